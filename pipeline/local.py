"""Target ``local``: serve WORK/repo in the foreground exactly as `loraship serve` does (triton_repo.serve's
``serve_foreground``), with a first request streamed through the client once it is ready (a multi-adapter
endpoint: a first chat to each adapter by name through the OpenAI API, and a `curl` of each)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraship.errors import LorashipError
from loraship.pipeline.runner import Pipeline

if TYPE_CHECKING:
    from pathlib import Path

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


@dataclass(frozen=True)
class ChatReply:
    """A chat completion as the OpenAI API returned it."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float


def chat(openai_url: str, model: str, messages: list[dict[str, str]], max_tokens: int = 32,
         api_key: str | None = None, timeout: float = 120.0) -> ChatReply:
    """One chat completion from ``openai_url`` (``.../v1``) on ``model`` (an adapter's name, or the base's),
    greedy; an error status is a one-line LorashipError with the server's message."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.perf_counter()
    try:
        response = httpx.post(f"{openai_url}/chat/completions", headers=headers, timeout=timeout,
                              json={"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0})
    except httpx.HTTPError as exc:
        raise LorashipError(f"chat request to {openai_url} failed: {exc}", "check that the endpoint is up") from None
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise LorashipError(f"{openai_url} answered {response.status_code} for model {model!r}: {message}",
                            "check the model name against GET /v1/models")
    body = response.json()
    usage = body.get("usage") or {}
    return ChatReply(body["choices"][0]["message"]["content"] or "", int(usage.get("prompt_tokens", 0)),
                     int(usage.get("completion_tokens", 0)), time.perf_counter() - start)


def first_questions(converted: dict[str, Path]) -> dict[str, list[dict[str, str]]]:
    """Each adapter's first request: the first question of its eval set (``eval.jsonl``), else a hello."""
    from loraship.export.evalset import EVAL_FILE, read_eval

    asked = {}
    for name, folder in converted.items():
        cases = read_eval(folder / EVAL_FILE) if (folder / EVAL_FILE).is_file() else []
        asked[name] = list(cases[0].messages) if cases else [{"role": "user", "content": SMOKE_PROMPT}]
    return asked


def ask_adapters(server: LocalEndpoint, questions: dict[str, list[dict[str, str]]], out: Console,
                 p: Pipeline | None = None, max_tokens: int = 32) -> dict[str, ChatReply]:
    """Ask each adapter its question by name (the OpenAI ``model``), printing each reply (and a summary row
    in ``p``); name -> reply."""
    from rich.markup import escape

    replies = {}
    for name, messages in questions.items():
        done = chat(server.openai_url, name, messages, max_tokens, server.api_key)
        out.print(f"[dim]model:[/] [bold]{escape(name)}[/]  [dim]question:[/] {escape(messages[-1]['content'])}\n"
                  f"[dim]reply:[/]  {escape(done.text)}", highlight=False)
        if p is not None:
            p.note(f"first request {name}", f"{done.completion_tokens} tokens by model {name!r}", done.seconds)
        replies[name] = done
    return replies


def serve_local(p: Pipeline, model: str, serve: ServeOptions, out: Console, debug: bool = False,
                title: str = "loraship ship", adapters: dict[str, list[dict[str, str]]] | None = None) -> None:
    """Serve WORK/repo in the foreground like `loraship serve`: endpoints, a sample curl, a first reply and
    the summary, then until Ctrl-C. ``out`` is the console for results (stdout). ``adapters`` (name -> the
    chat to ask it): a multi-adapter endpoint, each adapter asked first by name, with a `curl` for each."""
    from loraship.endpoint import sample_chat_curl, sample_curls
    from loraship.triton_repo.serve import serve_foreground

    server = serve.server(p.path("repo"))
    question = first_question(p.path("onnx"))
    start = time.perf_counter()

    def ready(server: LocalEndpoint) -> None:
        p.note("serve", f"{server.http_url} (HTTP), {server.grpc_url} (gRPC)", time.perf_counter() - start)
        if adapters:
            ask_adapters(server, adapters, out, p)
            out.print(f"One endpoint, {len(adapters)} adapters: the OpenAI [bold]model[/] picks one "
                      f"(or {model} for the base, no adapter):", highlight=False)
            for name in [*adapters, model]:
                content = adapters[name][-1]["content"] if name in adapters else SMOKE_PROMPT
                out.print(f"try     {sample_chat_curl(server.http_url, name, content, server.api_key)}",
                          markup=False, highlight=False, soft_wrap=True)
        else:
            done = ask(server.grpc_url, "grpc", model, question, FIRST_MAX_TOKENS, out, api_key=serve.api_key)
            p.note("first request", f"{done.completion_tokens} tokens, the first after {done.ttft_s * 1000:.0f} ms", done.total_s)
        out.print(p.summary(title))

    serve_foreground(server, lambda line: out.print(line, markup=False, highlight=False, soft_wrap=True),
                     lambda line: p.console.print(line, markup=False, highlight=False, soft_wrap=True), on_ready=ready, debug=debug,
                     samples=sample_curls(server.http_url, model, question, serve.api_key, FIRST_MAX_TOKENS))
