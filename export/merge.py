"""Merge a LoRA (or QLoRA) adapter into its full-precision base with peft ``merge_and_unload``.

The adapter is checked against the base before anything heavy is loaded (config, weight
files, target modules, shapes, rank), so a mismatch is a one-line error instead of a
peft traceback. A QLoRA adapter merges into the full-precision base: the base is never
loaded through bitsandbytes. The merged folder holds safetensors weights, a config that
transformers 4.x and 5.x read alike, the tokenizer and the generation config.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from loraship.errors import LorashipError
from loraship.export import hfcompat
from loraship.export.evalset import copy_eval, eval_source
from loraship.fsutil import atomic_dir, check_out_dir

DTYPES = ("auto", "fp32", "fp16", "bf16")
MERGE_RECORD = "loraship_merge.json"  # where the merged model came from: verify's int4 reference is the base
_ADAPTER_FIX = "point --adapter at a folder written by peft's save_pretrained"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def _torch_dtype(name: str, config: dict[str, Any]):
    import torch

    if name == "auto":
        name = {"float16": "fp16", "bfloat16": "bf16"}.get(str(config.get("dtype") or config.get("torch_dtype")), "fp32")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def tensor_shapes(path: Path, what: str, fix: str) -> dict[str, tuple[list[int], str]]:
    """Name -> (shape, dtype) of a safetensors file, read from its header only."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "np") as fh:
            return {k: (list(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype()) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise LorashipError(f"{what} {path} is not a readable safetensors file ({str(exc).splitlines()[0]})", fix) from exc


def base_shapes(base: Path) -> dict[str, tuple[list[int], str]] | None:
    """Weight shapes of a base folder from its safetensors headers (None for .bin checkpoints)."""
    fix = f"re-download or re-save the base model in {base}"
    files = sorted(base.glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, tuple[list[int], str]] = {}
    for file in files:
        shapes.update(tensor_shapes(file, "base weights", fix))
    return shapes


def adapter_weights(adapter: Path) -> Path:
    """The adapter's weight file, preferring safetensors."""
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter / name).is_file():
            return adapter / name
    raise LorashipError(f"no adapter_model.safetensors in {adapter}", _ADAPTER_FIX)


def module_pattern(patterns: dict[str, Any] | None, module: str) -> Any:
    """The value of ``rank_pattern``/``alpha_pattern`` for ``module`` (None if no key matches), as peft matches them."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def _expected_rank(module: str, cfg: dict[str, Any]) -> int:
    rank = module_pattern(cfg.get("rank_pattern"), module)
    return int(cfg["r"] if rank is None else rank)


def _target_parameter(module: str, cfg: dict[str, Any], base_w: dict | None) -> list[int] | None:
    """For a LoRA on a parameter (peft ``target_parameters``, e.g. gpt-oss's MoE experts): the experts and
    the parameter's two feature dims (``[experts, a, b]``; ``[1, out, in]`` for a 2-D one), else None.
    peft stacks the experts' low-rank factors, so such a factor has rank r x experts; nested wrappers (two
    parameters of one module) save as ``module.base_layer.lora_A``."""
    names = cfg.get("target_parameters") or []
    if not names:
        return None
    owner, depth = module, 0
    while owner.endswith(".base_layer"):
        owner, depth = owner.removesuffix(".base_layer"), depth + 1
    params = [name.rpartition(".")[2] for name in names
              if owner == name.rpartition(".")[0] or owner.endswith(f".{name.rpartition('.')[0]}")]
    if len(params) <= depth:
        return None
    param = params[-(depth + 1)]  # peft wraps in target_parameters order: the outermost wrapper is the last
    shape = (base_w or {}).get(f"{owner}.{param}", ([], ""))[0]
    if len(shape) == 3:
        return list(shape)
    if len(shape) == 2:
        return [1, *shape]
    return [1] if base_w is None else None


def check_adapter(adapter: Path, base: Path, base_config: dict[str, Any]) -> dict[str, Any]:
    """Validate an adapter folder against a base folder; return the adapter config."""
    cfg = hfcompat.read_json(adapter / "adapter_config.json", "adapter config", _ADAPTER_FIX)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LorashipError(f"adapter in {adapter} is {cfg.get('peft_type')}, not LoRA", "pass a LoRA or QLoRA adapter")
    if not isinstance(cfg.get("r"), int) or cfg["r"] <= 0:
        raise LorashipError(f"adapter_config.json in {adapter} has no valid rank r ({cfg.get('r')!r})", _ADAPTER_FIX)
    weights = adapter_weights(adapter)
    if weights.suffix != ".safetensors":
        return cfg
    shapes = tensor_shapes(weights, "adapter weights", _ADAPTER_FIX)
    lora = {k: v for k, v in shapes.items() if _LORA_KEY.match(k)}
    if not lora:
        raise LorashipError(f"adapter weights {weights} hold no LoRA tensors", _ADAPTER_FIX)
    base_w = base_shapes(base)
    arch = (base_config.get("architectures") or [base_config.get("model_type", "?")])[0]
    for key, (shape, _) in sorted(lora.items()):
        m = _LORA_KEY.match(key)
        module, ab = m["module"].removeprefix(_PREFIX), m["ab"]
        experts = _target_parameter(module, cfg, base_w)
        rank = _expected_rank(module, cfg) * (experts[0] if experts else 1)
        got_rank = shape[0] if ab == "A" else shape[1]
        if got_rank != rank:
            per = f" x {experts[0]} experts" if experts else ""
            raise LorashipError(
                f"wrong rank: adapter_config.json says r={rank // (experts[0] if experts else 1)}{per} but {key} has rank "
                f"{got_rank}",
                "set r in adapter_config.json to the rank the adapter was trained with",
            )
        if base_w is None:
            continue
        features = shape[1] if ab == "A" else shape[0]  # A: [r, in]; B: [out, r]
        if experts is not None:  # a peft ParamWrapper: in/out are the parameter's last two dims, in either order
            base_key, fits = module, features in experts[1:]
        else:
            base_key = f"{module}.weight"
            if base_key not in base_w:
                raise LorashipError(
                    f"adapter targets {module}, which the base {arch} does not have (adapter for another architecture?)",
                    "pass the base model the adapter was trained on",
                )
            out_f, in_f = base_w[base_key][0][:2]
            # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out] (peft's fan_in_fan_out)
            fits = features in ((in_f, out_f) if ab == "A" else (out_f, in_f))
        if not fits:
            raise LorashipError(
                f"adapter does not fit the base: {key} has shape {shape} but {base_key} is "
                f"{experts[1:] if experts else [out_f, in_f]} (adapter for another model size?)",
                "pass the base model the adapter was trained on",
            )
    return cfg


def _check_quantization(base: Path, config: dict[str, Any], shapes: dict[str, tuple[list[int], str]] | None) -> None:
    """Refuse a base whose weights are stored 4-/8-bit: merging needs the full-precision base."""
    packed = shapes is not None and any(
        k.endswith((".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4", ".SCB")) or (k.endswith("proj.weight") and d in ("U8", "I8"))
        for k, (_, d) in shapes.items()
    )
    if packed:
        method = (config.get("quantization_config") or {}).get("quant_method", "quantized")
        raise LorashipError(
            f"base {base} stores {method} weights; a QLoRA adapter merges into the full-precision base",
            "pass --base the original (unquantized) model the 4-bit checkpoint was made from",
        )


def resolve_base(base: str) -> Path:
    """A local folder for ``base``: the path itself, or a hub snapshot."""
    path = Path(base)
    if path.is_dir():
        return path
    if path.exists() or base.startswith((".", "/")) or base.count("/") > 1:
        raise LorashipError(f"base model folder not found: {base}", "pass --base a model folder or a hub id")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(base))
    except Exception as exc:  # noqa: BLE001 - any hub failure is the same user problem
        raise LorashipError(
            f"cannot fetch base model {base!r} from the hub ({type(exc).__name__})",
            "pass --base a local model folder, or check the id and your network",
        ) from exc


def _tokenizer_source(adapter: Path, base: Path, tokenizer: Path | None) -> Path:
    for candidate in (adapter, base, tokenizer):
        if candidate is not None and (Path(candidate) / "tokenizer_config.json").is_file():
            return Path(candidate)
        if candidate is not None and (Path(candidate) / "tokenizer.json").is_file():
            return Path(candidate)
    raise LorashipError(
        f"no tokenizer in {adapter} or {base}", "pass --tokenizer with a folder holding tokenizer.json"
    )


def merge(
    base: str | Path,
    adapter: Path,
    out: Path,
    dtype: str = "auto",
    tokenizer: Path | None = None,
    force: bool = False,
    eval_file: Path | None = None,
) -> Path:
    """Merge ``adapter`` into ``base`` and write the merged model to ``out``.

    The eval set ``eval_file`` (default: ``adapter/eval.jsonl`` if there is one) is copied along.
    """
    if dtype not in DTYPES:
        raise LorashipError(f"unknown --dtype {dtype!r}", f"choose one of {', '.join(DTYPES)}")
    adapter, out = Path(adapter), Path(out)
    if not adapter.is_dir():
        raise LorashipError(f"adapter folder not found: {adapter}", _ADAPTER_FIX)
    check_out_dir(out, force)
    evalset = eval_source(eval_file, adapter)
    with tempfile.TemporaryDirectory(prefix="loraship-merge-") as work:
        work = Path(work)
        base_dir = resolve_base(str(base))
        base_config = hfcompat.read_json(base_dir / "config.json", "base config", "pass --base a transformers model folder")
        _check_quantization(base_dir, base_config, base_shapes(base_dir))
        check_adapter(adapter, base_dir, base_config)
        tok_dir = _tokenizer_source(adapter, base_dir, tokenizer)

        base_view = hfcompat.compat_view(base_dir, work / "base")
        strip_quantization(base_view / "config.json")
        adapter_view = hfcompat.compat_view(adapter, work / "adapter")
        tok_view = hfcompat.compat_view(tok_dir, work / "tokenizer")
        with atomic_dir(out, force=force) as tmp:
            _merge_into(base_view, adapter_view, tok_view, tmp, _torch_dtype(dtype, base_config))
            _keep_attention(base_config, tmp / "config.json")
            copy_eval(evalset, tmp)
            (tmp / MERGE_RECORD).write_text(json.dumps({"base": str(base_dir.resolve()), "adapter": str(adapter.resolve())},
                                                       indent=2) + "\n")
    return out


def merge_record(merged: Path) -> dict[str, Any] | None:
    """The base and adapter paths ``merge`` recorded in ``merged`` (None for a folder merged elsewhere)."""
    path = Path(merged) / MERGE_RECORD
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def _keep_attention(base_config: dict[str, Any], config_path: Path) -> None:
    """Carry the base's ``_attn_implementation`` (real Gemma-2 checkpoints say ``eager``: sdpa drops their
    soft-capping) into the merged config; transformers drops the key when it saves a config."""
    wanted = base_config.get("_attn_implementation")
    if wanted:
        cfg = json.loads(config_path.read_text())
        cfg["_attn_implementation"] = wanted
        config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def strip_quantization(config_path: Path) -> None:
    """Drop bitsandbytes settings so the base loads in full precision."""
    cfg = json.loads(config_path.read_text())
    if cfg.pop("quantization_config", None) is not None:
        config_path.write_text(json.dumps(cfg, indent=2))


def _saved_vocab(adapter: Path) -> int:
    """Rows of the embedding or output layer an adapter saved in full (it added tokens), else 0."""
    weights = adapter_weights(adapter)
    if weights.suffix != ".safetensors":
        return 0
    shapes = tensor_shapes(weights, "adapter weights", _ADAPTER_FIX)
    return max((shape[0] for key, (shape, _) in shapes.items() if key.endswith(("embed_tokens.weight", "lm_head.weight"))), default=0)


def _merge_into(base: Path, adapter: Path, tok_dir: Path, out: Path, torch_dtype) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer, GenerationConfig

    model = hfcompat.load_causal_lm(base, "base model", dtype=torch_dtype, low_cpu_mem_usage=True)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    vocab = max(_saved_vocab(adapter), len(tok))
    if vocab > model.get_input_embeddings().num_embeddings:  # the fine-tune added tokens: grow the base as training did
        model.resize_token_embeddings(vocab)
    try:
        peft_model = PeftModel.from_pretrained(model, adapter, is_trainable=False)
    except (ValueError, RuntimeError, KeyError) as exc:
        raise LorashipError(
            f"adapter does not fit the base: {str(exc).strip().splitlines()[0][:300]}",
            "pass the base model the adapter was trained on",
        ) from exc
    with torch.no_grad():
        merged = peft_model.merge_and_unload()
    try:
        gen = GenerationConfig.from_pretrained(base)
    except OSError:
        gen = GenerationConfig.from_model_config(merged.config)
    if gen.pad_token_id is None:
        gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if gen.eos_token_id is None:
        gen.eos_token_id = tok.eos_token_id
    merged.generation_config = gen
    merged.config.name_or_path = ""
    merged.save_pretrained(out, safe_serialization=True)
    hfcompat.write_dual_rope(out / "config.json")
    tok.save_pretrained(out)
