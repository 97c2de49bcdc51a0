"""One forward pass of the decoder, on the host or with the KV cache kept on a GPU."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .session import DecoderLayout


class Runner:
    """Runs the decoder. On CUDA/TensorRT the KV cache stays on the device (IO binding).

    ``cuda_graph`` means the session was created with CUDA graphs enabled: the decode steps of
    :class:`~.slots.SlotBatch` are then captured once per width and replayed; every other run
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
        self.no_graph = ort.RunOptions()
        if self.cuda_graph:
            self.no_graph.add_run_config_entry("gpu_graph_id", "-1")

    def empty_past(self, batch: int) -> list:
        shape = (batch, self.layout.kv_heads, 0, self.layout.head_dim)
        empty = [np.zeros(shape, self.layout.kv_dtype) for _ in self.layout.past_names]
        if not self.on_device:
            return empty
        return [ort.OrtValue.ortvalue_from_numpy(a, self.device, self.device_id) for a in empty]

    def _position_ids(self, attention_mask: np.ndarray, seq: int) -> np.ndarray:
        return np.maximum(np.cumsum(attention_mask, axis=1)[:, -seq:] - 1, 0)

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list) -> tuple[np.ndarray, list]:
        """Return last-position logits ``[B, V]`` (float32) and the new KV cache."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.layout.has_position_ids:
            feeds["position_ids"] = self._position_ids(attention_mask, input_ids.shape[1])
        if not self.on_device:
            feeds.update(zip(self.layout.past_names, past))
            logits, *present = self.session.run(self._outputs, feeds)
            return np.ascontiguousarray(logits[:, -1, :], dtype=np.float32), present
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in zip(self.layout.past_names, past):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self.layout.present_names:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding, self.no_graph)
        logits, *present = binding.get_outputs()
        return np.asarray(logits.numpy()[:, -1, :], dtype=np.float32), present

    def buffer(self, shape: tuple[int, ...], dtype: type) -> ort.OrtValue:
        """A zeroed tensor that stays at one address: on the device, or in host memory."""
        return ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, dtype), self.device, self.device_id)
