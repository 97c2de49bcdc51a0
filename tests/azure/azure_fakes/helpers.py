"""Test data shared by the Azure tests."""

from __future__ import annotations

import os
from pathlib import Path

RG = "rg-loraship"


def make_repo(root: Path, name: str = "tiny", version: int = 1, size: int = 3 * 1024 * 1024 + 123, chat: bool = True) -> Path:
    """A Triton repository laid out like `loraship repo` (ROOT/repo, ROOT/wheels); ``chat``: the export has a chat template."""
    repo = root / "repo"
    (repo / name / str(version) / "onnx").mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_text(f'name: "{name}"\nbackend: "python"\nmodel_transaction_policy {{ decoupled: true }}\n'
                                              f'parameters {{ key: "chat_template" value {{ string_value: "{int(chat)}" }} }}\n')
    (repo / name / str(version) / "model.py").write_text(f"# version {version}\n")
    (repo / name / str(version) / "onnx" / "model.onnx").write_bytes(os.urandom(size))
    (root / "wheels").mkdir(exist_ok=True)
    (root / "wheels" / "start.sh").write_text("#!/bin/sh\nexec tritonserver \"$@\"\n")
    (root / "wheels" / "tokenizers-0.20.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(os.urandom(4096))
    return repo
