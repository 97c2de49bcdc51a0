"""`loraship demo` end to end: the README's first command ends with a streamed reply from a local Triton."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_streams_the_engines_reply_and_prints_the_summary(tmp_path):
    from loraship.engine import Engine, SamplingParams
    from loraship.pipeline import DEMO_PROMPT as PROMPT

    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "loraship.cli.main", "demo", "--out", str(out), "--max-tokens", "16"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    [local] = Engine.load(out / "onnx").generate([PROMPT], SamplingParams(max_tokens=16))
    reply = result.stdout.split("reply:", 1)[1]
    expected = " ".join(local.text.split())[:20]
    assert expected and expected in " ".join(reply.split())
    for figure in ("parity: max |logit diff|", "parity: greedy tokens │ 100% identical", "time to first token", "decode speed"):
        assert figure in " ".join(result.stdout.split()), result.stdout
    assert sorted(p.name for p in out.iterdir()) == [".loraship-state.json", "merged", "model", "onnx", "repo"]
    assert Path(out / "repo" / "demo" / "1" / "model.py").is_file()
    elsewhere = out.parent / "not-a-demo"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("keep me")
    refused = subprocess.run([sys.executable, "-m", "loraship.cli.main", "demo", "--out", str(elsewhere)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "--force" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert [p.name for p in elsewhere.iterdir()] == ["notes.txt"]
