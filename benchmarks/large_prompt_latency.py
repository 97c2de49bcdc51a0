"""Small requests' latency with and without a large prompt sent beside them, side by side in one run.

Four closed-loop clients send small streamed requests (a short prompt, 16 new tokens) over gRPC to a
local tritonserver; each request's latency is its start to its final response. Beside them, one more
client sends large prompts back to back (1 new token each), or nothing:

- none: the small clients alone (the baseline);
- largest admitted: the largest prompt the byte bound admits (the tokenizer's widest piece repeated
  to fill the context: 24 kB, 2001 tokens for the demo tokenizer);
- 4 MB refused: a 4 MB prompt, refused by the byte bound before it is tokenized;
- 4 MB tokenized: the same 4 MB, small requests and large ones both sent to a copy of the model whose
  tokenizer has no byte bound (a Strip normalizer), so it is really tokenized (2.4 M tokens) in that
  model's process before its token count refuses it.

Scenarios alternate in rounds (none, admitted, refused, tokenized; repeated) so drift hits each alike;
p50 and p99 are over every small request of a scenario. Target (issue 17): small p99 with a large
prompt beside them within 2x of their p99 without.

    python -m benchmarks.large_prompt_latency                       # builds the tiny demo model first
    python -m benchmarks.large_prompt_latency --onnx work/onnx --seconds 10 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from loraship.engine.manifest import Manifest

SMALL_PROMPTS = ("Hello, how are you today?", "The quick brown fox", "LoRA adds small low-rank matrices", "Numbers: 1 2 3")
SCENARIOS = ("none", "largest admitted", "4 MB refused", "4 MB tokenized")


def unbounded_copy(onnx: Path, dest: Path) -> Path:
    """The export with a Strip normalizer: no byte bound holds, so every prompt is tokenized."""
    shutil.copytree(onnx, dest)
    spec = json.loads((dest / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Strip", "strip_left": True, "strip_right": True}
    (dest / "tokenizer.json").write_text(json.dumps(spec))
    manifest = Manifest.read(dest)
    manifest.replace(files={k: v for k, v in (manifest.files or {}).items() if k != "tokenizer.json"}).write(dest)
    return dest


def largest_admitted(onnx: Path) -> str:
    """The tokenizer's widest piece repeated to fill all but 48 positions of the context."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(onnx / "tokenizer.json"))
    context = Manifest.read(onnx).max_context
    pieces = [tok.decode([i]) for i in range(tok.get_vocab_size())]
    widest = max((p for p in pieces if len(tok.encode(p * 4, add_special_tokens=False).ids) == 4), key=lambda p: len(p.encode()))
    return widest * (context - 48)


def request(client, model: str, text: str, max_tokens: int) -> tuple[float, str | None]:
    """One streamed request on ``client``'s stream: (seconds to its final response, error or None)."""
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, arr in (("text_input", np.array([text.encode()], np.object_)), ("max_tokens", np.array([max_tokens], np.int32)),
                      ("stream", np.array([True]))):
        tensor = grpcclient.InferInput(name, list(arr.shape), {"text_input": "BYTES", "max_tokens": "INT32", "stream": "BOOL"}[name])
        tensor.set_data_from_numpy(arr)
        inputs.append(tensor)
    start = time.perf_counter()
    client.async_stream_infer(model, inputs, enable_empty_final_response=True)
    error = client.events.get(timeout=300)
    return time.perf_counter() - start, error


def stream_client(url: str):
    import queue

    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(url)
    client.events = queue.Queue()

    def callback(result, error):
        if error is not None:
            client.events.put(str(error))
        elif result.get_response().parameters["triton_final_response"].bool_param:
            client.events.put(None)

    client.start_stream(callback=callback)
    return client


def scenario(url: str, seconds: float, large: tuple[str, str] | None, model: str = "bench") -> tuple[list[float], list[float], list[str]]:
    """Small latencies, large latencies and errors of one scenario window."""
    stop = threading.Event()
    small: list[float] = []
    big: list[float] = []
    errors: list[str] = []

    def small_loop(k: int) -> None:
        client = stream_client(url)
        while not stop.is_set():
            latency, error = request(client, model, SMALL_PROMPTS[k], 16)
            (errors.append(error) if error else small.append(latency))
        client.stop_stream()

    def large_loop(model: str, text: str) -> None:
        client = stream_client(url)
        while not stop.is_set():
            latency, _ = request(client, model, text, 1)
            big.append(latency)
        client.stop_stream()

    threads = [threading.Thread(target=small_loop, args=(k,)) for k in range(len(SMALL_PROMPTS))]
    if large:
        threads.append(threading.Thread(target=large_loop, args=large))
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return small, big, errors


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{Path(__file__).stem}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx", type=Path, help="An export (default: build the tiny demo model)")
    parser.add_argument("--seconds", type=float, default=8.0, help="Length of each scenario window")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads of the served model")
    args = parser.parse_args()

    from loraship.triton_repo.config import ModelOptions
    from loraship.triton_repo.layout import write_version
    from loraship.triton_repo.server import TritonServer

    work = Path(tempfile.mkdtemp(prefix="large-prompt-"))
    try:
        if args.onnx is None:
            from benchmarks.triton_vs_inprocess import build_onnx

            args.onnx = build_onnx(work, "tiny")
        unbounded = unbounded_copy(args.onnx, work / "unbounded")
        for name, path in (("bench", args.onnx), ("bench-unbounded", unbounded)):
            write_version(path, work / "repo", ModelOptions(name=name, max_batch_size=8, threads=args.threads))
        admitted = largest_admitted(args.onnx)
        four_mb = "word " * ((4 << 20) // 5)
        large = {"none": None, "largest admitted": ("bench", admitted), "4 MB refused": ("bench", four_mb),
                 "4 MB tokenized": ("bench-unbounded", four_mb)}
        results = {name: ([], [], []) for name in SCENARIOS}
        with TritonServer(work / "repo", ready_timeout=180) as server:
            scenario(server.grpc_url, 2.0, None)  # warm up
            for _ in range(args.rounds):
                for name in SCENARIOS:
                    small_model = large[name][0] if large[name] else "bench"
                    for into, got in zip(results[name], scenario(server.grpc_url, args.seconds, large[name], small_model)):
                        into.extend(got)
        base = np.percentile(results["none"][0], 99)
        print(f"small: 4 clients x 16 new tokens; large: 1 client back to back, 1 new token; "
              f"{args.rounds} rounds x {args.seconds:g} s per scenario; largest admitted prompt {len(admitted.encode()):,} bytes")
        print("| large prompt beside them | small requests | small p50 ms | small p99 ms | p99 / p99 alone | large requests | large p50 ms |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for name in SCENARIOS:
            small, big, errors = results[name]
            assert not errors, errors[:3]
            p99 = np.percentile(small, 99)
            print(f"| {name} | {len(small)} | {np.percentile(small, 50) * 1000:.1f} | {p99 * 1000:.1f} | {p99 / base:.2f} | "
                  f"{len(big) or '-'} | {np.percentile(big, 50) * 1000 if big else float('nan'):.0f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
