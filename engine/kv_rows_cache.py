"""The KV rows of a GroupQueryAttention decoder (the onnxruntime-genai export), planned at load, for
:class:`~.kv_rows.KVRowsBatch`.

The cache is one buffer per layer and per K/V, ``[rows, kv_heads, capacity, head_dim]``: a row
holds one request's keys and values up to ``capacity`` positions. The attention op reads each
row's length from the attention mask and appends in place, so rows of different lengths decode in
one run, and one run can cover the first ``n`` rows by binding the buffers' addresses with batch ``n``
(or a single row, by offsetting the address). Nothing is allocated after load: a request that finds
no free row waits for one, and never runs out of memory mid-generation.

A decoder with recurrent state (LFM2's short convolutions: ``past_conv.{i}`` in, ``present_conv.{i}`` out,
``[batch, channels, cache length]``) gets one more buffer per state, a row per request like the KV rows;
a decode step reads and replaces each row's state in place, and a prefill starts from zeros.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from .adapters import SlotLayout
from .errors import RequestError
from .session import DecoderLayout

GIB = 1024**3


@dataclass(frozen=True)
class KVPlan:
    """How many rows of how many positions, and what they cost; on a base export with LoRA slots, the
    slot buffers too, which are allocated beside the rows and taken from the same budget."""

    rows: int
    capacity: int  # positions per row: prompt + generated tokens of one request
    bytes_per_position: int  # every layer's K and V for one position of one row
    dtype: str
    slots: SlotLayout | None = None  # the LoRA slot buffers allocated with the rows

    @property
    def row_bytes(self) -> int:
        return self.capacity * self.bytes_per_position

    @property
    def total_bytes(self) -> int:
        """The KV rows' bytes."""
        return self.rows * self.row_bytes

    @property
    def slot_bytes(self) -> int:
        """The LoRA slot buffers' bytes (0 without slots)."""
        return self.slots.nbytes if self.slots else 0

    @classmethod
    def of(cls, layout: DecoderLayout, capacity: int, max_batch: int, budget_bytes: int | None = None,
           slots: SlotLayout | None = None) -> "KVPlan":
        """``max_batch`` rows of ``capacity`` positions, or as many as ``budget_bytes`` holds (at most
        ``max_batch``) beside the LoRA ``slots``."""
        return cls.sized(len(layout.past_names), layout.kv_heads, layout.head_dim, np.dtype(layout.kv_dtype).name,
                         capacity, max_batch, budget_bytes, slots)

    @classmethod
    def sized(cls, tensors: int, kv_heads: int, head_dim: int, dtype: str, capacity: int, max_batch: int,
              budget_bytes: int | None = None, slots: SlotLayout | None = None) -> "KVPlan":
        """The plan from the decoder's dimensions: ``tensors`` KV inputs (2 per layer) of ``dtype``; the
        budget holds the LoRA ``slots`` (a base export with slots: ``SlotLayout.from_manifest``) first."""
        if max_batch < 1:
            raise RequestError(f"max_batch must be >= 1, got {max_batch}")
        plan = cls(max_batch, capacity, tensors * kv_heads * head_dim * np.dtype(dtype).itemsize, np.dtype(dtype).name, slots)
        if budget_bytes is None:
            return plan
        rows = min(max_batch, (budget_bytes - plan.slot_bytes) // plan.row_bytes)
        if rows < 1:
            less = f" less {_size(plan.slot_bytes)} for the LoRA slots" if slots else ""
            fix = ", or fewer adapter slots" if slots else ""
            raise RequestError(
                f"a KV budget of {_size(budget_bytes)}{less} holds no row of {capacity} positions "
                f"({_size(plan.row_bytes)}); raise the KV budget or lower max_context{fix}"
            )
        return cls(int(rows), capacity, plan.bytes_per_position, plan.dtype, slots)

    def describe(self) -> str:
        text = (f"KV cache: {self.rows} rows x {self.capacity} positions ({self.dtype}), "
                f"{_size(self.row_bytes)} a row, {_size(self.total_bytes)} in all")
        if self.slots:
            text += f"; {self.slots.describe()}; {_size(self.total_bytes + self.slot_bytes)} with the KV rows"
        return text


def _size(count: int) -> str:
    return f"{count / GIB:.2f} GiB" if count >= GIB else f"{count / 2**20:.1f} MiB"


class KVRowsCache:
    """The KV rows of one engine. Free rows are handed out lowest first, so the active rows stay packed
    at the front and a decode step covers as few rows as possible."""

    def __init__(self, layout: DecoderLayout, plan: KVPlan, device: str, device_id: int = 0) -> None:
        self.layout = layout
        self.plan = plan
        self.device = device
        self.device_id = device_id
        shape = (plan.rows, layout.kv_heads, plan.capacity, layout.head_dim)
        try:
            self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, layout.kv_dtype), device, device_id)
                            for _ in layout.past_names]
            self.conv = [ort.OrtValue.ortvalue_from_numpy(np.zeros((plan.rows, *layout.conv_shape), layout.kv_dtype), device,
                                                          device_id) for _ in layout.conv_names]
            self._conv_zeros = ort.OrtValue.ortvalue_from_numpy(np.zeros((1, *layout.conv_shape), layout.kv_dtype), device,
                                                                device_id) if layout.conv_names else None
        except (RuntimeError, MemoryError) as exc:
            raise RequestError(
                f"cannot allocate the KV cache on {device}:{device_id} ({plan.describe()}): {str(exc).splitlines()[0]}; "
                "lower max_batch or max_context, or set a KV budget"
            ) from None
        self._row_stride = layout.kv_heads * plan.capacity * layout.head_dim * np.dtype(layout.kv_dtype).itemsize
        self._conv_stride = int(np.prod(layout.conv_shape, dtype=np.int64)) * np.dtype(layout.kv_dtype).itemsize
        self._free = set(range(plan.rows))
        self._owner = threading.Lock()  # held by the one batch that decodes from these rows

    @property
    def rows(self) -> int:
        return self.plan.rows

    @property
    def free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        """Reserve the lowest free row."""
        if not self._free:
            raise RuntimeError("no free KV row: the scheduler admits requests only while rows are free")
        row = min(self._free)
        self._free.remove(row)
        return row

    def give(self, row: int) -> None:
        self._free.add(row)

    def claim(self) -> None:
        """Become the one batch that uses these rows (until :meth:`release`)."""
        if not self._owner.acquire(blocking=False):
            raise RequestError("the engine's KV cache is in use by a running scheduler; submit to it instead")

    def release(self) -> None:
        self._free = set(range(self.plan.rows))
        self._owner.release()

    def bind(self, binding: ort.IOBinding, first: int, count: int, fresh: bool = False) -> None:
        """Bind rows ``first .. first+count-1`` as both past and present: the decoder writes the new
        positions in place. ``fresh`` (a prefill into one row): the recurrent state starts from zeros."""
        layout = self.layout
        shape = [count, layout.kv_heads, self.plan.capacity, layout.head_dim]
        offset = first * self._row_stride
        for past, present, value in zip(layout.past_names, layout.present_names, self.buffers):
            address = value.data_ptr() + offset
            binding.bind_input(past, self.device, self.device_id, layout.kv_dtype, shape, address)
            binding.bind_output(present, self.device, self.device_id, layout.kv_dtype, shape, address)
        conv_shape = [count, *layout.conv_shape]
        for past, value in zip(layout.conv_names, self.conv):
            address = value.data_ptr() + first * self._conv_stride
            if fresh:
                binding.bind_ortvalue_input(past, self._conv_zeros)
            else:
                binding.bind_input(past, self.device, self.device_id, layout.kv_dtype, conv_shape, address)
            binding.bind_output(past.replace("past_conv.", "present_conv."), self.device, self.device_id, layout.kv_dtype,
                                conv_shape, address)
