"""Read model, tokenizer and adapter folders saved by transformers 4.x or 5.x alike.

transformers 5 keeps ``rope_theta`` (and any rope scaling) under ``rope_parameters``;
transformers 4.57 ignores that key and silently falls back to ``rope_theta=10000``.
Tokenizers saved by 5.x name ``TokenizersBackend`` as their class and list extra
special tokens as ``extra_special_tokens`` (a list, which 4.x expects as a dict).
Newer peft versions add adapter_config fields older ones do not know.

:func:`compat_view` builds a folder of symlinks with translated JSON files, so every
loader (transformers, peft, optimum, the onnxruntime-genai builder) sees one format;
:func:`write_dual_rope` makes the configs we write readable by both major versions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraship.errors import LorashipError

# Keys transformers 5 may keep inside rope_parameters that 4.x reads at the top level.
_TOP_LEVEL_ROPE_KEYS = ("partial_rotary_factor",)
_PHI3_TOP_LEVEL_KEYS = ("original_max_position_embeddings",)
_CONTEXT_KEYS = ("n_positions", "max_seq_len", "seq_length", "n_ctx")


def read_json(path: Path, what: str, fix: str) -> dict[str, Any]:
    """Load a JSON object, turning a missing or corrupt file into a LorashipError."""
    path = Path(path)
    if not path.is_file():
        raise LorashipError(f"{what} not found: {path}", fix)
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LorashipError(f"{what} {path} is not valid JSON ({exc.msg if hasattr(exc, 'msg') else exc})", fix) from exc
    if not isinstance(data, dict):
        raise LorashipError(f"{what} {path} is not a JSON object", fix)
    return data


def translate_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Return a model config whose rope settings transformers 4.x and 5.x read the same.

    ``rope_parameters`` (5.x) is mirrored into ``rope_theta``/``rope_scaling`` (4.x) and
    the reverse, so the result carries both spellings.
    """
    cfg = dict(cfg)
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params:
        params = dict(params)
        if "rope_theta" in params:
            cfg["rope_theta"] = params["rope_theta"]
        for key in _TOP_LEVEL_ROPE_KEYS:
            if key in params:
                cfg.setdefault(key, params[key])
        rope_type = params.get("rope_type", params.get("type", "default"))
        if cfg.get("model_type") == "phi3":
            for key in _PHI3_TOP_LEVEL_KEYS:
                if key in params:
                    cfg[key] = params[key]
        if rope_type not in (None, "default"):
            if cfg.get("model_type") == "phi3":
                # Phi3Config (4.x) accepts exactly {type, short_factor, long_factor}.
                cfg["rope_scaling"] = {
                    "type": "longrope" if rope_type in ("su", "yarn", "longrope") else rope_type,
                    "short_factor": params.get("short_factor"),
                    "long_factor": params.get("long_factor"),
                }
            else:
                skip = {"rope_theta", "type", "rope_type", *_TOP_LEVEL_ROPE_KEYS}
                scaling = {k: v for k, v in params.items() if k not in skip}
                cfg["rope_scaling"] = {"rope_type": rope_type, "type": rope_type, **scaling}
        else:
            cfg["rope_scaling"] = None
        cfg["rope_parameters"] = _typed(params)
    elif "rope_theta" in cfg or cfg.get("model_type") in ("llama", "phi3", "mistral", "qwen2"):
        cfg["rope_parameters"] = rope_parameters_of(cfg)
    if "torch_dtype" in cfg and "dtype" not in cfg:
        cfg["dtype"] = cfg["torch_dtype"]
    return cfg


def standard_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with the standard names (``max_position_embeddings``, ``hidden_size``, ...) of keys that its
    model type spells otherwise (GPT-2: ``n_positions``, ``n_embd``, ``n_head``, ``n_layer``), from the
    config class's own ``attribute_map``."""
    from transformers import CONFIG_MAPPING

    cfg = dict(cfg)
    try:
        attribute_map = CONFIG_MAPPING[cfg.get("model_type")].attribute_map
    except KeyError:
        return cfg
    for standard, own in attribute_map.items():
        if standard not in cfg and own in cfg:
            cfg[standard] = cfg[own]
    for own in _CONTEXT_KEYS:  # MPT's max_seq_len and others the attribute_map leaves out
        if "max_position_embeddings" not in cfg and own in cfg:
            cfg["max_position_embeddings"] = cfg[own]
    return cfg


