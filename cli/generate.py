"""`loraship generate`: stream a completion from a Triton endpoint to the terminal."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from loraship_contract import API_KEY_ENV


def endpoint_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--url, --protocol, --model, --api-key and --timeout, shared by generate, bench and ui."""
    for option in reversed([
        click.option("--url", help="Endpoint: http://HOST:PORT or https:// (HTTP); HOST:PORT without a scheme, or grpc:// or grpcs:// (gRPC). "
                                   "Default: http://127.0.0.1:8000, or 127.0.0.1:8001 with --protocol grpc."),
        click.option("--protocol", type=click.Choice(["http", "grpc"]),
                     help="Triton protocol, for a --url without a scheme or no --url [default: the URL's scheme; gRPC without one; http without --url]."),
        click.option("--model", help="Model name (default: the server's only ready model)."),
        click.option("--api-key", envvar=API_KEY_ENV, help="API key sent as header x-api-key [env LORASHIP_API_KEY]."),
        click.option("--timeout", default=60.0, show_default=True, help="Seconds to wait for the server."),
    ]):
        func = option(func)
    return func


def make_client(url: str | None, protocol: str | None, model: str | None, api_key: str | None, timeout: float) -> Any:
    """A `loraship.client.Client` from the shared options (the client applies the URL rule)."""
    from loraship.client import Client

    return Client(url, protocol=protocol, model=model, api_key=api_key, timeout=timeout)


def sampling_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--max-tokens, --temperature, --top-p, --top-k, --seed, --stop."""
    for option in reversed([
        click.option("--max-tokens", default=128, show_default=True, help="Most tokens to generate."),
        click.option("--temperature", default=0.0, show_default=True, help="0 is greedy."),
        click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass."),
        click.option("--top-k", default=0, show_default=True, help="Sample from the k likeliest tokens (0: all)."),
        click.option("--seed", type=int, help="Sampling seed, for repeatable samples."),
        click.option("--stop", multiple=True, help="Stop string (repeatable)."),
    ]):
        func = option(func)
    return func


def chat_prompt(client: Any, text: str, system: str | None = None, raw: bool = False) -> Any:
    """``text`` as one user message (after ``system``) when the model has a chat template, else the text as is."""
    from loraship.errors import LorashipError

    if raw or not client.chat_template:
        if system:
            raise LorashipError("--system needs a model with a chat template", "drop --system, or serve a model whose export has one")
        return text
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


@click.command(epilog="""\b
Example:
  loraship serve --repo work/repo --http-port 8000 --grpc-port 8001 &
  loraship generate --url http://127.0.0.1:8000 "Write a haiku about ships"
  loraship generate --url 127.0.0.1:8001 --max-tokens 32 --temperature 0.7 --seed 1 "Hello"   # no scheme: gRPC
  loraship generate --system "Answer in French." "What is LoRA?"
  loraship generate --raw "Once upon a time"      # complete the text, no chat template
""")
@endpoint_options
@sampling_options
@click.option("--raw", is_flag=True, help="Send PROMPT as is; by default it is a user message in the model's chat template, when it has one.")
@click.option("--system", help="A system message before PROMPT (chat template only).")
@click.option("--stats/--no-stats", default=True, show_default=True, help="Print TTFT, tokens and tokens/s to stderr after the reply.")
@click.argument("prompt")
def generate(url: str | None, protocol: str | None, model: str | None, api_key: str | None, timeout: float, max_tokens: int, temperature: float,
             top_p: float, top_k: int, seed: int | None, stop: tuple[str, ...], raw: bool, system: str | None, stats: bool, prompt: str) -> None:
    """Stream the model's reply to PROMPT to the terminal (as a chat when the model has a template)."""
    from loraship.client import SamplingOptions

    options = SamplingOptions(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=list(stop) or None)
    with make_client(url, protocol, model, api_key, timeout) as client:
        stream = client.stream(chat_prompt(client, prompt, system, raw), options)
        for chunk in stream:
            click.echo(chunk.text, nl=False)
        click.echo()
    done = stream.reply
    if stats and done is not None:
        click.secho(
            f"[{done.prompt_tokens} prompt + {done.completion_tokens} completion tokens, TTFT {done.ttft_s * 1000:.0f} ms, "
            f"{done.tokens_per_s:.1f} tokens/s, finish: {done.finish_reason}]",
            err=True, dim=True,
        )
