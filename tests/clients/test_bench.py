"""`loraship bench` against a real tritonserver, its figures checked against Triton's /metrics."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import pytest

from loraship.client.bench import run_bench
from loraship.client.bench_report import CSV_FIELDS
from loraship.client.metrics import scrape

MAX_TOKENS = 8
REQUESTS = 8


def _sane_level(level: dict, concurrency: int) -> None:
    assert level["concurrency"] == concurrency and level["requests"] == REQUESTS and level["errors"] == 0
    for metric in ("ttft_ms", "itl_ms", "e2e_ms"):
        s = level[metric]
        assert 0 < s["p50"] <= s["p90"] <= s["p99"] and s["mean"] > 0, (metric, s)
    assert level["ttft_ms"]["p50"] < level["e2e_ms"]["p50"]
    assert level["itl_ms"]["p50"] < level["e2e_ms"]["p50"]
    assert 1 <= level["completion_tokens_mean"] <= MAX_TOKENS
    tokens = level["completion_tokens_mean"] * REQUESTS
    assert abs(level["output_tokens_per_s"] - tokens / level["duration_s"]) < 1e-6 * tokens
    assert abs(level["requests_per_s"] - REQUESTS / level["duration_s"]) < 1e-6 * REQUESTS
    server = level["server"]
    assert level["counts_agree"] is True and server["requests"] == REQUESTS and server["failures"] == 0
    assert server["compute_ms_mean"] > 0
    assert server["queue_ms_mean"] >= 0 and server["request_ms_mean"] >= server["compute_ms_mean"]


def test_bench_at_concurrency_1_and_4_matches_triton_metrics(served):
    client = served.client("grpc")
    metrics_url = served.server.metrics_url
    before = scrape(metrics_url, served.model)
    report = run_bench(client, [1, 4], max_tokens=MAX_TOKENS, requests=REQUESTS, prompt_tokens=16, warmup=1, metrics_url=metrics_url)
    data = report.to_json()
    assert [lv["concurrency"] for lv in data["levels"]] == [1, 4]
    for level, conc in zip(data["levels"], (1, 4)):
        _sane_level(level, conc)
        assert 15 <= level["prompt_tokens_mean"] <= 16  # fitted with the server's own tokenizer counts
    after = scrape(metrics_url, served.model)
    measured = sum(lv["server"]["requests"] for lv in data["levels"])
    assert measured == 2 * REQUESTS
    # Everything Triton saw: calibration, check() and warm-up requests, plus the measured ones.
    assert after["nv_inference_request_success"] - before["nv_inference_request_success"] >= measured + 2
    assert report.counts_agree


def test_bench_cli_writes_json_csv_png(served, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ("Hello there", "The sea is", "One two three")) + "\n")
    out = tmp_path / "bench-out"
    env = {**os.environ, "LORASHIP_API_KEY": served.api_key}
    run = subprocess.run(
        [sys.executable, "-m", "loraship.cli.main", "bench", "--url", served.server.http_url, "--protocol", "http",
         "--concurrency", "1,4", "--requests", str(REQUESTS), "--max-tokens", str(MAX_TOKENS), "--prompts", str(prompts),
         "--metrics-url", served.server.metrics_url, "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "loraship bench" in run.stdout and "TTFT p50/p90/p99 ms" in run.stdout and "✓" in run.stdout
    data = json.loads((out / "bench.json").read_text())
    assert data["config"]["protocol"] == "http" and data["config"]["prompts"] == "file" and data["config"]["prompt_count"] == 3
    for level, conc in zip(data["levels"], (1, 4)):
        _sane_level(level, conc)
    rows = list(csv.DictReader((out / "bench.csv").open()))
    assert list(rows[0]) == CSV_FIELDS and [int(r["concurrency"]) for r in rows] == [1, 4]
    assert [float(r["ttft_ms_p50"]) for r in rows] == [lv["ttft_ms"]["p50"] for lv in data["levels"]]
    assert [int(r["server_requests"]) for r in rows] == [REQUESTS, REQUESTS]
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    rerun = subprocess.run([sys.executable, "-m", "loraship.cli.main", "bench", "--url", served.server.http_url, "--out", str(out)],
                           capture_output=True, text=True, env=env, timeout=60)
    assert rerun.returncode == 1 and "is not empty" in rerun.stderr  # refuses to overwrite before benchmarking


def test_bench_duration_mode_and_a_request_from_elsewhere_shows_as_a_mismatch(served):
    """``--duration``: each level runs for the given seconds. A request that another client sends
    during the level makes Triton's count exceed the benchmark's: the report says the counts
    disagree and the table flags it, instead of quietly mixing foreign load into the figures."""
    import threading
    import time

    from rich.console import Console

    from loraship.client.bench_report import render_table

    client = served.client("grpc")
    metrics_url = served.server.metrics_url
    intruder = served.client("http")

    def outside_request() -> None:
        time.sleep(1.2)  # inside the 3 s level (the settled /metrics reading before it takes ~0.5 s)
        intruder.generate("an outside request", max_tokens=1)

    thread = threading.Thread(target=outside_request)
    thread.start()
    # Given prompts (no calibration requests), so the level starts at once and the outside request lands in it.
    report = run_bench(client, [2], max_tokens=MAX_TOKENS, duration_s=3.0, prompts=["a prompt from a file"], warmup=0,
                       metrics_url=metrics_url)
    thread.join()
    [level] = report.to_json()["levels"]
    assert 3.0 <= level["duration_s"] < 20 and level["requests"] >= 2 and level["errors"] == 0
    assert level["server"]["requests"] == level["requests"] + 1
    assert level["counts_agree"] is False and report.counts_agree is False
    console = Console(width=250, record=True)
    console.print(render_table(report))
    assert "MISMATCH" in console.export_text()


def test_bench_png_draws_requests_and_tokens_per_second_apart():
    """With every reply max_tokens long, tokens/s is requests/s times a constant: on twin axes the two
    lines fell exactly on each other. Each now has its own panel, style and legend (read from the Figure)."""
    from loraship.client.bench_report import BenchReport, LevelResult, figure

    def level(conc: int, rps: float) -> LevelResult:
        pct = {"p50": 10.0 * conc, "p90": 12.0 * conc, "p99": 15.0 * conc, "mean": 11.0 * conc}
        return LevelResult(conc, 32, 0, 32 / rps, pct, {k: v / 10 for k, v in pct.items()}, pct, 16 * rps, rps, 16.0, 16.0)

    report = BenchReport({"model": "tiny", "protocol": "grpc", "max_tokens": 16}, [level(1, 100.0), level(2, 90.0), level(4, 240.0)])
    fig = figure(report)
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    tokens, requests = lines["output tokens/s"], lines["requests/s"]
    assert list(tokens.get_xdata()) == list(requests.get_xdata()) == [1, 2, 4]
    assert list(tokens.get_ydata()) == [1600.0, 1440.0, 3840.0] and list(requests.get_ydata()) == [100.0, 90.0, 240.0]
    ax_tok, ax_req = tokens.axes, requests.axes
    assert ax_tok is not ax_req and len(fig.axes) == 4  # four panels, no twin axes
    a, b = ax_tok.get_position(), ax_req.get_position()
    assert a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0  # the panels do not overlap
    assert (tokens.get_color(), tokens.get_linestyle(), tokens.get_marker()) != (requests.get_color(), requests.get_linestyle(), requests.get_marker())
    assert (ax_tok.get_ylabel(), ax_req.get_ylabel()) == ("tokens/s", "requests/s")
    for ax, label in ((ax_tok, "output tokens/s"), (ax_req, "requests/s")):
        assert [t.get_text() for t in ax.get_legend().get_texts()] == [label] and ax.get_ylim()[0] == 0
    latency = {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].get_lines()}
    assert latency["TTFT p99"] == [15.0, 30.0, 60.0] and len(latency) == 6
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == list(latency)


def test_the_verdict_notes_failures_and_refuses_disagreeing_counts_or_a_run_where_all_failed():
    """What `loraship bench` prints after the table and when it exits 1, from reports with known figures."""
    from loraship.client.bench import per_level
    from loraship.client.bench_report import BenchReport, LevelResult, verdict
    from loraship.errors import LorashipError

    def level(conc: int, requests: int, errors: int, server: int | None = None, samples: tuple[str, ...] = ()) -> LevelResult:
        pct = dict.fromkeys(("p50", "p90", "p99", "mean"), 1.0)
        agree = None if server is None else server == requests
        return LevelResult(conc, requests, errors, 1.0, pct, pct, pct, 10.0, 1.0, 4.0, 4.0, list(samples),
                           None if server is None else {"requests": server}, agree)

    skipped = "[yellow]server-side figures skipped: pass --metrics-url to check them against Triton's /metrics[/]"
    clean = verdict(BenchReport({"metrics_url": None}, [level(1, 4, 0)]))
    assert (clean.notes, clean.error) == ([skipped], None)
    mismatch = verdict(BenchReport({"metrics_url": "http://m/metrics"}, [level(1, 4, 0, 4), level(2, 5, 1, 6, ("boom",))]))
    assert mismatch.notes == ["[bold red]1 request(s) failed[/], e.g. ['boom']"]
    assert str(mismatch.error) == ("client and Triton request counts disagree: conc 2: client 5 vs server 6 "
                                   "(is another client using the model? Benchmark an otherwise idle endpoint)")
    failed = verdict(BenchReport({"metrics_url": "http://m/metrics"}, [level(1, 2, 2, 2, ("refused",))]))
    assert failed.notes == ["[bold red]2 request(s) failed[/], e.g. ['refused']"]
    assert str(failed.error) == "every request failed (run `loraship generate` against the endpoint to see why)"
    assert [per_level(None, None), per_level(5, None), per_level(None, 3.0)] == [(32, None), (5, None), (None, 3.0)]
    with pytest.raises(LorashipError, match=r"--requests and --duration exclude each other \(pass one of them\)"):
        per_level(5, 3.0)
