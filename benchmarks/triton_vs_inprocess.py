"""Triton overhead and in-flight batching, measured side by side in one run.

1. Per-token latency at batch 1 (request start to last token, per token): a local tritonserver gRPC stream ÷ the in-process
   engine on the same ONNX folder (target <= 1.10).
2. Output tokens/s at concurrency 1 and 8 (closed loop: each of the streams sends its next request when
   the last one ends), through Triton and in-process through the engine's scheduler: concurrency 8 ÷ 1,
   and Triton ÷ in-process at 8 (the GPU target is >= 0.90).

Both are measured on each demo size with the default export (``loraship export``), each with its own
export, repository and tritonserver: tiny's sub-millisecond step exposes the serving path's fixed cost
per token, mid's step puts it in proportion to a real decode step.

    python -m benchmarks.triton_vs_inprocess                 # builds the tiny and mid demo models first
    python -m benchmarks.triton_vs_inprocess --onnx work/onnx --max-tokens 128
"""

from __future__ import annotations

import argparse
import itertools
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

PROMPT = "LoRA adds small low-rank matrices to the attention and MLP projections of a large model."
MODEL = "bench"


def prompt(k: int) -> str:
    """The prompt of stream ``k``: streams differ, so rows of a batch hold different text."""
    return f"Stream {k}. {PROMPT}"


def build_onnx(work: Path, size: str, random: bool = True) -> Path:
    """demo-model -> merge -> export in child processes: torch's OpenMP threads would slow this
    process's ONNX Runtime, while the Triton stub never imports torch. ``random``: random-init weights
    (speed needs only shapes), else the trained demo fine-tune."""
    loraship = [sys.executable, "-m", "loraship.cli.main"]
    for args in (["demo-model", "--out", str(work / "model"), "--size", size, *(["--random"] if random else [])],
                 ["merge", "--base", str(work / "model" / "base"), "--adapter", str(work / "model" / "adapter"),
                  "--out", str(work / "merged")],
                 ["export", "--model", str(work / "merged"), "--out", str(work / "onnx")]):
        subprocess.run(loraship + args, check=True, capture_output=True)
    return work / "onnx"


def per_token_ms(start: float, stamps: list[float]) -> float:
    """Request start to last token, per token: robust to tokens arriving in bursts."""
    return (stamps[-1] - start) / len(stamps) * 1000


def inprocess(engine, max_tokens: int, runs: int) -> tuple[float, float]:
    """(decode ms/token, TTFT ms) of the engine at batch 1, medians over ``runs``."""
    from loraship.engine import SamplingParams

    params = SamplingParams(max_tokens=max_tokens)
    per_token, ttft = [], []
    for _ in range(runs + 1):
        stamps: list[float] = []
        start = time.perf_counter()
        engine.generate([PROMPT], params, on_token=lambda i, t, d: stamps.append(time.perf_counter()))
        per_token.append(per_token_ms(start, stamps))
        ttft.append((stamps[0] - start) * 1000)
    return statistics.median(per_token[1:]), statistics.median(ttft[1:])


