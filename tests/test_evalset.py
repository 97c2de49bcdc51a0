"""eval.jsonl: reading, scoring, and carrying it through merge and export (random-init models: no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraship.errors import LorashipError
from loraship.export.demo_data import QUESTIONS, TASK_RANGE, number_words, task_split
from loraship.export.evalset import EvalCase, is_correct, read_eval, score


@pytest.mark.parametrize("reply, answer, ok", [
    ("forty-seven", "forty-seven", True),
    ("  forty-seven\n", "forty-seven", True),
    ("forty-seven. It is odd.", "forty-seven", True),
    ("forty-seven is the answer", "forty-seven", True),
    ("forty-seven", "forty", False),       # a longer word is not the answer
    ("fortyseven", "forty", False),
    ("It is forty-seven", "forty-seven", False),
    ("", "forty", False),
    ("42", "42", True),
    ("420", "42", False),
])
def test_is_correct(reply, answer, ok):
    assert is_correct(reply, answer) is ok


def test_number_words_and_split():
    assert [number_words(n) for n in (20, 21, 47, 70, 99)] == ["twenty", "twenty-one", "forty-seven", "seventy", "ninety-nine"]
    with pytest.raises(ValueError):
        number_words(19)
    train, held = task_split(0)
    held_numbers = {int(c.question.split()[-3]) for c in held}
    train_numbers = {int(c.question.split()[-3]) for c in train}
    assert len(held) == 24 and len(train) == 56 * len(QUESTIONS)
    assert held_numbers | train_numbers == set(TASK_RANGE) and not held_numbers & train_numbers
    for tens in range(2, 10):  # three held out per tens digit; every units digit still trained with some tens digit
        assert sum(n // 10 == tens for n in held_numbers) == 3
    assert {n % 10 for n in train_numbers} == set(range(10))
    assert task_split(0) == task_split(0)


def test_read_eval_errors(tmp_path: Path):
    good = {"messages": [{"role": "user", "content": "What is 47 in words?"}], "answer": "forty-seven"}
    path = tmp_path / "eval.jsonl"
    path.write_text(json.dumps(good) + "\n\n")
    assert read_eval(path) == [EvalCase.ask("What is 47 in words?", "forty-seven")]
    for body, message in [
        ("not json\n", "bad eval case on line 1"),
        (json.dumps(good) + "\n" + json.dumps({"messages": [], "answer": "x"}) + "\n", "bad eval case on line 2"),
        (json.dumps({**good, "answer": ""}) + "\n", "needs non-empty messages and answer"),
        (json.dumps({"messages": [{"role": "assistant", "content": "hi"}], "answer": "x"}) + "\n", "no user message"),
        ("\n", "no eval cases in"),
    ]:
        path.write_text(body)
        with pytest.raises(LorashipError, match=message):
            read_eval(path)
    with pytest.raises(LorashipError, match="eval set not found"):
        read_eval(tmp_path / "missing.jsonl")


def test_score():
    cases = [EvalCase.ask("What is 21 in words?", "twenty-one"), EvalCase.ask("What is 30 in words?", "thirty")]
    result = score(cases, ["twenty-one", "thirty-one"])
    assert result.correct == [True, False] and result.accuracy == 0.5
    assert result.to_dict()["questions"] == ["What is 21 in words?", "What is 30 in words?"]


@pytest.fixture(scope="module")
def random_demo(tmp_path_factory) -> Path:
    from loraship.export.demo_model import demo_model

    return demo_model(tmp_path_factory.mktemp("evalset") / "demo", random=True, seed=2)


def test_merge_and_export_carry_the_eval_set(random_demo, tmp_path, run_cli):
    """merge takes --eval FILE (or ADAPTER/eval.jsonl), export copies the merged folder's, verify
    reads the export's; a malformed file stops merge before anything is written."""
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps(c.to_json()) + "\n" for c in task_split(2)[1][:3]))
    merged, onnx = tmp_path / "merged", tmp_path / "onnx"
    code, _, err = run_cli(["merge", "--base", str(random_demo / "base"), "--adapter", str(random_demo / "adapter"),
                            "--out", str(merged), "--eval", str(held)])
    assert code == 0, err
    assert (merged / "eval.jsonl").read_bytes() == held.read_bytes()
    code, _, err = run_cli(["export", "--model", str(merged), "--out", str(onnx)])
    assert code == 0, err
    assert (onnx / "eval.jsonl").read_bytes() == held.read_bytes()
    code, stdout, err = run_cli(["verify", "--merged", str(merged), "--onnx", str(onnx), "--json", "--max-new-tokens", "4"])
    report = json.loads(stdout)
    assert code == 0 and report["eval"]["cases"] == 3 and report["eval"]["file"] == str(onnx / "eval.jsonl")
    assert report["eval"]["engine"]["replies"] == report["eval"]["torch"]["replies"]  # random weights: same noise

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": "hi"}\n')
    code, _, err = run_cli(["merge", "--base", str(random_demo / "base"), "--adapter", str(random_demo / "adapter"),
                            "--out", str(tmp_path / "m2"), "--eval", str(bad)])
    assert code == 1 and err.strip().splitlines()[-1].startswith(f"Error: bad eval case on line 1 of {bad}")
    assert not (tmp_path / "m2").exists()
    code, _, err = run_cli(["merge", "--base", str(random_demo / "base"), "--adapter", str(random_demo / "adapter"),
                            "--out", str(tmp_path / "m3")])
    assert code == 0 and not (tmp_path / "m3" / "eval.jsonl").exists()  # a random demo has no eval set
    code, _, err = run_cli(["verify", "--merged", str(merged), "--onnx", str(onnx), "--eval", str(tmp_path / "nope.jsonl")])
    assert code == 1 and err.strip().splitlines()[-1].startswith("Error: eval set not found")
