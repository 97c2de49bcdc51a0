"""`loraship verify`: ONNX Runtime parity against the merged PyTorch model."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command(epilog="""\b
Example:
  loraship verify --merged work/merged --onnx work/onnx
  loraship verify --merged work/merged --onnx work/onnx-fp16 --prompts prompts.txt --atol 0.05 --json
""")
@click.option("--merged", required=True, type=click.Path(path_type=Path), help="Merged PyTorch model folder.")
@click.option("--onnx", "onnx_dir", required=True, type=click.Path(path_type=Path), help="Export folder (`loraship export`).")
@click.option("--prompts", type=click.Path(path_type=Path), help="Prompts file: one per line, or JSONL with a prompt field.")
@click.option("--atol", type=float, help="Max abs first-step logit difference (default: fp32 1e-4, fp16 5e-2, int4 2.0).")
@click.option("--min-agreement", type=float, help="Min mean greedy token agreement (default: fp32 1.0, fp16 0.9, int4 none).")
@click.option("--max-new-tokens", default=32, show_default=True, help="Greedy tokens compared per prompt.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def verify(merged: Path, onnx_dir: Path, prompts: Path | None, atol: float | None, min_agreement: float | None,
           max_new_tokens: int, as_json: bool) -> None:
    """Compare logits and greedy tokens of the ONNX export with the merged model; exit 1 past tolerance.

    The report is also written into the export's loraship.json under "verify".
    """
    from rich.console import Console
    from rich.table import Table

    from loraship.export.progress import Stages
    from loraship.export.verify import check, verify as run_verify

    console = Console(stderr=True)
    with Stages(console)(f"comparing {onnx_dir} (ONNX Runtime) with {merged} (PyTorch)"):
        report = run_verify(merged, onnx_dir, prompts, atol, min_agreement, max_new_tokens)
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
        verdict = "[green]PASS[/]" if report.passed else "[red]FAIL[/]"
        console.print(f"{verdict} max logit diff {report.max_abs_logit_diff:.3g} (atol {report.atol:g}); "
                      f"token agreement {report.token_agreement:.1%} over {report.max_new_tokens} tokens "
                      f"(need {report.min_token_agreement:.0%})")
    check(report)
