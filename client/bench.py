"""`loraship bench`: latency and throughput of a Triton generate endpoint under bounded concurrency.

Each concurrency level runs a fixed number of streamed requests (or runs for a fixed
time) from that many workers, each with its own connection, driven from one asyncio loop
(`loraship.client.loadgen`) and timed the way perf_analyzer times them.
Token counts are the server tokenizer's. Triton's ``/metrics`` is read
before and after each level, so the server's request count and queue/compute time
sit beside the client's figures, and the two request counts are checked to agree. The report and
its outputs are in `loraship.client.bench_report`.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from loraship.client import loadgen
from loraship.client.bench_report import BenchReport, summarize
from loraship.client.client import Client
from loraship.client.errors import EndpointError
from loraship.client.loadgen import RequestResult
from loraship.client.metrics import ServerDelta, scrape
from loraship.client.sampling import Prompt, SamplingOptions
from loraship.errors import LorashipError

_WORDS = (
    "the river carried small boats past old stone houses while children watched from a bridge and "
    "merchants counted coins under bright market awnings near the harbour where gulls circled slowly "
    "above fishing nets drying in warm afternoon light before evening bells rang across quiet streets"
).split()

DEFAULT_REQUESTS = 32  # per level, when neither --requests nor --duration is given


def per_level(requests: int | None, duration_s: float | None) -> tuple[int | None, float | None]:
    """What each level runs: ``requests`` requests or ``duration_s`` seconds (one of them), else `DEFAULT_REQUESTS`."""
    if requests is not None and duration_s is not None:
        raise LorashipError("--requests and --duration exclude each other", "pass one of them")
    return (DEFAULT_REQUESTS if requests is None and duration_s is None else requests), duration_s


def load_prompts(path: Path) -> list[str]:
    """Prompts from a JSONL file: one object per line with a ``prompt`` (or ``text_input``) string."""
    prompts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            prompt = item.get("prompt", item.get("text_input")) if isinstance(item, dict) else None
        except ValueError:
            prompt = None
        if not isinstance(prompt, str) or not prompt:
            raise LorashipError(f"{path}:{number} is not a JSON object with a non-empty \"prompt\" string", 'write one {"prompt": "..."} per line')
        prompts.append(prompt)
    if not prompts:
        raise LorashipError(f"{path} holds no prompts", 'write one {"prompt": "..."} per line')
    return prompts


def synthetic_prompts(client: Client, tokens: int, count: int = 8) -> list[str]:
    """``count`` distinct prompts of ``tokens`` tokens (or one fewer) by the server's own tokenizer.

    Each is the longest prefix of a shuffled word sequence whose ``prompt_tokens``, read
    back from ``max_tokens=1`` requests, stays within ``tokens`` (doubling, then bisection).
    """
    if tokens < 1:
        raise LorashipError(f"--prompt-tokens {tokens} must be at least 1", "pass a positive token count")

    def measure(text: str) -> int:
        return client.generate(text, max_tokens=1).prompt_tokens

    prompts = []
    for variant in range(count):
        words = list(_WORDS)
        random.Random(variant).shuffle(words)
        n_words = max(1, tokens // 2)
        while measure(text := " ".join(words[i % len(words)] for i in range(n_words))) <= tokens:
            n_words *= 2  # overshoots by at most about 2x, so stays within a context that fits 2x the prompt
        lo, hi = 1, len(text)  # measure(text[:hi]) > tokens
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if measure(text[:mid]) <= tokens else (lo, mid)
        prompts.append(text[:lo])
    return prompts


def run_level(
    client: Client,
    prompts: list[Prompt],
    concurrency: int,
    max_tokens: int,
    requests: int | None = None,
    duration_s: float | None = None,
    on_done: Any = None,
    ignore_eos: bool = False,
) -> tuple[list[RequestResult], float]:
    """Run one level: ``concurrency`` workers issue streamed requests until ``requests`` or ``duration_s``."""
    if (requests is None) == (duration_s is None):
        raise LorashipError("give exactly one of --requests and --duration", "e.g. --requests 64")
    options = SamplingOptions(max_tokens=max_tokens, ignore_eos=ignore_eos)
    return loadgen.run_level(client, prompts, concurrency, options, requests, duration_s, on_done)


def _settled_scrape(metrics_url: str, model: str, settle_s: float = 5.0) -> dict[str, float]:
    """Triton's counters once requests sent before this level (check, calibration, warm-up, the
    last level) are all recorded: Triton counts a decoupled request when it is released, a little
    after its client saw the final response, so take two equal readings 0.2 s apart."""
    deadline = time.monotonic() + settle_s
    last = scrape(metrics_url, model)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = scrape(metrics_url, model)
        if now == last:
            break
        last = now
    return last


def _server_delta(metrics_url: str, model: str, before: dict[str, float], expected: int, settle_s: float = 5.0) -> ServerDelta:
    """The server's view of a level; waits briefly for Triton to record the last releases."""
    deadline = time.monotonic() + settle_s
    while True:
        delta = ServerDelta.between(before, scrape(metrics_url, model))
        if delta.requests >= expected or time.monotonic() > deadline:
            return delta
        time.sleep(0.1)


