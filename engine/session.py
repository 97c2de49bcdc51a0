"""ONNX Runtime session creation and the decoder's input/output layout."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import RequestError
from .manifest import MANIFEST

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


@dataclass(frozen=True)
class DecoderLayout:
    """What the exported decoder takes and returns."""

    past_names: list[str]  # past_key_values.{i}.key/.value, in order
    present_names: list[str]  # present.{i}.key/.value, same order
    kv_heads: int
    head_dim: int
    kv_dtype: type
    has_position_ids: bool
    vocab: int | None  # None where the ONNX shape leaves it symbolic
    logits_dtype: type
    value_dim: int | None = None  # head size of the values where it is not the keys' (DeepSeek's latent attention)
    conv_names: tuple[str, ...] = ()  # past_conv.{i}: a recurrent state per row (LFM2's short convolutions), replaced each step
    conv_shape: tuple[int, ...] = ()  # one row's state, [channels, cache length]
    lora_ids: bool = False  # a base export with LoRA slots: each row's slot comes in as lora_ids [batch]

    @classmethod
    def of(cls, session: ort.InferenceSession, kv_heads: int | None = None, head_dim: int | None = None) -> "DecoderLayout":
        """Read the layout from the session; symbolic KV dims fall back to the given values."""
        inputs = {i.name: i for i in session.get_inputs()}
        past = sorted(
            (n for n in inputs if n.startswith("past_key_values.")),
            key=lambda n: (int(n.split(".")[1]), n.endswith(".value")),
        )
        if "input_ids" not in inputs or not past:
            raise RequestError("the ONNX model is not a decoder with KV cache; export it with `loraship export`")
        first = inputs[past[0]]
        conv = sorted((n for n in inputs if n.startswith("past_conv.")), key=lambda n: int(n.split(".")[1]))
        conv_shape = tuple(inputs[conv[0]].shape[1:]) if conv else ()
        if conv and not all(isinstance(d, int) for d in conv_shape):
            raise RequestError(f"cannot read the recurrent state's shape from {conv[0]} {inputs[conv[0]].shape}")
        values = [inputs[n].shape[3] for n in past if n.endswith(".value")]
        value_dim = values[0] if values and isinstance(values[0], int) and values[0] != first.shape[3] else None
        logits = next(o for o in session.get_outputs() if o.name == "logits")
        kv_heads = first.shape[1] if isinstance(first.shape[1], int) else kv_heads
        head_dim = first.shape[3] if isinstance(first.shape[3], int) else head_dim
        if not isinstance(kv_heads, int) or not isinstance(head_dim, int):
            raise RequestError(
                f"cannot read KV cache dimensions from {past[0]} shape {first.shape}; add kv_heads and head_dim to {MANIFEST}"
            )
        return cls(
            past_names=past,
            present_names=[n.replace("past_key_values.", "present.") for n in past],
            kv_heads=kv_heads,
            head_dim=head_dim,
            kv_dtype=_NP_TYPES[first.type],
            has_position_ids="position_ids" in inputs,
            vocab=logits.shape[-1] if isinstance(logits.shape[-1], int) else None,
            logits_dtype=_NP_TYPES[logits.type],
            value_dim=value_dim,
            conv_names=tuple(conv),
            conv_shape=conv_shape,
            lora_ids="lora_ids" in inputs,
        )


def trt_profile(layout: DecoderLayout, max_batch: int, max_context: int, opt_context: int = 256) -> dict[str, str]:
    """TensorRT EP shape profiles covering prefill and decode up to ``max_context``."""
    def shapes(batch: int, seq: int, past: int) -> str:
        kv = f"{batch}x{layout.kv_heads}x{past}x{layout.head_dim}"
        parts = [f"input_ids:{batch}x{seq}", f"attention_mask:{batch}x{past + seq}"]
        if layout.has_position_ids:
            parts.append(f"position_ids:{batch}x{seq}")
        parts += [f"{name}:{kv}" for name in layout.past_names]
        return ",".join(parts)

    return {
        "trt_profile_min_shapes": shapes(1, 1, 0),
        "trt_profile_opt_shapes": shapes(max(1, max_batch // 2), 1, opt_context),
        "trt_profile_max_shapes": shapes(max_batch, max_context, max_context),
    }


def create_session(
    model_path: Path,
    provider: str = "cpu",
    threads: int | None = None,
    trt_cache_dir: Path | None = None,
    trt_fp16: bool = False,
    device_id: int = 0,
    max_batch: int = 8,
    max_context: int = 4096,
    kv_dims: tuple[int | None, int | None] = (None, None),
    trt_profile_tokens: tuple[int, int, int] | None = None,
    spin: bool = True,
    cuda_graph: bool = False,
) -> ort.InferenceSession:
    """Open ``model_path`` on ``provider``; the session's providers say what is really used.

    ``trt_profile_tokens`` is (min, opt, max) context tokens for TensorRT shape profiles; the
    minimum profile always covers a one-token step with an empty cache. ``spin=False`` stops
    idle intra-op threads from spinning: a server needs that, because spinning threads starve
    its response threads on small hosts (2 cores: Triton TTFT 12-62 ms spinning, 6 ms not).
    ``cuda_graph`` turns on the CUDA EP's graph capture (for shared-buffer decoders only).
    """
    if provider not in PROVIDERS:
        raise RequestError(f"unknown provider {provider!r}; use one of {', '.join(PROVIDERS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or (os.cpu_count() or 1)
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    providers: list = []
    for name in PROVIDERS[provider]:
        if name == "CPUExecutionProvider":
            providers.append(name)
        elif name == "CUDAExecutionProvider":
            providers.append((name, {"device_id": device_id, "enable_cuda_graph": "1" if cuda_graph else "0"}))
        else:
            probe = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
            trt = {
                "device_id": device_id,
                "trt_fp16_enable": trt_fp16,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(trt_cache_dir or Path(model_path).parent / "trt_cache"),
                "trt_timing_cache_enable": True,
            }
            _, opt, most = trt_profile_tokens or (1, min(256, max_context), max_context)
            trt.update(trt_profile(DecoderLayout.of(probe, *kv_dims), max_batch, most, opt))
            del probe
            providers.append((name, trt))
    return ort.InferenceSession(str(model_path), options, providers=providers)
