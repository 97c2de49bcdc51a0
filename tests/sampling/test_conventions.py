"""What Triton's LLM tools send, replayed against a real tritonserver.

The request rows are the ones genai-perf 0.0.16 (perf_analyzer 2.60) writes to ``inputs.json`` for
``--endpoint-type kserve --backend tensorrtllm`` and ``--backend vllm``, with ``--streaming`` and
``--output-tokens-mean N --output-tokens-mean-deterministic``: its TensorRTLLMConverter and
VLLMConverter (``genai_perf/inputs/converters``). ``infer_stream`` turns them into tensors as
perf_analyzer does. The rows with ``return_num_*`` are what Triton's OpenAI frontend sends with
``--backend vllm`` (``_create_vllm_inference_request``: the OpenAI request's fields, defaults
included, dumped into sampling_parameters). Outputs are checked against the in-process engine with
the same sampling parameters.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from loraship.engine import SamplingParams

N = 24


def trtllm_row(prompt: str, n: int = N, stream: bool = True, deterministic: bool = True) -> dict:
    """genai-perf's TensorRTLLMConverter row."""
    row = {"model": "tiny-eos", "text_input": [prompt], "max_tokens": [256], "exclude_input_in_output": [True]}
    if stream:
        row["stream"] = [True]
    if deterministic:
        row["min_length"] = [n]
    row["max_tokens"] = [n]
    return row


def vllm_row(prompt: str, n: int = N, stream: bool = True, deterministic: bool = True) -> dict:
    """genai-perf's VLLMConverter row: the numbers go into sampling_parameters as strings."""
    row = {"model": "tiny-eos", "text_input": [prompt], "exclude_input_in_output": [True]}
    if stream:
        row["stream"] = [True]
    sampling = {"max_tokens": f"{n}"}
    if deterministic:
        sampling["min_tokens"] = f"{n}"
    row["sampling_parameters"] = [json.dumps(sampling, separators=(",", ":"))]
    return row


def reference(engine, prompt: str, **params):
    [done] = engine.generate([prompt], SamplingParams(**params))
    return done


@pytest.mark.parametrize("row", [trtllm_row, vllm_row], ids=["tensorrtllm", "vllm"])
def test_genai_perf_deterministic_output_length_on_a_model_that_stops_early(served, eos_export, eos_engine, row) -> None:
    """min_length / min_tokens = max_tokens gives exactly N tokens where greedy would stop at EOS."""
    plain = served.infer("tiny-eos", row(eos_export.prompt, deterministic=False))
    assert served.final(plain)["finish_reason"] == "eos" and served.final(plain)["completion_tokens"] == eos_export.steps + 1
    responses = served.infer("tiny-eos", row(eos_export.prompt))
    expected = reference(eos_engine, eos_export.prompt, max_tokens=N, min_tokens=N)
    final = served.final(responses)
    assert final["completion_tokens"] == N and final["finish_reason"] == "length"
    assert len(responses) >= 2 and responses[-1]["text_output"].reshape(-1)[0] == b""  # streamed, then an empty final
    assert served.text(responses) == expected.text
    assert "num_output_tokens" not in responses[0], "counts only when asked for, as vLLM's backend does"


@pytest.mark.parametrize("row", [trtllm_row, vllm_row], ids=["tensorrtllm", "vllm"])
def test_genai_perf_without_streaming_answers_once(served, eos_export, eos_engine, row) -> None:
    responses = served.infer("tiny-eos", row(eos_export.prompt, stream=False))
    assert len(responses) == 1
    assert served.text(responses) == reference(eos_engine, eos_export.prompt, max_tokens=N, min_tokens=N).text


def test_vllm_token_counts_are_uint32_and_per_response(served, engine) -> None:
    """Triton's OpenAI frontend asks for num_input_tokens and num_output_tokens and sums the latter
    over a stream."""
    prompt = "Hello, how are you today?"
    row = {"text_input": [prompt], "stream": [True], "exclude_input_in_output": [True],
           "sampling_parameters": [json.dumps({"max_tokens": 12, "temperature": 0})],
           "return_num_input_tokens": [True], "return_num_output_tokens": [True]}
    responses = served.infer("tiny", row)
    assert all(r["num_input_tokens"].dtype == np.uint32 and r["num_output_tokens"].dtype == np.uint32 for r in responses)
    assert {int(r["num_input_tokens"][0]) for r in responses} == {len(engine.encode(prompt))}
    assert sum(int(r["num_output_tokens"][0]) for r in responses) == 12 == served.final(responses)["completion_tokens"]
    assert int(responses[-1]["num_output_tokens"][0]) == 0  # the empty final response carries no tokens
    assert served.text(responses) == reference(engine, prompt, max_tokens=12).text


