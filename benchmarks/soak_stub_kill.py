"""A soak with a crash in the middle: 16 clients for 60 s against `loraship serve`, a python stub killed at 30 s.

`loraship serve --api-key` (the CLI in a child process, as a user runs it: tritonserver behind the frontend,
under the supervisor) serves the tiny demo model (random-init, or ``--trained``). Half the clients stream
``/v1/completions`` through the frontend with the openai package (its default retries, as an application
would run it), half stream over gRPC straight to Triton with tritonclient (no retries: a failure counts).
Each client sends its next request when the last one ends, and waits 0.5 s after a failure. At ``--kill-at``
the model's python stub gets SIGKILL (as an OOM kill would). Every request ends as ok (the full greedy
reply, checked against the reference taken before the soak), wrong, error, or hang (no end within
``--hang-s``). Reported: requests in all and failed; failed that were in flight at the kill, and how soon
their error came; failed that were not; hangs (must be 0); kill to the first success of a request sent after
it; and that every request sent after serve said it had recovered succeeded. Loopback only, bounded in time.

    python -m benchmarks.soak_stub_kill                  # builds the tiny random-init demo model first
    python -m benchmarks.soak_stub_kill --trained --duration 60 --kill-at 30 --clients 16
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchmarks.triton_vs_inprocess import build_onnx

MODEL = "tiny"
KEY = "soak-stub-kill-key"
PROMPTS = ("The quick brown fox", "Write a short poem about the sea.", "What is the capital of France?",
           "LoRA adds small low-rank matrices", "Hello, how are you today?", "Numbers: 0 1 2 3")


@dataclass
class Request:
    kind: str  # "openai" or "grpc"
    start: float
    end: float | None = None
    outcome: str = ""  # ok, wrong, error, hang
    detail: str = ""


def openai_request(client, prompt: str, max_tokens: int) -> str:
    text = []
    for chunk in client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=True):
        if chunk.choices:
            text.append(chunk.choices[0].text or "")
    return "".join(text)


def grpc_request(url: str, prompt: str, max_tokens: int, hang_s: float) -> str:
    """One decoupled gRPC stream; its text, or raises (TimeoutError for a hang)."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    texts: list[str] = []
    errors: list[str] = []
    done = threading.Event()

    def callback(result, error):
        if error is not None:
            errors.append(str(error))
            done.set()
            return
        response = result.get_response()
        if any(o.name == "text_output" for o in response.outputs):
            texts.append(result.as_numpy("text_output").reshape(-1)[0].decode())
        if response.parameters["triton_final_response"].bool_param:
            done.set()

    client = grpcclient.InferenceServerClient(url)
    try:
        client.start_stream(callback=callback, headers={"triton-grpc-protocol-x-api-key": KEY})
        inputs = []
        for name, arr in {"text_input": np.array([prompt.encode()], np.object_), "max_tokens": np.array([max_tokens], np.int32),
                          "stream": np.array([True])}.items():
            tensor = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
            tensor.set_data_from_numpy(arr)
            inputs.append(tensor)
        client.async_stream_infer(MODEL, inputs, enable_empty_final_response=True)
        if not done.wait(hang_s):
            raise TimeoutError(f"no end within {hang_s:.0f} s")
    finally:
        client.stop_stream()
        client.close()
    if errors:
        raise RuntimeError(errors[0])
    return "".join(texts)


def reference(http: str, max_tokens: int) -> dict[str, str]:
    """Each prompt's greedy reply (/v2 generate through the frontend), before the soak."""
    out = {}
    for prompt in PROMPTS:
        body = json.dumps({"text_input": prompt, "max_tokens": max_tokens}).encode()
        req = urllib.request.Request(f"{http}/v2/models/{MODEL}/generate", data=body,
                                     headers={"Content-Type": "application/json", "x-api-key": KEY})
        with urllib.request.urlopen(req, timeout=60) as resp:
            out[prompt] = json.loads(resp.read())["text_output"]
    return out


