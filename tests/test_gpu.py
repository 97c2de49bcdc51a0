"""The engine on CUDA (ONNX Runtime CUDA EP, KV cache kept on the GPU with IO binding) decodes the same
greedy tokens as on the CPU, and batched rows the same tokens as each row alone. Real optimum and
onnxruntime-genai (fp16, CUDA) exports of a tiny random-init Phi-3, real ORT sessions.

Skipped unless onnxruntime really opens a CUDA session (``session.get_providers()``, not the
package's list of available providers, which names CUDA even on machines without a GPU). On a GPU
runner set ``LORASHIP_REQUIRE_GPU=1``: then a CUDA session that does not open (a broken CUDA install,
onnxruntime without CUDA) fails these tests with the reason instead of skipping them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

VOCAB = 512


def _cuda_session_problem() -> str | None:
    """Why onnxruntime cannot open a CUDAExecutionProvider session here, or None when it can."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} has no CUDAExecutionProvider (install the gpu extra: onnxruntime-gpu)"
    try:
        import torch  # noqa: F401  (on a GPU machine it loads the CUDA libraries onnxruntime-gpu needs)
    except ImportError:
        pass
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)  # any ORT reads IR 8
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CUDAExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - any failure to open a CUDA session: reported, or failed on a GPU runner
        return f"onnxruntime could not open a CUDA session: {type(exc).__name__}: {exc}"
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return f"onnxruntime opened the CUDA session on {session.get_providers()} (no GPU, or CUDA libraries missing)"
    return None


def require_cuda() -> None:
    """Skip (no usable GPU), or fail when ``LORASHIP_REQUIRE_GPU=1`` says this machine must have one."""
    problem = _cuda_session_problem()
    if problem is None:
        return
    if os.environ.get("LORASHIP_REQUIRE_GPU") == "1":
        pytest.fail(f"LORASHIP_REQUIRE_GPU=1 but {problem}", pytrace=False)
    pytest.skip(problem)


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> Path:
    """A tiny random Phi-3 (seeded, init 0.06 so greedy argmaxes are clear) with a WordLevel tokenizer."""
    require_cuda()
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, Phi3Config, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("gpu")
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    config = Phi3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        original_max_position_embeddings=512, rope_scaling=None, initializer_range=0.06,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "hf")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<unk>").save_pretrained(root / "hf")
    return root / "hf"