class GrpcStreams:
    """One gRPC connection and decoupled stream, reused for every request (as a real client does)."""

    def __init__(self, url: str) -> None:
        import tritonclient.grpc as grpcclient

        self.grpcclient = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.client.start_stream(callback=self._callback)
        self.pending: dict[str, tuple[list[float], queue.Queue]] = {}
        self.counter = itertools.count()

    def _callback(self, result, error) -> None:
        if error is not None:
            for _, done in list(self.pending.values()):
                done.put(error)
            return
        response = result.get_response()
        stamps, done = self.pending[response.id]
        if response.parameters["triton_final_response"].bool_param:
            done.put(int(result.as_numpy("completion_tokens")[0]))  # the final response carries the counts
        else:
            stamps.append(time.perf_counter())

    def run(self, max_tokens: int, text: str = PROMPT) -> tuple[list[float], int]:
        """Send time and the arrival time of each token response; the server's token count.

        Under load one response may carry several tokens, so tokens are counted by the server."""
        from tritonclient.utils import np_to_triton_dtype

        inputs = []
        for name, arr in (("text_input", np.array([text.encode()], np.object_)),
                          ("max_tokens", np.array([max_tokens], np.int32)), ("stream", np.array([True]))):
            tensor = self.grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
            tensor.set_data_from_numpy(arr)
            inputs.append(tensor)
        rid = str(next(self.counter))
        stamps: list[float] = []
        done: queue.Queue = queue.Queue()
        self.pending[rid] = (stamps, done)
        sent = time.perf_counter()
        self.client.async_stream_infer(MODEL, inputs, request_id=rid, enable_empty_final_response=True)
        outcome = done.get(timeout=600)
        del self.pending[rid]
        if not isinstance(outcome, int):
            raise RuntimeError(str(outcome))
        return [sent, *stamps], outcome

    def close(self) -> None:
        self.client.stop_stream()
        self.client.close()


def triton_batch1(url: str, max_tokens: int, runs: int) -> tuple[float, float]:
    streams = GrpcStreams(url)
    per_token, ttft = [], []
    for _ in range(runs + 1):
        (sent, *stamps), _ = streams.run(max_tokens)
        per_token.append(per_token_ms(sent, stamps))
        ttft.append((stamps[0] - sent) * 1000)
    streams.close()
    return statistics.median(per_token[1:]), statistics.median(ttft[1:])


def closed_loop(concurrency: int, requests_each: int, one_request) -> float:
    """Output tokens/s with ``concurrency`` workers, each running ``one_request(k) -> tokens`` in turn."""
    tokens = [0] * concurrency

    def worker(k: int) -> None:
        for _ in range(requests_each):
            tokens[k] += one_request(k)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(tokens) / (time.perf_counter() - start)


def throughput(url: str, concurrency: int, requests_each: int, max_tokens: int, prompt_of=prompt) -> float:
    """Output tokens/s through Triton with ``concurrency`` gRPC streams in flight; stream k sends ``prompt_of(k)``."""
    clients = [GrpcStreams(url) for _ in range(concurrency)]
    try:
        return closed_loop(concurrency, requests_each, lambda k: clients[k].run(max_tokens, prompt_of(k))[1])
    finally:
        for client in clients:
            client.close()


def inprocess_throughput(engine, concurrency: int, requests_each: int, max_tokens: int, prompt_of=prompt) -> float:
    """Output tokens/s of the engine's scheduler (the Triton model's batching, without Triton)."""
    from loraship.engine import SamplingParams

    scheduler = engine.scheduler()
    params = SamplingParams(max_tokens=max_tokens)

    def one_request(k: int) -> int:
        done: queue.Queue = queue.Queue()
        scheduler.submit(prompt_of(k), params, lambda token, text, logprob: None, lambda completion, error: done.put(error or completion))
        outcome = done.get(timeout=600)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome.completion_tokens

    try:
        return closed_loop(concurrency, requests_each, one_request)
    finally:
        scheduler.close()


