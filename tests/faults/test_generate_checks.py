"""/v2 generate bodies are checked at the edge against the model's own inputs (its config, through Triton):
where Triton's JSON parser answers 500 for a wrong type, wraps an integer into int32 (max_tokens 2**32+5 ran
5 tokens) or ignores an unknown input, the frontend answers 400 in Triton's shape naming the input."""

from __future__ import annotations

import json

import pytest

from .conftest import MODEL

GENERATE = f"/v2/models/{MODEL}/generate"
GOOD = {"text_input": "Hello", "max_tokens": 3}
LEFT_OUT = object()


@pytest.mark.parametrize("route", ["generate", "generate_stream"])
@pytest.mark.parametrize(("fields", "named"), [
    ({"text_input": 5}, "'text_input' of model 'tiny' is TYPE_STRING"),
    ({"max_tokens": "abc"}, "'max_tokens' of model 'tiny' is TYPE_INT32"),
    ({"max_tokens": 4.0}, "'max_tokens' of model 'tiny' is TYPE_INT32"),
    ({"max_tokens": True}, "'max_tokens' of model 'tiny' is TYPE_INT32"),
    ({"max_tokens": None}, "'max_tokens' is null"),
    ({"max_tokens": [3, 4]}, "'max_tokens' of model 'tiny' is TYPE_INT32 with 1 value, not 2"),
    ({"max_tokens": 2**32 + 5}, "integer in [-2147483648, 2147483647], not 4294967301"),
    ({"max_tokens": 2**31}, "not 2147483648"),
    ({"max_tokens": 2**40}, "not 1099511627776"),
    ({"max_tokens": 2**70}, "not 1180591620717411303424"),
    ({"input_ids": [1, 2**40], "text_input": LEFT_OUT}, "'input_ids' of model 'tiny' is TYPE_INT32"),
    ({"seed": -1}, "'seed' of model 'tiny' is TYPE_UINT64: send an integer in [0, 18446744073709551615], not -1"),
    ({"seed": 2**64}, "'seed' of model 'tiny' is TYPE_UINT64"),
    ({"temperature": "inf"}, "'temperature' of model 'tiny' is TYPE_FP32: send a finite number"),
    ({"temperature": 1e39}, "'temperature' of model 'tiny' is TYPE_FP32: send a finite number"),
    ({"stream": 1}, "'stream' of model 'tiny' is TYPE_BOOL: send true or false, not 1"),
    ({"stop": ["x", 3]}, "'stop' of model 'tiny' is TYPE_STRING: send a JSON string, not 3"),
    ({"text_input": "\ud800"}, "input 'text_input' is not valid Unicode"),
    ({"parameters": 5}, "parameters must be a JSON object"),
    ({"parameters": {"max_tokens": "x"}}, "input 'max_tokens' is given twice (also in parameters)"),
    ({"id": 7}, "id must be a string"),
])
def test_wrong_types_and_integer_edges_get_400_naming_the_input(live, route, fields, named):
    body = {k: v for k, v in {**GOOD, **fields}.items() if v is not LEFT_OUT}
    reply = live.post(f"{GENERATE}{'_stream' if route == 'generate_stream' else ''}", body)
    assert reply.status_code == 400, (fields, reply.text)
    assert reply.headers["content-type"] == "application/json" and named in reply.json()["error"], reply.json()


@pytest.mark.parametrize(("raw", "said"), [
    (b"not json", "not valid JSON"),
    (b'{"text_input": "Hello", "max_tokens": NaN}', "NaN is not a JSON number"),
    (b'{"text_input": "Hello", "max_tokens": 1e400}', "TYPE_INT32"),
    (b'{"text_input": "Hello", "temperature": 1e400}', "finite number"),
    (b'{"text_input": "Hello", "max_tokens": 3, "max_tokens": 4}', "'max_tokens' is given twice"),
    (b'["Hello"]', "a JSON list, not a JSON object"),
    (b"", "empty, not a JSON object"),
    (b"[" * 100_000, "not valid JSON"),
])
def test_a_body_that_is_no_json_object_gets_400_not_500(live, raw, said):
    reply = live.post(GENERATE, raw)
    assert reply.status_code == 400 and said in reply.json()["error"], reply.text


def test_an_unknown_input_gets_400_as_grpc_refuses_it(live):
    """Triton's HTTP generate passes ``beam_width`` on as a request parameter (the model refuses it there); its
    gRPC API refuses it with these words, and so does the edge, before Triton sees it."""
    reply = live.post(GENERATE, {**GOOD, "beam_width": 4})
    assert reply.status_code == 400
    message = reply.json()["error"]
    assert message.startswith("unexpected inference input 'beam_width' for model 'tiny'") and "max_tokens" in message
    assert "GET /v2/models/tiny/config" in message
    direct = live.post(GENERATE, {**GOOD, "beam_width": 4}, direct=True)  # Triton alone passes it on: the model refuses it
    assert direct.status_code == 400 and direct.json()["error"].startswith("beam_width is not an input of this model")


def test_stream_true_on_generate_gets_400_pointing_at_generate_stream(live):
    reply = live.post(GENERATE, {**GOOD, "stream": True})
    assert reply.status_code == 400 and "generate_stream" in reply.json()["error"]
    direct = live.post(GENERATE, {**GOOD, "stream": True}, direct=True)
    assert direct.status_code == 200 and "error" in direct.json()  # Triton alone: 200 with an error body
    stream = live.post(f"{GENERATE}_stream", {**GOOD, "stream": True})
    events = [json.loads(line[5:]) for line in stream.text.splitlines() if line.startswith("data:")]
    assert stream.status_code == 200 and events[-1]["completion_tokens"] == 3


@pytest.mark.parametrize("fields", [
    {},
    {"id": "req-7", "parameters": {"priority": 0}},
    {"logprobs": 2, "prompt_logprobs": 1, "exclude_input_in_output": False, "return_num_output_tokens": True},
    {"temperature": 0.8, "seed": 2**64 - 1, "stop": "e", "top_k": 5},
    {"max_tokens": [3]},
])
def test_good_bodies_get_the_answer_triton_gives(live, fields):
    """What passes the edge is answered as Triton answers /generate, though it goes upstream as a stream."""
    body = {**GOOD, **fields}
    via, direct = live.post(GENERATE, body), live.post(GENERATE, body, direct=True)
    assert (via.status_code, direct.status_code) == (200, 200), via.text
    assert via.json() == direct.json() and list(via.json()) == list(direct.json())  # keys in Triton's order too


def test_model_errors_keep_tritons_status_and_words(live):
    for body in ({"text_input": "Hello", "max_tokens": 100_000}, {"text_input": "Hello", "input_ids": [1, 2]}):
        via, direct = live.post(GENERATE, body), live.post(GENERATE, body, direct=True)
        assert via.status_code == direct.status_code == 400 and via.json() == direct.json(), (via.text, direct.text)
    unknown = live.post("/v2/models/nope/generate", GOOD)
    assert unknown.status_code == 404 and "unknown model" in unknown.json()["error"]
