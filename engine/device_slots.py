"""The LoRA slot buffers on the decoder's device: allocated once, bound by address, written in place.

:class:`~.adapters.SlotTable` keeps the slots in host arrays. On a GPU the decoder reads device copies
of them instead: :class:`DeviceSlots` allocates each buffer once on the device, binds it to every step
and prefill (a captured CUDA graph finds it at the same address), and after a slot is written on the
host copies just that slot into its place (``A[slot]`` and ``B[slot]`` of each site, contiguous in the
gather design) with a one-node graph run beside the decoder, so the buffer is never reallocated and no
other slot is touched. The masked design's slot is a band of columns, not contiguous: its buffers are
copied whole. The scheduler writes slots between decode steps, so no step reads a slot being copied.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .adapters import SlotTable
from .devgraph import ONNX_TYPES, copy_graph, session_beside
from .runner import Runner


class DeviceSlots:
    """A :class:`SlotTable`'s buffers on ``runner``'s device; implements the ``Resident`` protocol of
    :mod:`.kv_rows` (bound whole, whatever the rows)."""

    def __init__(self, table: SlotTable, runner: Runner) -> None:
        self.table = table
        self.device, self.device_id = runner.device, runner.device_id
        self.buffers: dict[str, ort.OrtValue] = {}
        for name, host in table.buffers.items():
            value = ort.OrtValue.ortvalue_from_shape_and_type(list(host.shape), host.dtype, self.device, self.device_id)
            value.update_inplace(host)  # the slots written so far, zeros elsewhere
            self.buffers[name] = value
        self._copy = session_beside(runner.session, copy_graph(ONNX_TYPES[np.dtype(table.layout.dtype)]))
        table.on_write(self.upload)

    def bind(self, binding: ort.IOBinding, first: int = 0, count: int = 0, fresh: bool = False) -> None:
        for name, value in self.buffers.items():
            binding.bind_ortvalue_input(name, value)

    def upload(self, slot: int) -> None:
        """Copy ``slot`` of every host buffer into its place on the device."""
        layout = self.table.layout
        for name, host in self.table.buffers.items():
            device = self.buffers[name]
            if layout.design != "gather":
                device.update_inplace(host)
                continue
            part = np.ascontiguousarray(host[slot : slot + 1])
            binding = self._copy.io_binding()
            binding.bind_cpu_input("x", part)
            binding.bind_output("y", self.device, self.device_id, host.dtype, list(part.shape),
                                device.data_ptr() + slot * part.nbytes)
            self._copy.run_with_iobinding(binding)
