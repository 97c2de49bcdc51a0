"""Generation through a real tritonserver (python backend, decoupled) against the in-process engine."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from testkit import metrics_text

from .conftest import MAX_TOKENS, MODEL, PROMPTS


def grpc_fields(prompt, max_tokens=MAX_TOKENS, stream=True, **extra) -> dict:
    fields = {
        "text_input": np.array([prompt.encode()], dtype=np.object_),
        "max_tokens": np.array([max_tokens], dtype=np.int32),
        "stream": np.array([stream], dtype=np.bool_),
    }
    fields.update(extra)
    return fields


def check_stream(events: list[dict], expected) -> None:
    """Token responses carry the engine's deltas for the tokens they count (one each, or several
    joined when the sender fell behind); the last one has the counts."""
    text, deltas, prompt_tokens, finish_reason = expected
    *tokens, last = events
    counts = [e["completion_tokens"] for e in tokens]
    assert counts == sorted(set(counts)) and counts[-1] == len(deltas)
    for before, event in zip([0, *counts], tokens):
        assert event["text_output"] == "".join(deltas[before : event["completion_tokens"]])
    assert last["text_output"] == "" and last["finish_reason"] == finish_reason
    assert last["completion_tokens"] == len(deltas) and last["prompt_tokens"] == prompt_tokens
    assert "".join(e["text_output"] for e in events) == text


def test_http_generate_matches_engine(triton, reference, calls):
    for prompt in PROMPTS[:4]:
        status, body = calls.post(f"{triton.http_url}/v2/models/{MODEL}/generate",
                                  {"text_input": prompt, "max_tokens": MAX_TOKENS})
        text, deltas, prompt_tokens, finish_reason = reference[prompt]
        reply = json.loads(body)
        assert status == 200 and "error" not in reply, body
        assert reply["text_output"] == text
        assert reply["completion_tokens"] == len(deltas) and reply["prompt_tokens"] == prompt_tokens
        assert reply["finish_reason"] == finish_reason


def test_http_generate_stream_matches_engine_token_for_token(triton, reference, calls):
    for prompt in PROMPTS[:4]:
        status, body = calls.post(f"{triton.http_url}/v2/models/{MODEL}/generate_stream",
                                  {"text_input": prompt, "max_tokens": MAX_TOKENS, "stream": True})
        assert status == 200, body
        check_stream(calls.sse(body), reference[prompt])


def test_grpc_stream_matches_engine_token_for_token(triton, reference, calls):
    for prompt in PROMPTS[:4]:
        events = calls.grpc_stream(triton.grpc_url, MODEL, grpc_fields(prompt))
        assert isinstance(events, list), events
        check_stream(events, reference[prompt])


def test_grpc_non_streaming_gives_one_response(triton, reference, calls):
    prompt = PROMPTS[0]
    events = calls.grpc_stream(triton.grpc_url, MODEL, grpc_fields(prompt, stream=False))
    assert len(events) == 1 and events[0]["text_output"] == reference[prompt][0]


def test_eight_concurrent_streams_each_match_engine(triton, reference, calls):
    """8 streams at once (in-flight batching inside the instance); each equals its batch-1 output."""
    with ThreadPoolExecutor(8) as pool:
        futures = {p: pool.submit(calls.grpc_stream, triton.grpc_url, MODEL, grpc_fields(p)) for p in PROMPTS}
        results = {p: f.result(timeout=120) for p, f in futures.items()}
    for prompt, events in results.items():
        assert isinstance(events, list), events
        check_stream(events, reference[prompt])


def test_eight_concurrent_streams_of_different_lengths_equal_each_alone(triton, engine, calls):
    """8 streams with 8 different prompt and output lengths decode together in one batch (rows join and
    leave between steps); each stream's text and token count equal that request decoded alone."""
    from loraship.engine import SamplingParams

    lengths = [5 + 5 * i for i in range(len(PROMPTS))]
    alone = {p: engine.generate([p], SamplingParams(max_tokens=n))[0] for p, n in zip(PROMPTS, lengths)}
    before = _metrics(triton)
    with ThreadPoolExecutor(8) as pool:
        futures = {p: pool.submit(calls.grpc_stream, triton.grpc_url, MODEL, grpc_fields(p, max_tokens=n))
                   for p, n in zip(PROMPTS, lengths)}
        results = {p: f.result(timeout=120) for p, f in futures.items()}
    for prompt, events in results.items():
        assert isinstance(events, list), events
        assert "".join(e["text_output"] for e in events) == alone[prompt].text
        assert events[-1]["completion_tokens"] == alone[prompt].completion_tokens
        assert events[-1]["finish_reason"] == alone[prompt].finish_reason
    # the model says it batched them: fewer decode steps than tokens, more than one request a step
    after = _metrics(triton)
    steps, rows = (_counter(after, k) - _counter(before, k) for k in ("loraship_decode_steps", "loraship_decode_rows"))
    assert rows == sum(c.completion_tokens - 1 for c in alone.values())  # each token after a request's first: one row of one step
    assert 0 < steps < rows, (steps, rows)  # one request a step would take a step per row
    assert _gauge(after, "loraship_active_rows_peak") > 1


