"""`loraship demo` end to end: the README's first command trains the demo fine-tune and ends with its
answers to three held-out questions, streamed from a local Triton (the real tritonserver).

Its training step is the session's ``trained`` fixture: the same ``demo_model`` call (phi3, tiny, seed 0),
whose output is byte-identical run to run (``test_same_seed_same_model``), copied in instead of trained a
second time; merge, export, verify, repo, serving and the answers run here."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_answers_held_out_questions_through_triton_and_prints_the_summary(tmp_path, trained, run_cli, monkeypatch):
    from loraship.engine import Engine, SamplingParams
    from loraship.engine.chat import ChatTemplate
    from loraship.export import demo_model
    from loraship.export.evalset import is_correct, read_eval
    from loraship.pipeline.demo import pick_questions

    def trained_once(out: Path, arch: str = "phi3", size: str = "tiny", seed: int = 0, force: bool = False,
                     random: bool = False, console=None) -> Path:
        assert (arch, size, seed, random) == ("phi3", "tiny", 0, False)  # what the ``trained`` fixture ran
        shutil.rmtree(out, ignore_errors=True)
        return Path(shutil.copytree(trained.demo, out))

    monkeypatch.setattr(demo_model, "demo_model", trained_once)
    out = tmp_path / "demo"
    code, stdout, err = run_cli(["demo", "--out", str(out), "--max-tokens", "16"])
    assert code == 0, err[-2000:]
    result = subprocess.CompletedProcess([], code, stdout, err)
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
