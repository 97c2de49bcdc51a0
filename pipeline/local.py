"""Target ``local``: serve WORK/repo in the foreground exactly as `loraship serve` does (triton_repo.serve's
``serve_foreground``), with a first request streamed through the client once it is ready."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from loraship.pipeline.runner import Pipeline

if TYPE_CHECKING:
    from rich.console import Console

    from loraship.client.client import Client, Prompt, Reply
    from loraship.triton_repo.serve import LocalEndpoint, ServeOptions

SMOKE_PROMPT = "Hello"
FIRST_MAX_TOKENS = 32


def first_question(onnx: Path) -> str | list[dict[str, str]]:
    """What ship asks first, and its sample commands too: the first held-out question of the export's eval
    set (the demo fine-tune's, or any adapter's ``eval.jsonl``) as a chat; else "Hello" as a chat, or as text
    for a model without a chat template."""
    from loraship.engine.chat import ChatTemplate
    from loraship.export.evalset import EVAL_FILE, read_eval

    if (onnx / EVAL_FILE).is_file() and (cases := read_eval(onnx / EVAL_FILE)):
        return list(cases[0].messages)
    return [{"role": "user", "content": SMOKE_PROMPT}] if ChatTemplate.load(onnx) is not None else SMOKE_PROMPT


def stream_reply(client: Client, prompt: Prompt, max_tokens: int, console: Console) -> Reply:
    """Stream one reply (to text or a chat), printing it as it arrives; its Reply."""
    stream = client.stream(prompt, max_tokens=max_tokens)
    for chunk in stream:
        console.print(chunk.text, end="", markup=False, highlight=False, soft_wrap=True)
    return stream.reply


def ask(url: str, protocol: str, model: str, prompt: Prompt, max_tokens: int, console: Console,
        api_key: str | None = None) -> Reply:
    """Stream one reply to text or a chat from the served model (greedy: the model's default), printing it as it
    arrives; its Reply."""
    from rich.markup import escape

    from loraship.client.client import Client

    shown = prompt if isinstance(prompt, str) else prompt[-1]["content"]
    console.print(f"[dim]prompt:[/] {escape(shown)}\n[dim]reply:[/]  ", end="")
    with Client(url, protocol=protocol, model=model, api_key=api_key) as client:
        done = stream_reply(client, prompt, max_tokens, console)
    console.print()
    return done


def serve_local(p: Pipeline, model: str, serve: ServeOptions, out: Console, debug: bool = False,
                title: str = "loraship ship") -> None:
    """Serve WORK/repo in the foreground like `loraship serve`: endpoints, a sample curl, a first reply and
    the summary, then until Ctrl-C. ``out`` is the console for results (stdout)."""
    from loraship.triton_repo.serve import serve_foreground

    from loraship.endpoint import sample_curls

    server = serve.server(p.path("repo"))
    question = first_question(p.path("onnx"))
    start = time.perf_counter()

    def ready(server: LocalEndpoint) -> None:
        p.note("serve", f"{server.http_url} (HTTP), {server.grpc_url} (gRPC)", time.perf_counter() - start)
        done = ask(server.grpc_url, "grpc", model, question, FIRST_MAX_TOKENS, out, api_key=serve.api_key)
        p.note("first request", f"{done.completion_tokens} tokens, the first after {done.ttft_s * 1000:.0f} ms", done.total_s)
        out.print(p.summary(title))

    serve_foreground(server, lambda line: out.print(line, markup=False, highlight=False, soft_wrap=True),
                     lambda line: p.console.print(line, markup=False, highlight=False, soft_wrap=True), on_ready=ready, debug=debug,
                     samples=sample_curls(server.http_url, model, question, serve.api_key, FIRST_MAX_TOKENS))
