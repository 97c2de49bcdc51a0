"""`loraship bench`: latency and throughput of a Triton generate endpoint under bounded concurrency.

Each concurrency level runs a fixed number of streamed requests (or runs for a fixed
time) from that many workers, each with its own connection, driven from one asyncio loop
(`loraship.client.loadgen`) and timed the way perf_analyzer times them.
Token counts are the server tokenizer's. Triton's ``/metrics`` is read
before and after each level, so the server's request count and queue/compute time
sit beside the client's figures, and the two request counts are checked to agree.
"""

from __future__ import annotations

import csv
import io
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loraship.client import loadgen
from loraship.client.client import Client, EndpointError, Prompt
from loraship.client.loadgen import RequestResult
from loraship.client.metrics import ServerDelta, scrape
from loraship.errors import LorashipError
from loraship.fsutil import atomic_dir

_WORDS = (
    "the river carried small boats past old stone houses while children watched from a bridge and "
    "merchants counted coins under bright market awnings near the harbour where gulls circled slowly "
    "above fishing nets drying in warm afternoon light before evening bells rang across quiet streets"
).split()


@dataclass
class LevelResult:
    """Figures for one concurrency level; latencies in milliseconds."""

    concurrency: int
    requests: int
    errors: int
    duration_s: float
    ttft_ms: dict[str, float]
    itl_ms: dict[str, float]
    e2e_ms: dict[str, float]
    output_tokens_per_s: float
    requests_per_s: float
    prompt_tokens_mean: float
    completion_tokens_mean: float
    error_samples: list[str] = field(default_factory=list)
    server: dict[str, Any] | None = None  # ServerDelta as a dict, when /metrics was read
    counts_agree: bool | None = None


@dataclass
class BenchReport:
    """Everything `loraship bench` writes."""

    config: dict[str, Any]
    levels: list[LevelResult]

    @property
    def counts_agree(self) -> bool:
        return all(level.counts_agree is not False for level in self.levels)

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "levels": [asdict(level) for level in self.levels]}


