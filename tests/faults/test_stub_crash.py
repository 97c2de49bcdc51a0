"""A crashed model heals itself and health tells the truth, under `loraship serve` as a user runs it
(the CLI in a subprocess, the real tritonserver and frontend, the real openai, httpx and tritonclient
clients): a python stub or tritonserver killed with SIGKILL mid-stream ends every in-flight stream
with an error at once, readiness answers 503 until the model serves again, the model then answers
exactly as before without anyone acting, and serve says one line; too many crashes end serve with a
one-line error. A version swapped out in poll mode is no crash, and a server that stops answering
is restarted too."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import openai
import psutil
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import np_to_triton_dtype

from loraship.triton_repo.config import ModelOptions
from loraship.triton_repo.layout import write_version
from loraship.triton_repo.server import TritonServer
from loraship.triton_repo.runtime.supervisor import STUB, Supervisor, repository_index

MODEL = "tiny"
KEY = "stub-crash-key-5d0c7a"
PROMPT = "The quick brown fox"
LONG = 2000  # tokens: a stream still running when the stub is stopped (the context is 2048)
BATCH = 8  # the repository's in-flight batch
RECOVERED = re.compile(r"recovered: (?P<why>.+); tritonserver restarted, serving again after (?P<s>[\d.]+) s")


@pytest.fixture(scope="module")
def crash_repo(onnx_dir, tmp_path_factory) -> Path:
    """The tiny random-init model in a repository of its own (tests here write versions into it)."""
    root = tmp_path_factory.mktemp("stub-crash") / "repo"
    write_version(onnx_dir, root, ModelOptions(name=MODEL, max_batch_size=BATCH, threads=2))
    return root


@dataclass
class Served:
    """`loraship serve` in a subprocess: its URLs, its stdout and (as they come) its stderr lines."""

    proc: subprocess.Popen
    out: str
    err: list[str] = field(default_factory=list)

    @property
    def http(self) -> str:
        return re.search(r"HTTP\s+(http://127\.0\.0\.1:\d+)", self.out).group(1)

    @property
    def grpc(self) -> str:
        return re.search(r"gRPC\s+(127\.0\.0\.1:\d+)", self.out).group(1)

    def triton(self) -> psutil.Process:
        [triton] = [p for p in psutil.Process(self.proc.pid).children() if p.name() == "tritonserver"]
        return triton

    def stub(self) -> psutil.Process:
        [stub] = [p for p in self.triton().children() if p.cmdline()[:1] and p.cmdline()[0].endswith(STUB)
                  and p.status() != psutil.STATUS_ZOMBIE]
        return stub

    def wait_line(self, pattern: re.Pattern, timeout: float = 60.0, start: int = 0) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.err[start:]:
                if m := pattern.search(line):
                    return m
            assert time.monotonic() < deadline and self.proc.poll() is None, self.err
            time.sleep(0.05)


@pytest.fixture
def serve(crash_repo):
    """Start `loraship serve --api-key` with extra options; SIGINT it at the end and check nothing is left."""
    started: list[tuple[Served, list[int], str]] = []

    def launch(*extra: str, repo: Path = crash_repo) -> Served:
        env = {**os.environ, "LORASHIP_API_KEY": KEY}
        proc = subprocess.Popen([sys.executable, "-m", "loraship.cli.main", "serve", "--repo", str(repo), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        lines: list[str] = []
        served = Served(proc, "")
        threading.Thread(target=lambda: served.err.extend(iter(proc.stderr.readline, "")), daemon=True).start()
        deadline = time.monotonic() + 180
        while not any("Ctrl-C to stop." in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, (lines, served.err)
            lines.append(proc.stdout.readline())
        served.out = "".join(lines)
        prefix = re.search(r"shm-region-prefix-name=(\w+)", " ".join(served.triton().cmdline())).group(1)
        started.append((served, [served.triton().pid], prefix))
        return served

    yield launch
    for served, pids, prefix in started:
        family = psutil.Process(served.proc.pid).children(recursive=True) if served.proc.poll() is None else []
        if served.proc.poll() is None:
            served.proc.send_signal(signal.SIGINT)
        try:
            served.proc.wait(60)
        finally:
            if served.proc.poll() is None:
                served.proc.kill()
            for child in family:  # whatever serve left (each leads its own process group)
                if child.is_running():  # the same process (psutil checks its start time), not a reused pid
                    try:
                        os.killpg(child.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
        assert not list(Path("/dev/shm").glob(f"{prefix}*")), "shared memory left behind"
        assert not [p for p in psutil.process_iter(["cmdline"]) if prefix in " ".join(p.info["cmdline"] or [])]


# -- clients, each on its own thread: what the stream ended with, and when ---------------------------

@dataclass
class Stream:
    name: str
    events: int = 0
    outcome: str | None = None  # "done" (ended normally) or "error: ..."
    ended: float | None = None
    first: threading.Event = field(default_factory=threading.Event)

    def event(self) -> None:
        self.events += 1
        self.first.set()

    def end(self, outcome: str) -> None:
        self.outcome, self.ended = outcome, time.monotonic()
        self.first.set()


def openai_stream(served: Served, stream: Stream) -> None:
    """/v1/completions streamed through the frontend by the openai SDK."""
    client = openai.OpenAI(base_url=f"{served.http}/v1", api_key=KEY, max_retries=0, timeout=120)
    try:
        for _ in client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=LONG, stream=True):
            stream.event()
        stream.end("done")
    except Exception as exc:  # the SDK's error for an error event, or the dropped connection
        stream.end(f"error: {type(exc).__name__}: {exc}")


def v2_stream(served: Served, stream: Stream) -> None:
    """Triton's /v2 generate_stream through the frontend, read with httpx."""
    body = {"text_input": PROMPT, "max_tokens": LONG, "ignore_eos": True, "stream": True}
    try:
        with httpx.stream("POST", f"{served.http}/v2/models/{MODEL}/generate_stream", json=body,
                          headers={"x-api-key": KEY}, timeout=120) as resp:
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    if "error" in json.loads(line[5:]):
                        stream.end(f"error: {line}")
                        return
                    stream.event()
        stream.end("done")
    except httpx.HTTPError as exc:
        stream.end(f"error: {type(exc).__name__}: {exc}")


