"""A client that drops a non-streamed request cancels it: the frontend sends it upstream as a stream (Triton
notices a client gone only when it writes to it), closes that stream when its client goes, and the model
stops early; its own counters on Triton's /metrics say so. Before, it generated up to max_tokens."""

from __future__ import annotations

import time

import httpx
import pytest

from .conftest import AUTH, MODEL

MAX_TOKENS = 2000  # the tiny model's context is 2048; it decodes ~1500 tokens/s here, so ~1.3 s uncancelled


def _drop(url: str, body: dict, after_s: float) -> None:
    """POST and give up (closing the connection) after ``after_s`` seconds without an answer."""
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, headers=AUTH, timeout=httpx.Timeout(after_s, connect=10))


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", f"/v2/models/{MODEL}/generate"])
def test_a_dropped_non_streamed_request_is_cancelled(live, route):
    body = {"model": MODEL, "max_tokens": MAX_TOKENS}
    body |= ({"text_input": "Hello", "ignore_eos": True} if route.startswith("/v2") else
             {"messages": [{"role": "user", "content": "Hello"}]} if "chat" in route else {"prompt": "Hello"})
    if route.startswith("/v2"):
        del body["model"]
    before = live.counters()
    _drop(f"{live.frontend.root}{route}", body, 0.15)
    deadline = time.monotonic() + 30
    while (after := live.counters())["loraship_requests_cancelled"] < before["loraship_requests_cancelled"] + 1:
        assert time.monotonic() < deadline, "the dropped request was never cancelled"
        time.sleep(0.1)
    time.sleep(0.5)  # its last tokens are counted
    after = live.counters()
    generated = after["loraship_completion_tokens"] - before["loraship_completion_tokens"]
    assert after["loraship_requests_cancelled"] == before["loraship_requests_cancelled"] + 1
    assert 1 <= generated < MAX_TOKENS, generated
    print(f"{route}: cancelled after {generated:.0f} of {MAX_TOKENS} tokens")
