"""Fixtures for sampling controls (penalties, min_tokens, ignore_eos) and the LLM tools' input
conventions: the session's tiny export, a copy of it whose greedy path ends on EOS, both served by a
real tritonserver on loopback."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from testkit import grpc_stream, scalars

SHORT_CONTEXT = 48
PROMPTS = ("The quick brown fox", "Hello, how are you today?", "Numbers: 0 1 2 3", "Explain what a transformer is")


@dataclass(frozen=True)
class EosExport:
    """An export whose greedy continuation of ``prompt`` emits EOS as generated token ``steps + 1``."""

    path: Path
    prompt: str
    eos: int
    steps: int  # tokens before the EOS


@pytest.fixture(scope="session")
def eos_export(onnx_dir, engine, tmp_path_factory) -> EosExport:
    """The tiny export with one more EOS id in its manifest: a token its greedy path first emits a few
    steps into a prompt's continuation. The random-weight demo model rarely samples its real EOS; this
    gives a model that does, on the real ONNX Runtime path, whatever weights the demo model has."""
    from loraship.engine import SamplingParams

    for prompt in PROMPTS:
        [done] = engine.generate([prompt], SamplingParams(max_tokens=12))
        path = done.token_ids
        steps = next((i for i in range(3, len(path)) if path[i] not in path[:i] and path[i] not in engine.eos_ids), None)
        if steps is not None:
            break
    else:
        pytest.fail("no greedy continuation of the test prompts emits a new token after step 3")
    out = tmp_path_factory.mktemp("eos") / "onnx"
    shutil.copytree(onnx_dir, out)
    manifest = json.loads((out / "loraship.json").read_text())
    manifest["eos_token_ids"] = sorted(set(manifest.get("eos_token_ids") or []) | {path[steps]})
    (out / "loraship.json").write_text(json.dumps(manifest, indent=2))
    return EosExport(out, prompt, path[steps], steps)


@pytest.fixture(scope="session")
def eos_engine(eos_export):
    from loraship.engine import Engine

    return Engine.load(eos_export.path)


@dataclass(frozen=True)
class Served:
    """A real tritonserver serving the tiny export as ``tiny`` (and capped to a context of
    ``SHORT_CONTEXT`` tokens as ``tiny-short``) and its EOS copy as ``tiny-eos``."""

    grpc_url: str
    http_url: str

    def infer(self, model: str, row: dict) -> list[dict] | str:
        return infer_stream(self.grpc_url, model, row)

    text = staticmethod(lambda responses: text_of(responses))
    final = staticmethod(lambda responses: final_of(responses))


@pytest.fixture(scope="session")
def served(onnx_dir, eos_export, tmp_path_factory):
    from loraship.triton_repo.config import ModelOptions
    from loraship.triton_repo.layout import write_version
    from loraship.triton_repo.server import TritonServer

    repo = tmp_path_factory.mktemp("conventions") / "repo"
    write_version(onnx_dir, repo, ModelOptions(name="tiny", max_batch_size=8, threads=1))
    write_version(eos_export.path, repo, ModelOptions(name="tiny-eos", max_batch_size=8, threads=1))
    write_version(onnx_dir, repo, ModelOptions(name="tiny-short", max_batch_size=2, threads=1, max_context=SHORT_CONTEXT))
    with TritonServer(repo, ready_timeout=120) as server:
        yield Served(server.grpc_url, server.http_url)


def infer_stream(url: str, model: str, row: dict) -> list[dict] | str:
    """Send one request the way perf_analyzer turns a genai-perf ``inputs.json`` row into tensors:
    every key but ``model`` is an input whose values are the row's list, typed by the model's metadata
    (BYTES as UTF-8), shape ``[len(list)]``, over a decoupled gRPC stream. Returns each response's
    outputs as numpy arrays, or the error text."""
    import numpy as np
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import triton_to_np_dtype

    with grpcclient.InferenceServerClient(url) as client:
        types = {i.name: i.datatype for i in client.get_model_metadata(model).inputs}
    fields = {}
    for name, values in row.items():
        if name == "model":
            continue
        items = [v.encode() if isinstance(v, str) else v for v in values]
        datatype = types.get(name, "INT32")  # a name the model lacks: as TensorRT-LLM's ensemble types it
        fields[name] = (datatype, np.array(items, dtype=triton_to_np_dtype(datatype)))
    return grpc_stream(url, model, fields)


def text_of(responses: list[dict]) -> str:
    return "".join(r["text_output"].reshape(-1)[0].decode() for r in responses)


def final_of(responses: list[dict]) -> dict:
    """The last response's scalar outputs as Python values."""
    return scalars(responses[-1])