def grpc_stream(served: Served, stream: Stream, max_tokens: int = LONG) -> list[str]:
    """A decoupled gRPC stream straight to Triton with tritonclient; the texts it received."""
    texts: list[str] = []
    done = threading.Event()

    def callback(result, error):
        if error is not None:
            stream.end(f"error: {error}")
            done.set()
            return
        response = result.get_response()
        if any(o.name == "text_output" for o in response.outputs):
            texts.append(result.as_numpy("text_output").reshape(-1)[0].decode())
            stream.event()
        if response.parameters["triton_final_response"].bool_param:
            stream.end("done")
            done.set()

    client = grpcclient.InferenceServerClient(served.grpc)
    client.start_stream(callback=callback, headers={"triton-grpc-protocol-x-api-key": KEY})
    try:
        inputs = []
        fields = {"text_input": np.array([PROMPT.encode()], np.object_), "max_tokens": np.array([max_tokens], np.int32),
                  "ignore_eos": np.array([True]), "stream": np.array([True])}
        for name, arr in fields.items():
            tensor = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
            tensor.set_data_from_numpy(arr)
            inputs.append(tensor)
        client.async_stream_infer(MODEL, inputs, enable_empty_final_response=True)
        done.wait(120)
    finally:
        client.stop_stream()
        client.close()
    return texts


def answers(served: Served) -> tuple[str, str, str]:
    """The same greedy request three ways: /v2 generate and /v1 through the frontend, a gRPC stream direct."""
    body = json.dumps({"text_input": PROMPT, "max_tokens": 24}).encode()
    request = urllib.request.Request(f"{served.http}/v2/models/{MODEL}/generate", data=body,
                                     headers={"Content-Type": "application/json", "x-api-key": KEY})
    with urllib.request.urlopen(request, timeout=60) as resp:
        v2 = json.loads(resp.read())["text_output"]
    v1 = openai.OpenAI(base_url=f"{served.http}/v1", api_key=KEY, max_retries=0).completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=24).choices[0].text
    stream = Stream("grpc")
    grpc = "".join(grpc_stream(served, stream, max_tokens=24))
    assert stream.outcome == "done"
    return v2, v1, grpc


