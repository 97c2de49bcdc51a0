"""One forward pass of the decoder, on the host or with the KV cache kept on a GPU."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .session import DecoderLayout


class Runner:
    """Runs the decoder. On CUDA/TensorRT the KV cache stays on the device (IO binding)."""

    def __init__(self, session: ort.InferenceSession, layout: DecoderLayout, device_id: int = 0) -> None:
        self.session = session
        self.layout = layout
        self.on_device = session.get_providers()[0] != "CPUExecutionProvider"
        self.device_id = device_id
        self._outputs = ["logits", *layout.present_names]

    def empty_past(self, batch: int) -> list:
        shape = (batch, self.layout.kv_heads, 0, self.layout.head_dim)
        return self.from_host([np.zeros(shape, self.layout.kv_dtype) for _ in self.layout.past_names])

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray, past: list) -> tuple[np.ndarray, list]:
        """Return last-position logits ``[B, V]`` (float32) and the new KV cache."""
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self.layout.has_position_ids:
            seq = input_ids.shape[1]
            positions = np.cumsum(attention_mask, axis=1) - 1
            feeds["position_ids"] = np.maximum(positions[:, -seq:], 0)
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
        self.session.run_with_iobinding(binding)
        logits, *present = binding.get_outputs()
        return np.asarray(logits.numpy()[:, -1, :], dtype=np.float32), present

    def to_host(self, past: list) -> list[np.ndarray]:
        return [p.numpy() for p in past] if self.on_device else past

    def from_host(self, arrays: list[np.ndarray]) -> list:
        if not self.on_device:
            return arrays
        return [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(a), "cuda", self.device_id) for a in arrays]
