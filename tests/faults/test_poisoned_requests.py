"""One request, one fault, through a real tritonserver (python backend, decoupled) on loopback.

A poisoned request (infinite or NaN sampling values through gRPC tensors, /v2 JSON and vLLM's
``sampling_parameters``) arrives while three long streams run: it gets a one-line error naming the
parameter, and the three finish with exactly the token ids each gets alone (both KV strategies). Integer
and type edges are refused in one line, never wrapped. A prompt over the byte bound is refused without
being tokenized, and a prompt being tokenized does not stop other streams from decoding.
"""

from __future__ import annotations

import json
import queue
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from loraship.engine import Engine, SamplingParams

MODELS = {"tiny": "genai", "tiny-grown": "optimum"}  # the genai export's KV rows; optimum's grown cache
PROMPTS = ("Hello, how are you today?", "The quick brown fox jumps over the lazy dog", "LoRA adds small low-rank matrices")
LONG = 1000


def _unbounded_copy(onnx_dir: Path, dest: Path) -> Path:
    """The export with a Strip normalizer in its tokenizer: text can vanish without limit, so no byte
    bound holds and a 4 MB prompt really is tokenized (then refused for its token count)."""
    shutil.copytree(onnx_dir, dest)
    spec = json.loads((dest / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Strip", "strip_left": True, "strip_right": True}
    (dest / "tokenizer.json").write_text(json.dumps(spec))
    manifest = json.loads((dest / "loraship.json").read_text())
    manifest.get("files", {}).pop("tokenizer.json", None)  # its checksum changed with it
    (dest / "loraship.json").write_text(json.dumps(manifest))
    return dest


@pytest.fixture(scope="module")
def exports(onnx_dir, optimum_dir, tmp_path_factory) -> dict[str, Path]:
    return {"tiny": onnx_dir, "tiny-grown": optimum_dir,
            "tiny-unbounded": _unbounded_copy(onnx_dir, tmp_path_factory.mktemp("unbounded") / "onnx")}


@pytest.fixture(scope="module")
def engines(exports) -> dict[str, Engine]:
    return {name: Engine.load(path) for name, path in exports.items()}


@pytest.fixture(scope="module")
def server(exports, tmp_path_factory):
    from loraship.triton_repo.config import ModelOptions
    from loraship.triton_repo.layout import write_version
    from loraship.triton_repo.server import TritonServer

    repo = tmp_path_factory.mktemp("faults") / "repo"
    for name, path in exports.items():
        write_version(path, repo, ModelOptions(name=name, max_batch_size=8, threads=1))
    with TritonServer(repo, ready_timeout=180) as server:
        yield server


def _alone(engine: Engine, prompt: str, max_tokens: int) -> list[int]:
    return _reference(engine, prompt, max_tokens).token_ids


def _reference(engine: Engine, prompt: str, max_tokens: int):
    return engine.generate([prompt], SamplingParams(max_tokens=max_tokens))[0]


def fields(prompt: str, max_tokens: int = LONG, **extra) -> dict:
    """gRPC inputs of a streamed request that reports each token's id (logprobs 0)."""
    out = {"text_input": np.array([prompt.encode()], np.object_), "max_tokens": np.array([max_tokens], np.int32),
           "stream": np.array([True]), "logprobs": np.array([0], np.int32)}
    out.update(extra)
    return out


@dataclass
class Stream:
    """One request on its own decoupled gRPC stream, read in the background."""

    url: str
    model: str
    inputs: dict
    token_ids: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # when each token response came
    final: dict | None = None
    error: str | None = None
    ended: float = 0.0  # when the final response or the error came

    def __post_init__(self) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import np_to_triton_dtype

        self.done = threading.Event()
        self.first = threading.Event()
        self.client = grpcclient.InferenceServerClient(self.url)
        self.client.start_stream(callback=self._callback)
        tensors = []
        for name, arr in self.inputs.items():
            tensor = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
            tensor.set_data_from_numpy(arr)
            tensors.append(tensor)
        self.sent = time.monotonic()
        self.client.async_stream_infer(self.model, tensors, enable_empty_final_response=True)

    def _callback(self, result, error) -> None:
        if error is not None:
            self.error = str(error)
            self.ended = time.monotonic()
            self.done.set()
            return
        response = result.get_response()
        outputs = {o.name: result.as_numpy(o.name).reshape(-1)[0] for o in response.outputs}
        if "logprobs" in outputs:
            self.token_ids += [e["token_id"] for e in json.loads(outputs["logprobs"])]
        if outputs.get("text_output"):
            self.arrivals.append(time.monotonic())
            self.first.set()
        if "finish_reason" in outputs:
            self.final = {k: (v.decode() if isinstance(v, bytes) else int(v)) for k, v in outputs.items() if k != "logprobs"}
        if response.parameters["triton_final_response"].bool_param:
            self.ended = time.monotonic()
            self.done.set()

    def wait(self, timeout: float = 120) -> "Stream":
        assert self.done.wait(timeout), f"{self.model}: no final response in {timeout} s"
        self.client.stop_stream()
        self.client.close()
        return self


def _post(url: str, body: dict) -> tuple[int, bytes]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _error_of(server, model: str, inputs: dict) -> str:
    stream = Stream(server.grpc_url, model, inputs).wait(60)
    assert stream.error is not None, (stream.final, stream.token_ids[:5])
    return stream.error


with np.errstate(over="ignore"):
    FP32_1E39 = np.array([1e39], np.float32)  # what a client's float32 tensor holds for 1e39: inf

POISONS = {
    "temperature 1e39 (inf in FP32)": ({"temperature": FP32_1E39, "min_length": np.array([4], np.int32)},
                                       "temperature must be a finite number, got inf"),
    "temperature NaN": ({"temperature": np.array([np.nan], np.float32)}, "temperature must be a finite number, got nan"),
    "top_p NaN": ({"temperature": np.array([0.8], np.float32), "top_p": np.array([np.nan], np.float32)}, "top_p must be a finite number"),
    'sampling_parameters {"temperature": "inf", "min_tokens": 4}': (
        {"sampling_parameters": np.array([b'{"temperature": "inf", "min_tokens": 4}'], np.object_)},
        "sampling_parameters.temperature must be a finite number, got 'inf'"),
    'sampling_parameters {"temperature": 1e999}': (
        {"sampling_parameters": np.array([b'{"temperature": 1e999, "min_tokens": 4}'], np.object_)},
        "sampling_parameters.temperature must be a finite number, got inf"),
    'sampling_parameters {"repetition_penalty": NaN}': (
        {"sampling_parameters": np.array([b'{"temperature": 0.7, "repetition_penalty": NaN}'], np.object_)},
        "sampling_parameters.repetition_penalty must be a finite number, got nan"),
}


@pytest.mark.parametrize("model", MODELS)
def test_a_poisoned_request_beside_three_long_streams(server, engines, model):
    """Each poison arrives while three 1000-token streams run; each is refused in one line naming its
    parameter, and the three streams end with exactly the token ids each gets alone."""
    alone = [_reference(engines[model], p, LONG) for p in PROMPTS]
    streams = [Stream(server.grpc_url, model, fields(p)) for p in PROMPTS]
    for stream in streams:
        assert stream.first.wait(60), stream.error
    for name, (extra, message) in POISONS.items():
        error = _error_of(server, model, {**fields("Numbers: 1 2 3 4 5", 40), "stream": np.array([True]), **extra})
        assert message in error and "\n" not in error, (name, error)
    assert not all(s.done.is_set() for s in streams)  # the poisons really came while they ran
    for stream, expected in zip(streams, alone):
        stream.wait()
        assert stream.error is None and stream.token_ids == expected.token_ids
        assert stream.final["finish_reason"] == expected.finish_reason and stream.final["completion_tokens"] == len(expected.token_ids)


def test_a_poisoned_json_request_is_a_400_naming_the_parameter(server, engines):
    """Over /v2 JSON, 1e39 parses into the FP32 input as inf: a 400 with the parameter's name; the
    server serves the next request."""
    url = f"{server.http_url}/v2/models/tiny/generate"
    status, raw = _post(url, {"text_input": "hi", "max_tokens": 8, "temperature": 1e39, "min_length": 3})
    assert status == 400 and "temperature must be a finite number, got inf" in json.loads(raw)["error"], raw
    status, raw = _post(url, {"text_input": "hi", "max_tokens": 8, "sampling_parameters": '{"temperature": "inf", "min_tokens": 3}'})
    assert status == 400 and "sampling_parameters.temperature must be a finite number" in json.loads(raw)["error"], raw
    status, raw = _post(url, {"text_input": PROMPTS[0], "max_tokens": 8})
    assert status == 200 and json.loads(raw)["text_output"] == engines["tiny"].generate([PROMPTS[0]], SamplingParams(max_tokens=8))[0].text


@pytest.mark.parametrize("endpoint", ["generate", "generate_stream"])
def test_an_unknown_json_key_is_refused_over_http(server, endpoint):
    """HTTP's generate extension passes a key that names no input on as a request parameter (gRPC refuses
    an unknown input itself): the model refuses it in one line, instead of ignoring it with a 200."""
    status, raw = _post(f"{server.http_url}/v2/models/tiny/{endpoint}", {"text_input": "hi", "max_tokens": 4, "beam_width": 2})
    assert status == 400, raw
    error = json.loads(raw[5:] if raw.startswith(b"data:") else raw)["error"]
    assert error == "beam_width is not an input of this model; GET /v2/models/tiny/config lists the inputs it takes"


I32 = np.int32
GRPC_EDGES = [
    ("max_tokens 2**31-1", {"max_tokens": np.array([2**31 - 1], I32)}, "max_tokens (2147483647) exceeds the context of 2048 tokens"),
    ("max_tokens -2**31", {"max_tokens": np.array([-(2**31)], I32)}, "max_tokens must be positive"),
    ("top_k -5", {"top_k": np.array([-5], I32)}, "top_k must be in [0, 2**31)"),
    ("min_length 2**31-1", {"min_length": np.array([2**31 - 1], I32)}, "min_tokens must be in [0, max_tokens=8]"),
    ("logprobs 2**31-1", {"logprobs": np.array([2**31 - 1], I32)}, "logprobs must be in [0, 20]"),
    ("prompt_logprobs -1", {"prompt_logprobs": np.array([-1], I32)}, "prompt_logprobs must be in [0, 20]"),
    ("temperature -inf", {"temperature": np.array([-np.inf], np.float32)}, "temperature must be a finite number, got -inf"),
    ("frequency_penalty inf", {"frequency_penalty": np.array([np.inf], np.float32)}, "frequency_penalty must be a finite number"),
    ("input_ids 2**31-1", {"input_ids": np.array([5, 2**31 - 1], I32)}, "token id 2147483647 is not in the model's vocabulary"),
    ("input_ids -2**31", {"input_ids": np.array([-(2**31)], I32)}, "token id -2147483648 is not in the model's vocabulary"),
    ("input_ids past the context", {"input_ids": np.full(100_000, 7, I32)}, "prompt is 100000 tokens but the model's context is 2048"),
    ("max_tokens as INT64", {"max_tokens": np.array([2**32 + 5], np.int64)}, "data-type"),  # Triton refuses the type itself
]


@pytest.mark.parametrize("case,extra,message", GRPC_EDGES, ids=[c[0] for c in GRPC_EDGES])
def test_integer_and_float_edges_of_grpc_tensors(server, case, extra, message):
    inputs = {**fields("Hello", 8), **extra}
    if "input_ids" in extra:
        del inputs["text_input"]
    error = _error_of(server, "tiny", inputs)
    assert message in error and "\n" not in error, error


def test_the_largest_seed_is_a_seed(server, engines):
    stream = Stream(server.grpc_url, "tiny", fields("Hello", 12, seed=np.array([2**64 - 1], np.uint64),
                                                    temperature=np.array([0.9], np.float32))).wait()
    expected = engines["tiny"].generate(["Hello"], SamplingParams(max_tokens=12, seed=2**64 - 1, temperature=np.float32(0.9)))[0]
    assert stream.error is None and stream.token_ids == expected.token_ids


VLLM_EDGES = [
    ('{"max_tokens": 4294967301}', "sampling_parameters.max_tokens must be in [-2**31, 2**31), got 4294967301"),  # 2**32+5: no wrap to 5
    ('{"max_tokens": "4294967301"}', "sampling_parameters.max_tokens must be in [-2**31, 2**31), got '4294967301'"),
    ('{"max_tokens": 1180591620717411303424}', "sampling_parameters.max_tokens must be in [-2**31, 2**31), got 1180591620717411303424"),
    ('{"max_tokens": "' + "9" * 5000 + '"}', "sampling_parameters.max_tokens must be an integer, got '999999999999999999999999999999999999..."),
    ('{"max_tokens": true}', "sampling_parameters.max_tokens must be an integer, got True"),
    ('{"max_tokens": 8.5}', "sampling_parameters.max_tokens must be an integer, got 8.5"),
    ('{"top_k": 1e20}', "sampling_parameters.top_k must be an integer, got 1e+20"),
    ('{"temperature": "nan"}', "sampling_parameters.temperature must be a finite number, got 'nan'"),
    ('{"temperature": -Infinity}', "sampling_parameters.temperature must be a finite number, got -inf"),
    ('{"temperature": false}', "sampling_parameters.temperature must be a number, got False"),
    ('{"temperature": [1]}', "sampling_parameters.temperature must be a number, got [1]"),
    ('{"temperature": 1e400}', "sampling_parameters.temperature must be a finite number, got inf"),
    ('{"seed": -1}', "sampling_parameters.seed must be in [0, 2**64), got -1"),
    ('{"seed": 18446744073709551616}', "sampling_parameters.seed must be in [0, 2**64), got 18446744073709551616"),
    ('{"min_tokens": "2147483648"}', "sampling_parameters.min_tokens must be in [-2**31, 2**31), got '2147483648'"),
    ('{"ignore_eos": 1}', "sampling_parameters.ignore_eos must be true or false, got 1"),
    ("[" * 100_000 + "]" * 100_000, "sampling_parameters is not valid JSON"),  # nested past Python's recursion limit
]


@pytest.mark.parametrize("body,message", VLLM_EDGES, ids=[b[:40] for b, _ in VLLM_EDGES])
def test_wrongly_typed_and_out_of_range_sampling_parameters(server, body, message):
    inputs = {**fields("Hello", 8), "sampling_parameters": np.array([body.encode()], np.object_)}
    del inputs["max_tokens"]
    error = _error_of(server, "tiny", inputs)
    assert message in error and "\n" not in error, error


def test_prompts_over_the_byte_bound_are_refused_untokenized(server, engines):
    """4 MB of text_input, of messages, and 30 kB of stop strings: each refused in one line naming the
    bound (26,624 bytes: 13 bytes a token at most, times 2048), a check made before any tokenizing."""
    limit = engines["tiny"].text_bound.limit
    assert limit == 26_624
    error = _error_of(server, "tiny", fields("x" * (4 << 20), 8))
    assert error.endswith(f"text_input is 4,194,304 bytes, more than the {limit:,} bytes the model's context of 2048 tokens "
                          "could ever hold (13 bytes per token at most); shorten the prompt"), error
    chat = json.dumps([{"role": "user", "content": "y" * (4 << 20)}]).encode()
    inputs = {**fields("", 8), "messages": np.array([chat], np.object_)}
    del inputs["text_input"]
    assert f"messages is {len(chat):,} bytes, more than the {6 * limit:,} bytes" in _error_of(server, "tiny", inputs)
    inputs = {**fields("Hello", 8), "stop": np.array([b"z" * 30_000], np.object_)}
    assert "stop is 30,000 bytes, more than the 26,624 bytes" in _error_of(server, "tiny", inputs)
    chat = json.dumps([{"role": "user", "content": "ok \ud800"}]).encode()  # a lone surrogate, as JSON escapes allow
    inputs = {**fields("", 8), "messages": np.array([chat], np.object_)}
    del inputs["text_input"]
    assert "messages holds a lone surrogate" in _error_of(server, "tiny", inputs)


class SmallTraffic:
    """Three clients, each sending small streamed requests one after another until stopped; every
    token's arrival is recorded, and every request's token ids are checked against the engine's."""

    MAX_TOKENS = 120

    def __init__(self, server, model: str, engine: Engine) -> None:
        self.expected = {p: _alone(engine, p, self.MAX_TOKENS) for p in PROMPTS}
        self.arrivals: list[float] = []
        self.wrong: list[tuple[str, str | None]] = []
        self.served = 0
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(server.grpc_url, model, p)) for p in PROMPTS]
        for thread in self.threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(self.arrivals) < 10:
            assert time.monotonic() < deadline and not self.wrong, self.wrong
            time.sleep(0.01)

    def _client(self, url: str, model: str, prompt: str) -> None:
        while not self.stop.is_set():
            stream = Stream(url, model, fields(prompt, self.MAX_TOKENS)).wait()
            self.arrivals += stream.arrivals
            if stream.error is not None or stream.token_ids != self.expected[prompt]:
                self.wrong.append((prompt, stream.error))
            self.served += 1

    def finish(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(120)
        assert not self.wrong and self.served >= 3, (self.wrong, self.served)

    def longest_pause(self, start: float, end: float) -> float:
        """The longest time in [start, end] in which no small-request token arrived."""
        edges = [start, *sorted(t for t in self.arrivals if start < t < end), end]
        return max(b - a for a, b in zip(edges, edges[1:]))


def test_a_4mb_prompt_being_tokenized_does_not_pause_the_small_streams(server, engines):
    """A model whose tokenizer has no byte bound really tokenizes a 4 MB prompt (then refuses it for its
    token count). Small streamed requests keep receiving tokens all through it: the longest pause
    between their tokens is a small part of the large request's life, and each gets exactly its own
    tokens. (Tokenized inside execute() with Tokenizer.encode, which holds the GIL, they stopped for
    the whole tokenizing.)"""
    traffic = SmallTraffic(server, "tiny-unbounded", engines["tiny-unbounded"])
    try:
        large = Stream(server.grpc_url, "tiny-unbounded", fields("word " * 800_000, 16)).wait(120)
    finally:
        traffic.finish()
    assert large.error is not None and "tokens but the model's context is 2048" in large.error, large.error
    life = large.ended - large.sent
    assert traffic.longest_pause(large.sent, large.ended) < life / 3, (traffic.longest_pause(large.sent, large.ended), life)


def test_the_largest_admitted_prompt_is_served_beside_small_streams(server, engines):
    """The largest prompt the byte bound admits (" projections" x 2000: 24 kB, 2001 tokens) is prepared
    while small streamed requests decode (their tokens arrive between its send and its first token)
    and answered with its own tokens; each small request gets exactly its own."""
    traffic = SmallTraffic(server, "tiny", engines["tiny"])
    big = " projections" * 2000
    try:
        large = Stream(server.grpc_url, "tiny", fields(big, 16)).wait(120)
    finally:
        traffic.finish()
    assert large.error is None and large.final["prompt_tokens"] == 2001 and large.final["completion_tokens"] == 16
    assert large.token_ids == _alone(engines["tiny"], big, 16)
    assert [t for t in traffic.arrivals if large.sent < t < large.arrivals[0]]
