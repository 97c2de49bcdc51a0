"""A base export with LoRA slots: every row of a batch adds its own adapter's LoRA term, in one run.

Takes the default export (the onnxruntime-genai builder's GroupQueryAttention graph: fp32 or int4
MatMulNBits on the CPU, fp16 for CUDA) and rewrites each projection that gets a slot, ``y = x·W``,
into ``y = x·W + LoRA_row(x)``, the adapter weights coming from slot buffers that are graph inputs
and each row's slot from the ``lora_ids`` input (``loraship.engine.adapters`` describes the inputs
and both designs). The weights file is copied as it is; only ``model.onnx`` and ``loraship.json``
(which records the layout under ``lora_slots``) change.

The builder packs q/k/v into one MatMul (``attn/qkv_proj``) and splits Phi-3's ``gate_up_proj`` into
``mlp/gate_proj`` and ``mlp/up_proj``. Adapter modules are placed on these MatMuls by the parts they
share (q, k, v, o, gate, up, down, lm_head): a Llama ``q_proj`` adapter takes the q columns of the
packed MatMul in its own band of the slot, a Phi-3 ``qkv_proj`` adapter all of them in one band, and a
Phi-3 ``gate_up_proj`` adapter the same A on both gate and up with each its half of B.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from loraship.engine.adapters import DESIGNS, IDS_INPUT, Site, SlotLayout
from loraship.engine.integrity import IntegrityError, check_files, export_files, write_checksummed
from loraship.errors import LorashipError
from loraship.export.hfcompat import read_json
from loraship.export.manifest import read_export
from loraship.export.progress import Stages
from loraship.fsutil import atomic_dir, check_out_dir

SLOTS_FORMAT = 1
# the builder's MatMul (fp32/fp16) or MatMulNBits (int4) of a layer's projection, by its output
_PROJECTION = re.compile(r"^/model/layers\.(\d+)/(?:attn|mlp)/(\w+)/MatMul/output_0$")
_LM_HEAD = "/lm_head/MatMul"
# atomic parts of each projection the builder writes, in column order
_ONNX_PARTS = {
    "qkv_proj": ("q", "k", "v"), "q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",),
    "gate_up_proj": ("gate", "up"), "gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("down",),
    "lm_head": ("lm_head",),
}
# the adapter (transformers) modules of a layer, in parts; Phi-3 packs q/k/v and gate/up
_HF_MODULES = {
    "phi3": {"qkv_proj": ("q", "k", "v"), "o_proj": ("o",), "gate_up_proj": ("gate", "up"), "down_proj": ("down",)},
    "default": {"q_proj": ("q",), "k_proj": ("k",), "v_proj": ("v",), "o_proj": ("o",),
                "gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("down",)},
}
GROUPS = {"attention": {"q", "k", "v", "o"}, "mlp": {"gate", "up", "down"}}
DEFAULT_TARGETS = ("attention", "mlp")


def hf_modules(model_type: str) -> dict[str, tuple[str, ...]]:
    """The adapter modules of ``model_type`` that can get slots (``lm_head`` included), in parts."""
    return {**_HF_MODULES.get(model_type, _HF_MODULES["default"]), "lm_head": ("lm_head",)}


def part_sizes(config: dict[str, Any]) -> dict[str, int]:
    """Output columns of each part, from the model config."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    kv = int(config.get("num_key_value_heads") or heads) * head_dim
    hidden, ffn = int(config["hidden_size"]), int(config["intermediate_size"])
    return {"q": heads * head_dim, "k": kv, "v": kv, "o": hidden, "gate": ffn, "up": ffn, "down": hidden,
            "lm_head": int(config["vocab_size"])}


def resolve_targets(targets: list[str] | tuple[str, ...] | None, model_type: str) -> list[str]:
    """Adapter module names (or the groups ``attention``, ``mlp``) -> the module names that get slots."""
    modules = hf_modules(model_type)
    chosen: list[str] = []
    for name in targets or DEFAULT_TARGETS:
        if name in GROUPS:
            found = [m for m, parts in modules.items() if set(parts) <= GROUPS[name]]
        elif name in modules:
            found = [name]
        else:
            raise LorashipError(f"unknown LoRA target {name!r} for {model_type}",
                                f"choose from {', '.join([*GROUPS, *modules])}")
        chosen += [m for m in found if m not in chosen]
    return chosen


