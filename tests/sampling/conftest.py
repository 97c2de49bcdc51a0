"""Fixtures for sampling controls (penalties, min_tokens, ignore_eos) and the LLM tools' input
conventions: the session's tiny export and a copy of it whose greedy path ends on EOS (``eos_export``),
both served by the session's ``plain_triton``, a real tritonserver on loopback (tests/conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from testkit import SHORT_CONTEXT, grpc_stream, scalars  # noqa: F401  (SHORT_CONTEXT: for the tests)



@dataclass(frozen=True)
class Served:
    """The session's ``plain_triton`` (tests/conftest.py): the tiny export as ``tiny`` (and capped to a short
    context as ``tiny-short``) and its EOS copy as ``tiny-eos``."""

    grpc_url: str
    http_url: str

    def infer(self, model: str, row: dict) -> list[dict] | str:
        return infer_stream(self.grpc_url, model, row)

    text = staticmethod(lambda responses: text_of(responses))
    final = staticmethod(lambda responses: final_of(responses))


@pytest.fixture(scope="session")
def served(plain_triton):
    return Served(plain_triton.grpc_url, plain_triton.http_url)


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
