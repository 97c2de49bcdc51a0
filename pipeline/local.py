"""Target ``local``: serve WORK/repo in the foreground exactly as `loraship serve` does (triton_repo.serve's
``serve_foreground``), with a first request streamed through the client once it is ready."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from loraship.pipeline.runner import Pipeline

if TYPE_CHECKING:
    from rich.console import Console

    from loraship.client.client import Client, Prompt, Reply
    from loraship.triton_repo.serve import LocalEndpoint, ServeOptions

SMOKE_PROMPT = "Hello"


def stream_reply(client: Client, prompt: Prompt, max_tokens: int, console: Console) -> Reply:
    """Stream one reply (to text or a chat), printing it as it arrives; its Reply."""
    stream = client.stream(prompt, max_tokens=max_tokens)
    for chunk in stream:
        console.print(chunk.text, end="", markup=False, highlight=False, soft_wrap=True)
    return stream.reply


def ask(url: str, protocol: str, model: str, prompt: str, max_tokens: int, console: Console,
        api_key: str | None = None) -> Reply:
    """Stream one reply from the served model, printing it as it arrives; its Reply."""
    from loraship.client.client import Client

    console.print(f"[dim]prompt:[/] {prompt}\n[dim]reply:[/]  ", end="")
    with Client(url, protocol=protocol, model=model, api_key=api_key) as client:
        done = stream_reply(client, prompt, max_tokens, console)
    console.print()
    return done


def serve_local(p: Pipeline, model: str, serve: ServeOptions, out: Console, debug: bool = False,
                title: str = "loraship ship") -> None:
    """Serve WORK/repo in the foreground like `loraship serve`: endpoints, a sample curl, a first reply and
    the summary, then until Ctrl-C. ``out`` is the console for results (stdout)."""
    from loraship.triton_repo.serve import serve_foreground

    server = serve.server(p.path("repo"))
    start = time.perf_counter()

    def ready(server: LocalEndpoint) -> None:
        p.note("serve", f"{server.http_url} (HTTP), {server.grpc_url} (gRPC)", time.perf_counter() - start)
        done = ask(server.grpc_url, "grpc", model, SMOKE_PROMPT, 16, out, api_key=serve.api_key)
        p.note("first request", f"{done.completion_tokens} tokens, the first after {done.ttft_s * 1000:.0f} ms", done.total_s)
        out.print(p.summary(title))

    serve_foreground(server, lambda line: out.print(line, markup=False, highlight=False, soft_wrap=True),
                     lambda line: p.console.print(line, markup=False, highlight=False, soft_wrap=True), on_ready=ready, debug=debug)
