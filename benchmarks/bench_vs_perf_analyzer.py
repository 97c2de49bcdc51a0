"""`loraship bench` against NVIDIA's perf_analyzer on one local tritonserver, same prompts and settings.

Target (issue 11): TTFT p50 and end-to-end p50 of `loraship bench` within 10% (+0.5 ms) of
perf_analyzer's at concurrency 1 and 4. Both send the same streamed gRPC requests (the prompts,
``max_tokens`` and ``ignore_eos``, so every reply is exactly ``--max-tokens`` long) to the same
server. perf_analyzer's figures come from its per-response timestamps (``--profile-export-file``):
TTFT is the first response, end-to-end the last, as genai-perf computes them. `loraship bench` runs
as its own command and reports from its bench.json. Rounds alternate which tool goes first; the
table gives the median over rounds of each run's p50, and the spread.

perf_analyzer 2.60 needs glibc 2.38; on Debian 12 run ``shared/tools/nvidia-perf-tools.sh`` first
and pass its folder (default ``$G`` or /tmp/nvperf).

    python -m benchmarks.bench_vs_perf_analyzer                       # builds the tiny demo model first
    python -m benchmarks.bench_vs_perf_analyzer --onnx work/onnx --rounds 5 --json cmp.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.triton_vs_inprocess import build_onnx

MODEL = "bench"


def perf_analyzer(tool: Path, url: str, inputs: Path, concurrency: int, requests: int, export: Path) -> dict[str, float]:
    """One perf_analyzer run: p50 TTFT and end-to-end in ms from its per-response timestamps."""
    export.unlink(missing_ok=True)
    cmd = [str(tool), "-m", MODEL, "-i", "grpc", "--streaming", "-u", url, "--input-data", str(inputs),
           "--concurrency-range", str(concurrency), "--request-count", str(requests), "--stability-percentage", "999",
           "--profile-export-file", str(export)]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"perf_analyzer failed ({run.returncode}): {run.stdout[-2000:]}{run.stderr[-2000:]}")
    records = json.loads(export.read_text())["experiments"][0]["requests"]
    ttft = [(r["response_timestamps"][0] - r["timestamp"]) / 1e6 for r in records]
    e2e = [(r["response_timestamps"][-1] - r["timestamp"]) / 1e6 for r in records]
    return {"ttft_p50": float(np.percentile(ttft, 50)), "e2e_p50": float(np.percentile(e2e, 50)), "requests": len(records)}


def loraship_bench(python: str, url: str, prompts: Path, concurrency: int, requests: int, max_tokens: int, out: Path) -> dict[str, float]:
    """One `loraship bench` run, as a user runs it; its bench.json's p50s."""
    cmd = [python, "-m", "loraship.cli.main", "bench", "--url", url, "--protocol", "grpc", "--model", MODEL,
           "--concurrency", str(concurrency), "--requests", str(requests), "--max-tokens", str(max_tokens),
           "--prompts", str(prompts), "--out", str(out), "--force"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"loraship bench failed ({run.returncode}): {run.stderr[-2000:]}")
    [level] = json.loads((out / "bench.json").read_text())["levels"]
    if level["errors"] or level["completion_tokens_mean"] != max_tokens:
        sys.exit(f"loraship bench: {level['errors']} errors, {level['completion_tokens_mean']} tokens per reply")
    return {"ttft_p50": level["ttft_ms"]["p50"], "e2e_p50": level["e2e_ms"]["p50"], "requests": level["requests"]}


