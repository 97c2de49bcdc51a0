"""A client that drops a non-streamed request cancels it: the frontend sends it upstream as a stream (Triton
notices a client gone only when it writes to it), closes that stream when its client goes, and the model
stops early; its own counters on Triton's /metrics say so. Before, it generated up to max_tokens."""

from __future__ import annotations

import json
import socket
import time

import pytest

from .conftest import AUTH, MODEL

MAX_TOKENS = 2000  # the tiny model's context is 2048; it decodes ~1500 tokens/s here, so ~1.3 s uncancelled


def _until(live, counter: str, value: float) -> dict[str, float]:
    deadline = time.monotonic() + 30
    while (now := live.counters())[counter] < value:
        assert time.monotonic() < deadline, f"{counter} never reached {value}"
        time.sleep(0.02)
    return now


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", f"/v2/models/{MODEL}/generate"])
def test_a_dropped_non_streamed_request_is_cancelled(live, route):
    """The client closes its connection once the model has the request (Triton's nv_inference_count), well
    before the 2000 tokens it asked for are generated."""
    body = {"model": MODEL, "max_tokens": MAX_TOKENS}
    body |= ({"text_input": "Hello", "ignore_eos": True} if route.startswith("/v2") else
             {"messages": [{"role": "user", "content": "Hello"}]} if "chat" in route else {"prompt": "Hello"})
    if route.startswith("/v2"):
        del body["model"]
    content = json.dumps(body).encode()
    before = live.counters()
    client = socket.create_connection(("127.0.0.1", live.port))
    client.sendall(f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: {AUTH['Authorization']}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(content)}\r\n\r\n".encode() + content)
    _until(live, "nv_inference_count", before["nv_inference_count"] + 1)  # the model is generating
    client.close()
    _until(live, "loraship_requests_cancelled", before["loraship_requests_cancelled"] + 1)
    time.sleep(0.5)
    after = live.counters()
    generated = after["loraship_completion_tokens"] - before["loraship_completion_tokens"]
    assert after["loraship_requests_cancelled"] == before["loraship_requests_cancelled"] + 1
    assert 1 <= generated < MAX_TOKENS, generated
    print(f"{route}: cancelled after {generated:.0f} of {MAX_TOKENS} tokens")
