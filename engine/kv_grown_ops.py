"""Join and retire rows of a left-padded, grown KV cache where it lives (for :class:`~.kv_grown.KVGrownBatch`).

An optimum export's decoder takes ``past_key_values.*`` and returns a new, longer ``present.*`` each
step, so the batch's cache is one tensor per layer ``[batch, kv_heads, width, head_dim]``, left-padded.
A joining request's cache is padded to the common width and concatenated; finished rows are gathered
out and columns that are padding for every remaining row dropped. Both edits run as two small ONNX
graphs beside the decoder (:mod:`.devgraph`), so on a GPU the cache never travels through host memory.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .devgraph import ONNX_TYPES, model, session_beside
from .runner import Runner


class KVGrownOps:
    """``merge`` and ``select`` over every KV tensor of a decoder in one run each."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self._sessions: dict[str, ort.InferenceSession] = {}

    def merge(self, old: list, new: list, width: int) -> list:
        """``old`` and ``new`` left-padded to ``width`` positions and stacked along the batch axis."""
        pads = {"pad_old": _left_pad(old[0], width), "pad_new": _left_pad(new[0], width)}
        feeds = {**{f"old_{i}": v for i, v in enumerate(old)}, **{f"new_{i}": v for i, v in enumerate(new)}}
        return self._run("merge", feeds, pads)

    def select(self, past: list, keep: list[int], start: int) -> list:
        """Rows ``keep`` of each tensor, from position ``start`` on."""
        small = {"keep": np.asarray(keep, np.int64), "starts": np.asarray([start], np.int64),
                 "ends": np.asarray([np.iinfo(np.int64).max], np.int64)}
        return self._run("select", {f"kv_{i}": v for i, v in enumerate(past)}, small)

    def _run(self, graph: str, tensors: dict, small: dict[str, np.ndarray]) -> list:
        session = self._session(graph)
        outputs = [o.name for o in session.get_outputs()]
        if not self.runner.on_device:
            return session.run(outputs, {**tensors, **small})
        binding = session.io_binding()
        for name, value in tensors.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in small.items():
            binding.bind_cpu_input(name, value)
        for name in outputs:
            binding.bind_output(name, self.runner.device, self.runner.device_id)
        session.run_with_iobinding(binding)
        return binding.get_outputs()

    def _session(self, graph: str) -> ort.InferenceSession:
        if graph not in self._sessions:
            build = _merge_graph if graph == "merge" else _select_graph
            self._sessions[graph] = session_beside(self.runner.session, build(len(self.runner.layout.past_names),
                                                                              ONNX_TYPES[np.dtype(self.runner.layout.kv_dtype)]))
        return self._sessions[graph]


def _left_pad(value, width: int) -> np.ndarray:
    """ONNX Pad's ``pads`` (begins, then ends) that left-pad axis 2 of a 4-D tensor to ``width``."""
    shape = value.shape() if isinstance(value, ort.OrtValue) else value.shape
    return np.asarray([0, 0, width - shape[2], 0, 0, 0, 0, 0], np.int64)


def _merge_graph(count: int, elem: int) -> bytes:
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("pad_old", TensorProto.INT64, [8]),
              helper.make_tensor_value_info("pad_new", TensorProto.INT64, [8])]
    nodes, outputs = [], []
    for i in range(count):
        kv = ["batch", "heads", "width", f"dim_{i}"]  # keys and values may differ in head size (latent attention)
        inputs += [helper.make_tensor_value_info(f"old_{i}", elem, ["b_old", *kv[1:]]),
                   helper.make_tensor_value_info(f"new_{i}", elem, ["b_new", *kv[1:]])]
        nodes += [helper.make_node("Pad", [f"old_{i}", "pad_old"], [f"old_padded_{i}"]),
                  helper.make_node("Pad", [f"new_{i}", "pad_new"], [f"new_padded_{i}"]),
                  helper.make_node("Concat", [f"old_padded_{i}", f"new_padded_{i}"], [f"merged_{i}"], axis=0)]
        outputs.append(helper.make_tensor_value_info(f"merged_{i}", elem, kv))
    return model(helper, nodes, inputs, outputs)


def _select_graph(count: int, elem: int) -> bytes:
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("keep", TensorProto.INT64, ["kept"]),
              helper.make_tensor_value_info("starts", TensorProto.INT64, [1]),
              helper.make_tensor_value_info("ends", TensorProto.INT64, [1])]
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [2])
    nodes, outputs = [], []
    for i in range(count):
        kv = ["batch", "heads", "width", f"dim_{i}"]
        inputs.append(helper.make_tensor_value_info(f"kv_{i}", elem, kv))
        nodes += [helper.make_node("Gather", [f"kv_{i}", "keep"], [f"kept_{i}"], axis=0),
                  helper.make_node("Slice", [f"kept_{i}", "starts", "ends", "axes"], [f"selected_{i}"])]
        outputs.append(helper.make_tensor_value_info(f"selected_{i}", elem, ["kept", *kv[1:]]))
    return model(helper, nodes, inputs, outputs, [axes])
