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
  loraship verify --onnx work/base-slots --adapter words=work/adapter --adapter roman=work/adapter-roman
""")
@click.option("--merged", type=click.Path(path_type=Path), help="Merged PyTorch model folder (not with --adapter).")
@click.option("--onnx", "onnx_dir", required=True, type=click.Path(path_type=Path),
              help="Export folder (`loraship export`); with --adapter, the base exported with LoRA slots (--max-adapters).")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=DIR",
              help="Per adapter, repeated: the peft adapter DIR, converted for --onnx's slots, runs through the multi-adapter "
                   "engine beside the others and is checked against its own merged model (merged into --base, default: the "
                   "base its adapter_config.json names), with its eval.jsonl when it has one.")
@click.option("--prompts", type=click.Path(path_type=Path), help="Prompts file: one per line, or JSONL with a prompt field.")
@click.option("--atol", type=float, help="Max abs first-step logit difference (default: fp32 1e-4, fp16 5e-2, int4 half "
                                          "the base model's distance from the merged one).")
@click.option("--min-agreement", type=float, help="Min mean greedy token agreement (default: fp32 1.0, fp16 0.9, int4 none).")
@click.option("--max-new-tokens", default=32, show_default=True, help="Greedy tokens compared per prompt.")
@click.option("--eval", "eval_file", type=click.Path(path_type=Path),
              help="Eval set (JSONL: messages + answer) to score both sides on [default: ONNX/eval.jsonl if present].")
@click.option("--base", type=click.Path(path_type=Path),
              help="Base model the adapter was merged into: int4's bound is half its distance from the merged model "
                   "[default: the base `loraship merge` recorded]. With --adapter: the base each adapter is merged into.")
@click.option("--min-accuracy", type=float, help="Fail if the export's eval accuracy through the engine is below this (0-1).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def verify(merged: Path | None, onnx_dir: Path, adapters: tuple[str, ...], prompts: Path | None, atol: float | None,
           min_agreement: float | None, max_new_tokens: int, eval_file: Path | None, base: Path | None,
           min_accuracy: float | None, as_json: bool) -> None:
    """Compare logits and greedy tokens of the ONNX export with the merged model; exit 1 past tolerance.

    With an eval set (the export's eval.jsonl, carried from the adapter by merge and export, or
    --eval), both sides also answer its questions through the chat template and their accuracies
    are reported. The report is also written into the export's loraship.json under "verify".

    With --adapter NAME=DIR (a base exported with LoRA slots as --onnx): every adapter at once through
    the multi-adapter engine, each against its own merged model; exit 1 naming the first that fails.
    """
    from rich.console import Console

    from loraship.errors import LorashipError
    from loraship.export.progress import Stages
    from loraship.export.verify import check, verify as run_verify
    from loraship.export.verify_report import render

    console = Console(stderr=True)
    if adapters:
        from loraship.export.adapter_verify import check_adapters, verify_peft_adapters
        from loraship.pipeline.multi import parse_adapters

        named = parse_adapters(adapters)
        if merged is not None or eval_file is not None or not isinstance(named, dict):
            raise LorashipError("--adapter takes NAME=DIR for each adapter, and no --merged or --eval (each adapter has "
                                "its own merged model and eval set)", "pass --onnx BASE_WITH_SLOTS --adapter NAME=DIR ...")
        reports = verify_peft_adapters(onnx_dir, named, base, prompts, atol, min_agreement, max_new_tokens, min_accuracy,
                                       console=console)
        if as_json:
            click.echo(json.dumps({name: report.to_dict() for name, report in reports.items()}, indent=2))
        else:
            for name, report in reports.items():
                console.rule(f"adapter {name}")
                for part in render(report):
                    console.print(part)
        check_adapters(reports)
        return
    if merged is None:
        raise LorashipError("verify needs --merged (or --adapter NAME=DIR with a base exported with LoRA slots)",
                            "pass --merged the folder `loraship merge` wrote")
    with Stages(console)(f"comparing {onnx_dir} (ONNX Runtime) with {merged} (PyTorch)"):
        report = run_verify(merged, onnx_dir, prompts, atol, min_agreement, max_new_tokens,
                            eval_file=eval_file, min_accuracy=min_accuracy, base=base)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for part in render(report):
            console.print(part)
    check(report)