def stats(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/mean of ``values`` (seconds) in milliseconds; zeros when empty."""
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    ms = np.asarray(values) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(ms.mean())}


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
    params = {"max_tokens": max_tokens, "ignore_eos": ignore_eos}
    return loadgen.run_level(client, prompts, concurrency, params, requests, duration_s, on_done)


def summarize(concurrency: int, results: list[RequestResult], wall_s: float) -> LevelResult:
    """Client-side figures for one level."""
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    return LevelResult(
        concurrency=concurrency,
        requests=len(results),
        errors=len(results) - len(ok),
        duration_s=wall_s,
        ttft_ms=stats([r.ttft_s for r in ok]),
        itl_ms=stats([r.itl_s for r in ok if r.itl_s is not None]),
        e2e_ms=stats([r.total_s for r in ok]),
        output_tokens_per_s=tokens / wall_s if wall_s > 0 else 0.0,
        requests_per_s=len(ok) / wall_s if wall_s > 0 else 0.0,
        prompt_tokens_mean=float(np.mean([r.prompt_tokens for r in ok])) if ok else 0.0,
        completion_tokens_mean=float(np.mean([r.completion_tokens for r in ok])) if ok else 0.0,
        error_samples=sorted({r.error for r in results if r.error})[:3],
    )


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


def render_table(report: BenchReport) -> Any:
    """A rich Table of the report."""
    from rich.table import Table

    table = Table(title=f"loraship bench: {report.config['model']} over {report.config['protocol']} at {report.config['url']} (max_tokens {report.config['max_tokens']})")
    columns = ["conc", "reqs", "err", "TTFT p50/p90/p99 ms", "ITL p50/p99 ms", "E2E p50/p90/p99 ms", "out tok/s", "req/s", "prompt/out tok", "server reqs", "queue ms", "compute ms"]
    for name in columns:
        table.add_column(name, justify="right")
    for lv in report.levels:
        server = lv.server or {}
        agree = "" if lv.counts_agree is None else (" ✓" if lv.counts_agree else " ✗ MISMATCH")
        table.add_row(
            str(lv.concurrency), str(lv.requests), str(lv.errors),
            "/".join(f"{lv.ttft_ms[k]:.1f}" for k in ("p50", "p90", "p99")),
            "/".join(f"{lv.itl_ms[k]:.2f}" for k in ("p50", "p99")),
            "/".join(f"{lv.e2e_ms[k]:.1f}" for k in ("p50", "p90", "p99")),
            f"{lv.output_tokens_per_s:.1f}", f"{lv.requests_per_s:.2f}",
            f"{lv.prompt_tokens_mean:.0f}/{lv.completion_tokens_mean:.0f}",
            (str(server["requests"]) + agree) if server else "n/a",
            f"{server['queue_ms_mean']:.1f}" if server else "n/a",
            f"{server['compute_ms_mean']:.1f}" if server else "n/a",
        )
    return table


CSV_FIELDS = [
    "concurrency", "requests", "errors", "duration_s",
    *(f"{m}_{s}" for m in ("ttft_ms", "itl_ms", "e2e_ms") for s in ("p50", "p90", "p99", "mean")),
    "output_tokens_per_s", "requests_per_s", "prompt_tokens_mean", "completion_tokens_mean",
    "server_requests", "server_failures", "server_queue_ms_mean", "server_compute_ms_mean", "server_request_ms_mean", "counts_agree",
]


def to_csv(report: BenchReport) -> str:
    """One row per concurrency level."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for lv in report.levels:
        row: dict[str, Any] = {k: getattr(lv, k) for k in ("concurrency", "requests", "errors", "duration_s", "output_tokens_per_s", "requests_per_s", "prompt_tokens_mean", "completion_tokens_mean", "counts_agree")}
        for metric in ("ttft_ms", "itl_ms", "e2e_ms"):
            row.update({f"{metric}_{s}": v for s, v in getattr(lv, metric).items()})
        for key, value in (lv.server or {}).items():
            row[f"server_{key}"] = value
        writer.writerow(row)
    return buf.getvalue()


def figure(report: BenchReport) -> Any:
    """bench.png's matplotlib Figure: latency percentiles, inter-token latency, output tokens/s and
    requests/s against concurrency, each throughput in its own panel (with every reply ``max_tokens``
    long, one is the other times a constant, so on twin axes the two lines fall exactly on each other)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    conc = [lv.concurrency for lv in report.levels]
    fig = Figure(figsize=(11, 8), layout="constrained")
    (ax_lat, ax_itl), (ax_tok, ax_req) = fig.subplots(2, 2, sharex=True)
    percentiles = (("p50", "-o"), ("p90", "--s"), ("p99", ":^"))
    for metric, label, color in (("ttft_ms", "TTFT", "tab:blue"), ("e2e_ms", "end-to-end", "tab:orange")):
        for stat, style in percentiles:
            ax_lat.plot(conc, [getattr(lv, metric)[stat] for lv in report.levels], style, color=color, label=f"{label} {stat}")
    for stat, style in percentiles:
        ax_itl.plot(conc, [lv.itl_ms[stat] for lv in report.levels], style, color="tab:red", label=f"ITL {stat}")
    ax_tok.plot(conc, [lv.output_tokens_per_s for lv in report.levels], "-o", color="tab:green", label="output tokens/s")
    ax_req.plot(conc, [lv.requests_per_s for lv in report.levels], "--s", color="tab:purple", label="requests/s")
    panels = ((ax_lat, "Latency", "ms"), (ax_itl, "Inter-token latency", "ms"),
              (ax_tok, "Output tokens per second", "tokens/s"), (ax_req, "Requests per second", "requests/s"))
    for ax, title, ylabel in panels:
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        ax.set_xticks(conc)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in (ax_tok, ax_req):
        ax.set_xlabel("concurrency")
    fig.suptitle(f"{report.config['model']} over {report.config['protocol']}, max_tokens {report.config['max_tokens']}")
    return fig


def plot(report: BenchReport, path: Path) -> None:
    """Write bench.png (`figure`)."""
    figure(report).savefig(path, dpi=110)


def write_outputs(report: BenchReport, out: Path, force: bool = False) -> Path:
    """bench.json, bench.csv and bench.png in ``out``, written to a temp dir and renamed into place."""
    with atomic_dir(Path(out), force=force) as tmp:
        (tmp / "bench.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
        (tmp / "bench.csv").write_text(to_csv(report))
        plot(report, tmp / "bench.png")
    return Path(out)