def openai_frontend_row(prompt: str, sampling: dict, stream: bool) -> dict:
    """What Triton's OpenAI frontend (--backend vllm) sends for one OpenAI request."""
    return {"text_input": [prompt], "stream": [stream], "exclude_input_in_output": [True],
            "sampling_parameters": [json.dumps(sampling)], "return_num_input_tokens": [True],
            "return_num_output_tokens": [True]}


def test_triton_openai_frontend_requests_with_their_defaults(served, engine) -> None:
    """A chat and a completion request as the frontend dumps them: every field with a default comes
    along (n, best_of, logprobs, the zero penalties), and each is taken at that value."""
    prompt = "Explain what a transformer is"
    chat = {"frequency_penalty": 0.0, "ignore_eos": False, "logprobs": False, "n": 1, "presence_penalty": 0.0,
            "seed": 9, "temperature": 0.7, "top_p": 1.0, "max_tokens": 14}
    completion = {"best_of": 1, "frequency_penalty": 0.0, "ignore_eos": False, "n": 1, "presence_penalty": 0.0,
                  "seed": 9, "temperature": 1.0, "top_p": 1.0, "max_tokens": 14}
    for sampling in (chat, completion):
        expected = reference(engine, prompt, max_tokens=14, seed=9, temperature=sampling["temperature"])
        for stream in (True, False):
            responses = served.infer("tiny", openai_frontend_row(prompt, sampling, stream))
            assert not isinstance(responses, str), responses
            assert served.text(responses) == expected.text
            assert sum(int(r["num_output_tokens"][0]) for r in responses) == expected.completion_tokens
            assert {int(r["num_input_tokens"][0]) for r in responses} == {len(engine.encode(prompt))}


def test_a_request_without_max_tokens_gets_the_room_its_context_has_left(served, engine) -> None:
    """The default max_tokens (128) is capped by the context, not an error the caller never asked for;
    an explicit max_tokens past the context still is one."""
    from .conftest import SHORT_CONTEXT

    prompt = "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13"
    room = SHORT_CONTEXT - len(engine.encode(prompt))
    assert 0 < room < 128
    responses = served.infer("tiny-short", {"text_input": [prompt], "sampling_parameters": [json.dumps({"ignore_eos": True})]})
    final = served.final(responses)
    assert final["completion_tokens"] == room and final["finish_reason"] == "length"
    assert served.text(responses) == reference(engine, prompt, max_tokens=room, ignore_eos=True).text
    error = served.infer("tiny-short", {"text_input": [prompt], "max_tokens": [room + 1]})
    assert isinstance(error, str) and f"lower max_tokens to at most {room}" in error


def test_exclude_input_in_output_false_echoes_the_prompt(served, engine) -> None:
    prompt = "The quick brown fox"
    expected = reference(engine, prompt, max_tokens=8).text
    row = {"text_input": [prompt], "max_tokens": [8], "exclude_input_in_output": [False]}
    [response] = served.infer("tiny", row)
    assert response["text_output"][0].decode() == prompt + expected
    streamed = served.infer("tiny", {**row, "stream": [True]})
    assert streamed[0]["text_output"][0].decode().startswith(prompt) and served.text(streamed) == prompt + expected
    left_out = served.infer("tiny", {"text_input": [prompt], "max_tokens": [8]})
    assert served.text(left_out) == expected  # absent means excluded: loraship's own convention is unchanged


