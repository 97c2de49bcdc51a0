"""Serving fixtures: a tiny demo model taken through merge and export once, laid out as a
Triton repository and served by a real tritonserver (nvidia-pytriton's binary) on loopback."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from loraship.triton_repo.config import ModelOptions
from loraship.triton_repo.layout import write_version
from loraship.triton_repo.server import TritonServer

MODEL = "tiny"
PROMPTS = (
    "The quick brown fox",
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "LoRA adds small low-rank matrices",
    "Hello, how are you today?",
    "Numbers: 0 1 2 3",
    "A model reads tokens, one after another,",
    "Explain what a transformer is",
)
MAX_TOKENS = 24


@pytest.fixture(scope="session")
def engine(onnx_dir):
    """The in-process engine on the same ONNX folder the server serves."""
    from loraship.engine import Engine

    return Engine.load(onnx_dir)


@pytest.fixture(scope="session")
def reference(engine):
    """In-process greedy output per prompt: (text, per-token text deltas, prompt_tokens, finish_reason)."""
    from loraship.engine import SamplingParams

    out = {}
    for prompt in PROMPTS:
        deltas: list[str] = []
        [done] = engine.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS), on_token=lambda i, t, d: deltas.append(d))
        out[prompt] = (done.text, deltas, done.prompt_tokens, done.finish_reason)
    return out


@pytest.fixture(scope="session")
def repo(onnx_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("triton")
    write_version(onnx_dir, root / "repo", ModelOptions(name=MODEL, max_batch_size=8, threads=2))
    return root / "repo"


@pytest.fixture(scope="session")
def triton(repo):
    """A real tritonserver serving the repository; checks that it leaves no /dev/shm region behind."""
    server = TritonServer(repo, ready_timeout=120)
    with server:
        yield server
    assert not server.shm_regions(), "tritonserver left shared-memory regions behind"


class Calls:
    """Raw protocol calls, so tests see exactly what Triton answers (not the client's view)."""

    @staticmethod
    def post(url: str, body: dict | bytes, headers: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
        """POST JSON; (status, body) for successes and HTTP errors alike."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    @staticmethod
    def sse(raw: bytes) -> list[dict]:
        """The JSON payloads of a text/event-stream body."""
        return [json.loads(line[5:]) for line in raw.decode().splitlines() if line.startswith("data:")]

    @staticmethod
    def grpc_stream(url: str, model: str, fields: dict, headers: dict | None = None, timeout: float = 60):
        """One request on a decoupled gRPC stream: its responses as dicts, or the error text.

        ``fields`` maps input names to numpy arrays (the dtype picks the Triton type).
        """
        import queue

        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException, np_to_triton_dtype

        responses: list[dict] = []
        events: queue.Queue = queue.Queue()

        def callback(result, error):
            if error is not None:
                events.put(str(error))
                return
            response = result.get_response()
            fields = {}
            for out in response.outputs:
                value = result.as_numpy(out.name).reshape(-1)[0]
                fields[out.name] = value.decode() if isinstance(value, bytes) else int(value)
            if fields:
                responses.append(fields)
            if response.parameters["triton_final_response"].bool_param:
                events.put(None)

        client = grpcclient.InferenceServerClient(url)
        client.start_stream(callback=callback, headers=headers)
        try:
            inputs = []
            for name, arr in fields.items():
                tensor = grpcclient.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
                tensor.set_data_from_numpy(arr)
                inputs.append(tensor)
            try:
                client.async_stream_infer(model, inputs, enable_empty_final_response=True)
            except InferenceServerException:  # the stream died before the send; the cause went to the callback
                pass
            error = events.get(timeout=timeout)
        finally:
            client.stop_stream()
            client.close()
        return error if error is not None else responses


@pytest.fixture(scope="session")
def calls() -> Calls:
    return Calls()


def copy_repo(repo: Path, dest: Path) -> Path:
    shutil.copytree(repo, dest)
    return dest