def rope_parameters_of(cfg: dict[str, Any]) -> dict[str, Any]:
    """The transformers-5 ``rope_parameters`` equivalent of a 4.x config."""
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.get("rope_theta", 10000.0)}
    scaling = cfg.get("rope_scaling")
    if isinstance(scaling, dict):
        params.update({k: v for k, v in scaling.items() if k != "type"})
        params["rope_type"] = scaling.get("rope_type", scaling.get("type", "default"))
    if cfg.get("model_type") == "phi3" and "original_max_position_embeddings" in cfg:
        params["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    return _typed(params)


def _typed(params: dict[str, Any]) -> dict[str, Any]:
    """``rope_parameters`` with the legacy ``type`` beside ``rope_type`` where the rope is scaled: the
    onnxruntime-genai builder (0.15 to 0.18) reads ``rope_parameters`` before ``rope_scaling`` and takes
    longrope's magnitude-scaling policy from ``type`` (KeyError 'type' without it; upstream PR #2609)."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type in (None, "default"):
        return params
    return {**params, "rope_type": rope_type, "type": rope_type}


def translate_tokenizer_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Return a tokenizer_config that transformers 4.x loads like 5.x does."""
    cfg = dict(cfg)
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, list):  # 5.x: a list of extra special tokens; 4.x: a name->token dict
        merged = list(cfg.get("additional_special_tokens") or [])
        merged += [t for t in extra if t not in merged]
        cfg["additional_special_tokens"] = merged
        cfg["extra_special_tokens"] = {}
    cls = cfg.get("tokenizer_class")
    if cls in ("TokenizersBackend", "PreTrainedTokenizer") or (cls and not _known_tokenizer_class(cls)):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    return cfg


def _known_tokenizer_class(name: str) -> bool:
    import transformers

    return hasattr(transformers, name) or hasattr(transformers, f"{name}Fast")


def translate_adapter_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Drop adapter_config fields this peft version does not know (added by newer peft)."""
    import dataclasses

    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    return {k: v for k, v in cfg.items() if k in known}


_TRANSLATORS = {
    "config.json": translate_config,
    "tokenizer_config.json": translate_tokenizer_config,
    "adapter_config.json": translate_adapter_config,
}


def load_causal_lm(folder: Path, what: str, **kwargs: Any):
    """``AutoModelForCausalLM.from_pretrained(folder, **kwargs)``, an architecture this transformers cannot
    load (a newer one, a remote-code one) turned into a one-line error."""
    import transformers
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (ValueError, KeyError, ImportError, AttributeError, TypeError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise LorashipError(
            f"transformers {transformers.__version__} cannot load the {what} in {folder}: "
            f"{type(exc).__name__}: {(lines[0] if lines else '')[:240]}",
            "loraship supports the causal LMs of transformers 4.57 (README \"Supported architectures\"); "
            "re-save the model with a config this version reads") from exc


def compat_view(src: Path, dst: Path) -> Path:
    """Make ``dst`` a view of ``src``: symlinks to its files, translated JSON configs.

    Loading from ``dst`` gives the same result with transformers 4.x whether ``src``
    was saved by 4.x or 5.x.
    """
    src, dst = Path(src).resolve(), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for item in src.iterdir():
        target = dst / item.name
        translate = _TRANSLATORS.get(item.name)
        if translate is not None and item.is_file():
            data = read_json(item, item.name, f"re-save {src} or fix the JSON")
            target.write_text(json.dumps(translate(data), indent=2))
        else:
            target.symlink_to(item)
    return dst


def write_dual_rope(config_path: Path) -> None:
    """Rewrite a saved config.json so that 4.x and 5.x read the same rope settings."""
    config_path = Path(config_path)
    cfg = json.loads(config_path.read_text())
    cfg.pop("rope_parameters", None)
    cfg = translate_config(cfg)
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