def test_tensorrtllm_sampling_names(served, engine) -> None:
    """random_seed, stop_words and the penalties under TensorRT-LLM's names and dtypes."""
    prompt = "Explain what a transformer is"
    row = {"text_input": [prompt], "max_tokens": [20], "temperature": [0.8], "top_p": [0.9], "top_k": [40],
           "random_seed": [7], "repetition_penalty": [1.3], "presence_penalty": [0.2], "frequency_penalty": [0.1]}
    params = dict(max_tokens=20, temperature=0.8, top_p=0.9, top_k=40, seed=7, repetition_penalty=1.3,
                  presence_penalty=0.2, frequency_penalty=0.1)
    expected = reference(engine, prompt, **params)
    [response] = served.infer("tiny", row)
    assert response["text_output"][0].decode() == expected.text
    assert int(response["completion_tokens"][0]) == expected.completion_tokens
    stop = expected.text[len(expected.text) // 2 :][:3]
    [stopped] = served.infer("tiny", {**row, "stop_words": [stop, "never appears"]})
    assert stopped["text_output"][0].decode() == reference(engine, prompt, **params, stop=(stop, "never appears")).text
    assert stopped["finish_reason"][0] == b"stop"


def test_vllm_sampling_parameters_keys(served, engine, eos_export, eos_engine) -> None:
    prompt = "Numbers: 0 1 2 3"
    sampling = {"max_tokens": 16, "temperature": 0.7, "top_p": 0.95, "top_k": -1, "seed": 11, "n": 1,
                "repetition_penalty": 1.2, "presence_penalty": 0.5, "frequency_penalty": -0.5, "stop": None}
    responses = served.infer("tiny", {"text_input": [prompt], "sampling_parameters": [json.dumps(sampling)]})
    expected = reference(engine, prompt, max_tokens=16, temperature=0.7, top_p=0.95, seed=11, repetition_penalty=1.2,
                         presence_penalty=0.5, frequency_penalty=-0.5)
    assert served.text(responses) == expected.text
    ignore = {"max_tokens": "20", "ignore_eos": "true", "stop": ["never appears"]}
    responses = served.infer("tiny-eos", {"text_input": [eos_export.prompt], "sampling_parameters": [json.dumps(ignore)]})
    assert served.final(responses)["completion_tokens"] == 20 and served.final(responses)["finish_reason"] == "length"
    assert served.text(responses) == reference(eos_engine, eos_export.prompt, max_tokens=20, ignore_eos=True).text
    extra = served.infer("tiny-eos", {"text_input": [eos_export.prompt], "max_tokens": [20], "ignore_eos": [True]})
    assert served.final(extra)["completion_tokens"] == 20  # genai-perf --extra-inputs ignore_eos:true


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ({"sampling_parameters": ['{"max_tokens": 8, "best_of": 2}']}, "sampling_parameters.best_of must be 1: one completion per request"),
        ({"sampling_parameters": ['{"logprobs": true}']}, "sampling_parameters.logprobs is not supported; leave it out or send false"),
        ({"sampling_parameters": ['{"logit_bias": {"5": 10}}']}, "sampling_parameters.logit_bias is not supported; leave it out or send {}"),
        ({"sampling_parameters": ['{"lora_name": "a"}']}, "this model serves no adapters, so adapter 'a' cannot be chosen"),
        ({"sampling_parameters": ['{"lora_name": 3}']}, "sampling_parameters.lora_name must be an adapter's name (a string), got 3"),
        ({"sampling_parameters": ['{"lora_nam": "a"}']}, "sampling_parameters.lora_nam is not supported; use max_tokens"),
        ({"sampling_parameters": ["{max_tokens: 8}"]}, "sampling_parameters is not valid JSON"),
        ({"sampling_parameters": ["[8]"]}, "sampling_parameters must be a JSON object"),
        ({"sampling_parameters": ['{"max_tokens": "eight"}']}, "sampling_parameters.max_tokens must be an integer, got 'eight'"),
        ({"sampling_parameters": ['{"ignore_eos": "yes"}']}, "sampling_parameters.ignore_eos must be true or false"),
        ({"sampling_parameters": ['{"n": 2}']}, "sampling_parameters.n must be 1"),
        ({"sampling_parameters": ['{"stop": [1]}']}, "sampling_parameters.stop must be a string or a list of strings"),
        ({"max_tokens": [8], "sampling_parameters": ['{"max_tokens": "8"}']}, "sampling_parameters.max_tokens and max_tokens both set max_tokens"),
        ({"seed": [1], "random_seed": [2]}, "random_seed and seed both set seed"),
        ({"presence_penalty": [3.0]}, r"presence_penalty must be in [-2, 2]"),
        ({"max_tokens": [8], "min_length": [9]}, "min_tokens must be in [0, max_tokens=8]"),
        ({"sampling_parameters": ['{"repetition_penalty": 0}']}, "repetition_penalty must be > 0"),
        ({"sampling_parameters": ['{"seed": -3}']}, "seed must be in [0, 2**64)"),
    ],
)
def test_unsupported_values_get_a_one_line_error(served, row: dict, needle: str) -> None:
    error = served.infer("tiny", {"text_input": ["Hello"], **row})
    assert isinstance(error, str) and needle in error, error
    assert "\n" not in error


def test_unknown_input_names_are_refused_by_triton(served) -> None:
    error = served.infer("tiny", {"text_input": ["Hello"], "beam_width": [2]})
    assert isinstance(error, str) and "beam_width" in error


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_bench_fixes_the_reply_length_on_a_model_that_stops_early(served, eos_export, protocol) -> None:
    """`loraship bench` sends ignore_eos by default: every reply is max_tokens long."""
    from loraship.client.bench import run_level
    from loraship.client.client import Client

    with Client(served.grpc_url if protocol == "grpc" else served.http_url, protocol, "tiny-eos") as client:
        fixed, _ = run_level(client, [eos_export.prompt], 2, 20, requests=4, ignore_eos=True)
        natural, _ = run_level(client, [eos_export.prompt], 2, 20, requests=2, ignore_eos=False)
    assert [r.completion_tokens for r in fixed] == [20] * 4
    assert [r.completion_tokens for r in natural] == [eos_export.steps + 1] * 2