def stub_of(serve_pid: int):
    import psutil

    from loraship.triton_repo.runtime.supervisor import STUB

    [triton] = [p for p in psutil.Process(serve_pid).children() if p.name() == "tritonserver"]
    [stub] = [p for p in triton.children() if p.cmdline()[:1] and p.cmdline()[0].endswith(STUB) and p.status() != "zombie"]
    return stub


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{Path(__file__).stem}", description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnx", type=Path, help="an export folder (default: build the tiny demo model)")
    parser.add_argument("--trained", action="store_true", help="build the trained demo fine-tune (about a minute) instead of random weights")
    parser.add_argument("--clients", type=int, default=16, help="half openai /v1 streams, half gRPC streams")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of traffic")
    parser.add_argument("--kill-at", type=float, default=30.0, help="seconds into the traffic to kill the python stub")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--hang-s", type=float, default=30.0, help="a request not ended after this long is a hang")
    args = parser.parse_args()

    import openai

    from loraship.triton_repo.config import ModelOptions
    from loraship.triton_repo.layout import write_version

    with tempfile.TemporaryDirectory(prefix="loraship-soak-") as tmp:
        work = Path(tmp)
        onnx = args.onnx or build_onnx(work, "tiny", random=not args.trained)
        write_version(onnx, work / "repo", ModelOptions(name=MODEL, max_batch_size=8))
        serve = subprocess.Popen([sys.executable, "-m", "loraship.cli.main", "serve", "--repo", str(work / "repo")],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "LORASHIP_API_KEY": KEY})
        err: list[tuple[float, str]] = []
        threading.Thread(target=lambda: [err.append((time.monotonic(), line)) for line in iter(serve.stderr.readline, "")],
                         daemon=True).start()
        try:
            out = ""
            while "Ctrl-C to stop." not in out:
                line = serve.stdout.readline()
                if not line:
                    raise SystemExit(f"serve ended: {''.join(l for _, l in err)}")
                out += line
            http = re.search(r"HTTP\s+(http://\S+)", out).group(1)
            grpc = re.search(r"gRPC\s+(\S+)", out).group(1)
            expected = reference(http, args.max_tokens)
            requests: list[Request] = []
            lock = threading.Lock()
            t0 = time.monotonic()
            stop_at = t0 + args.duration

            def client(k: int) -> None:
                kind = "openai" if k % 2 == 0 else "grpc"
                sdk = openai.OpenAI(base_url=f"{http}/v1", api_key=KEY, timeout=args.hang_s) if kind == "openai" else None
                i = k
                while time.monotonic() < stop_at:
                    prompt = PROMPTS[i % len(PROMPTS)]
                    i += 1
                    request = Request(kind, time.monotonic())
                    with lock:
                        requests.append(request)
                    try:
                        text = (openai_request(sdk, prompt, args.max_tokens) if sdk is not None
                                else grpc_request(grpc, prompt, args.max_tokens, args.hang_s))
                        request.outcome = "ok" if text == expected[prompt] else "wrong"
                    except (TimeoutError, openai.APITimeoutError) as exc:
                        request.outcome, request.detail = "hang", str(exc)
                    except Exception as exc:  # noqa: BLE001 - every other failure is an error the client saw
                        request.outcome, request.detail = "error", f"{type(exc).__name__}: {exc}"[:160]
                    request.end = time.monotonic()
                    if request.outcome != "ok":
                        time.sleep(0.5)

            threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
            for t in threads:
                t.start()
            time.sleep(max(0.0, t0 + args.kill_at - time.monotonic()))
            stub = stub_of(serve.pid)
            stub.kill()
            killed = time.monotonic()
            for t in threads:
                t.join(args.duration + args.hang_s + 60)
            recovered = [(t, line.strip()) for t, line in err if line.startswith("recovered:")]
        finally:
            serve.send_signal(signal.SIGINT)
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                serve.kill()

    done = [r for r in requests if r.end is not None]
    failed = [r for r in done if r.outcome != "ok"]
    in_flight = [r for r in done if r.start <= killed < r.end]
    failed_in_flight = [r for r in in_flight if r.outcome != "ok"]
    failed_other = [r for r in failed if r not in in_flight]
    first_ok = min((r.end for r in done if r.start > killed and r.outcome == "ok"), default=float("nan"))
    said_at = recovered[0][0] if recovered else float("inf")
    after = [r for r in done if r.start >= said_at]
    print(f"{MODEL} ({'trained' if args.trained else 'random-init'}): {args.clients} clients ({args.clients // 2} openai /v1 streams "
          f"through the frontend, {args.clients - args.clients // 2} gRPC streams), {args.duration:.0f} s, stub killed at "
          f"{killed - t0:.1f} s, {args.max_tokens} tokens a request")
    print(f"serve said: {recovered[0][1] if recovered else '(nothing)'}")
    print("| | all | openai /v1 | gRPC |\n| --- | ---: | ---: | ---: |")
    rows = {
        "requests": lambda rs: len(rs),
        "failed": lambda rs: sum(r.outcome != "ok" for r in rs),
        "in flight at the kill": lambda rs: sum(r in in_flight for r in rs),
        "failed, in flight at the kill": lambda rs: sum(r in failed_in_flight for r in rs),
        "failed, sent during the recovery": lambda rs: sum(r in failed_other and r.start < said_at for r in rs),
        "wrong replies": lambda rs: sum(r.outcome == "wrong" for r in rs),
        "hangs": lambda rs: sum(r.outcome == "hang" for r in rs),
        "sent after serve said recovered": lambda rs: sum(r in after for r in rs),
        "failed of those": lambda rs: sum(r in after and r.outcome != "ok" for r in rs),
    }
    for name, count in rows.items():
        print(f"| {name} | {count(done)} | {count([r for r in done if r.kind == 'openai'])} | {count([r for r in done if r.kind == 'grpc'])} |")
    for kind, label in (("openai", "openai /v1 (after the SDK's own retries)"), ("grpc", "gRPC")):
        if error_s := sorted(r.end - killed for r in failed_in_flight if r.kind == kind):
            print(f"in flight at the kill, {label}: ended with an error {statistics.median(error_s):.2f} s (median), "
                  f"{error_s[-1]:.2f} s (last) after the kill")
    print(f"kill -> first success of a request sent after it: {first_ok - killed:.2f} s; serve said recovered "
          f"{said_at - killed:.2f} s after the kill")
    for r in sorted(failed, key=lambda r: r.start)[:6]:
        print(f"  e.g. {r.kind} sent at {r.start - t0:.2f} s, ended {r.end - killed:+.2f} s from the kill: {r.outcome} {r.detail}")
    if any(r.outcome == "hang" for r in done) or any(r.outcome != "ok" for r in after) or not recovered:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