@pytest.fixture(scope="module")
def tiny_export(tiny_hf: Path) -> Path:
    """The tiny model exported fp32 by optimum."""
    from optimum.exporters.onnx import main_export

    out = tiny_hf.parent / "onnx"
    main_export(str(tiny_hf), out, task="text-generation-with-past", do_validation=False)
    manifest = {"format": 1, "engine": "optimum", "model_file": "model.onnx", "dtype": "fp32",
                "architecture": "phi3", "max_context": 512, "eos_token_ids": [], "pad_token_id": 0}
    (out / "loraship.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def tiny_genai(tiny_hf: Path) -> Path:
    """The tiny model through the onnxruntime-genai builder for CUDA (fp16 GroupQueryAttention)."""
    from loraship.export.onnx_export import export_onnx

    return export_onnx(tiny_hf, tiny_hf.parent / "genai", engine="genai", dtype="fp16", target="cuda")


def test_cuda_greedy_tokens_equal_cpu(tiny_export: Path) -> None:
    from loraship.engine import Engine, SamplingParams

    prompts = ["w5 w17 w300 w42 w9 w128 w77", "w400 w3 w3"]  # unequal lengths: left padding on the GPU too
    params = SamplingParams(max_tokens=24, temperature=0.0)
    cpu = Engine.load(tiny_export, provider="cpu")
    gpu = Engine.load(tiny_export, provider="cuda")
    assert gpu.providers[0] == "CUDAExecutionProvider"

    cpu_logits, gpu_logits = cpu.prefill_logits(prompts), gpu.prefill_logits(prompts)
    assert np.abs(gpu_logits - cpu_logits).max() <= 1e-2 * np.abs(cpu_logits).max()
    cpu_out, gpu_out = cpu.generate(prompts, params), gpu.generate(prompts, params)
    assert [c.token_ids for c in gpu_out] == [c.token_ids for c in cpu_out]
    assert all(len(c.token_ids) == 24 for c in gpu_out)
    assert len(set(cpu_out[0].token_ids)) > 1  # a real sequence, not one repeated id


PROMPTS = ["w5 w17 w300 w42 w9 w128 w77", "w400 w3 w3", "w8", "w11 w12 w13 w14", "w200 w201 w202 w203 w204 w205"]


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_batched_rows_equal_each_row_alone(tiny_genai: Path, cuda_graph: bool) -> None:
    """KV rows on the GPU: five requests on four rows (one waits for a free row), one run per step,
    bound by address (and replayed as one CUDA graph per width): each row's tokens equal it alone."""
    from loraship.engine import Engine, SamplingParams

    engine = Engine.load(tiny_genai, provider="cuda", cuda_graph=cuda_graph, max_batch=4)
    assert engine.providers[0] == "CUDAExecutionProvider" and engine.kv_plan.rows == 4
    params = [SamplingParams(max_tokens=n) for n in (20, 6, 16, 12, 9)]
    alone = [engine.generate([p], sp)[0].token_ids for p, sp in zip(PROMPTS, params)]
    together = [c.token_ids for c in engine.generate(PROMPTS, params)]
    assert together == alone
    assert sum(len(t) for t in alone) > 30


def test_cuda_optimum_rows_join_and_leave_on_the_device(tiny_export: Path) -> None:
    """The optimum export's growing cache: joins and retires run as graphs on the GPU; tokens equal the CPU's."""
    from loraship.engine import Engine, SamplingParams

    params = [SamplingParams(max_tokens=n) for n in (18, 5, 12, 9, 14)]
    cpu = Engine.load(tiny_export, provider="cpu")
    gpu = Engine.load(tiny_export, provider="cuda", max_batch=2)  # three requests wait and join as rows leave
    alone = [cpu.generate([p], sp)[0].token_ids for p, sp in zip(PROMPTS, params)]
    assert [c.token_ids for c in gpu.generate(PROMPTS, params)] == alone


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_chunked_prefill_equals_a_whole_prefill(tiny_genai: Path, cuda_graph: bool, monkeypatch) -> None:
    """GroupQueryAttention on CUDA with a multi-token chunk and past context (batch 1): long prompts
    prefilled in chunks beside decoding rows give the tokens of a whole prefill. Chunking stays off on
    a device (kv_rows.CHUNK_ON_DEVICE) until this passes on a GPU."""
    from loraship.engine import Engine, SamplingParams
    from loraship.engine import kv_rows

    engine = Engine.load(tiny_genai, provider="cuda", cuda_graph=cuda_graph, max_batch=4)
    long = [" ".join(f"w{(7 * i + k) % 500 + 3}" for i in range(90)) for k in range(2)]
    prompts = [PROMPTS[0], long[0], PROMPTS[1], long[1]]
    params = [SamplingParams(max_tokens=n) for n in (30, 10, 25, 12)]
    whole = [engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    monkeypatch.setattr(kv_rows, "CHUNK_ON_DEVICE", True)
    monkeypatch.setattr(kv_rows, "LONG_PROMPT", 16)
    monkeypatch.setattr(kv_rows, "MIN_CHUNK", 4)
    assert [engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)] == whole
    assert [c.token_ids for c in engine.generate(prompts, params)] == whole  # chunks between the others' steps


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_cuda_lora_slots_in_place_under_graphs(tiny_hf: Path, cuda_graph: bool) -> None:
    """LoRA slots on the GPU (issue 19): the slot buffers live on the device, bound once; an adapter is
    copied into its slot's place, so a captured CUDA graph reads the new weights. 2 slots and 3 adapters
    (slots rewritten between and during runs): rows on different adapters and the base decode together
    the tokens each decodes alone on a fresh engine without graphs; each adapter's prefill logits equal the
    CPU provider's (host slot buffers) within fp16 rounding; adapter rows differ from the base's."""
    from loraship.engine import Engine, SamplingParams
    from loraship.engine.device_slots import DeviceSlots
    from loraship.export.demo_model import random_adapter
    from loraship.export.lora_convert import convert_adapter
    from loraship.export.lora_slots import export_base_with_slots

    root = tiny_hf.parent
    slots = export_base_with_slots(tiny_hf, root / f"slots-{cuda_graph}", max_adapters=2, max_rank=8, dtype="fp16",
                                   target="cuda")
    names = ["qkv", "o-down", "all"]
    targets = [["qkv_proj"], ["o_proj", "down_proj"], ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]]
    converted = [convert_adapter(random_adapter(tiny_hf, root / f"peft-{cuda_graph}-{i}", t, 8, seed=40 + i),
                                 slots, root / f"converted-{cuda_graph}-{i}") for i, t in enumerate(targets)]

    def serving(**kwargs) -> Engine:
        engine = Engine.load(slots, **kwargs)
        for name, folder in zip(names, converted):
            engine.adapters.register(name, folder)
        return engine

    engine = serving(provider="cuda", cuda_graph=cuda_graph, max_batch=4)
    assert engine.providers[0] == "CUDAExecutionProvider" and isinstance(engine.slot_buffers, DeviceSlots)
    addresses = {n: v.data_ptr() for n, v in engine.slot_buffers.buffers.items()}
    rows = ["qkv", None, "o-down", "all", "qkv", "all"]
    params = [SamplingParams(max_tokens=n) for n in (20, 8, 14, 16, 6, 10)]
    together = [c.token_ids for c in engine.generate(PROMPTS + PROMPTS[:1], params, adapters=rows)]
    fresh = serving(provider="cuda", max_batch=1)
    alone = [fresh.generate([p], sp, adapters=[a])[0].token_ids for p, sp, a in zip(PROMPTS + PROMPTS[:1], params, rows)]
    assert together == alone
    assert {n: v.data_ptr() for n, v in engine.slot_buffers.buffers.items()} == addresses  # written in place
    base = fresh.generate([PROMPTS[0]], SamplingParams(max_tokens=20))[0].token_ids
    assert together[0] != base
    cpu = serving(provider="cpu")
    for name in names:
        got, want = fresh.prefill_logits(PROMPTS[:2], [name] * 2), cpu.prefill_logits(PROMPTS[:2], [name] * 2)
        assert np.abs(got - want).max() <= 1e-2 * np.abs(want).max(), name


