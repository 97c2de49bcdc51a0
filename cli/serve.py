"""`loraship serve`: a real local tritonserver for a model repository."""

from __future__ import annotations

import signal
from pathlib import Path

import click


@click.command(epilog="""\b
Example:
  loraship serve --repo work/repo
  LORASHIP_API_KEY=$(openssl rand -hex 24) loraship serve --repo work/repo --http-port 8000 --grpc-port 8001
  loraship serve --repo work/repo --openai-port 9000   # also http://127.0.0.1:9000/v1 for the openai SDK
""")
@click.option("--repo", required=True, type=click.Path(path_type=Path), help="Model repository from `loraship repo`.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless you say otherwise).")
@click.option("--http-port", type=int, help="HTTP port (default: a free one).")
@click.option("--grpc-port", type=int, help="gRPC port (default: a free one).")
@click.option("--metrics-port", type=int, help="Prometheus metrics port (default: a free one).")
@click.option("--api-key", envvar="LORASHIP_API_KEY", help="Require header x-api-key on inference and model control "
              "[env LORASHIP_API_KEY].")
@click.option("--model-control-mode", type=click.Choice(["none", "poll", "explicit"]), default="none",
              show_default=True, help="poll: new versions written by `loraship repo` load while the server runs.")
@click.option("--ready-timeout", default=300.0, show_default=True, help="Seconds to wait for the models to load.")
@click.option("--openai-port", type=int, help="Also serve the OpenAI-compatible API at http://HOST:PORT/v1 (and Triton's "
              "/v2 on the same port); the API key goes as Authorization: Bearer KEY.")
def serve(repo: Path, host: str, http_port: int | None, grpc_port: int | None, metrics_port: int | None,
          api_key: str | None, model_control_mode: str, ready_timeout: float, openai_port: int | None) -> None:
    """Start tritonserver (from the nvidia-pytriton wheel or PATH), wait until ready, serve until Ctrl-C."""
    from loraship.errors import LorashipError
    from loraship.triton_repo.server import TritonServer

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        raise LorashipError(f"--host {host} exposes the server beyond this machine without an API key",
                            "pass --api-key (or set LORASHIP_API_KEY)")
    server = TritonServer(repo, host=host, http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port,
                          api_key=api_key, model_control_mode=model_control_mode, ready_timeout=ready_timeout)
    click.echo(f"$ {server.masked_command()}", err=True)
    frontend = None
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        click.echo(f"HTTP    {server.http_url}  (POST /v2/models/<name>/generate, /generate_stream)")
        click.echo(f"gRPC    {server.grpc_url}")
        click.echo(f"metrics {server.metrics_url}")
        if openai_port:
            from loraship.triton_repo.frontend import OpenAIFrontend

            frontend = OpenAIFrontend(server.http_url, host=host, port=openai_port, api_key=api_key).start()
            click.echo(f"OpenAI  {frontend.url}  (GET /models, POST /chat/completions, /completions; Triton's /v2 too)")
        if api_key:
            click.echo("API key required: header x-api-key (gRPC metadata triton-grpc-protocol-x-api-key)"
                       + ("; OpenAI API: Authorization: Bearer KEY" if frontend else ""))
        click.echo(f"log     {server.log_path}" + (f"  (OpenAI: {frontend.log_path})" if frontend else "") + "\nCtrl-C to stop.")
        code = _wait(server, frontend)
        if code:
            raise LorashipError(f"tritonserver exited with code {code}:\n{server.log_tail()}", f"see {server.log_path}")
    except KeyboardInterrupt:
        click.echo("stopping tritonserver ...", err=True)
    finally:
        if frontend is not None:
            frontend.stop()
        left = server.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if left:
        click.echo(f"removed {left} shared-memory region(s) left by the python stubs", err=True)
    click.echo("stopped.", err=True)


def _wait(server, frontend) -> int:
    """Block until tritonserver exits (its exit code), or fail when the OpenAI frontend dies first."""
    import time

    from loraship.errors import LorashipError

    if frontend is None:
        return server.wait()
    while (code := server.process.poll()) is None:
        if frontend.process is None or frontend.process.poll() is not None:
            raise LorashipError("the OpenAI frontend exited while Triton kept running", f"see {frontend.log_path}")
        time.sleep(0.5)
    return code


def _interrupt(signum: int, frame: object) -> None:
    """Ctrl-C and SIGTERM stop the server (also when started with SIGINT ignored, e.g. by `&`)."""
    raise KeyboardInterrupt
