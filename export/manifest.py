"""``loraship.json``: what an export folder holds, read by the engine and written by verify.

Its ``files`` entry records every other file's size and sha256 (``loraship.engine.integrity``),
so a missing, truncated or altered file is refused before it is served or uploaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loraship.engine.integrity import FILES, checksums
from loraship.errors import LorashipError
from loraship.export.hfcompat import read_json
from loraship.fsutil import write_json_atomic

MANIFEST = "loraship.json"
FORMAT = 1


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
                   kv: dict[str, str]) -> dict[str, Any]:
    """The manifest of a fresh export (``verify`` adds its report later)."""
    eos = _ids(generation.get("eos_token_id")) or _ids(config.get("eos_token_id")) or _ids(tokenizer.eos_token_id)
    pad = generation.get("pad_token_id", config.get("pad_token_id"))
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    heads = int(config["num_attention_heads"])
    return {
        "format": FORMAT,
        "engine": engine,
        **kv,
        "model_file": "model.onnx",
        "dtype": dtype,
        "architecture": config["model_type"],
        "max_context": int(config["max_position_embeddings"]),
        "eos_token_ids": eos,
        "pad_token_id": int(pad),
        "num_layers": int(config["num_hidden_layers"]),
        "kv_heads": int(config.get("num_key_value_heads") or heads),
        "head_dim": int(config.get("head_dim") or config["hidden_size"] // heads),
    }


def read_manifest(folder: Path) -> dict[str, Any]:
    """Load ``folder/loraship.json``."""
    data = read_json(Path(folder) / MANIFEST, "export manifest", "point --onnx at a folder written by `loraship export`")
    if data.get("format") != FORMAT:
        raise LorashipError(f"{Path(folder) / MANIFEST} has format {data.get('format')!r}, expected {FORMAT}", "re-run `loraship export`")
    return data


def write_manifest(folder: Path, data: dict[str, Any]) -> None:
    """Write ``folder/loraship.json`` atomically."""
    write_json_atomic(Path(folder) / MANIFEST, data)


def write_checksummed(folder: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Write ``data`` as the manifest of ``folder``, with the size and sha256 of every other file."""
    data = {**data, FILES: checksums(folder)}
    write_manifest(folder, data)
    return data


def rehash(folder: Path) -> dict[str, Any]:
    """Record the checksums of an existing export (one written before exports had them) as it is now."""
    return write_checksummed(folder, read_manifest(folder))


def update_manifest(folder: Path, key: str, value: Any) -> dict[str, Any]:
    """Set one top-level key of an existing manifest, atomically."""
    data = read_manifest(folder)
    data[key] = value
    write_manifest(folder, data)
    return data
