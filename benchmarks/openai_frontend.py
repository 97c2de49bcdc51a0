"""What the OpenAI-compatible frontend adds, measured side by side in one run.

The same streamed chat (the model's ``messages`` input, greedy, ``--max-tokens`` tokens) two ways, by
the same client (httpx, one connection per stream), at concurrency 1 and 4 (closed loop):
  A. straight to Triton: ``POST /v2/models/M/generate_stream`` (server-sent events);
  B. through the frontend: ``POST /v1/chat/completions`` with ``stream: true`` (its SSE chunks).
Reported: TTFT and end-to-end p50 of each, and B ÷ A (the rounds alternate A and B so that a busy
machine slows both alike), and the frontend's own CPU time per relayed token, which a busy machine
does not stretch: on a 2-core box the frontend competes with Triton for the CPU, so its latency
cost there is mostly that CPU time waiting for a core. ``--compare FILE`` adds C: another
``openai_api.py`` (an older one, say) as a second frontend on the same Triton, in the same rounds.

    python -m benchmarks.openai_frontend                       # builds the tiny demo model first
    python -m benchmarks.openai_frontend --onnx work/onnx --max-tokens 64 --requests 64
    git show main:triton_repo/openai_api.py > /tmp/main_api.py && python -m benchmarks.openai_frontend --compare /tmp/main_api.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.triton_vs_inprocess import build_onnx

MODEL = "bench"
MESSAGES = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Write a short poem about the sea."}]


def one(client, url: str, body: dict, is_token) -> tuple[float, float]:
    """(TTFT, end-to-end) seconds of one streamed request."""
    start = time.perf_counter()
    first = None
    with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith("data:") and is_token(line[5:]):
                first = time.perf_counter() - start
    return first if first is not None else float("nan"), time.perf_counter() - start


def level(url: str, body: dict, is_token, concurrency: int, requests: int) -> list[tuple[float, float]]:
    """``requests`` streams from ``concurrency`` threads, each with its own connection."""
    import httpx

    results: list[tuple[float, float]] = []
    lock = threading.Lock()
    left = [requests]

    def worker() -> None:
        with httpx.Client(timeout=120) as client:
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                result = one(client, url, body, is_token)
                with lock:
                    results.append(result)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def other_frontend(path: Path, triton_url: str):
    """The frontend class, running another ``openai_api.py`` (``--compare``)."""
    from loraship.triton_repo.frontend import OpenAIFrontend

    class Other(OpenAIFrontend):
        def command(self) -> list[str]:
            command = super().command()
            command[1:3] = [str(path)]  # the file in place of ``-m <the frontend package>``
            return command

    return Other(triton_url)


def triton_token(data: str) -> bool:
    return bool(json.loads(data).get("text_output"))


def openai_token(data: str) -> bool:
    if data.strip() == "[DONE]":
        return False
    choices = json.loads(data).get("choices") or [{}]
    return bool(choices[0].get("delta", {}).get("content"))


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{Path(__file__).stem}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", type=Path, help="an export folder (default: build the tiny demo model)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=48, help="requests per path, level and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compare", type=Path, metavar="FILE", help="another openai_api.py to measure beside this one (C)")
    args = parser.parse_args()

    from loraship.client.metrics import scrape
    from loraship.triton_repo.config import ModelOptions
    from loraship.triton_repo.frontend import OpenAIFrontend
    from loraship.triton_repo.layout import write_version
    from loraship.triton_repo.server import TritonServer

    with tempfile.TemporaryDirectory(prefix="loraship-bench-openai-") as tmp:
        work = Path(tmp)
        onnx = args.onnx or build_onnx(work, "tiny")
        write_version(onnx, work / "repo", ModelOptions(name=MODEL, max_batch_size=8))
        with contextlib.ExitStack() as stack:
            triton = stack.enter_context(TritonServer(work / "repo"))
            frontends = {"B frontend": stack.enter_context(OpenAIFrontend(triton.http_url))}
            if args.compare:
                frontends["C compare"] = stack.enter_context(other_frontend(args.compare, triton.http_url))
            chat = {"model": MODEL, "messages": MESSAGES, "max_tokens": args.max_tokens, "stream": True}
            paths = {"A triton": (f"{triton.http_url}/v2/models/{MODEL}/generate_stream",
                                  {"messages": json.dumps(MESSAGES), "max_tokens": args.max_tokens, "stream": True}, triton_token)}
            paths |= {name: (f"{frontend.url}/chat/completions", chat, openai_token) for name, frontend in frontends.items()}
            print(f"{MODEL}: {onnx}, {args.max_tokens} tokens, {args.requests} requests x {args.rounds} rounds per path and level"
                  + (f"; C: {args.compare}" if args.compare else ""))
            import psutil

            processes = {name: psutil.Process(frontend.process.pid) for name, frontend in frontends.items()}
            for concurrency in (1, 4):
                samples: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
                for name, (url, body, is_token) in paths.items():
                    level(url, body, is_token, concurrency, 4)  # warm-up
                cpu_s = dict.fromkeys(frontends, 0.0)  # each frontend's CPU time, and the tokens it relayed (the model's own count)
                tokens = dict.fromkeys(frontends, 0.0)
                for _ in range(args.rounds):
                    for name, (url, body, is_token) in paths.items():
                        process = processes.get(name)
                        before, served = sum(process.cpu_times()[:2]) if process else 0.0, scrape(triton.metrics_url, MODEL)
                        samples[name] += level(url, body, is_token, concurrency, args.requests)
                        if process:
                            cpu_s[name] += sum(process.cpu_times()[:2]) - before
                            tokens[name] += scrape(triton.metrics_url, MODEL)["loraship_completion_tokens"] - served["loraship_completion_tokens"]
                p50 = {name: (statistics.median(t for t, _ in s) * 1000, statistics.median(e for _, e in s) * 1000) for name, s in samples.items()}
                ta, ea = p50["A triton"]
                for name in frontends:
                    tb, eb, x = *p50[name], name[0]
                    print(f"concurrency {concurrency}: TTFT p50 A {ta:.1f} ms, {x} {tb:.1f} ms ({x}/A {tb / ta:.2f}, +{tb - ta:.1f} ms); "
                          f"end-to-end p50 A {ea:.1f} ms, {x} {eb:.1f} ms ({x}/A {eb / ea:.2f}, +{eb - ea:.1f} ms); "
                          f"{name} CPU {cpu_s[name] / tokens[name] * 1e6:.0f} us/token")


if __name__ == "__main__":
    main()