def placements(modules: dict[str, tuple[str, ...]], projections: dict[str, tuple[str, ...]],
               sizes: dict[str, int]) -> dict[str, list[list]]:
    """Where each adapter module's LoRA goes: ``module -> [[projection, band, col0, col1, row0, row1]]``.

    ``col0:col1`` are the projection's output columns, ``row0:row1`` the rows of the module's lora_B
    that land there; ``band`` numbers the modules placed on one projection (slot columns
    ``band·r .. (band+1)·r``). Modules whose parts no projection has are left out."""
    offset = {}
    for proj, parts in projections.items():
        col = 0
        for part in parts:
            offset[part] = (proj, col)
            col += sizes[part]
    bands: dict[str, int] = {}
    placed: dict[str, list[list]] = {}
    for module, parts in modules.items():
        if not all(p in offset for p in parts):
            continue
        runs: list[list] = []
        row = 0
        for part in parts:
            proj, col = offset[part]
            if runs and runs[-1][0] == proj and runs[-1][3] == col:  # contiguous in the same projection
                runs[-1][3] += sizes[part]
                runs[-1][5] += sizes[part]
            else:
                runs.append([proj, None, col, col + sizes[part], row, row + sizes[part]])
            row += sizes[part]
        for run in runs:
            run[1] = bands.get(run[0], 0)
            bands[run[0]] = run[1] + 1
        placed[module] = runs
    return placed


def _projections(graph) -> dict[str, Any]:
    """``layers.N.proj`` / ``lm_head`` -> the builder's MatMul node of it."""
    found = {}
    for node in graph.node:
        if node.op_type not in ("MatMul", "MatMulNBits") or node.domain not in ("", "com.microsoft"):
            continue
        m = _PROJECTION.match(node.output[0])
        if m and m[2] in _ONNX_PARTS:
            found[f"layers.{m[1]}.{m[2]}"] = node
        elif node.name.startswith(_LM_HEAD):
            found["lm_head"] = node
    return found


def _matmul_dims(node, initializers: dict[str, Any]) -> tuple[int, int]:
    if node.op_type == "MatMulNBits":
        attrs = {a.name: a.i for a in node.attribute}
        return int(attrs["K"]), int(attrs["N"])
    weight = initializers.get(node.input[1])
    if weight is None or len(weight.dims) != 2:
        raise LorashipError(f"cannot read the weight shape of {node.name}", "export the base with `loraship export` (genai engine)")
    return int(weight.dims[0]), int(weight.dims[1])