def test_cuda_graph_tokens_equal_plain_cuda_and_cpu(tiny_genai: Path) -> None:
    """The same genai fp16 export three ways: CUDA with graph capture and replay, CUDA without, and the
    CPU provider. Graph replay runs the plain CUDA kernels, so its batched greedy tokens equal the plain
    run's exactly; the CPU's prefill logits agree within fp16 rounding and its greedy tokens are the same."""
    from loraship.engine import Engine, SamplingParams

    params = [SamplingParams(max_tokens=n) for n in (20, 6, 16, 12, 9)]
    graph = Engine.load(tiny_genai, provider="cuda", cuda_graph=True, max_batch=4)
    plain = Engine.load(tiny_genai, provider="cuda", cuda_graph=False, max_batch=4)
    cpu = Engine.load(tiny_genai, provider="cpu", max_batch=4)
    assert graph.providers[0] == plain.providers[0] == "CUDAExecutionProvider" and cpu.providers[0] == "CPUExecutionProvider"
    graph_logits, plain_logits, cpu_logits = (e.prefill_logits(PROMPTS[:2]) for e in (graph, plain, cpu))
    assert np.abs(graph_logits - plain_logits).max() <= 1e-3 * np.abs(plain_logits).max()
    assert np.abs(cpu_logits - plain_logits).max() <= 1e-2 * np.abs(cpu_logits).max()
    runs = [[c.token_ids for c in e.generate(PROMPTS, params)] for e in (graph, plain, cpu)]
    assert runs[0] == runs[1] == runs[2]
    assert [len(t) for t in runs[0]] == [20, 6, 16, 12, 9] and len(set(runs[0][0])) > 1
