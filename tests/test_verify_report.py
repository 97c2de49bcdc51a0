"""`loraship verify`'s tables and verdict (export/verify_report.py), rendered from a report with known figures."""

from __future__ import annotations

import io

from rich.console import Console

from loraship.export.evalset import EvalResult
from loraship.export.verify import Case, EvalReport, Report
from loraship.export.verify_report import render, verdict


def _report(passed: bool = True, with_eval: bool = True) -> Report:
    cases = [Case(["Hello there, how are you doing today my friend?"], 1.5e-5, [1.0], [[1, 2]], [[1, 2]]),
             Case(["Hi", "Hello there"], 3.25e-5, [1.0, 0.75], [[1], [2]], [[1], [3]])]
    ev = None
    if with_eval:
        questions, answers = ["Write 12 in words.", "Write 7 in words."], ["twelve", "seven"]
        ev = EvalReport("eval.jsonl", 8, torch=EvalResult(questions, answers, ["twelve.", "seven"]),
                        engine=EvalResult(questions, answers, ["twelve.", "eight"]))
    return Report(dtype="fp32", engine="genai", atol=1e-4, min_token_agreement=1.0, max_new_tokens=32,
                  max_abs_logit_diff=3.25e-5, token_agreement=0.875, tokens_identical=False, tokenizer_match=True,
                  passed=passed, providers=["CPUExecutionProvider"], versions={}, cases=cases, eval=ev, min_accuracy=0.5)


def _text(report: Report) -> str:
    console = Console(file=io.StringIO(), width=200, record=True, color_system=None)
    for part in render(report):
        console.print(part)
    return console.export_text()


def test_the_parity_table_eval_table_and_verdict_carry_the_reports_figures():
    text = _text(_report())
    lines = text.splitlines()
    assert lines[0].strip() == "parity: genai fp32 vs PyTorch (CPUExecutionProvider)"
    rows = [line for line in lines if line.startswith("│")]
    assert "│ 1     │ Hello there, how are you doing t │ 1.5e-05          │ 100%            │" in rows
    assert "│ 2     │ Hi | Hello there                 │ 3.25e-05         │ 100% 75%        │" in rows
    assert "eval set eval.jsonl: engine genai fp32 1/2 (50.0%), PyTorch 2/2 (100.0%)" in " ".join(text.split())  # a wrapped title
    assert "│ Write 7 in words.  │ seven    │ ✗ eight      │ ✓ seven       │" in rows
    assert lines[-2] == "PASS max logit diff 3.25e-05 (atol 0.0001); token agreement 87.5% over 32 tokens (need 100%)"
    assert lines[-1] == "eval accuracy through the engine 50.0% (need 50%), PyTorch 100.0%, same replies 50%"


def test_a_failed_report_without_an_eval_set_prints_fail_and_no_eval_lines():
    report = _report(passed=False, with_eval=False)
    assert [type(part).__name__ for part in render(report)] == ["Table", "str"]
    assert verdict(report) == ["[red]FAIL[/] max logit diff 3.25e-05 (atol 0.0001); token agreement 87.5% over 32 tokens (need 100%)"]
    assert "eval" not in _text(report)
