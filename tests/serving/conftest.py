"""Serving fixtures: a tiny demo model taken through merge and export once, laid out as a
Triton repository and served by a real tritonserver (nvidia-pytriton's binary) on loopback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loraship.triton_repo.config import ModelOptions
from loraship.triton_repo.layout import write_version
from testkit import grpc_stream, post_json, scalars

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
def triton(plain_triton):
    """The session's real tritonserver without a key (tests/conftest.py ``plain_triton``, shared with
    tests/sampling): ``tiny`` is the session's tiny export as :func:`repo` lays it out."""
    return plain_triton


class Calls:
    """Raw protocol calls, so tests see exactly what Triton answers (not the client's view)."""

    post = staticmethod(post_json)  # POST JSON; (status, body) for successes and HTTP errors alike

    @staticmethod
    def sse(raw: bytes) -> list[dict]:
        """The JSON payloads of a text/event-stream body."""
        return [json.loads(line[5:]) for line in raw.decode().splitlines() if line.startswith("data:")]

    @staticmethod
    def grpc_stream(url: str, model: str, fields: dict, headers: dict | None = None, timeout: float = 60):
        """One request on a decoupled gRPC stream: its responses' outputs as Python values, or the error text.

        ``fields`` maps input names to numpy arrays (the dtype picks the Triton type).
        """
        responses = grpc_stream(url, model, fields, headers, timeout)
        return responses if isinstance(responses, str) else [scalars(r) for r in responses]


@pytest.fixture(scope="session")
def calls() -> Calls:
    return Calls()


def copy_repo(repo: Path, dest: Path) -> Path:
    shutil.copytree(repo, dest)
    return dest