def measure(onnx: Path, work: Path, args) -> dict:
    """Both figures on one export: its own repository and tritonserver."""
    from loraship.engine import Engine
    from loraship.triton_repo.config import ModelOptions
    from loraship.triton_repo.layout import write_version
    from loraship.triton_repo.server import TritonServer

    # The served engine's settings on both sides (the Triton model turns spinning off), so the
    # ratio is the serving path's overhead alone.
    engine = Engine.load(onnx, threads=args.threads, spin=False, max_batch=8)
    write_version(onnx, work / "repo", ModelOptions(name=MODEL, max_batch_size=8, threads=args.threads))
    with TritonServer(work / "repo") as server:
        # Interleaved, one run of each at a time, so drifting machine load hits both alike.
        local, remote = [], []
        for _ in range(args.runs):
            local.append(inprocess(engine, args.max_tokens, 1))
            remote.append(triton_batch1(server.grpc_url, args.max_tokens, 1))
        throughput(server.grpc_url, 2, 1, args.max_tokens)  # warm-up of the batched path
        inprocess_throughput(engine, 2, 1, args.max_tokens)
        tps = {}
        for concurrency, requests in ((1, args.requests * 2), (8, args.requests)):
            tps[("triton", concurrency)] = throughput(server.grpc_url, concurrency, requests, args.max_tokens)
            tps[("local", concurrency)] = inprocess_throughput(engine, concurrency, requests, args.max_tokens)
        del engine
    local_ms, local_ttft = (statistics.median(x) for x in zip(*local))
    triton_ms, triton_ttft = (statistics.median(x) for x in zip(*remote))
    return {"local_ms": local_ms, "local_ttft": local_ttft, "triton_ms": triton_ms, "triton_ttft": triton_ttft,
            "tps1": tps[("triton", 1)], "tps8": tps[("triton", 8)],
            "local_tps1": tps[("local", 1)], "local_tps8": tps[("local", 8)]}


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{Path(__file__).stem}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, help="export folder (default: build the demo models of --sizes)")
    parser.add_argument("--sizes", default="tiny,mid", help="demo model sizes to measure, comma-separated")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--requests", type=int, default=4, help="requests per stream in the throughput test")
    parser.add_argument("--threads", type=int, help="ONNX Runtime threads of both engines (default: all cores)")
    args = parser.parse_args()

    import onnxruntime
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    names = ["given"] if args.onnx else [s for s in args.sizes.split(",") if s]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="loraship-bench-") as tmp, Progress(transient=True) as progress:
        task = progress.add_task("measuring", total=2 * len(names))
        for name in names:
            work = Path(tmp) / name
            work.mkdir()
            progress.update(task, description=f"{name}: building the export")
            onnx = args.onnx or build_onnx(work, name)
            progress.advance(task)
            progress.update(task, description=f"{name}: in-process vs Triton")
            rows[name] = measure(onnx, work, args)
            progress.advance(task)

    table = Table(title=f"Triton (gRPC stream) vs in-process engine: {args.max_tokens} new tokens, onnxruntime "
                        f"{onnxruntime.__version__}, CPU, {args.threads or 'all'} ONNX Runtime threads")
    for col in ("model", "in-process ms/token", "Triton ms/token", "Triton/in-process", "TTFT ms in-process",
                "TTFT ms Triton", "tok/s conc 1 in-process", "tok/s conc 8 in-process", "tok/s conc 1 Triton",
                "tok/s conc 8 Triton", "conc 8 / 1 Triton", "Triton / in-process at 8"):
        table.add_column(col, justify="right")
    for name, r in rows.items():
        table.add_row(name, f"{r['local_ms']:.3f}", f"{r['triton_ms']:.3f}", f"{r['triton_ms'] / r['local_ms']:.2f}",
                      f"{r['local_ttft']:.2f}", f"{r['triton_ttft']:.2f}", f"{r['local_tps1']:.0f}", f"{r['local_tps8']:.0f}",
                      f"{r['tps1']:.0f}", f"{r['tps8']:.0f}", f"{r['tps8'] / r['tps1']:.2f}", f"{r['tps8'] / r['local_tps8']:.2f}")
    Console(width=200).print(table)
    for name, r in rows.items():
        print(f"{name}: ratio Triton/in-process per-token latency at batch 1: {r['triton_ms'] / r['local_ms']:.3f} "
              f"(target <= 1.10); throughput concurrency 8 / 1: Triton {r['tps8'] / r['tps1']:.2f} (target >= 4 on tiny), "
              f"in-process {r['local_tps8'] / r['local_tps1']:.2f}; Triton / in-process at concurrency 8: "
              f"{r['tps8'] / r['local_tps8']:.2f} (GPU target >= 0.90)")


if __name__ == "__main__":
    main()