def run_bench(
    client: Client,
    concurrency: list[int],
    max_tokens: int = 64,
    requests: int | None = None,
    duration_s: float | None = None,
    prompt_tokens: int = 128,
    prompts: list[str] | None = None,
    warmup: int = 2,
    metrics_url: str | None = None,
    console: Any = None,
    chat: bool = False,
    ignore_eos: bool = True,
) -> BenchReport:
    """Benchmark ``client``'s endpoint at each concurrency level (rich progress on ``console``).

    ``chat`` sends each prompt as one user message, rendered with the model's chat template by the server.
    ``ignore_eos`` (the default) makes every reply exactly ``max_tokens`` long, so trained models
    that stop early are measured over the same output length as any other.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if not concurrency or min(concurrency) < 1:
        raise LorashipError("--concurrency needs positive integers", "e.g. --concurrency 1,2,4,8")
    if max_tokens < 1:
        raise LorashipError(f"--max-tokens {max_tokens} must be at least 1", "pass a positive number")
    client.check()
    if metrics_url:  # a wrong --metrics-url fails now, not after the calibration and warm-up
        scrape(metrics_url, client.model)
    if chat and not client.chat_template:  # before the calibration requests of synthetic prompts
        raise LorashipError(f"model {client.model!r} has no chat template", "drop --chat to bench raw prompts")
    source = "file" if prompts else "synthetic"
    prompts = prompts or synthetic_prompts(client, prompt_tokens)
    if chat:
        prompts = [[{"role": "user", "content": p}] for p in prompts]
    if warmup:  # through the same path as the levels, so its first-use costs fall here
        warm, _ = run_level(client, prompts, 1, max_tokens, requests=warmup, ignore_eos=ignore_eos)
        if failed := [r.error for r in warm if not r.ok]:
            raise EndpointError(f"warm-up request failed: {failed[0]}", "run `loraship generate` against the endpoint to see why")
    config = {
        "url": client.url, "protocol": client.protocol, "model": client.model, "max_tokens": max_tokens,
        "requests_per_level": requests, "duration_s_per_level": duration_s, "prompts": source,
        "prompt_count": len(prompts), "target_prompt_tokens": prompt_tokens if source == "synthetic" else None,
        "warmup_requests": warmup, "metrics_url": metrics_url, "sampling": "greedy (temperature 0)", "chat": chat,
        "ignore_eos": ignore_eos,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    levels = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False, refresh_per_second=4) as progress:
        for level in concurrency:
            total = requests if requests is not None else None
            task = progress.add_task(f"concurrency {level}", total=total)
            before = _settled_scrape(metrics_url, client.model) if metrics_url else None
            results, wall = run_level(client, prompts, level, max_tokens, requests, duration_s,
                                      on_done=lambda _r, t=task: progress.advance(t), ignore_eos=ignore_eos)
            progress.update(task, total=len(results), completed=len(results))
            result = summarize(level, results, wall)
            if before is not None:
                delta = _server_delta(metrics_url, client.model, before, result.requests)
                result.server = asdict(delta)
                result.counts_agree = delta.requests == result.requests
            levels.append(result)
    return BenchReport(config, levels)