def test_sampling_with_seed_is_reproducible_and_stop_strings_apply(triton, engine, reference, calls):
    from loraship.engine import SamplingParams

    prompt = PROMPTS[1]
    body = {"text_input": prompt, "max_tokens": 16, "temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 7}
    first = json.loads(calls.post(f"{triton.http_url}/v2/models/{MODEL}/generate", body)[1])
    second = json.loads(calls.post(f"{triton.http_url}/v2/models/{MODEL}/generate", body)[1])
    [local] = engine.generate([prompt], SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=7))
    assert first["text_output"] == second["text_output"] == local.text

    # A stop string the greedy output reaches mid-way: a clean word from its middle third.
    prompt, stop = next((p, d.strip()) for p in PROMPTS for d in reference[p][1][MAX_TOKENS // 3: 2 * MAX_TOKENS // 3]
                        if d.strip().isalnum() and reference[p][0].count(d.strip()) == 1)
    reply = json.loads(calls.post(f"{triton.http_url}/v2/models/{MODEL}/generate",
                                  {"text_input": prompt, "max_tokens": MAX_TOKENS, "stop": [stop]})[1])
    [local] = engine.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, stop=(stop,)))
    assert reply["finish_reason"] == "stop" == local.finish_reason
    assert reply["text_output"] == local.text and stop not in reply["text_output"]


BAD_HTTP = [
    ("no text_input", {"max_tokens": 4}, "text_input is required"),
    ("max_tokens zero", {"text_input": "hi", "max_tokens": 0}, "max_tokens must be positive"),
    ("max_tokens negative", {"text_input": "hi", "max_tokens": -3}, "max_tokens must be positive"),
    ("max_tokens above the context", {"text_input": "hi", "max_tokens": 100_000}, "exceeds the context"),
    ("prompt longer than the context", {"text_input": "hello world " * 3000, "max_tokens": 4}, "shorten the prompt"),
    ("max_tokens as text", {"text_input": "hi", "max_tokens": "ten"}, "Unable to parse"),  # Triton's own check
    ("temperature negative", {"text_input": "hi", "max_tokens": 4, "temperature": -1.0}, "temperature must be"),
    ("empty prompt", {"text_input": "", "max_tokens": 4}, "empty prompt"),
]


@pytest.mark.parametrize("endpoint", ["generate", "generate_stream"])
@pytest.mark.parametrize("case,body,message", BAD_HTTP, ids=[c[0] for c in BAD_HTTP])
def test_bad_http_request_gets_clear_error_and_server_keeps_serving(triton, reference, calls, endpoint, case, body, message):
    status, raw = calls.post(f"{triton.http_url}/v2/models/{MODEL}/{endpoint}", body)
    assert status >= 400, raw
    reply = calls.sse(raw)[0] if raw.startswith(b"data:") else json.loads(raw)
    assert message in reply["error"], reply
    status, raw = calls.post(f"{triton.http_url}/v2/models/{MODEL}/generate", {"text_input": PROMPTS[0], "max_tokens": MAX_TOKENS})
    assert status == 200 and json.loads(raw)["text_output"] == reference[PROMPTS[0]][0]


def test_generate_with_stream_true_is_refused_in_the_body(triton, calls):
    """/generate needs exactly one response: Triton answers a streaming request with an error field."""
    status, raw = calls.post(f"{triton.http_url}/v2/models/{MODEL}/generate",
                             {"text_input": "hi", "max_tokens": 3, "stream": True})
    assert "exactly 1 response" in json.loads(raw)["error"]


def test_unknown_model_is_refused(triton, calls):
    for endpoint in ("generate", "generate_stream"):
        status, raw = calls.post(f"{triton.http_url}/v2/models/nope/{endpoint}", {"text_input": "hi", "max_tokens": 3})
        assert status >= 400 and b"nope" in raw, raw
    error = calls.grpc_stream(triton.grpc_url, "nope", grpc_fields("hi"))
    assert isinstance(error, str) and "nope" in error


