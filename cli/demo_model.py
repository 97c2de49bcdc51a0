"""`loraship demo-model`: a small random-init base, LoRA adapter and tokenizer."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(epilog="""\b
Example:
  loraship demo-model --out work
  loraship demo-model --out work-mid --arch llama --size mid --seed 1
""")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for base/, adapter/ and tokenizer/.")
@click.option("--arch", type=click.Choice(["phi3", "llama"]), default="phi3", show_default=True, help="Model architecture.")
@click.option("--size", type=click.Choice(["tiny", "mid"]), default="tiny", show_default=True,
              help="tiny: ~0.5M parameters (tests); mid: ~57M parameters (benchmarks).")
@click.option("--seed", default=0, show_default=True, help="Seed for the weights (output is deterministic).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def demo_model(out: Path, arch: str, size: str, seed: int, force: bool) -> None:
    """Build a random-init base model, a LoRA adapter that changes it, and a local BPE tokenizer."""
    from loraship.export.demo_model import demo_model as build
    from loraship.export.progress import Stages

    with Stages()(f"building {size} {arch} base, adapter and tokenizer in {out}"):
        build(out, arch=arch, size=size, seed=seed, force=force)
    click.echo(str(out))
