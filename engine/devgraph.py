"""Small ONNX graphs run beside the decoder, on its execution provider, so tensors that live on a GPU
are edited there and only what the host needs crosses to it.

TensorRT is left out of their providers (CUDA runs them where the decoder runs on TensorRT): it would
build an engine for every new shape of these few-node graphs. CUDA graph capture is off for them even
where the decoder uses it: each run has new shapes and addresses, which a captured graph would replay
stale.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

ONNX_TYPES = {np.dtype(np.float32): 1, np.dtype(np.float16): 10}  # onnx.TensorProto.FLOAT / FLOAT16


def providers_beside(decoder: ort.InferenceSession) -> list[tuple[str, dict]]:
    """The decoder's providers and their options, TensorRT left out and CUDA graphs off."""
    options = decoder.get_provider_options()
    beside = []
    for name in decoder.get_providers():
        if name == "TensorrtExecutionProvider":
            continue
        opts = dict(options.get(name, {}))
        if name == "CUDAExecutionProvider":
            opts["enable_cuda_graph"] = "0"
        beside.append((name, opts))
    return beside


def session_beside(decoder: ort.InferenceSession, model: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model, providers=providers_beside(decoder))


def model(helper, nodes, inputs, outputs, initializers=()) -> bytes:
    """A serialized opset-17 model of ``nodes`` (``helper`` is ``onnx.helper``, imported by the caller)."""
    graph = helper.make_graph(nodes, "loraship_device_edit", inputs, outputs, initializer=list(initializers))
    built = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    built.ir_version = 8
    return built.SerializeToString()


def last_position_graph(elem: int) -> bytes:
    """``logits [B, S, V]`` -> ``last [B, 1, V]`` float32: the last position, cast where it lives."""
    from onnx import TensorProto, helper

    starts = helper.make_tensor("starts", TensorProto.INT64, [1], [-1])
    ends = helper.make_tensor("ends", TensorProto.INT64, [1], [np.iinfo(np.int64).max])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Slice", ["logits", "starts", "ends", "axes"], ["sliced"]),
             helper.make_node("Cast", ["sliced"], ["last"], to=TensorProto.FLOAT)]
    inputs = [helper.make_tensor_value_info("logits", elem, ["batch", "seq", "vocab"])]
    outputs = [helper.make_tensor_value_info("last", TensorProto.FLOAT, ["batch", 1, "vocab"])]
    return model(helper, nodes, inputs, outputs, [starts, ends, axes])


def copy_graph(elem: int) -> bytes:
    """``x`` -> ``y``, unchanged: with ``y`` bound at an address inside a device buffer, a host array is
    copied into that place (a slot of the LoRA slot buffers) without reallocating the buffer."""
    from onnx import helper

    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", elem, ["n", "d", "r"])]
    outputs = [helper.make_tensor_value_info("y", elem, ["n", "d", "r"])]
    return model(helper, nodes, inputs, outputs)
