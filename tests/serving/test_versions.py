"""Versions on a real tritonserver polling the repository: a new version loads while the old
one keeps serving, and `--keep` prunes old version directories."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from loraship.triton_repo.config import ModelOptions
from loraship.triton_repo.layout import versions, write_version
from loraship.triton_repo.server import TritonServer

from .conftest import MAX_TOKENS, MODEL, PROMPTS, copy_repo


def version_ready(server, version: int) -> bool:
    try:
        with urllib.request.urlopen(f"{server.http_url}/v2/models/{MODEL}/versions/{version}/ready", timeout=5) as r:
            return r.status == 200
    except urllib.error.HTTPError:
        return False


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def polling(repo, tmp_path_factory):
    live = copy_repo(repo, tmp_path_factory.mktemp("versions") / "repo")
    server = TritonServer(live, model_control_mode="poll", poll_secs=1, ready_timeout=120)
    with server:
        yield server
    assert not server.shm_regions()


def test_new_version_loads_while_old_one_serves_then_keep_prunes(polling, onnx_dir, engine, reference, calls):
    prompt = PROMPTS[0]
    expected = reference[prompt][0]
    url = f"{polling.http_url}/v2/models/{MODEL}/generate"
    log: list[tuple[float, str, str]] = []  # (time, model_version, text or error)
    stop = threading.Event()

    def traffic():
        while not stop.is_set():
            status, raw = calls.post(url, {"text_input": prompt, "max_tokens": MAX_TOKENS})
            reply = json.loads(raw)
            log.append((time.monotonic(), reply.get("model_version", "?"), reply.get("text_output", reply.get("error"))))

    long_stream: dict = {}

    def long_request():  # in flight on version 1 across the switch
        status, raw = calls.post(f"{polling.http_url}/v2/models/{MODEL}/generate_stream",
                                 {"text_input": prompt, "max_tokens": engine.max_context - 32, "stream": True}, timeout=300)
        long_stream["events"], long_stream["end"] = calls.sse(raw), time.monotonic()

    threads = [threading.Thread(target=traffic), threading.Thread(target=long_request)]
    for t in threads:
        t.start()
    wait_for(lambda: len(log) >= 3)
    written = time.monotonic()
    result = write_version(onnx_dir, polling.repo, ModelOptions(name=MODEL, threads=2))
    assert result.version == 2 and result.pruned == []
    wait_for(lambda: version_ready(polling, 2))
    ready = time.monotonic()
    wait_for(lambda: not version_ready(polling, 1))  # latest {num_versions: 1}: the old one unloads
    wait_for(lambda: any(v == "2" and t > ready + 1.0 for t, v, _ in log))
    stop.set()
    for t in threads:
        t.join(300)

    assert all(text == expected for _, _, text in log), [e for e in log if e[2] != expected][:3]
    assert any(v == "1" and t > written for t, v, _ in log), "version 1 stopped serving before version 2 was ready"
    assert {v for t, v, _ in log if t > ready + 1.0} == {"2"}
    events = long_stream["events"]
    assert long_stream["end"] > written, "the long request was not in flight across the new version"
    assert "error" not in events[-1] and events[-1]["model_version"] == "1"
    counts = [e["completion_tokens"] for e in events[:-1]]  # a response may carry several tokens under load
    assert counts == sorted(set(counts)) and counts[-1] == events[-1]["completion_tokens"]
    assert events[-1]["finish_reason"] in ("length", "eos")

    # --keep 2: each new version prunes the oldest directory, never the two newest.
    third = write_version(onnx_dir, polling.repo, ModelOptions(name=MODEL, threads=2, keep=2))
    assert (third.version, third.pruned) == (3, [1])
    wait_for(lambda: version_ready(polling, 3))
    fourth = write_version(onnx_dir, polling.repo, ModelOptions(name=MODEL, threads=2, keep=2))
    assert (fourth.version, fourth.pruned) == (4, [2])
    assert versions(polling.repo / MODEL) == [3, 4]
    wait_for(lambda: version_ready(polling, 4))
    status, raw = calls.post(url, {"text_input": prompt, "max_tokens": MAX_TOKENS})
    reply = json.loads(raw)
    assert (reply["model_version"], reply["text_output"]) == ("4", expected)
