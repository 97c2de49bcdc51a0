"""`loraship demo` end to end: the README's first command trains the demo fine-tune and ends with its
answers to three held-out questions, streamed from a local Triton (the real tritonserver)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_answers_held_out_questions_through_triton_and_prints_the_summary(tmp_path):
    from loraship.engine import Engine, SamplingParams
    from loraship.engine.chat import ChatTemplate
    from loraship.export.evalset import is_correct, read_eval
    from loraship.pipeline.demo import pick_questions

    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "loraship.cli.main", "demo", "--out", str(out), "--max-tokens", "16"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    stdout = " ".join(result.stdout.split())

    engine = Engine.load(out / "onnx")
    chat = ChatTemplate.load(out / "onnx")
    cases = pick_questions(read_eval(out / "onnx" / "eval.jsonl"))
    assert len(cases) == 3 and len({c.question for c in cases}) == 3
    correct = 0
    for case in cases:  # the served reply is the in-process engine's reply to the same chat
        [local] = engine.generate([chat.encode(list(case.messages), engine.tokenizer)], SamplingParams(max_tokens=16))
        verdict = "✓ correct" if is_correct(local.text, case.answer) else "✗ wrong"
        line = f"question: {case.question} reply: {' '.join(local.text.split())} expected: {case.answer} {verdict}"
        assert line in stdout, (line, result.stdout)
        correct += is_correct(local.text, case.answer)
    assert correct >= 2
    for figure in ("parity: max |logit diff|", "parity: greedy tokens │ 100% identical",
                   f"fine-tune answers correct through Triton │ {correct}/3", "time to first token", "decode speed"):
        assert figure in stdout, result.stdout
    assert sorted(p.name for p in out.iterdir()) == [".loraship-state.json", "merged", "model", "onnx", "repo"]
    assert Path(out / "repo" / "demo" / "1" / "model.py").is_file()
    elsewhere = out.parent / "not-a-demo"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("keep me")
    refused = subprocess.run([sys.executable, "-m", "loraship.cli.main", "demo", "--out", str(elsewhere)],
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "--force" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert [p.name for p in elsewhere.iterdir()] == ["notes.txt"]
