"""A base export with LoRA slots, on real ONNX Runtime sessions: one batch mixing four adapters of
different ranks and targets and the base decodes each row as that adapter's merged model exported alone
(`loraship merge` + the default export) does, in both slot designs, for phi3 (packed qkv_proj and
gate_up_proj adapter modules) and llama (q/k/v_proj adapters on the builder's packed QKV MatMul).
Also: the graph inputs added, int4 (MatMulNBits) bases, and adapters that are converted or refused."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from loraship.engine.adapters import WEIGHTS_FILE, AdapterError, SlotLayout, SlotTable, read_adapter, read_safetensors
from loraship.errors import LorashipError
from loraship.export.demo_model import random_adapter
from loraship.export.lora_convert import convert_adapter
from loraship.export.lora_slots import add_lora_slots
from loraship.export.manifest import read_export
from loraship.export.onnx_export import export_onnx

RANK = 8  # the slot rank of the LoRA worlds (tests/conftest.py)
PROMPT = 12
STEPS = 6


def session(folder: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])


def decode(folder: Path, prompts: np.ndarray, steps: int, lora_ids: list[int] | None = None,
           buffers: dict | None = None) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Each prompt prefilled alone (batch 1, its own lora id), then ``steps`` greedy decode steps of all rows
    in one run each. Return (last-position prefill logits [B, V], first decode step's logits [B, V], tokens)."""
    sess = session(folder)
    manifest = read_export(folder)
    layers, heads, dim = manifest.num_layers, manifest.kv_heads, manifest.head_dim
    names = {i.name for i in sess.get_inputs()}
    past_names = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    outputs = ["logits"] + [n.replace("past_key_values.", "present.") for n in past_names]

    def run(ids: np.ndarray, past: list[np.ndarray], lora: list[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        total = past[0].shape[2] + ids.shape[1]
        feeds = {"input_ids": ids, "attention_mask": np.ones((ids.shape[0], total), np.int64), **dict(zip(past_names, past))}
        if "position_ids" in names:
            feeds["position_ids"] = np.tile(np.arange(total - ids.shape[1], total), (ids.shape[0], 1))
        if lora_ids is not None:
            feeds.update({"lora_ids": np.asarray(lora, np.int64), **buffers})
        logits, *present = sess.run(outputs, feeds)
        return logits[:, -1], present

    kv_type = np.float16 if sess.get_inputs()[2].type == "tensor(float16)" else np.float32
    rows = [run(p[None], [np.zeros((1, heads, 0, dim), kv_type)] * len(past_names), [lora_ids[r] if lora_ids else 0])
            for r, p in enumerate(prompts)]
    prefill = np.concatenate([logits for logits, _ in rows])
    past = [np.concatenate([present[i] for _, present in rows]) for i in range(len(past_names))]
    tokens = [[int(t)] for t in prefill.argmax(-1)]
    first = None
    for _ in range(steps):
        logits, past = run(np.asarray([[t[-1]] for t in tokens], np.int64), past, lora_ids or [0] * len(tokens))
        first = logits if first is None else first
        for row, t in zip(tokens, logits.argmax(-1)):
            row.append(int(t))
    return prefill, first, tokens


def prompts_for(vocab: int, rows: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    return np.concatenate([np.ones((rows, 1), np.int64), rng.integers(8, vocab, (rows, PROMPT - 1))], axis=1)


@pytest.mark.parametrize("arch", ["phi3", "llama"])
@pytest.mark.parametrize("design", ["gather", "masked"])
def test_mixed_batch_decodes_each_row_as_its_merged_export(lora_worlds, arch, design):
    """Rows on four adapters (in slots 3, 1, 4, 2) and the base in one batch: each row's prefill and first
    decode-step logits within 1e-4 of its adapter's merged export run alone, and the same greedy tokens."""
    world = lora_worlds(arch)
    table = SlotTable(SlotLayout.from_manifest(read_export(world.slots[design])))
    for name in ("a2", "a0", "a3", "a1"):
        table.load(world.converted[int(name[1])], name=name)
    row_adapters = ["a0", "a1", None, "a2", "a3"]
    lora_ids = table.ids(row_adapters).tolist()
    assert lora_ids == [2, 4, 0, 1, 3]
    prompts = prompts_for(read_export(world.base_onnx).extra.get("vocab", 1000), len(row_adapters))
    prefill, first, tokens = decode(world.slots[design], prompts, STEPS, lora_ids, table.buffers)
    for row, name in enumerate(row_adapters):
        reference = world.base_onnx if name is None else world.merged[int(name[1])]
        ref_prefill, ref_first, ref_tokens = decode(reference, prompts[row:row + 1], STEPS)
        assert np.abs(prefill[row] - ref_prefill[0]).max() < 1e-4, (row, name)
        assert np.abs(first[row] - ref_first[0]).max() < 1e-4, (row, name)
        assert tokens[row] == ref_tokens[0], (row, name)
    base_prefill = decode(world.base_onnx, prompts[:1], 0)[0]
    assert np.abs(prefill[0] - base_prefill[0]).max() > 1e-2  # the adapter really changes the row


def test_graph_inputs(lora_worlds):
    """The inputs the slots add, by name, shape and dtype; Phi-3's qkv_proj adapter module takes one band of
    the packed QKV MatMul, Llama's q/k/v_proj three."""
    phi3, llama = (lora_worlds(arch) for arch in ("phi3", "llama"))
    added = {}
    for design, folder in phi3.slots.items():
        sess = session(folder)
        added[design] = {i.name: (i.shape, i.type) for i in sess.get_inputs() if i.name.startswith("lora")}
    assert added["gather"]["lora_ids"] == (["batch_size"], "tensor(int64)")
    assert added["gather"]["lora_A.layers.0.qkv_proj"] == ([5, 128, 8], "tensor(float)")
    assert added["gather"]["lora_B.layers.0.qkv_proj"] == ([5, 8, 256], "tensor(float)")
    assert added["gather"]["lora_A.layers.1.down_proj"] == ([5, 256, 8], "tensor(float)")
    assert added["masked"]["lora_A.layers.0.qkv_proj"] == ([128, 32], "tensor(float)")
    assert added["masked"]["lora_B.layers.0.gate_proj"] == ([32, 256], "tensor(float)")
    projections = ("qkv_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert set(added["gather"]) == {"lora_ids"} | {f"lora_{ab}.layers.{i}.{p}" for ab in "AB" for i in (0, 1) for p in projections}
    spec = read_export(llama.slots["gather"]).lora_slots
    assert spec["sites"]["layers.0.qkv_proj"] == [128, 256, 24]  # q, k and v bands of rank 8
    assert spec["modules"]["k_proj"] == [["qkv_proj", 1, 128, 192, 0, 64]]
    assert read_export(phi3.slots["gather"]).lora_slots["modules"]["gate_up_proj"] == [
        ["gate_proj", 0, 0, 256, 0, 256], ["up_proj", 0, 0, 256, 256, 512]]


def test_int4_base_gets_slots_on_its_matmulnbits(lora_worlds, tmp_path):
    """Slots on the int4 export: base rows equal the int4 export exactly; an adapter row moves toward that
    adapter's merged int4 export (quantized merged weights cannot match exactly)."""
    world = lora_worlds("phi3")
    int4 = export_onnx(world.base, tmp_path / "int4", int4=True)
    slots = add_lora_slots(int4, tmp_path / "int4-slots", max_adapters=2, max_rank=RANK)
    assert SlotLayout.from_manifest(read_export(slots)).fingerprint() == \
        SlotLayout.from_manifest(read_export(world.slots["gather"])).fingerprint()  # fp32 activations: same adapters
    table = SlotTable(SlotLayout.from_manifest(read_export(slots)))
    table.load(world.converted[0])
    merged4 = export_onnx(world.root / "merged-0", tmp_path / "merged-int4", int4=True)
    prompts = prompts_for(1000, 2)
    slotted = decode(slots, prompts, 0, [0, 1], table.buffers)[0]
    base = decode(int4, prompts, 0)[0]
    merged = decode(merged4, prompts, 0)[0]
    assert np.array_equal(slotted[0], base[0])
    assert np.abs(slotted[1] - merged[1]).max() < 0.6 * np.abs(base[1] - merged[1]).max()


def test_converted_adapter_folds_scaling_and_pads_rank(lora_worlds):
    """rslora scaling (alpha / sqrt(r)) folded into B, rank 8 padded in the slot's band, absent sites absent."""
    from safetensors.numpy import load_file

    world = lora_worlds("llama")
    folder = world.converted[2]  # rank 8 rslora on k_proj, o_proj, down_proj
    manifest = json.loads((folder / "loraship.json").read_text())
    assert manifest["kind"] == "lora_adapter" and set(manifest["files"]) == {WEIGHTS_FILE}
    tensors = read_safetensors(folder / WEIGHTS_FILE)
    assert sorted({k.split(".", 2)[2].rsplit(".", 1)[0] for k in tensors}) == ["down_proj", "o_proj", "qkv_proj"]
    peft = load_file(str(world.adapters[2] / "adapter_model.safetensors"))
    prefix = "base_model.model.model.layers.1.self_attn.k_proj"
    a, b = tensors["layers.1.qkv_proj.A"], tensors["layers.1.qkv_proj.B"]
    assert a.shape == (128, 24) and b.shape == (24, 256)
    assert np.array_equal(a[:, 8:16], peft[f"{prefix}.lora_A.weight"].T)
    assert np.allclose(b[8:16, 128:192], 16 / math.sqrt(8) * peft[f"{prefix}.lora_B.weight"].T, rtol=1e-6)
    assert not a[:, :8].any() and not a[:, 16:].any() and not b[:, :128].any() and not b[:, 192:].any()
    assert read_adapter(folder, SlotLayout.from_manifest(read_export(world.slots["masked"]))).tensors  # one file, both designs
    phi3 = lora_worlds("phi3")
    with pytest.raises(AdapterError, match="converted for another base export"):
        SlotTable(SlotLayout.from_manifest(read_export(phi3.slots["gather"]))).load(folder)


def _copy(adapter: Path, dst: Path, config=None, tensors=None) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(adapter, dst)
    if config is not None:
        path = dst / "adapter_config.json"
        path.write_text(json.dumps(config(json.loads(path.read_text()))))
    if tensors is not None:
        loaded = load_file(str(dst / "adapter_model.safetensors"))
        save_file({k: v.contiguous() for k, v in tensors(loaded, torch).items()}, str(dst / "adapter_model.safetensors"))
    return dst


def test_adapters_that_do_not_fit_are_refused_in_one_line(lora_worlds, tmp_path):
    phi3, llama = (lora_worlds(arch) for arch in ("phi3", "llama"))
    slots = phi3.slots["gather"]
    attention_only = add_lora_slots(phi3.base_onnx, tmp_path / "attn", max_rank=RANK, targets=["attention"])
    big = random_adapter(phi3.base, tmp_path / "rank16", ["o_proj"], 16)
    cases = [
        (big, slots, r"adapter rank 16 on model\.layers\.0\.self_attn\.o_proj exceeds the base's slot rank 8 "
                     r"\(re-export the base with slots that fit \(`loraship export --max-adapters` --max-lora-rank 16 or more\)\)"),
        (phi3.adapters[0], attention_only, r"adapter targets down_proj, which has no LoRA slot in this base export "
                                           r"\(slots: qkv_proj, o_proj\)"),
        (llama.adapters[0], slots, r"adapter targets model\.layers\.0\.mlp\.gate_proj, which the base phi3 does not have"),
        (_copy(phi3.adapters[1], tmp_path / "narrow", tensors=lambda t, torch: {
            k: (v[:, :96] if "lora_A" in k else v) for k, v in t.items()}),
         slots, r"adapter does not fit the base: .*qkv_proj has A \[4, 96\] and B \[256, 4\], but the base's qkv_proj takes 128 inputs"),
        (_copy(phi3.adapters[1], tmp_path / "dora", config=lambda c: {**c, "use_dora": True}), slots,
         "uses DoRA, which LoRA slots do not carry"),
        (_copy(phi3.adapters[1], tmp_path / "saved", config=lambda c: {**c, "modules_to_save": ["lm_head"]}), slots,
         "saves full weights of lm_head"),
        (phi3.adapters[1], phi3.base_onnx, "has no LoRA slots"),
    ]
    for adapter, base, message in cases:
        with pytest.raises(LorashipError, match=message) as err:
            convert_adapter(adapter, base, tmp_path / "out")
        assert "\n" not in str(err.value)
        assert not (tmp_path / "out").exists()


def test_qlora_and_transformers5_adapters_convert(lora_worlds, tmp_path):
    """bf16 LoRA tensors (QLoRA) convert to what their float32 values convert to; an adapter_config.json with
    fields a newer peft wrote converts too."""
    world = lora_worlds("phi3")
    bf16 = _copy(world.adapters[0], tmp_path / "qlora", config=lambda c: {**c, "peft_version": "0.99.0", "future": {"x": 1},
                                                                          "base_model_name_or_path": "someone/phi3-bnb-4bit"},
                 tensors=lambda t, torch: {k: v.to(torch.bfloat16) for k, v in t.items()})
    upcast = _copy(bf16, tmp_path / "upcast", tensors=lambda t, torch: {k: v.to(torch.float32) for k, v in t.items()})
    got = read_safetensors(convert_adapter(bf16, world.slots["gather"], tmp_path / "c-bf16") / WEIGHTS_FILE)
    want = read_safetensors(convert_adapter(upcast, world.slots["gather"], tmp_path / "c-f32") / WEIGHTS_FILE)
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in got)


def test_fp16_cuda_export_gets_fp16_slots(lora_worlds, tmp_path):
    """The builder's fp16 graph for CUDA (it also runs on the CPU provider): fp16 slot buffers, and an adapter
    row decodes the tokens of that adapter's merged fp16 export, its logits within fp16 rounding."""
    from loraship.export.lora_slots import export_base_with_slots

    world = lora_worlds("phi3")
    slots = export_base_with_slots(world.base, tmp_path / "slots16", max_adapters=2, max_rank=RANK, dtype="fp16", target="cuda")
    layout = SlotLayout.from_manifest(read_export(slots))
    assert layout.dtype == "float16"
    table = SlotTable(layout)
    table.load(convert_adapter(world.adapters[0], slots, tmp_path / "converted16"))
    assert table.buffers["lora_B.layers.0.qkv_proj"].dtype == np.float16
    merged = export_onnx(world.root / "merged-0", tmp_path / "merged16", dtype="fp16", target="cuda")
    prompts = prompts_for(1000, 1)
    got = decode(slots, prompts, STEPS, [1], table.buffers)
    want = decode(merged, prompts, STEPS)
    assert np.abs(got[0].astype(np.float32) - want[0].astype(np.float32)).max() < 2e-2
    assert got[2] == want[2]


def test_cli_exports_slots_and_converts_adapters(lora_worlds, tmp_path, run_cli):
    world = lora_worlds("phi3")
    out = tmp_path / "slots"
    code, stdout, _ = run_cli(["export", "--model", str(world.base), "--out", str(out), "--max-adapters", "3",
                               "--max-lora-rank", "4", "--lora-targets", "attention", "--lora-design", "masked"])
    assert code == 0 and stdout.strip() == str(out)
    spec = read_export(out).lora_slots
    assert (spec["design"], spec["max_adapters"], spec["max_rank"], spec["targets"]) == ("masked", 3, 4, ["qkv_proj", "o_proj"])
    code, stdout, _ = run_cli(["convert-adapter", "--adapter", str(world.adapters[1]), "--base", str(out), "--out", str(tmp_path / "a")])
    assert code == 0 and read_adapter(tmp_path / "a", SlotLayout.from_manifest(read_export(out))).tensors
    code, _, stderr = run_cli(["convert-adapter", "--adapter", str(world.adapters[0]), "--base", str(out), "--out", str(tmp_path / "b")])
    assert code == 1 and len(stderr.strip().splitlines()) == 1
    assert "adapter targets down_proj, which has no LoRA slot in this base export (slots: qkv_proj, o_proj) " \
           "(re-export the base with slots that fit (`loraship export --max-adapters` --lora-targets including down_proj))" in stderr
    code, _, stderr = run_cli(["export", "--model", str(world.base), "--out", str(tmp_path / "c"), "--max-adapters", "2",
                               "--lora-targets", "attention,fc9"])
    assert code == 1 and "unknown LoRA target 'fc9' for phi3" in stderr


def test_slots_are_added_only_to_an_intact_genai_export(lora_worlds, tmp_path, optimum_dir):
    world = lora_worlds("phi3")
    cases = [(optimum_dir, "is not an onnxruntime-genai GroupQueryAttention export"),
             (world.slots["gather"], "already has LoRA slots")]
    broken = shutil.copytree(world.base_onnx, tmp_path / "broken")
    with open(broken / "model.onnx.data", "r+b") as fh:
        fh.truncate(1000)
    cases.append((broken, r"model\.onnx\.data is 1000 bytes, but the export wrote \d+ \(truncated or replaced\) \(re-run `loraship export`"))
    for export, message in cases:
        with pytest.raises(LorashipError, match=message):
            add_lora_slots(export, tmp_path / "out")
        assert not (tmp_path / "out").exists()
    with pytest.raises(LorashipError, match="unknown LoRA slot design 'sgmv'"):
        add_lora_slots(world.base_onnx, tmp_path / "out", design="sgmv")