def ready_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def watch_ready(url: str, statuses: list[tuple[float, int | None]], timeout: float = 60.0) -> None:
    """Record readiness every 50 ms until it answers 200 again after it stopped, or ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = ready_status(url)
        statuses.append((time.monotonic(), status))
        if status == 200 and any(s != 200 for _, s in statuses):
            return
        time.sleep(0.05)


def kill_mid_stream(served: Served, victim: psutil.Process) -> tuple[float, list[Stream], list[tuple[float, int | None]]]:
    """Three long streams (openai /v1, /v2 SSE, gRPC) in flight, then ``victim`` killed: the stub is frozen
    (briefly: the python backend takes a stub that stays frozen for a second as dead) as soon as each stream
    has had an event, so every stream is mid-way (asserted). Returns the kill time, the streams (all ended)
    and readiness as seen through the frontend."""
    stub = served.stub()
    load = [Stream(f"load {i}") for i in range(BATCH - 3)]  # they fill the batch, so each stream runs at 1/8 the speed
    streams = [Stream("openai /v1"), Stream("/v2 SSE"), Stream("gRPC")]
    threads = [threading.Thread(target=fn, args=(served, s), daemon=True)
               for fn, s in [(grpc_stream, s) for s in load] + list(zip((openai_stream, v2_stream, grpc_stream), streams))]
    for t, s in zip(threads, load + streams):  # one after another: the first to start is the slowest to start
        t.start()
        assert s.first.wait(60), f"{s.name} never started"
    stub.suspend()
    print(f"\nat the kill: {[(s.name, s.events) for s in streams]}")
    assert [s.outcome for s in streams] == [None] * 3, [(s.name, s.events, s.outcome) for s in streams]
    victim.kill()
    killed = time.monotonic()
    statuses: list[tuple[float, int | None]] = []
    watch_ready(served.http, statuses)
    for t in threads:
        t.join(60)
    return killed, streams, statuses


def assert_recovered(served: Served, killed: float, streams: list[Stream], statuses: list[tuple[float, int | None]],
                     why: tuple[str, ...], before: tuple[str, str, str]) -> None:
    for s in streams:
        assert s.outcome is not None and s.outcome.startswith("error"), (s.name, s.events, s.outcome)
        assert 0 < s.events < LONG and s.ended - killed < 5.0, (s.name, s.events, s.ended - killed)
    seen = [s for _, s in statuses]
    assert 503 in seen and seen[-1] == 200, seen  # not ready while it recovers (Triton unreachable behind the frontend)
    assert 200 not in seen[seen.index(503):-1]
    line = served.wait_line(RECOVERED)
    assert line["why"] in why and float(line["s"]) < 30
    assert answers(served) == before  # the same tokens as before the crash, with nobody acting
    print(f"\n{line['why']}: streams ended {', '.join(f'{s.name} {s.ended - killed:.2f} s' for s in streams)} after the kill; "
          f"ready again after {statuses[-1][0] - killed:.2f} s; serve said {line['s']} s")


def test_a_killed_stub_ends_streams_with_an_error_and_the_model_serves_again(serve):
    served = serve()
    before = answers(served)
    triton = served.triton().pid
    stub = served.stub()
    killed, streams, statuses = kill_mid_stream(served, stub)
    # A stub killed while it holds a lock in shared memory makes Triton 2.51 itself abort (boost's
    # lock_exception); otherwise Triton stays up with the stub dead. Either way the server is restarted.
    assert_recovered(served, killed, streams, statuses,
                     (f"{MODEL}'s python stub {MODEL}_0_0 died", "tritonserver was killed by SIGABRT"), before)
    assert served.triton().pid != triton and served.stub().pid != stub.pid  # a new server, a new stub
    assert sum(bool(RECOVERED.search(line)) for line in served.err) == 1


def test_a_killed_tritonserver_is_restarted_the_same_way(serve):
    served = serve()
    before = answers(served)
    killed, streams, statuses = kill_mid_stream(served, served.triton())
    assert_recovered(served, killed, streams, statuses, ("tritonserver was killed by SIGKILL",), before)


def test_serve_gives_up_with_one_line_when_the_model_keeps_crashing(serve):
    served = serve("--max-restarts", "1")
    served.stub().kill()
    served.wait_line(RECOVERED)
    prefix = re.search(r"shm-region-prefix-name=(\w+)", " ".join(served.triton().cmdline())).group(1)
    served.stub().kill()
    assert served.proc.wait(60) == 1
    time.sleep(0.2)  # the reader thread takes the last line
    assert served.err[0].startswith("recovered: ") and len(served.err) == 2, served.err
    assert re.fullmatch(rf"Error: gave up: ({MODEL}'s python stub {MODEL}_0_0 died|tritonserver was killed by SIGABRT), "
                        r"and tritonserver needed more than 1 "
                        r"restart\(s\) within 600 s \(full log: \S+\)\n", served.err[1]), served.err[1]
    assert not list(Path("/dev/shm").glob(f"{prefix}*"))


def test_a_version_swapped_out_in_poll_mode_is_no_crash(serve, crash_repo, onnx_dir, tmp_path):
    """The old version's stub exits when the new one is ready; the index no longer lists it READY, so the
    supervisor leaves the server alone."""
    import shutil

    repo = Path(shutil.copytree(crash_repo, tmp_path / "repo"))
    served = serve("--model-control-mode", "poll", repo=repo)
    triton, old = served.triton().pid, served.stub().pid
    write_version(onnx_dir, repo, ModelOptions(name=MODEL, max_batch_size=8, threads=2))
    deadline = time.monotonic() + 120
    while psutil.pid_exists(old) and psutil.Process(old).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "version 1 was not unloaded"
        time.sleep(0.2)
    time.sleep(2.0)  # several of the supervisor's polls
    index = repository_index(served.http, KEY)  # through the frontend
    assert index is not None and index[(MODEL, "2")] == "READY" and index.get((MODEL, "1")) != "READY"
    assert served.triton().pid == triton and not any(RECOVERED.search(line) for line in served.err), served.err


def test_a_server_that_stops_answering_is_restarted(crash_repo):
    """SIGSTOP freezes tritonserver (its process and threads, not the stub): liveness stops answering, and
    after ``hang_s`` the supervisor restarts it."""
    said: list[str] = []
    with TritonServer(crash_repo, api_key=KEY) as server:
        supervisor = Supervisor(server, say=said.append, hang_s=3.0, probe_s=0.5)
        supervisor.watch()
        frozen = server.process.pid
        os.kill(frozen, signal.SIGSTOP)
        deadline = time.monotonic() + 30
        while (reason := supervisor.fault()) is None:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert re.fullmatch(r"tritonserver did not answer /v2/health/live for [3-9] s", reason), reason
        supervisor.recover(reason)
        assert server.process.pid != frozen and not psutil.pid_exists(frozen) and server.is_ready()
        assert said == [f"recovered: {reason}; tritonserver restarted, serving again after {supervisor.restarts[0][2]:.1f} s"]
        assert supervisor.fault() is None


def test_a_stub_that_died_before_the_supervisors_first_look_is_a_fault(crash_repo):
    """A stub killed between Triton's readiness and the supervisor's first snapshot (the container's test hit
    it once): its READY version runs in no stub, so the first poll reports it and the server is restarted."""
    said: list[str] = []
    with TritonServer(crash_repo, api_key=KEY) as server:
        [stub] = [p for p in psutil.Process(server.process.pid).children() if p.cmdline()[-2] == f"{MODEL}_0_0"]
        stub.kill()
        deadline = time.monotonic() + 30
        while stub.is_running() and stub.status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        supervisor = Supervisor(server, say=said.append)
        supervisor.watch()
        assert supervisor.fault() == f"{MODEL}'s python stub died"
        supervisor.recover(f"{MODEL}'s python stub died")
        assert server.is_ready() and supervisor.fault() is None
        assert said == [f"recovered: {MODEL}'s python stub died; tritonserver restarted, serving again after "
                        f"{supervisor.restarts[0][2]:.1f} s"]


def test_explicit_mode_loads_the_models_that_were_serving_again(serve):
    """A restarted server in explicit model-control mode starts with no model; the supervisor loads again the
    ones that were serving, so "serving again" is true."""
    served = serve("--model-control-mode", "explicit")
    assert "READY" not in repository_index(served.http, KEY).values()
    load = urllib.request.Request(f"{served.http}/v2/repository/models/{MODEL}/load", data=b"{}",
                                  headers={"Content-Type": "application/json", "x-api-key": KEY})
    with urllib.request.urlopen(load, timeout=120) as resp:
        assert resp.status == 200
    before = answers(served)
    served.stub().kill()
    assert served.wait_line(RECOVERED)["why"] in (f"{MODEL}'s python stub {MODEL}_0_0 died", "tritonserver was killed by SIGABRT")
    assert repository_index(served.http, KEY)[(MODEL, "1")] == "READY"
    assert answers(served) == before
