"""Convert a peft LoRA (or QLoRA) adapter once into the slot layout of a base export with LoRA slots.

Each adapter module's ``lora_A [r, in]`` and ``lora_B [out, r]`` become, on every projection it is
placed on (see ``loraship.export.lora_slots``), its band of ``A [d_in, R]`` and ``B [R, d_out]``: rank
zero-padded to the slot rank, untargeted parts zero, peft's scaling (``lora_alpha / r``, or
``/ sqrt(r)`` with rslora; ``rank_pattern``/``alpha_pattern`` per module) folded into B, in the
export's activation dtype. The folder written holds ``adapter_slots.safetensors``, ``loraship.json``
(kind ``lora_adapter``, the layout's fingerprint, every file's sha256) and the adapter's
``eval.jsonl`` when it has one; ``loraship.engine.adapters`` reads it. An adapter that cannot be
served this way is refused in one line naming why.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from loraship.engine.adapters import ADAPTER_FORMAT, ADAPTER_KIND, WEIGHTS_FILE, SlotLayout, write_safetensors
from loraship.engine.integrity import write_checksummed
from loraship.engine.manifest import Manifest
from loraship.errors import LorashipError
from loraship.export import hfcompat
from loraship.export.evalset import copy_eval, eval_source
from loraship.export.lora_slots import hf_modules
from loraship.export.manifest import read_export
from loraship.export.merge import _ADAPTER_FIX, _LORA_KEY, _PREFIX, adapter_weights, module_pattern, tensor_shapes
from loraship.fsutil import atomic_dir, check_out_dir

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_REFIT = "re-export the base with slots that fit (`loraship export --max-adapters`"


def convert_adapter(adapter: Path, base: Path, out: Path, force: bool = False) -> Path:
    """Convert the peft adapter folder ``adapter`` for the base export with slots ``base`` into ``out``; return ``out``."""
    adapter, base, out = Path(adapter), Path(base), Path(out)
    if not adapter.is_dir():
        raise LorashipError(f"adapter folder not found: {adapter}", _ADAPTER_FIX)
    manifest = read_export(base)
    if not manifest.lora_slots:
        raise LorashipError(f"{base} has no LoRA slots", "export the base with `export_base_with_slots` and convert against it")
    layout = SlotLayout.from_manifest(manifest)
    check_out_dir(out, force)
    cfg = _adapter_config(adapter)
    evalset = eval_source(None, adapter)
    tensors = _slot_tensors(adapter, cfg, manifest, layout)
    with atomic_dir(out, force=force) as tmp:
        dtype = np.dtype(layout.dtype)
        flat = {f"{site}.{ab}": t.astype(dtype) for site, pair in tensors.items() for ab, t in zip("AB", pair)}
        write_safetensors(tmp / WEIGHTS_FILE, flat, {"format": "np"})
        copy_eval(evalset, tmp)
        write_checksummed(tmp, Manifest.from_dict({
            "format": ADAPTER_FORMAT, "kind": ADAPTER_KIND, "layout": layout.fingerprint(),
            "base": f"{manifest.architecture} {base.resolve().name}", "dtype": layout.dtype, "max_rank": layout.max_rank,
            "sites": sorted(tensors), "source": {k: cfg.get(k) for k in ("peft_type", "r", "lora_alpha", "use_rslora",
                                                                          "rank_pattern", "alpha_pattern", "target_modules")},
        }))
    return out


def _adapter_config(adapter: Path) -> dict[str, Any]:
    cfg = hfcompat.read_json(adapter / "adapter_config.json", "adapter config", _ADAPTER_FIX)
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LorashipError(f"adapter in {adapter} is {cfg.get('peft_type')}, not LoRA", "pass a LoRA or QLoRA adapter")
    if not isinstance(cfg.get("r"), int) or cfg["r"] <= 0:
        raise LorashipError(f"adapter_config.json in {adapter} has no valid rank r ({cfg.get('r')!r})", _ADAPTER_FIX)
    merge_it = "merge it into its own model instead (`loraship merge`)"
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "a LoRA bias"), ("fan_in_fan_out", "fan_in_fan_out weights")):
        if cfg.get(key):
            raise LorashipError(f"adapter in {adapter} uses {what}, which LoRA slots do not carry", merge_it)
    if cfg.get("modules_to_save") or cfg.get("trainable_token_indices"):
        saved = cfg.get("modules_to_save") or ["trainable tokens"]
        raise LorashipError(f"adapter in {adapter} saves full weights of {', '.join(saved)}, which LoRA slots do not carry",
                            merge_it)
    return cfg


def _load_tensors(adapter: Path) -> dict[str, np.ndarray]:
    """The adapter's tensors as float32 numpy (bf16 QLoRA tensors included)."""
    import torch

    path = adapter_weights(adapter)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw = load_file(str(path))
        else:
            raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user problem
        raise LorashipError(f"adapter weights {path} are not readable ({str(exc).splitlines()[0][:200]})", _ADAPTER_FIX) from exc
    return {k: v.detach().to(torch.float32).numpy() for k, v in raw.items()}


