"""What `loraship serve` and `loraship ship --target local` run: tritonserver behind loraship's frontend, supervised.

The port layout is the container's: the frontend (``runtime/openai_frontend``) is the public HTTP port
(``--http-port``, and ``--openai-port`` too when given), serving Triton's ``/v2`` and the OpenAI ``/v1``;
Triton's own HTTP binds 127.0.0.1 on a private free port; gRPC and metrics are Triton's own ports on
``--host``. The supervisor (``runtime/supervisor.py``, the container's too) restarts tritonserver when one of
its python stubs dies or it exits, and `serve` says one line each time.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from loraship_contract import API_KEY_ENV, API_KEY_HEADER, GRPC_API_KEY_HEADER

from loraship.endpoint import sample_curl
from loraship.errors import LorashipError
from loraship.triton_repo.frontend import OpenAIFrontend
from loraship.triton_repo.layout import model_names
from loraship.triton_repo.localhost import client_host, free_port, port_in_use
from loraship.triton_repo.runtime.supervisor import FrontendExited, GaveUp, Supervisor, interrupt, to_stderr
from loraship.triton_repo.server import READY_TIMEOUT_S, TritonServer

LOOPBACK = ("127.0.0.1", "localhost", "::1")
PRIVATE_HOST = "127.0.0.1"  # Triton's own HTTP, reached only through the frontend


@dataclass(frozen=True)
class ServeOptions:
    """How `loraship serve` and `loraship ship --target local` serve: one field per command-line option."""

    host: str = "127.0.0.1"
    http_port: int | None = None  # the frontend: Triton's /v2 and the OpenAI /v1
    grpc_port: int | None = None
    metrics_port: int | None = None
    api_key: str | None = None
    model_control_mode: str = "none"
    ready_timeout: float = READY_TIMEOUT_S
    openai_port: int | None = None  # the frontend also listens here
    max_restarts: int = 5  # within RESTART_WINDOW_S; then serve fails

    def __post_init__(self) -> None:
        if self.host not in LOOPBACK and not self.api_key:
            raise LorashipError(f"--host {self.host} exposes the server beyond this machine without an API key",
                                "pass --api-key (or set LORASHIP_API_KEY)")
        if self.max_restarts < 0:
            raise LorashipError(f"--max-restarts {self.max_restarts} is negative", "pass 0 to never restart, or more")

    def check_ports(self) -> None:
        """Refuse a port given twice or one that something already listens on, before anything starts."""
        given = {name: port for name, port in (("--http-port", self.http_port), ("--openai-port", self.openai_port),
                                                ("--grpc-port", self.grpc_port), ("--metrics-port", self.metrics_port)) if port}
        seen: dict[int, str] = {}
        for name, port in given.items():
            if port in seen and {name, seen[port]} != {"--http-port", "--openai-port"}:
                raise LorashipError(f"{seen[port]} and {name} are both {port}", "give each its own port")
            seen.setdefault(port, name)
            if port_in_use(self.host, port):
                raise LorashipError(f"{name} {port} is already in use on {self.host}",
                                    "stop what listens there, or pick another port; without the option a free one is used")

    def server(self, repo: str | Path) -> "LocalEndpoint":
        """A (not yet started) endpoint for ``repo``."""
        return LocalEndpoint(repo, self)


RESTART_WINDOW_S = 600.0


class LocalEndpoint:
    """tritonserver and the frontend(s) in front of it; ``start``, ``supervise`` until Ctrl-C, ``stop``."""

    def __init__(self, repo: str | Path, options: ServeOptions) -> None:
        self.options = options
        self.triton = TritonServer(repo, host=options.host, http_host=PRIVATE_HOST, grpc_port=options.grpc_port,
                                   metrics_port=options.metrics_port, api_key=options.api_key,
                                   model_control_mode=options.model_control_mode, ready_timeout=options.ready_timeout)
        self.http_port = options.http_port or free_port(options.host)
        self.ports = [self.http_port] + ([options.openai_port] if options.openai_port not in (None, self.http_port) else [])
        self.frontends: list[OpenAIFrontend] = []

    @property
    def repo(self) -> Path:
        return self.triton.repo

    @property
    def api_key(self) -> str | None:
        return self.options.api_key

    @property
    def http_url(self) -> str:
        """The public HTTP endpoint (the frontend): Triton's /v2 and the OpenAI API under /v1."""
        return f"http://{client_host(self.options.host)}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return self.triton.grpc_url

    @property
    def metrics_url(self) -> str:
        return self.triton.metrics_url

    @property
    def openai_url(self) -> str:
        """The OpenAI base URL (``--openai-port``'s when given)."""
        return f"http://{client_host(self.options.host)}:{self.ports[-1]}/v1"

    def start(self) -> "LocalEndpoint":
        """Start tritonserver, then the frontend on each public port; each waits until it is ready."""
        self.triton.start()
        for port in self.ports:
            self.frontends.append(OpenAIFrontend(self.triton.http_url, host=self.options.host, port=port,
                                                 api_key=self.api_key, repository=self.repo).start())
        return self

    def supervise(self, note: Callable[[str], None]) -> None:
        """Restart tritonserver whenever a python stub dies or it exits (``note`` says one line each time),
        until Ctrl-C; a frontend that exits, or too many restarts, is a one-line LorashipError."""
        supervisor = Supervisor(self.triton, self.frontends, say=note, max_restarts=self.options.max_restarts,
                                window_s=RESTART_WINDOW_S)
        try:
            supervisor.run()
        except GaveUp as exc:
            raise LorashipError(str(exc), f"full log: {self.triton.log_path}") from None
        except FrontendExited as exc:
            raise LorashipError(f"{exc} (port {exc.child.port})", f"see {exc.child.log_path}") from None

    def stop(self) -> int:
        """Stop the frontends, then tritonserver; how many shared-memory regions its stubs had left."""
        frontends, self.frontends = self.frontends, []
        for frontend in frontends:
            frontend.stop()
        return self.triton.stop()


