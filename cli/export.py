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
  loraship export --rehash old-export      # record checksums in an export written before they existed
  loraship export --model work/base --out work/base-slots --max-adapters 4 --max-lora-rank 16 --lora-targets attention
""")
@click.option("--model", type=click.Path(path_type=Path), help="Merged model folder (`loraship merge`).")
@click.option("--out", type=click.Path(path_type=Path), help="Folder for the ONNX model and manifest.")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Weight dtype (fp16 KV cache and logits with the optimum engine).")
@click.option("--engine", type=click.Choice(["auto", "genai", "optimum"]), default="auto", show_default=True,
              help="auto: the onnxruntime-genai builder (GroupQueryAttention, batched in-place KV) where its build "
                   "passes a parity probe against PyTorch, else optimum-onnx text-generation-with-past (probed too); "
                   "refused in one line when neither passes. genai/optimum force one (and are probed).")
@click.option("--int4", is_flag=True, help="int4 weights (MatMulNBits); needs the genai builder.")
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Provider the genai builder optimizes for (cuda: fp16 GQA kernels, CUDA graphs in serving).")
@click.option("--max-adapters", type=int, metavar="S",
              help="Export the BASE model with S per-row LoRA slots: each row of a batch runs its own adapter "
                   "(converted with `loraship convert-adapter`); genai engine only.")
@click.option("--max-lora-rank", type=int, default=16, show_default=True, help="Slot rank per adapter module (with --max-adapters).")
@click.option("--lora-targets", default="attention,mlp", show_default=True,
              help="Adapter modules that get slots, comma-separated: attention, mlp, lm_head or module names (q_proj, qkv_proj, ...).")
@click.option("--lora-design", type=click.Choice(["gather", "masked"]), default="gather", show_default=True,
              help="gather: each row gathers its slot's weights; masked: every slot's product, masked per row (LoRAX).")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@click.option("--rehash", type=click.Path(path_type=Path), metavar="DIR",
              help="Instead of exporting: record the size and sha256 of every file of the existing export DIR, as they are now.")
def export(model: Path | None, out: Path | None, dtype: str, engine: str, int4: bool, target: str, max_adapters: int | None,
           max_lora_rank: int, lora_targets: str, lora_design: str, force: bool, rehash: Path | None) -> None:
    """Export MODEL to a self-contained ONNX folder: model.onnx, tokenizer, configs, loraship.json
    (which records every file's size and sha256, checked by `repo`, `azure upload` and the served model).

    Every build is probed against the merged model in PyTorch (eager fp32: a short prompt, and one past
    the sliding window or longrope's original context) before it is renamed into --out."""
    from loraship.errors import LorashipError

    if rehash is not None:
        if model or out:
            raise LorashipError("--rehash takes an existing export and no --model or --out", "drop --model/--out, or drop --rehash")
        from loraship.engine.manifest import MANIFEST
        from loraship.export.manifest import rehash as run_rehash
        from loraship.export.progress import Stages

        with Stages()(f"hashing the files of {rehash}"):
            files = run_rehash(rehash).files or {}
        click.echo(f"recorded {len(files)} files ({sum(f['size'] for f in files.values()):,} bytes) in {rehash / MANIFEST}")
        return
    if model is None or out is None:
        raise LorashipError("export needs --model and --out", "pass the merged model folder and an output folder (or --rehash DIR)")
    if max_adapters is not None:
        if engine == "optimum":
            raise LorashipError("LoRA slots need the onnxruntime-genai builder's graph", "drop --engine optimum")
        from loraship.export.lora_slots import export_base_with_slots

        targets = [t.strip() for t in lora_targets.split(",") if t.strip()]
        export_base_with_slots(model, out, max_adapters, max_lora_rank, targets, lora_design, dtype=dtype, int4=int4,
                               target=target, force=force)
        click.echo(str(out))
        return
    from loraship.export.onnx_export import export_onnx

    export_onnx(model, out, dtype=dtype, engine=engine, int4=int4, target=target, force=force)
    click.echo(str(out))
