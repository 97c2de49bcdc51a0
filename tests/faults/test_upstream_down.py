"""Server faults reach clients as server faults. tritonserver is killed under the frontend mid-stream (as a crash,
or the supervisor restarting it, drops its connections): open streams end within seconds with an error event,
never a hang or a cut chunked body; while it is down /v1 and /v2 answer 503 with Retry-After (not 400
invalid_request_error), liveness (the frontend's own) stays 200 and readiness (Triton's) is 503. A crashed
model (``Stub process ... is not healthy``, HTTP 400 from Triton) is a 503 too. Each test leaves tritonserver
running again."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import openai
import psutil
import pytest

from .conftest import AUTH, MODEL, stub_processes

CHAT = [{"role": "user", "content": "Hello"}]


def _kill_triton(served) -> None:
    """SIGKILL tritonserver and its python stubs (its own process group), as a crash does."""
    if served.triton_alive():
        os.killpg(served.triton.process.pid, signal.SIGKILL)
        served.triton.process.wait()


def test_streams_whose_upstream_dies_end_promptly_with_an_error_event(live):
    """A streamed chat (the openai client) and a /v2 generate_stream (passed through), both mid-way (2000
    tokens take the tiny model over a second) when tritonserver dies."""
    started, ended = threading.Barrier(3), {}

    def chat() -> None:
        stream = live.openai().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2000, stream=True)
        chunks = iter(stream)
        while not next(chunks).choices[0].delta.content:  # the role chunk comes before any token
            pass
        started.wait()
        try:
            for _ in chunks:
                pass
            ended["v1"] = ("done", time.monotonic())
        except openai.APIError as exc:  # the openai client raises on an error event
            ended["v1"] = (exc.message, time.monotonic())

    def generate_stream() -> None:
        body = {"text_input": "Hello", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{live.frontend.root}/v2/models/{MODEL}/generate_stream", json=body, headers=AUTH,
                          timeout=60) as response:
            lines = response.iter_lines()
            assert response.status_code == 200 and json.loads(next(lines)[5:])["completion_tokens"] >= 1
            started.wait()
            events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]  # it ends, and its body is whole
        ended["v2"] = (events[-1].get("error", "done"), time.monotonic())
        assert all("error" not in e for e in events[:-1])

    threads = [threading.Thread(target=chat), threading.Thread(target=generate_stream)]
    for thread in threads:
        thread.start()
    started.wait(60)
    _kill_triton(live)
    killed = time.monotonic()
    for thread in threads:
        thread.join(30)
    for name in ("v1", "v2"):
        message, at = ended[name]
        assert "Triton closed the stream" in message and at - killed < 5, (name, message)


def test_while_triton_is_down_every_route_answers_503_with_retry_after(served):
    _kill_triton(served)  # (down already after the test above)
    root = served.frontend.root
    client = served.openai()
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "5"
    assert info.value.body["type"] == "server_error" and "not reachable" in info.value.body["message"]
    with pytest.raises(openai.InternalServerError):
        client.models.list()
    for path, body in ((f"/v2/models/{MODEL}/generate", {"text_input": "Hello", "max_tokens": 2}),
                       (f"/v2/models/{MODEL}/generate_stream", {"text_input": "Hello", "max_tokens": 2, "stream": True}),
                       ("/v2/repository/index", {})):
        reply = httpx.post(f"{root}{path}", json=body, headers=AUTH, timeout=30)
        assert reply.status_code == 503 and reply.headers["retry-after"] == "5", (path, reply.text)
        assert "not reachable" in reply.json()["error"]
    assert httpx.get(f"{root}/v2/health/live", timeout=30).status_code == 200  # the frontend itself is alive
    for path in ("/v2/health/ready", f"/v2/models/{MODEL}/ready"):
        assert httpx.get(f"{root}{path}", timeout=30).status_code == 503
    served.ensure_triton()  # back on the same port: the frontend serves again without a restart of its own
    assert httpx.get(f"{root}/v2/health/ready", timeout=30).status_code == 200
    assert client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2).usage.completion_tokens == 2


def test_a_crashed_model_is_a_503_not_a_clients_400(live):
    """kill -9 of the python stub: Triton answers ``Stub process 'tiny_0_0' is not healthy.`` with HTTP 400
    (its readiness stays 200); the frontend answers 503 with Retry-After on /v1 and /v2."""
    [stub] = stub_processes(live.triton)
    stub.kill()
    deadline = time.monotonic() + 30
    while stub.is_running() and stub.status() != psutil.STATUS_ZOMBIE:  # tritonserver's child: it reaps it, or not
        assert time.monotonic() < deadline
        time.sleep(0.1)
    try:
        direct = live.post(f"/v2/models/{MODEL}/generate", {"text_input": "Hello", "max_tokens": 2}, direct=True)
        if live.triton_alive():  # (a supervisor may already be restarting it: then the frontend finds it unreachable)
            assert direct.status_code == 400 and "is not healthy" in direct.json()["error"]
        with pytest.raises(openai.InternalServerError) as info:
            live.openai().chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
        assert info.value.status_code == 503 and info.value.body["type"] == "server_error"
        assert info.value.response.headers["retry-after"] == "5"
        for route in ("generate", "generate_stream"):
            reply = live.post(f"/v2/models/{MODEL}/{route}", {"text_input": "Hello", "max_tokens": 2})
            assert reply.status_code == 503 and reply.headers["retry-after"] == "5", reply.text
    finally:
        _kill_triton(live)  # (a SIGTERM would wait 30 s for the dead model)
        live.ensure_triton()
