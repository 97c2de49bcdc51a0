"""Fixtures for sampling controls (penalties, min_tokens, ignore_eos) and the LLM tools' input
conventions: the session's tiny export, a copy of it whose greedy path ends on EOS, both served by a
real tritonserver on loopback."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

PROMPTS = ("The quick brown fox", "Hello, how are you today?", "Numbers: 0 1 2 3", "Explain what a transformer is")


@dataclass(frozen=True)
class EosExport:
    """An export whose greedy continuation of ``prompt`` emits EOS as generated token ``steps + 1``."""

    path: Path
    prompt: str
    eos: int
    steps: int  # tokens before the EOS


@pytest.fixture(scope="session")
def engine(onnx_dir):
    from loraship.engine import Engine

    return Engine.load(onnx_dir)


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