def _scaling(cfg: dict[str, Any], module: str, rank: int) -> float:
    alpha = module_pattern(cfg.get("alpha_pattern"), module)
    alpha = float(cfg.get("lora_alpha", 8) if alpha is None else alpha)
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _slot_tensors(adapter: Path, cfg: dict[str, Any], manifest: Manifest,
                  layout: SlotLayout) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``site -> (A [d_in, R], B [R, d_out])`` float32 of every site the adapter changes."""
    spec = manifest.lora_slots
    arch = manifest.architecture
    sites = {s.name: s for s in layout.sites}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in _load_tensors(adapter).items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise LorashipError(f"adapter in {adapter} holds {key}, which is no LoRA A/B weight (embedding LoRA or saved "
                                "modules), and LoRA slots carry only those", "merge it into its own model instead (`loraship merge`)")
        pairs.setdefault(m["module"].removeprefix(_PREFIX), {})[m["ab"]] = value
    if not pairs:
        raise LorashipError(f"adapter weights in {adapter} hold no LoRA tensors", _ADAPTER_FIX)
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise LorashipError(f"adapter in {adapter} has lora_{'A' if 'A' in ab else 'B'} but not the other for {module}", _ADAPTER_FIX)
        a, b = ab["A"], ab["B"]
        leaf = module.rpartition(".")[2]
        layer = _LAYER.search(module)
        runs = spec["modules"].get(leaf)
        if runs is None:
            if leaf in hf_modules(arch):
                raise LorashipError(f"adapter targets {leaf}, which has no LoRA slot in this base export "
                                    f"(slots: {', '.join(spec['targets'])})", f"{_REFIT} --lora-targets including {leaf})")
            raise LorashipError(f"adapter targets {module}, which the base {arch} does not have (adapter for another architecture?)",
                                "pass an adapter trained on this base")
        rank = a.shape[0]
        expected = module_pattern(cfg.get("rank_pattern"), module)
        expected = int(cfg["r"] if expected is None else expected)
        if rank != expected or b.ndim != 2 or b.shape[1] != rank:
            raise LorashipError(f"wrong rank: adapter_config.json says r={expected} but {module} has rank {rank}",
                                "set r in adapter_config.json to the rank the adapter was trained with")
        if rank > layout.max_rank:
            raise LorashipError(f"adapter rank {rank} on {module} exceeds the base's slot rank {layout.max_rank}",
                                f"{_REFIT} --max-lora-rank {rank} or more)")
        rows = max(run[5] for run in runs)
        for proj, band, col0, col1, row0, row1 in runs:
            site = sites.get(proj if leaf == "lm_head" else f"layers.{layer[1] if layer else '?'}.{proj}")
            if site is None or a.shape[1] != site.d_in or b.shape[0] != rows:
                raise LorashipError(f"adapter does not fit the base: {module} has A {list(a.shape)} and B {list(b.shape)}, but the "
                                    f"base's {leaf} takes {site.d_in if site else '?'} inputs to {rows} outputs"
                                    + ("" if site else f" and has no layer {layer[1] if layer else '?'}") + " (adapter for another model?)",
                                    "pass an adapter trained on this base")
            if site.name not in out:
                out[site.name] = (np.zeros((site.d_in, site.rank), np.float32), np.zeros((site.rank, site.d_out), np.float32))
            band_cols = slice(band * layout.max_rank, band * layout.max_rank + rank)
            out[site.name][0][:, band_cols] = a.T
            out[site.name][1][band_cols, col0:col1] = _scaling(cfg, module, rank) * b[row0:row1].T
    for name, (a, b) in out.items():
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise LorashipError(f"adapter in {adapter} has non-finite weights on {name}", "check the fine-tune; it diverged")
        if layout.dtype == "float16" and max(np.abs(a).max(), np.abs(b).max()) > np.finfo(np.float16).max:
            raise LorashipError(f"adapter in {adapter} has weights on {name} beyond float16's range", "serve an fp32 export")
    return out


def slot_fit(adapters: list[Path]) -> tuple[int, list[str]]:
    """The slots that fit every peft adapter of ``adapters``: (the largest rank, the union of the modules
    they target, sorted), read from the weights' shapes (``.bin`` weights: from the configs)."""
    rank, targets = 0, []
    for adapter in map(Path, adapters):
        if not adapter.is_dir():
            raise LorashipError(f"adapter folder not found: {adapter}", _ADAPTER_FIX)
        cfg = _adapter_config(adapter)
        weights = adapter_weights(adapter)
        if weights.suffix == ".safetensors":
            found = [(m["module"].rpartition(".")[2], shape[0]) for key, (shape, _) in
                     tensor_shapes(weights, "adapter weights", _ADAPTER_FIX).items()
                     if (m := _LORA_KEY.match(key)) is not None and m["ab"] == "A"]
        else:
            modules = cfg.get("target_modules")
            if not isinstance(modules, list):
                raise LorashipError(f"adapter in {adapter} names its targets by a pattern and has no safetensors weights to "
                                    "read them from", "save it with safetensors (peft's default)")
            ranks = [cfg["r"], *(cfg.get("rank_pattern") or {}).values()]
            found = [(module, max(ranks)) for module in modules]
        if not found:
            raise LorashipError(f"adapter weights in {adapter} hold no LoRA tensors", _ADAPTER_FIX)
        rank = max(rank, *(r for _, r in found))
        for leaf, _ in found:
            if leaf not in targets:
                targets.append(leaf)
    return rank, sorted(targets)
