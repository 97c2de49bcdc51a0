"""`loraship serve`: a real local tritonserver for a model repository."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
from loraship_contract import API_KEY_ENV

from loraship.triton_repo.server import READY_TIMEOUT_S

# The options of a local server, shared with `loraship ship --target local`; each becomes a field of
# ServeOptions (triton_repo/serve.py) of the same name.
SERVE_OPTIONS = (
    click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback unless you say otherwise)."),
    click.option("--http-port", type=int, help="HTTP port: Triton's /v2 and the OpenAI API under /v1, through loraship's "
                 "frontend (default: a free one)."),
    click.option("--grpc-port", type=int, help="gRPC port (default: a free one)."),
    click.option("--metrics-port", type=int, help="Prometheus metrics port (default: a free one)."),
    click.option("--api-key", envvar=API_KEY_ENV, help="Require header x-api-key on inference and model control "
                 "[env LORASHIP_API_KEY]."),
    click.option("--model-control-mode", type=click.Choice(["none", "poll", "explicit"]), default="none",
                 show_default=True, help="poll: new versions written by `loraship repo` load while the server runs."),
    click.option("--ready-timeout", default=READY_TIMEOUT_S, show_default=True, help="Seconds to wait for the models to load."),
    click.option("--openai-port", type=int, help="Also serve the frontend (the OpenAI API at http://HOST:PORT/v1, Triton's "
                 "/v2) on this port; the API key goes as Authorization: Bearer KEY."),
    click.option("--max-restarts", default=5, show_default=True, help="Restarts of tritonserver allowed within 10 minutes "
                 "when a model's python stub dies or the server exits; one more and serve fails (0: never restart)."),
)


def serve_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add SERVE_OPTIONS to a command."""
    for option in reversed(SERVE_OPTIONS):
        fn = option(fn)
    return fn


def serve_options_from(kwargs: dict[str, Any]) -> Any:
    """Pop SERVE_OPTIONS' values from a command's ``kwargs`` into a ServeOptions."""
    from dataclasses import fields

    from loraship.triton_repo.serve import ServeOptions

    return ServeOptions(**{f.name: kwargs.pop(f.name) for f in fields(ServeOptions)})


def echo_err(line: str) -> None:
    click.echo(line, err=True)


@click.command(epilog="""\b
Example:
  loraship serve --repo work/repo
  LORASHIP_API_KEY=$(openssl rand -hex 24) loraship serve --repo work/repo --http-port 8000 --grpc-port 8001
  loraship serve --repo work/repo --http-port 8000     # the openai SDK: base_url http://127.0.0.1:8000/v1
""")
@click.option("--repo", required=True, type=click.Path(path_type=Path), help="Model repository from `loraship repo`.")
@serve_options
@click.pass_context
def serve(ctx: click.Context, repo: Path, **options: Any) -> None:
    """Start tritonserver (from the nvidia-pytriton wheel or PATH) behind loraship's frontend, wait until ready,
    serve until Ctrl-C; a model whose python stub dies, or a server that exits, is restarted (one line says so)."""
    from loraship.triton_repo.serve import serve_foreground

    opts = serve_options_from(options)
    serve_foreground(opts.server(repo), click.echo, echo_err, debug=(ctx.obj or {}).get("debug", False))
