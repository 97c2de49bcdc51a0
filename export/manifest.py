"""Building an export's manifest (``loraship.engine.manifest.Manifest``): the facts ``loraship export``
reads from the model's config and graph, the checksums of ``export --rehash``, and verify's report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraship.engine.integrity import write_checksummed
from loraship.engine.manifest import FORMAT, Manifest, ManifestError
from loraship.errors import LorashipError


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def kv_cache_facts(model_file: Path) -> dict[str, str]:
    """How the decoder keeps its KV cache, read from the graph: ``kv_cache`` is ``shared`` where its
    attention is GroupQueryAttention (it appends to a max-length buffer in place, so the engine decodes
    from KV rows planned at load), else ``grown`` (a longer copy each step: optimum's, and the genai
    builder's CPU fp16 graph); ``kv_dtype`` is the cache's numpy dtype name."""
    import onnx
    from onnx import helper

    graph = onnx.load(str(model_file), load_external_data=False).graph
    ops = {node.op_type for node in graph.node}
    past = next(i for i in graph.input if i.name.startswith("past_key_values."))
    kind = "shared" if "GroupQueryAttention" in ops and not ops & {"MultiHeadAttention", "Attention"} else "grown"
    return {"kv_cache": kind, "kv_dtype": str(helper.tensor_dtype_to_np_dtype(past.type.tensor_type.elem_type))}


def build_manifest(engine: str, dtype: str, config: dict[str, Any], generation: dict[str, Any], tokenizer: Any,
                   kv: dict[str, str]) -> Manifest:
    """The manifest of a fresh export (``verify`` adds its report later)."""
    eos = _ids(generation.get("eos_token_id")) or _ids(config.get("eos_token_id")) or _ids(tokenizer.eos_token_id)
    pad = generation.get("pad_token_id", config.get("pad_token_id"))
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    heads = int(config["num_attention_heads"])
    return Manifest(
        format=FORMAT,
        engine=engine,
        kv_cache=kv["kv_cache"],
        kv_dtype=kv["kv_dtype"],
        model_file="model.onnx",
        dtype=dtype,
        architecture=config["model_type"],
        max_context=int(config["max_position_embeddings"]),
        eos_token_ids=tuple(eos),
        pad_token_id=int(pad),
        num_layers=int(config["num_hidden_layers"]),
        kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
    )


def read_export(folder: Path) -> Manifest:
    """``folder``'s manifest, or a one-line error saying to point at an export."""
    try:
        return Manifest.read(folder)
    except ManifestError as exc:
        raise LorashipError(str(exc), "point --onnx at a folder written by `loraship export`") from None


def rehash(folder: Path) -> Manifest:
    """Record the checksums of an existing export (one written before exports had them) as it is now."""
    return write_checksummed(folder, read_export(folder))


def record_verify(folder: Path, report: dict[str, Any]) -> Manifest:
    """Write verify's report into an existing manifest, atomically."""
    manifest = read_export(folder).replace(verify=report)
    manifest.write(folder)
    return manifest