BAD_GRPC = [
    ("no text_input", {"max_tokens": np.array([4], np.int32)}, "text_input is required"),
    ("max_tokens as FP32", {"text_input": np.array([b"hi"], np.object_), "max_tokens": np.array([4.0], np.float32)}, "data-type"),
    ("two prompts", {"text_input": np.array([b"a", b"b"], np.object_)}, "unexpected shape"),
    ("max_tokens zero", grpc_fields("hi", 0), "max_tokens must be positive"),
    ("prompt longer than the context", grpc_fields("hello world " * 3000, 4), "shorten the prompt"),
    ("invalid UTF-8", {"text_input": np.array([b"\xff\xfe"], np.object_)}, "UTF-8"),
]


@pytest.mark.parametrize("case,fields,message", BAD_GRPC, ids=[c[0] for c in BAD_GRPC])
def test_bad_grpc_request_gets_clear_error_and_server_keeps_serving(triton, reference, calls, case, fields, message):
    error = calls.grpc_stream(triton.grpc_url, MODEL, fields)
    assert isinstance(error, str) and message in error, error
    events = calls.grpc_stream(triton.grpc_url, MODEL, grpc_fields(PROMPTS[0]))
    assert "".join(e["text_output"] for e in events) == reference[PROMPTS[0]][0]


def _metrics(triton) -> str:
    return metrics_text(triton.metrics_url)


def _gauge(metrics: str, name: str) -> float:
    """A loraship gauge of this model on Triton's /metrics (its highest value over versions)."""
    from loraship.client.metrics import parse

    return max(v for n, labels, v in parse(metrics) if n == name and labels.get("model") == MODEL)


def _counter(metrics: str, name: str) -> float:
    """A loraship counter of this model on Triton's /metrics (0 before its first increment)."""
    from loraship.client.metrics import model_counters

    return model_counters(metrics, MODEL)[name]


def _abandon_grpc_stream(triton, max_tokens: int) -> None:
    """Start a streamed request, read three responses, then cancel the stream."""
    import queue

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    got: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(triton.grpc_url)
    client.start_stream(callback=lambda result, error: got.put(error or result))
    inputs = []
    for name, arr in grpc_fields(PROMPTS[0], max_tokens=max_tokens).items():
        tensor = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        tensor.set_data_from_numpy(arr)
        inputs.append(tensor)
    client.async_stream_infer(MODEL, inputs)
    for _ in range(3):
        item = got.get(timeout=30)
        assert not isinstance(item, Exception), item
    client.stop_stream(cancel_requests=True)
    client.close()


def _abandon_sse(triton, max_tokens: int) -> None:
    """POST to generate_stream, read three SSE events, then close the connection."""
    import socket

    host, port = triton.http_url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps({"text_input": PROMPTS[0], "max_tokens": max_tokens, "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"POST /v2/models/{MODEL}/generate_stream HTTP/1.1\r\nHost: {host}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        got = b""
        while got.count(b"data:") < 3:
            chunk = sock.recv(4096)
            assert chunk, got
            got += chunk


@pytest.mark.parametrize("abandon", [_abandon_grpc_stream, _abandon_sse], ids=["grpc-cancel", "sse-disconnect"])
def test_client_that_goes_away_mid_stream_stops_its_generation(triton, reference, calls, abandon):
    """A client leaves after three tokens of an 1800-token request (a cancelled gRPC stream, or a
    closed SSE connection): the model stops that sequence (its own counters on /metrics say so)
    far short of max_tokens, and the next request is served unchanged."""
    import time

    before = _metrics(triton)
    max_tokens = 1800
    abandon(triton, max_tokens)
    deadline = time.monotonic() + 30
    after = _metrics(triton)
    while _counter(after, "loraship_requests_cancelled") == _counter(before, "loraship_requests_cancelled"):
        assert time.monotonic() < deadline, "the abandoned request never ended"
        time.sleep(0.1)
        after = _metrics(triton)
    assert _counter(after, "loraship_requests_cancelled") == _counter(before, "loraship_requests_cancelled") + 1
    generated = _counter(after, "loraship_completion_tokens") - _counter(before, "loraship_completion_tokens")
    assert 3 <= generated < max_tokens / 2, generated
    events = calls.grpc_stream(triton.grpc_url, MODEL, grpc_fields(PROMPTS[1]))
    check_stream(events, reference[PROMPTS[1]])
    print(f"stopped after {generated:.0f} of {max_tokens} tokens")
