"""`loraship convert-adapter`: a peft LoRA/QLoRA adapter into the slot layout of a base exported with slots."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(epilog="""\b
Example:
  loraship export --model work/base --out work/base-slots --max-adapters 4 --lora-targets attention
  loraship convert-adapter --adapter work/adapter --base work/base-slots --out work/adapters/numbers
""")
@click.option("--adapter", required=True, type=click.Path(path_type=Path), help="peft LoRA/QLoRA adapter folder.")
@click.option("--base", required=True, type=click.Path(path_type=Path),
              help="The base's export with LoRA slots (`loraship export --max-adapters`).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the converted adapter.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def convert_adapter(adapter: Path, base: Path, out: Path, force: bool) -> None:
    """Convert ADAPTER once for BASE's slots: rank padded to the slot rank, peft's scaling folded in, with
    checksums; an adapter that does not fit (rank, targets, another base) is refused in one line."""
    from loraship.export.lora_convert import convert_adapter as run_convert
    from loraship.export.progress import Stages

    with Stages()(f"converting {adapter} for the slots of {base}"):
        run_convert(adapter, base, out, force=force)
    click.echo(str(out))