def serve_foreground(endpoint: LocalEndpoint, say: Callable[[str], None] = print, note: Callable[[str], None] = to_stderr,
                     on_ready: Callable[[LocalEndpoint], None] | None = None, debug: bool = False) -> None:
    """Check the ports, start ``endpoint``, print the endpoints and a sample `curl`, run ``on_ready``, then
    serve under supervision until Ctrl-C or SIGTERM; always stop everything, the python stubs and their
    shared memory. ``say`` prints to stdout, ``note`` to stderr (recoveries too)."""
    endpoint.options.check_ports()
    triton = endpoint.triton
    if debug:
        note(f"$ {triton.masked_command()}")
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        endpoint.start()
        say(f"HTTP    {endpoint.http_url}  (Triton's /v2: POST /v2/models/<name>/generate, /generate_stream; "
            "the OpenAI API under /v1)")
        say(f"gRPC    {endpoint.grpc_url}")
        say(f"metrics {endpoint.metrics_url}")
        for line in triton.loaded_models():
            say(f"model   {line}")
        say(f"OpenAI  {endpoint.openai_url}  (GET /models, POST /chat/completions, /completions)")
        if endpoint.api_key:
            say(f"API key required: header {API_KEY_HEADER} (gRPC metadata {GRPC_API_KEY_HEADER}), here ${API_KEY_ENV}; "
                "OpenAI API: Authorization: Bearer KEY")
        say(f"log     {triton.log_path}  (frontend: {', '.join(str(f.log_path) for f in endpoint.frontends)})")
        for name in model_names(endpoint.repo):
            say(f"try     {sample_curl(endpoint.http_url, name, API_KEY_HEADER if endpoint.api_key else None)}")
        if on_ready is not None:
            on_ready(endpoint)
        say("Ctrl-C to stop.")
        endpoint.supervise(note)
    except KeyboardInterrupt:
        note("stopping tritonserver ...")
    finally:
        left = endpoint.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if left:
        note(f"removed {left} shared-memory region(s) left by the python stubs")
    note("stopped.")

