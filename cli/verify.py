"""`loraship verify`: ONNX Runtime parity against the merged PyTorch model."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command(epilog="""\b
Example:
  loraship verify --merged work/merged --onnx work/onnx
  loraship verify --merged work/merged --onnx work/onnx-fp16 --prompts prompts.txt --atol 0.05 --json
  loraship verify --merged work/merged --onnx work/onnx-int4 --eval held-out.jsonl --min-accuracy 0.9
  loraship verify --merged work/merged --onnx work/onnx-int4 --base work/base
""")
@click.option("--merged", required=True, type=click.Path(path_type=Path), help="Merged PyTorch model folder.")
@click.option("--onnx", "onnx_dir", required=True, type=click.Path(path_type=Path), help="Export folder (`loraship export`).")
@click.option("--prompts", type=click.Path(path_type=Path), help="Prompts file: one per line, or JSONL with a prompt field.")
@click.option("--atol", type=float, help="Max abs first-step logit difference (default: fp32 1e-4, fp16 5e-2, int4 half "
                                          "the base model's distance from the merged one).")
@click.option("--min-agreement", type=float, help="Min mean greedy token agreement (default: fp32 1.0, fp16 0.9, int4 none).")
@click.option("--max-new-tokens", default=32, show_default=True, help="Greedy tokens compared per prompt.")
@click.option("--eval", "eval_file", type=click.Path(path_type=Path),
              help="Eval set (JSONL: messages + answer) to score both sides on [default: ONNX/eval.jsonl if present].")
@click.option("--base", type=click.Path(path_type=Path),
              help="Base model the adapter was merged into: int4's bound is half its distance from the merged model "
                   "[default: the base `loraship merge` recorded].")
@click.option("--min-accuracy", type=float, help="Fail if the export's eval accuracy through the engine is below this (0-1).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def verify(merged: Path, onnx_dir: Path, prompts: Path | None, atol: float | None, min_agreement: float | None,
           max_new_tokens: int, eval_file: Path | None, base: Path | None, min_accuracy: float | None,
           as_json: bool) -> None:
    """Compare logits and greedy tokens of the ONNX export with the merged model; exit 1 past tolerance.

    With an eval set (the export's eval.jsonl, carried from the adapter by merge and export, or
    --eval), both sides also answer its questions through the chat template and their accuracies
    are reported. The report is also written into the export's loraship.json under "verify".
    """
    from rich.console import Console
    from rich.table import Table

    from loraship.export.progress import Stages
    from loraship.export.verify import bound_text, check, verify as run_verify

    console = Console(stderr=True)
    with Stages(console)(f"comparing {onnx_dir} (ONNX Runtime) with {merged} (PyTorch)"):
        report = run_verify(merged, onnx_dir, prompts, atol, min_agreement, max_new_tokens,
                            eval_file=eval_file, min_accuracy=min_accuracy, base=base)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        table = Table(title=f"parity: {report.engine} {report.dtype} vs PyTorch ({', '.join(report.providers)})")
        for col in ("batch", "prompt", "max |logit diff|", "token agreement"):
            table.add_column(col)
        for case in report.cases:
            table.add_row(str(len(case.prompts)), " | ".join(p[:32] for p in case.prompts),
                          f"{case.max_abs_logit_diff:.3g}", " ".join(f"{a:.0%}" for a in case.token_agreement))
        console.print(table)
        if report.eval is not None:
            console.print(_eval_table(report))
        verdict = "[green]PASS[/]" if report.passed else "[red]FAIL[/]"
        console.print(f"{verdict} max logit diff {report.max_abs_logit_diff:.3g} (atol {bound_text(report.atol)}); "
                      f"token agreement {report.token_agreement:.1%} over {report.max_new_tokens} tokens "
                      f"(need {report.min_token_agreement:.0%})")
        if report.eval is not None:
            need = "" if report.min_accuracy is None else f" (need {report.min_accuracy:.0%})"
            console.print(f"eval accuracy through the engine {report.eval.engine.accuracy:.1%}{need}, "
                          f"PyTorch {report.eval.torch.accuracy:.1%}, same replies {report.eval.same_replies:.0%}")
    check(report)


def _eval_table(report):
    """Each eval question with the expected answer and both sides' replies."""
    from rich.markup import escape
    from rich.table import Table

    ev = report.eval
    n = len(ev.engine.replies)
    table = Table(title=f"eval set {ev.file}: engine {report.engine} {report.dtype} {sum(ev.engine.correct)}/{n} "
                        f"({ev.engine.accuracy:.1%}), PyTorch {sum(ev.torch.correct)}/{n} ({ev.torch.accuracy:.1%})")
    for col in ("question", "expected", "engine reply", "PyTorch reply"):
        table.add_column(col)
    mark = lambda ok: "[green]\u2713[/]" if ok else "[red]\u2717[/]"  # noqa: E731
    for q, a, er, ec, tr, tc in zip(ev.engine.questions, ev.engine.answers, ev.engine.replies, ev.engine.correct,
                                    ev.torch.replies, ev.torch.correct):
        table.add_row(escape(q[:48]), escape(a), f"{mark(ec)} {escape(er[:40])}", f"{mark(tc)} {escape(tr[:40])}")
    return table