def add_lora_slots(export: Path, out: Path, max_adapters: int = 4, max_rank: int = 16,
                   targets: list[str] | tuple[str, ...] | None = None, design: str = "gather", force: bool = False,
                   console: Console | None = None) -> Path:
    """Write ``out``: the genai export ``export`` with LoRA slots; return ``out``.

    ``max_adapters`` slots of rank ``max_rank`` per adapter module, on the projections of ``targets``
    (adapter module names such as ``q_proj`` or ``qkv_proj``, or ``attention``/``mlp``; default both).
    """
    export, out = Path(export), Path(out)
    _check_options(max_adapters, max_rank, design)
    manifest = read_export(export)
    if manifest.engine != "genai" or manifest.kv_cache != "shared":
        raise LorashipError(f"{export} is not an onnxruntime-genai GroupQueryAttention export",
                            "export the base with `loraship export` (the default genai engine)")
    if manifest.lora_slots:
        raise LorashipError(f"{export} already has LoRA slots", "start from the base's default export")
    try:
        check_files(export, manifest.files)
    except IntegrityError as exc:
        raise LorashipError(str(exc), "re-run `loraship export` for the base") from None
    check_out_dir(out, force)
    stage = Stages(console)
    with atomic_dir(out, force=force) as tmp:
        with stage(f"adding {max_adapters} LoRA slots of rank {max_rank} ({design}) to {export.name}"):
            spec = _transform(export, tmp / manifest.model_name, read_json(export / "config.json", "model config",
                              "re-run `loraship export`"), max_adapters, max_rank, targets, design)
        with stage("copying the weights and writing loraship.json (with every file's sha256)"):
            for name in export_files(export):
                if name != manifest.model_name:
                    (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(export / name, tmp / name)
            write_checksummed(tmp, manifest.replace(verify=None, lora_slots=spec))
    return out


def export_base_with_slots(model: Path, out: Path, max_adapters: int = 4, max_rank: int = 16,
                           targets: list[str] | tuple[str, ...] | None = None, design: str = "gather",
                           dtype: str = "fp32", int4: bool = False, target: str = "cpu", force: bool = False,
                           console: Console | None = None) -> Path:
    """Export the base model folder ``model`` (the default genai export) and add LoRA slots; return ``out``."""
    from loraship.export.onnx_export import export_onnx

    _check_options(max_adapters, max_rank, design)
    config = read_json(Path(model) / "config.json", "model config", "pass --model a transformers model folder")
    resolve_targets(targets, config.get("model_type", "?"))
    check_out_dir(Path(out), force)
    Path(out).resolve().parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loraship-slots-", dir=Path(out).resolve().parent) as work:
        plain = export_onnx(model, Path(work) / "base", dtype=dtype, engine="genai", int4=int4, target=target,
                            console=console)
        return add_lora_slots(plain, out, max_adapters, max_rank, targets, design, force, console)


def _check_options(max_adapters: int, max_rank: int, design: str) -> None:
    if design not in DESIGNS:
        raise LorashipError(f"unknown LoRA slot design {design!r}", f"choose one of {', '.join(DESIGNS)}")
    if max_adapters < 1 or max_rank < 1:
        raise LorashipError(f"--max-adapters and --max-lora-rank must be >= 1 (got {max_adapters}, {max_rank})",
                            "pass positive values")


def _transform(export: Path, dst: Path, config: dict[str, Any], slots: int, rank: int,
               targets: list[str] | tuple[str, ...] | None, design: str) -> dict[str, Any]:
    """Write the graph with slots to ``dst`` (its weights stay in the export's external data file);
    return the manifest's ``lora_slots`` entry."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(export / dst.name), load_external_data=False)
    graph = model.graph
    if any(i.name == IDS_INPUT for i in graph.input):
        raise LorashipError(f"{export} already has LoRA slots", "start from the base's default export")
    nodes = _projections(graph)
    if not nodes:
        raise LorashipError(f"found none of the builder's projection MatMuls in {export}",
                            "export the base with `loraship export` (the default genai engine)")
    model_type = config["model_type"]
    chosen = resolve_targets(targets, model_type)
    sizes = part_sizes(config)
    projections = {name.rpartition(".")[2]: _ONNX_PARTS[name.rpartition(".")[2]] for name in nodes}
    modules = hf_modules(model_type)
    placed = placements({m: modules[m] for m in chosen}, projections, sizes)
    missing = [m for m in chosen if m not in placed]
    if missing:
        raise LorashipError(f"the {model_type} export has no projection for LoRA target {missing[0]}",
                            "drop it from the targets")
    bands: dict[str, int] = {}
    for runs in placed.values():
        for proj, band, *_ in runs:
            bands[proj] = max(bands.get(proj, 0), band + 1)
    initializers = {i.name: i for i in graph.initializer}
    elem = next(i for i in graph.input if i.name.startswith("past_key_values.")).type.tensor_type.elem_type
    np_dtype = helper.tensor_dtype_to_np_dtype(elem)
    sites: list[tuple[Site, Any]] = []
    for name, node in nodes.items():
        proj = name.rpartition(".")[2]
        if proj not in bands:
            continue
        d_in, d_out = _matmul_dims(node, initializers)
        expected = sum(sizes[p] for p in _ONNX_PARTS[proj])
        if d_out != expected:
            raise LorashipError(f"{node.name} has {d_out} output columns, but config.json gives {proj} {expected}",
                                "re-run `loraship export` for this base")
        sites.append((Site(name, d_in, d_out, bands[proj] * rank), node))
    layout = SlotLayout(design, slots, rank, np_dtype.name, tuple(site for site, _ in sites))

    graph.input.append(helper.make_tensor_value_info(IDS_INPUT, TensorProto.INT64, ["batch_size"]))
    for name, (shape, _) in layout.inputs().items():
        graph.input.append(helper.make_tensor_value_info(name, elem, list(shape)))
    prelude, after = _lora_nodes(helper, TensorProto, layout, sites, elem)
    new_nodes = list(prelude)
    for node in graph.node:
        new_nodes.append(node)
        new_nodes += after.get(node.name, [])
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(_constants(helper, TensorProto, layout))
    onnx.save_model(model, str(dst))
    return {
        "format": SLOTS_FORMAT, "design": design, "max_adapters": slots, "max_rank": rank, "dtype": np_dtype.name,
        "ids_input": IDS_INPUT, "targets": chosen,
        "modules": placed,  # per layer: adapter module -> [[projection, band, col0, col1, row0, row1]]
        "sites": {s.name: [s.d_in, s.d_out, s.rank] for s in layout.sites},
    }


def _constants(helper, TensorProto, layout: SlotLayout) -> list:
    """The masked design's shapes and slot numbers (the gather design needs none)."""
    if layout.design != "masked":
        return []
    consts = [helper.make_tensor("lora/slot_numbers", TensorProto.INT64, [layout.slots], list(range(1, layout.slots + 1))),
              helper.make_tensor("lora/axis1", TensorProto.INT64, [1], [1]),
              helper.make_tensor("lora/axes13", TensorProto.INT64, [2], [1, 3])]
    for rank in sorted({s.rank for s in layout.sites}):
        consts += [helper.make_tensor(f"lora/expand_r{rank}", TensorProto.INT64, [4], [1, 1, layout.slots, rank]),
                   helper.make_tensor(f"lora/flat_r{rank}", TensorProto.INT64, [3], [0, 1, layout.slots * rank])]
    return consts


def _lora_nodes(helper, TensorProto, layout: SlotLayout, sites: list, elem: int) -> tuple[list, dict[str, list]]:
    """The nodes run once per step (the masked design's per-row masks) and, per projection node, the
    nodes that add its LoRA term: its output is renamed, and an Add writes the original name."""
    make = helper.make_node
    prelude: list = []
    if layout.design == "masked":
        # mask[b, s] = (lora_ids[b] == s); per slot rank R: [B, 1, S·R], each slot's R columns
        prelude += [make("Unsqueeze", [IDS_INPUT, "lora/axis1"], ["lora/ids_col"], name="/lora/ids_col"),
                    make("Equal", ["lora/ids_col", "lora/slot_numbers"], ["lora/onehot"], name="/lora/onehot"),
                    make("Cast", ["lora/onehot"], ["lora/mask"], to=elem, name="/lora/mask"),
                    make("Unsqueeze", ["lora/mask", "lora/axes13"], ["lora/mask4"], name="/lora/mask4")]
        for rank in sorted({s.rank for s in layout.sites}):
            prelude += [make("Expand", ["lora/mask4", f"lora/expand_r{rank}"], [f"lora/mask4_r{rank}"], name=f"/lora/expand_r{rank}"),
                        make("Reshape", [f"lora/mask4_r{rank}", f"lora/flat_r{rank}"], [f"lora/mask_r{rank}"], name=f"/lora/mask_r{rank}")]
    after: dict[str, list] = {}
    for site, node in sites:
        out = node.output[0]
        base = f"/lora/{site.name}/base"
        node.output[0] = base
        x, p = node.input[0], f"/lora/{site.name}"
        if layout.design == "gather":
            after[node.name] = [
                make("Gather", [site.a_input, IDS_INPUT], [f"{p}/A"], name=f"{p}/GatherA", axis=0),
                make("Gather", [site.b_input, IDS_INPUT], [f"{p}/B"], name=f"{p}/GatherB", axis=0),
                make("MatMul", [x, f"{p}/A"], [f"{p}/xA"], name=f"{p}/MatMulA"),
                make("MatMul", [f"{p}/xA", f"{p}/B"], [f"{p}/delta"], name=f"{p}/MatMulB"),
                make("Add", [base, f"{p}/delta"], [out], name=f"{p}/Add"),
            ]
        else:
            after[node.name] = [
                make("MatMul", [x, site.a_input], [f"{p}/xA"], name=f"{p}/MatMulA"),
                make("Mul", [f"{p}/xA", f"lora/mask_r{site.rank}"], [f"{p}/masked"], name=f"{p}/Mask"),
                make("MatMul", [f"{p}/masked", site.b_input], [f"{p}/delta"], name=f"{p}/MatMulB"),
                make("Add", [base, f"{p}/delta"], [out], name=f"{p}/Add"),
            ]
    return prelude, after
