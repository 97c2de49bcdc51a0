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

    from loraship.export.progress import Stages
    from loraship.export.verify import check, verify as run_verify
    from loraship.export.verify_report import render

    console = Console(stderr=True)
    with Stages(console)(f"comparing {onnx_dir} (ONNX Runtime) with {merged} (PyTorch)"):
        report = run_verify(merged, onnx_dir, prompts, atol, min_agreement, max_new_tokens,
                            eval_file=eval_file, min_accuracy=min_accuracy, base=base)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for part in render(report):
            console.print(part)
    check(report)
