"""The load generator behind `loraship bench` (gRPC streams, HTTP server-sent events), against a real
tritonserver with its API key on."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from tritonclient.grpc import service_pb2_grpc

from loraship.client.bench import run_level
from loraship.client.loadgen import _level, grpc_result, infer_request, sse_result
from loraship.client.sampling import SamplingOptions

PROMPTS = ["Hello there", "The sea is", "One two three four five"]


def _response(completion_tokens: int | None, final: bool = False, error: str = ""):
    from tritonclient.grpc import service_pb2

    message = service_pb2.ModelStreamInferResponse(error_message=error)
    response = message.infer_response
    response.parameters["triton_final_response"].bool_param = final
    if completion_tokens is not None:
        for name, value in (("text_output", None), ("prompt_tokens", 5), ("completion_tokens", completion_tokens)):
            response.outputs.add(name=name, datatype="BYTES" if value is None else "INT32", shape=[1])
            response.raw_output_contents.append(b"\x01\x00\x00\x00x" if value is None else np.int32(value).tobytes())
    return message


def test_request_result_reads_ttft_at_the_first_token_and_the_total_at_the_final_response() -> None:
    start = 10.0
    times = [10.002, 10.003, 10.004, 10.006]
    messages = [_response(0), _response(1), _response(3), _response(3, final=True)]  # a token-less first response is not the TTFT
    for result in (grpc_result(start, times, messages),
                   sse_result(start, times, [b'{"text_output":"","prompt_tokens":5,"completion_tokens":0}',
                                             b' {"text_output":"a","prompt_tokens":5,"completion_tokens":1}',
                                             b'{"text_output":"bc","prompt_tokens":5,"completion_tokens":3}',
                                             b'{"text_output":"","prompt_tokens":5,"completion_tokens":3,"finish_reason":"length"}'])):
        assert result.ok and result.prompt_tokens == 5 and result.completion_tokens == 3
        assert result.ttft_s == pytest.approx(0.003) and result.total_s == pytest.approx(0.006)
        assert result.itl_s == pytest.approx(0.0015)
    failed = grpc_result(start, times[:1], [_response(None, error="in ensemble: max_tokens must be positive\ndetail")])
    assert not failed.ok and failed.error == "in ensemble: max_tokens must be positive"
    assert sse_result(start, times[:1], [b'{"error": "max_tokens must be positive"}']).error == "max_tokens must be positive"
    assert "no prompt_tokens" in grpc_result(start, times[:1], [_response(None, final=True)]).error


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_level_counts_match_the_server_and_the_client(served, protocol) -> None:
    client = served.client(protocol)
    results, wall = run_level(client, PROMPTS, 2, 8, requests=6)
    assert len(results) == 6 and all(r.ok for r in results) and wall > 0
    expected = sorted(client.generate(p, max_tokens=1).prompt_tokens for p in PROMPTS) * 2
    assert sorted(r.prompt_tokens for r in results) == sorted(expected)
    assert all(r.completion_tokens == 8 and 0 < r.ttft_s < r.total_s for r in results)


def test_the_request_protobuf_carries_every_input_type(served) -> None:
    """BYTES lists, FP32, UINT64, BOOL and INT32 as the server parses them: the same text as the
    tritonclient-based `Client.generate` with the same parameters."""
    client = served.client("grpc")
    params = {"max_tokens": 12, "temperature": 0.9, "top_p": 0.8, "seed": 5, "stop": ["zz", "qq"], "ignore_eos": True}
    inputs = client.request_inputs("The sea is", SamplingOptions(**params), stream=False)
    assert {name: datatype for name, (datatype, _) in inputs.items()} == {
        "text_input": "BYTES", "max_tokens": "INT32", "stream": "BOOL", "temperature": "FP32", "top_p": "FP32",
        "seed": "UINT64", "stop": "BYTES", "ignore_eos": "BOOL"}
    request = infer_request(client.model, inputs)
    stop = [i for i, tensor in enumerate(request.inputs) if tensor.name == "stop"][0]
    assert list(request.inputs[stop].shape) == [2]
    assert request.raw_input_contents[stop] == b"\x02\x00\x00\x00zz\x02\x00\x00\x00qq"
    with grpc.insecure_channel(client.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        [message] = stub.ModelStreamInfer(iter([request]), metadata=tuple(client.headers.items()))
    assert not message.error_message
    response = message.infer_response
    text = {o.name: response.raw_output_contents[i] for i, o in enumerate(response.outputs)}["text_output"][4:].decode()
    assert text == client.generate("The sea is", **params).text


def test_a_refused_key_fails_each_grpc_request_with_the_servers_reason(served) -> None:
    good = served.client("grpc")
    requests = [infer_request(good.model, good.request_inputs(p, SamplingOptions(max_tokens=4), stream=True)) for p in PROMPTS]
    bad = served.client("grpc", api_key="wrong-key")
    results, _ = asyncio.run(_level(bad, requests, 2, 3, None, None))
    assert len(results) == 3 and not any(r.ok for r in results)
    # Every request names Triton's reason: one refused after it went out from the stream's status; one whose
    # send lost the race with the refusal (gRPC then says only INTERNAL) from a fresh stream's refusal.
    assert all("This protocol is restricted" in r.error for r in results), [r.error for r in results]


def test_http_errors_name_the_servers_reason(served) -> None:
    good = served.client("http")
    body = [b'{"text_input": "Hello", "max_tokens": 4, "stream": true, "presence_penalty": 9}']
    results, _ = asyncio.run(_level(good, body, 1, 1, None, None))
    assert not results[0].ok and "presence_penalty must be in [-2, 2]" in results[0].error, results[0].error
    bad = served.client("http", api_key="wrong-key")
    results, _ = asyncio.run(_level(bad, body, 1, 1, None, None))
    assert not results[0].ok and "restricted" in results[0].error, results[0].error


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cancelling_a_level_stops_it_at_once(served, protocol) -> None:
    """Ctrl-C cancels the level's task: it stops within a second instead of running its remaining
    requests, and a request cut short is not counted as a failed one (a timeout is the watchdog's)."""
    import json
    import time

    client = served.client(protocol)
    params = SamplingOptions(max_tokens=1000, ignore_eos=True)
    if protocol == "grpc":
        payloads = [infer_request(client.model, client.request_inputs(p, params, stream=True)) for p in PROMPTS]
    else:
        payloads = [json.dumps({k: v for k, (_, v) in client.request_inputs(p, params, stream=True).items()}).encode()
                    for p in PROMPTS]
    done = []

    async def cancel_after_a_second() -> float:
        task = asyncio.ensure_future(_level(client, payloads, 2, 40, None, done.append))
        await asyncio.sleep(1.0)
        cancelled = time.perf_counter()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.perf_counter() - cancelled

    assert asyncio.run(cancel_after_a_second()) < 1.0
    assert len(done) < 40 and all(r.ok and r.completion_tokens == 1000 for r in done)
