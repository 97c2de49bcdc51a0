"""`loraship export`: export a merged model to an ONNX decoder with KV cache."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(epilog="""\b
Example:
  loraship export --model work/merged --out work/onnx
  loraship export --model work/merged --out work/onnx-int4 --int4
  loraship export --model work/merged --out work/genai-cuda --dtype fp16 --target cuda
  loraship export --model work/merged --out work/onnx-optimum --engine optimum
""")
@click.option("--model", required=True, type=click.Path(path_type=Path), help="Merged model folder (`loraship merge`).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the ONNX model and manifest.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Weight dtype (fp16 KV cache and logits with the optimum engine).")
@click.option("--engine", type=click.Choice(["auto", "genai", "optimum"]), default="auto", show_default=True,
              help="auto: the onnxruntime-genai builder (GroupQueryAttention, batched in-place KV) where it "
                   "supports the architecture, else optimum-onnx text-generation-with-past.")
@click.option("--int4", is_flag=True, help="int4 weights (MatMulNBits); needs the genai builder.")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Provider the genai builder optimizes for (cuda: fp16 GQA kernels, CUDA graphs in serving).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def export(model: Path, out: Path, dtype: str, engine: str, int4: bool, target: str, force: bool) -> None:
    """Export MODEL to a self-contained ONNX folder: model.onnx, tokenizer, configs, loraship.json."""
    from loraship.export.onnx_export import export_onnx

    export_onnx(model, out, dtype=dtype, engine=engine, int4=int4, target=target, force=force)
    click.echo(str(out))
