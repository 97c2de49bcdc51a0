"""`loraship merge`: merge a LoRA/QLoRA adapter into its full-precision base."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(epilog="""\b
Example:
  loraship merge --base work/base --adapter work/adapter --out work/merged
  loraship merge --base microsoft/Phi-3-mini-4k-instruct --adapter qlora-out --out merged --dtype fp16
  loraship merge --base work/base --adapter work/adapter --out work/merged --eval held-out.jsonl
""")
@click.option("--base", required=True, help="Base model folder or hub id (loaded in full precision, never 4-bit).")
@click.option("--adapter", required=True, type=click.Path(path_type=Path), help="peft LoRA/QLoRA adapter folder.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the merged model.")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "fp16", "bf16"]), default="auto", show_default=True,
              help="Weight dtype of the merged model (auto: the base's).")
@click.option("--tokenizer", type=click.Path(path_type=Path),
              help="Tokenizer folder, if neither the adapter nor the base has one.")
@click.option("--eval", "eval_file", type=click.Path(path_type=Path),
              help="Held-out eval set (JSONL) to carry along for `loraship verify` [default: ADAPTER/eval.jsonl if present].")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def merge(base: str, adapter: Path, out: Path, dtype: str, tokenizer: Path | None, eval_file: Path | None,
          force: bool) -> None:
    """Merge ADAPTER into BASE with peft merge_and_unload; save weights, tokenizer and generation config."""
    from loraship.export.merge import merge as run_merge
    from loraship.export.progress import Stages

    with Stages()(f"merging {adapter} into {base}"):
        run_merge(base, adapter, out, dtype=dtype, tokenizer=tokenizer, force=force, eval_file=eval_file)
    click.echo(str(out))
