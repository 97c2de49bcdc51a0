"""One forward pass of the decoder, on the host or with the KV cache kept on a GPU."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .devgraph import ONNX_TYPES, last_position_graph, session_beside
from .session import DecoderLayout


class Runner:
    """Runs the decoder. On CUDA/TensorRT the KV cache stays on the device (IO binding).

    ``cuda_graph`` means the session was created with CUDA graphs enabled: the decode steps of
    :class:`~.kv_rows.KVRowsBatch` are then captured once per width and replayed; every other run
    passes :attr:`no_graph` and skips capture.
    """

    def __init__(self, session: ort.InferenceSession, layout: DecoderLayout, device_id: int = 0, cuda_graph: bool = False) -> None:
        self.session = session
        self.layout = layout
        self.on_device = session.get_providers()[0] != "CPUExecutionProvider"
        self.device = "cuda" if self.on_device else "cpu"
        self.device_id = device_id
        self.cuda_graph = cuda_graph and self.on_device
        self._outputs = ["logits", *layout.present_names]
        self._last: ort.InferenceSession | None = None
        self.no_graph = ort.RunOptions()
        if self.cuda_graph:
            self.no_graph.add_run_config_entry("gpu_graph_id", "-1")

    def empty_past(self, batch: int) -> list:
        layout = self.layout
        empty = [np.zeros((batch, layout.kv_heads, 0, layout.value_dim if name.endswith(".value") and layout.value_dim
                           else layout.head_dim), layout.kv_dtype) for name in layout.past_names]
        if not self.on_device:
            return empty
        return [ort.OrtValue.ortvalue_from_numpy(a, self.device, self.device_id) for a in empty]

    def _position_ids(self, attention_mask: np.ndarray, seq: int) -> np.ndarray:
        return np.maximum(np.cumsum(attention_mask, axis=1)[:, -seq:] - 1, 0)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list,
            every_position: bool = False) -> tuple[np.ndarray, list]:
        """Return last-position logits ``[B, V]`` (float32), or with ``every_position`` the logits
        ``[B, S, V]`` of every input position, and the new KV cache."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.layout.has_position_ids:
            feeds["position_ids"] = self._position_ids(attention_mask, input_ids.shape[1])
        if not self.on_device:
            feeds.update(zip(self.layout.past_names, past))
            logits, *present = self.session.run(self._outputs, feeds)
            return (logits if every_position else np.ascontiguousarray(logits[:, -1, :], dtype=np.float32)), present
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in zip(self.layout.past_names, past):
            binding.bind_ortvalue_input(name, value)
        prompt = input_ids.shape[1] > 1 and not every_position  # only its last position should cross to the host
        binding.bind_output("logits", self.device if prompt else "cpu", self.device_id)
        for name in self.layout.present_names:
            binding.bind_output(name, self.device, self.device_id)
        self.session.run_with_iobinding(binding, self.no_graph)
        logits, *present = binding.get_outputs()
        if prompt:
            return self.last_logits(logits), present
        logits = logits.numpy()
        return (logits if every_position else np.asarray(logits[:, -1, :], dtype=np.float32)), present

    def last_logits(self, logits: ort.OrtValue) -> np.ndarray:
        """``[B, V]`` float32: the last position of a logits tensor ``[B, S, V]`` where it lives, sliced
        and cast there, so a prompt's B x V values cross to the host instead of B x S x V."""
        if self._last is None:
            self._last = session_beside(self.session, last_position_graph(ONNX_TYPES[np.dtype(self.layout.logits_dtype)]))
        binding = self._last.io_binding()
        binding.bind_ortvalue_input("logits", logits)
        binding.bind_output("last", "cpu")
        self._last.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()[:, 0, :]

    def buffer(self, shape: tuple[int, ...], dtype: type) -> ort.OrtValue:
        """A zeroed tensor that stays at one address: on the device, or in host memory."""
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), self.device, self.device_id)
