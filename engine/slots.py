"""Fixed KV slots for GroupQueryAttention decoders (the onnxruntime-genai export).

Each slot is one row with a max-length KV buffer bound as both past and present, which the
attention op updates in place. Decode shapes never change: no KV copy per step, no new shapes
for ONNX Runtime to plan (a cold shape cost ~50 ms per step on CUDA), and on CUDA each slot's
step can be captured once as a CUDA graph and replayed. Rows decode one by one, because the
attention op reads a right-padded cache and cannot share a left-padded batch.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .batch import Sequence, sample_row
from .runner import Runner


class KVSlot:
    """One row's buffers, allocated once and reused by the requests that hold the slot in turn."""

    def __init__(self, runner: Runner, capacity: int, graph_id: int) -> None:
        layout = runner.layout
        self.capacity = capacity
        self.length = 0
        self._names = list(zip(layout.past_names, layout.present_names))
        self.kv = [runner.buffer((1, layout.kv_heads, capacity, layout.head_dim), layout.kv_dtype) for _ in layout.past_names]
        self._mask_host = np.zeros((1, capacity), np.int64)
        self._ids = runner.buffer((1, 1), np.int64)
        self._mask = runner.buffer((1, capacity), np.int64)
        self._positions = runner.buffer((1, 1), np.int64) if layout.has_position_ids else None
        self.logits = runner.buffer((1, 1, layout.vocab), layout.logits_dtype)
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id) if runner.cuda_graph else "-1")
        self.binding = runner.session.io_binding()
        self.binding.bind_ortvalue_input("input_ids", self._ids)
        self.binding.bind_ortvalue_input("attention_mask", self._mask)
        if self._positions is not None:
            self.binding.bind_ortvalue_input("position_ids", self._positions)
        self.bind_kv(self.binding)
        self.binding.bind_ortvalue_output("logits", self.logits)

    def bind_kv(self, binding: ort.IOBinding) -> None:
        """Bind the KV buffers as both past and present: the decoder writes the new rows in place."""
        for (past, present), value in zip(self._names, self.kv):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)

    def filled(self, length: int) -> None:
        """The prompt's ``length`` positions are in the cache."""
        self.length = length
        self._mask_host[:] = 0
        self._mask_host[0, :length] = 1

    def advance(self, token: int) -> None:
        """Stage one more token in the bound inputs (the mask gains one position)."""
        if self.length >= self.capacity:
            raise RuntimeError(f"KV slot full at {self.capacity} tokens")
        self._mask_host[0, self.length] = 1
        self._ids.update_inplace(np.array([[token]], np.int64))
        self._mask.update_inplace(self._mask_host)
        if self._positions is not None:
            self._positions.update_inplace(np.array([[self.length]], np.int64))
        self.length += 1


class SlotPool:
    """An engine's slots. A slot serves one request at a time and keeps its buffers (and its
    captured CUDA graph) for the next one."""

    def __init__(self, runner: Runner, capacity: int) -> None:
        self.runner = runner
        self.capacity = capacity
        self._free: list[KVSlot] = []
        self._count = 0

    @property
    def size(self) -> int:
        """Slots allocated so far: the most requests that were active at once."""
        return self._count

    def take(self) -> KVSlot:
        if self._free:
            return self._free.pop()
        self._count += 1
        return KVSlot(self.runner, self.capacity, graph_id=self._count)  # CUDA graph ids start at 1

    def give(self, slot: KVSlot) -> None:
        self._free.append(slot)


class SlotBatch:
    """The active requests of a shared-buffer decoder, one slot each. Same interface as
    :class:`~.batch.DecodeBatch`."""

    def __init__(self, pool: SlotPool, eos_ids: frozenset[int]) -> None:
        self.pool = pool
        self.runner = pool.runner
        self.eos_ids = eos_ids
        self.rows: list[tuple[KVSlot, Sequence]] = []

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def seqs(self) -> list[Sequence]:
        return [seq for _, seq in self.rows]

    def prefill(self, seqs: list[Sequence]) -> tuple[np.ndarray, None, None]:
        """Last-position logits ``[B, V]`` of each prompt (slots are handed back at once)."""
        logits = []
        for seq in seqs:
            slot = self.pool.take()
            try:
                logits.append(self.runner.prefill_slot(slot, seq.prompt_ids))
            finally:
                self.pool.give(slot)
        return np.stack(logits), None, None

    def add(self, seqs: list[Sequence]) -> None:
        """Prefill each new sequence into its own slot and sample its first token."""
        for seq in seqs:
            slot = self.pool.take()
            try:
                logits = self.runner.prefill_slot(slot, seq.prompt_ids)
            except BaseException:
                self.pool.give(slot)
                raise
            self.rows.append((slot, seq))
            sample_row(seq, logits, self.eos_ids)
        self._retire()

    def step(self) -> None:
        """One decode step for every active sequence."""
        for slot, seq in self.rows:
            sample_row(seq, self.runner.step_slot(slot, seq.generated[-1]), self.eos_ids)
        self._retire()

    def _retire(self) -> None:
        keep = []
        for slot, seq in self.rows:
            if seq.done:
                seq.finish(seq.error)
                self.pool.give(slot)
            else:
                keep.append((slot, seq))
        self.rows = keep

    def cancel_all(self, error: BaseException) -> None:
        for slot, seq in self.rows:
            seq.finish_reason = seq.finish_reason or "cancelled"
            seq.finish(error)
            self.pool.give(slot)
        self.rows = []
