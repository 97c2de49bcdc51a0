"""What `loraship bench` measured, what it means and how it is shown and kept: per-level figures
(`LevelResult`), the report and its `verdict`, its table, bench.json, bench.csv and bench.png."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loraship.client.loadgen import RequestResult
from loraship.errors import LorashipError
from loraship.fsutil import atomic_dir


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


@dataclass(frozen=True)
class Verdict:
    """What a finished run means: ``notes`` to print (rich markup), and ``error`` when it must not pass."""

    notes: list[str]
    error: LorashipError | None


def verdict(report: BenchReport) -> Verdict:
    """Failed requests are noted; a run without /metrics is told it skipped the server's figures; client and
    server request counts that disagree (another client on the model), or a run where every request
    failed, is an error."""
    notes = []
    errors = sum(level.errors for level in report.levels)
    if errors:
        samples = report.levels[-1].error_samples or [lv.error_samples for lv in report.levels]
        notes.append(f"[bold red]{errors} request(s) failed[/], e.g. {samples}")
    error = None
    if report.config.get("metrics_url") is None:
        notes.append("[yellow]server-side figures skipped: pass --metrics-url to check them against Triton's /metrics[/]")
    elif not report.counts_agree:
        error = LorashipError(
            "client and Triton request counts disagree: " + ", ".join(
                f"conc {lv.concurrency}: client {lv.requests} vs server {(lv.server or {}).get('requests')}"
                for lv in report.levels if lv.counts_agree is False),
            "is another client using the model? Benchmark an otherwise idle endpoint")
    if error is None and errors == sum(level.requests for level in report.levels):
        error = LorashipError("every request failed", "run `loraship generate` against the endpoint to see why")
    return Verdict(notes, error)


def stats(values: list[float]) -> dict[str, float]:
    """p50/p90/p99/mean of ``values`` (seconds) in milliseconds; zeros when empty."""
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    ms = np.asarray(values) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": float(ms.mean())}


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