def tokens_served(metrics_url: str) -> float:
    """The model's own count of generated tokens (Triton /metrics)."""
    from loraship.client.metrics import scrape

    return scrape(metrics_url, MODEL)["loraship_completion_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{Path(__file__).stem}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", type=Path, help="an export folder (default: build the tiny demo model)")
    ap.add_argument("--perf-tools", type=Path, default=Path(os.environ.get("G", "/tmp/nvperf")),
                    help="the folder nvidia-perf-tools.sh made (holds bin/perf_analyzer)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4")
    ap.add_argument("--requests", type=int, default=64, help="requests per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path, help="write every run's figures here")
    ap.add_argument("--python", default=sys.executable,
                    help="the interpreter whose `loraship bench` runs (default: this one; another checkout's venv compares versions)")
    args = ap.parse_args()

    from rich.console import Console
    from rich.table import Table

    from loraship.client.bench import synthetic_prompts
    from loraship.client.client import Client
    from loraship.triton_repo.config import ModelOptions
    from loraship.triton_repo.layout import write_version
    from loraship.triton_repo.server import TritonServer

    tool = args.perf_tools / "bin" / "perf_analyzer"
    if not tool.is_file():
        sys.exit(f"no perf_analyzer at {tool}: run shared/tools/nvidia-perf-tools.sh, or pass --perf-tools")
    levels = [int(c) for c in args.concurrency.split(",")]
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="bench-vs-pa-") as tmp:
        work = Path(tmp)
        onnx = args.onnx or build_onnx(work, "tiny")
        write_version(onnx, work / "repo", ModelOptions(name=MODEL, max_batch_size=8))
        with TritonServer(work / "repo", ready_timeout=180) as server, Client(server.grpc_url, "grpc", MODEL) as client:
            prompts = synthetic_prompts(client, args.prompt_tokens, count=args.prompts)
            (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
            rows = [{"text_input": [p], "max_tokens": [args.max_tokens], "stream": [True], "ignore_eos": [True]} for p in prompts]
            (work / "pa-input.json").write_text(json.dumps({"data": rows}))
            runs: dict[tuple[str, int], list[dict]] = {}
            for rnd in range(args.rounds):
                for conc in levels:
                    order = ["perf_analyzer", "loraship bench"][:: 1 if (rnd + conc) % 2 == 0 else -1]
                    for name in order:
                        console.print(f"round {rnd + 1}/{args.rounds}, concurrency {conc}: {name}")
                        if name == "perf_analyzer":
                            before = tokens_served(server.metrics_url)
                            figures = perf_analyzer(tool, server.grpc_url, work / "pa-input.json", conc, args.requests, work / "pa.json")
                            per_reply = (tokens_served(server.metrics_url) - before) / figures["requests"]
                            if abs(per_reply - args.max_tokens) > 1e-9:
                                sys.exit(f"perf_analyzer's requests got {per_reply} tokens each, not {args.max_tokens}")
                        else:
                            figures = loraship_bench(args.python, server.grpc_url, work / "prompts.jsonl", conc, args.requests, args.max_tokens, work / "out")
                        runs.setdefault((name, conc), []).append(figures)

    table = Table(title=f"loraship bench vs perf_analyzer: {args.prompts} prompts of {args.prompt_tokens} tokens, "
                        f"{args.max_tokens} output tokens, {args.requests} requests x {args.rounds} rounds, p50 in ms")
    for column in ("concurrency", "measure", "loraship bench", "perf_analyzer", "bench - PA", "limit", "ok", "spread bench / PA"):
        table.add_column(column, justify="right")
    ok_all = True
    for conc in levels:
        for key, label in (("ttft_p50", "TTFT p50"), ("e2e_p50", "end-to-end p50")):
            ours = [r[key] for r in runs[("loraship bench", conc)]]
            theirs = [r[key] for r in runs[("perf_analyzer", conc)]]
            a, b = statistics.median(ours), statistics.median(theirs)
            limit = 0.1 * b + 0.5
            ok = abs(a - b) <= limit
            ok_all &= ok
            table.add_row(str(conc), label, f"{a:.2f}", f"{b:.2f}", f"{a - b:+.2f}", f"±{limit:.2f}", "✓" if ok else "✗",
                          f"{min(ours):.1f}–{max(ours):.1f} / {min(theirs):.1f}–{max(theirs):.1f}")
    Console(width=160).print(table)
    if args.json:
        args.json.write_text(json.dumps({f"{name} c{conc}": figures for (name, conc), figures in runs.items()}, indent=2) + "\n")
    sys.exit(0 if ok_all else 1)


if __name__ == "__main__":
    main()
