"""Batched decode from the KV rows of a GroupQueryAttention decoder (the onnxruntime-genai export).

Every active request holds one row of the engine's :class:`~.kv_rows_cache.KVRowsCache`. A request
joins by prefilling its prompt alone into its row (the attention op takes no multi-token input
with past context at batch > 1); then all active rows decode together: one ONNX Runtime run per
step over the first ``width`` rows, the smallest step width that covers the highest active row.
Free rows inside that width decode a one-position dummy. No KV is copied, ever: each row's
attention mask holds its length, and the decoder appends each new position in place.

On the CPU (and on CUDA once ``CHUNK_ON_DEVICE`` is confirmed by a GPU run of the tests), a long
prompt is prefilled in chunks between decode steps (chunked prefill), so it never stalls the
other requests for the whole of its prefill: while they decode it earns the time their decode runs take
and spends it in chunks, so they keep about half their pace; with no one decoding it runs a chunk of
``LONG_PROMPT`` tokens a step, so requests that arrive meanwhile join at the next step. Meanwhile its row
decodes the free rows' dummy at the position its next chunk overwrites. A decoder with recurrent state
(LFM2's ``past_conv.*``) prefills whole: the dummy would advance the state, which no chunk overwrites.

A width's shapes and addresses never change, so on CUDA each width's step is captured once as a
CUDA graph and replayed; widths are then powers of two (one graph each). Two things make that so,
and per-row state goes through them too:

- ``KVRowsBatch.inputs``: host arrays with one entry per row, fed to each decode step for its first
  ``width`` rows (ids, mask, positions; and ``lora_ids`` on a base export with LoRA slots: each row's
  slot, written when a request takes its row, 0 (the base) in free rows);
- ``KVRowsBatch.resident``: device buffers bound by address once per width and per prefill
  (:class:`Resident`: the KV rows, and the LoRA slot buffers, written in place when an adapter is
  copied into a slot). So rows on different adapters and on the base decode in one run per step.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np
import onnxruntime as ort

from .kv_rows_cache import KVRowsCache
from .request import Request, RequestStatus
from .runner import Runner


LONG_PROMPT = 256  # prompts longer than this are prefilled in chunks, between decode steps
CHUNK_ON_DEVICE = False  # chunks on CUDA too: off until a GPU run of tests/test_gpu.py confirms them (the CPU is tested)
MIN_CHUNK = 8  # the fewest prompt tokens a chunk runs (a run's fixed cost makes fewer wasteful)


def step_widths(rows: int, cuda_graph: bool) -> list[int]:
    """The batch widths a decode step may run at: every width, or powers of two (and ``rows``) for CUDA graphs."""
    if not cuda_graph:
        return list(range(1, rows + 1))
    widths = [1 << k for k in range(rows.bit_length()) if 1 << k < rows]
    return widths + [rows]


class Resident(Protocol):
    """Device buffers with a row per request, bound by address (so a captured CUDA graph finds them)."""

    def bind(self, binding: ort.IOBinding, first: int, count: int, fresh: bool = False) -> None:
        """Bind rows ``first .. first+count-1``; ``fresh``: a prefill into one row."""
        ...


class StepBinding:
    """The inputs and outputs of decode steps at one width, bound once.

    On the CPU the batch's per-row inputs and the logits are its own host arrays, bound by address
    (nothing is copied). On a GPU they are device buffers of this width, refreshed from the host
    arrays before each run, so a captured graph finds its inputs at the same addresses.
    """

    def __init__(self, batch: "KVRowsBatch", width: int, graph_id: int) -> None:
        runner = batch.runner
        self.width = width
        self.binding = runner.session.io_binding()
        self.run_options = runner.no_graph
        if runner.cuda_graph:
            self.run_options = ort.RunOptions()
            self.run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self._host = batch.inputs
        self._device = {}
        for name, array in self._host.items():
            if runner.on_device:
                self._device[name] = runner.buffer((width, *array.shape[1:]), array.dtype)
                self.binding.bind_ortvalue_input(name, self._device[name])
            else:
                self.binding.bind_input(name, "cpu", 0, array.dtype, [width, *array.shape[1:]], array.ctypes.data)
        logits_shape = [width, 1, runner.layout.vocab]
        if runner.on_device:
            self._logits = runner.buffer(tuple(logits_shape), runner.layout.logits_dtype)
            self.binding.bind_ortvalue_output("logits", self._logits)
        else:
            self._logits = batch.logits
            self.binding.bind_output("logits", "cpu", 0, batch.logits.dtype, logits_shape, batch.logits.ctypes.data)
        for resident in batch.resident:
            resident.bind(self.binding, 0, width)
        self._runner = runner

    def run(self) -> np.ndarray:
        """One decode step; return the logits ``[width, V]`` as float32."""
        runner = self._runner
        if runner.on_device:
            for name, value in self._device.items():
                value.update_inplace(self._host[name][: self.width])
        runner.session.run_with_iobinding(self.binding, self.run_options)
        if runner.on_device:
            self.binding.synchronize_outputs()
            return np.asarray(self._logits.numpy()[:, -1], dtype=np.float32)
        return np.asarray(self._logits[: self.width, -1], dtype=np.float32)


class KVRowsBatch:
    """The active requests of a GroupQueryAttention decoder, one KV row each, decoding together;
    implements :class:`~.batch.Batch`. It owns the engine's rows until :meth:`close`."""

    def __init__(self, runner: Runner, cache: KVRowsCache, eos_ids: frozenset[int], pad_id: int,
                 slots: Resident | None = None) -> None:
        if runner.layout.vocab is None:
            raise RuntimeError("the decoder's logits have a symbolic vocabulary size")
        cache.claim()
        self.runner = runner
        self.cache = cache
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        rows, capacity = cache.rows, cache.plan.capacity
        self.active: dict[int, Request] = {}  # row -> its request
        self.filling: dict[int, tuple[Request, int]] = {}  # row -> a long prompt's request, positions prefilled so far
        self.lengths = np.zeros(rows, np.int64)  # positions in each row's cache
        self.ids = np.full((rows, 1), pad_id, np.int64)
        self.mask = np.zeros((rows, capacity), np.int64)
        self.mask[:, 0] = 1  # a free row decodes a one-position dummy
        self.positions = np.zeros((rows, 1), np.int64)
        self.inputs: dict[str, np.ndarray] = {"input_ids": self.ids, "attention_mask": self.mask}  # per row, fed each step
        if runner.layout.has_position_ids:
            self.inputs["position_ids"] = self.positions
        self.lora_ids = np.zeros(rows, np.int64)  # each row's LoRA slot (0: the base), where the decoder has slots
        if runner.layout.lora_ids:
            if slots is None:
                raise RuntimeError("a decoder with LoRA slots needs its slot buffers")
            self.inputs["lora_ids"] = self.lora_ids
        self.resident: list[Resident] = [cache] + ([slots] if runner.layout.lora_ids else [])  # bound by address
        self.logits = np.zeros((rows, 1, runner.layout.vocab), runner.layout.logits_dtype)
        self.widths = step_widths(rows, runner.cuda_graph)
        self._steps: dict[int, StepBinding] = {}
        self._token_seconds = 0.0  # a chunked prefill's last cost per prompt token
        self._credit = 0.0  # decode seconds the prompt being prefilled may still spend

    def __len__(self) -> int:
        return len(self.active) + len(self.filling)

    @property
    def room(self) -> int:
        return self.cache.free

    @property
    def requests(self) -> list[Request]:
        return [*self.active.values(), *(request for request, _ in self.filling.values())]

    def prefill_logits(self, requests: list[Request]) -> np.ndarray:
        """Each prompt run alone in a free row."""
        logits = []
        for request in requests:
            row = self.cache.take()
            self.lora_ids[row] = request.slot
            try:
                logits.append(self._prefill(row, request.prompt_ids))
            finally:
                self._free(row)
        return np.stack(logits)

    def add(self, requests: list[Request]) -> None:
        """Prefill each new request into its own row and sample its first token; a long prompt is
        prefilled in chunks by the next steps instead."""
        for request in requests:
            row = self.cache.take()
            self.lora_ids[row] = request.slot  # its prefill (chunks too) and its steps read its adapter's slot
            scored = request.params.prompt_logprobs is not None
            if (len(request.prompt_ids) > LONG_PROMPT and not scored and (CHUNK_ON_DEVICE or not self.runner.on_device)
                    and not self.runner.layout.conv_names):  # a parked row's dummy decode would advance a recurrent state
                self.filling[row] = (request, 0)
                request.status = RequestStatus.PREFILLING
                self._park(row, 0)
                continue
            try:
                logits = self._prefill(row, request.prompt_ids, every_position=scored)
            except Exception as exc:  # noqa: BLE001 - a model fault in this prompt's run
                self._free(row)
                request.fail(exc)
                continue
            except BaseException:
                self._free(row)
                raise
            self._seat(row, request)
            if scored:
                request.score_prompt(logits)
                logits = np.asarray(logits[-1], dtype=np.float32)
            request.sample(logits, self.eos_ids)
        self._retire()

    def step(self) -> None:
        """One decode step for every active request, in one run (requests cancelled since the last
        step leave first, so their rows are free now), then a chunk of a long prompt being prefilled."""
        self._retire()
        decoded = self._decode() if self.active else None
        if self.filling:
            self._fill(decoded)
        else:
            self._credit = 0.0
        self._retire()

    def cancel_all(self, error: BaseException) -> None:
        requests = self.requests
        for row in [*self.active, *self.filling]:
            self._free(row)
        self.active, self.filling = {}, {}
        for request in requests:
            request.fail(error)

    def close(self) -> None:
        """Hand the rows back to the engine."""
        self.cache.release()

    def _seat(self, row: int, request: Request) -> None:
        """``request`` decodes from ``row`` from the next step on (its prompt is in the row's cache)."""
        self.active[row] = request
        request.status = RequestStatus.RUNNING

    def _decode(self) -> float:
        """The decode run of the active requests; the seconds it took."""
        start = time.perf_counter()
        capacity = self.cache.plan.capacity
        for row, request in self.active.items():
            position = int(self.lengths[row])
            if position >= capacity:
                raise RuntimeError(f"KV row full at {capacity} positions")
            self.ids[row, 0] = request.generated[-1]
            self.mask[row, position] = 1
            self.positions[row, 0] = position
            self.lengths[row] = position + 1
        width = next(w for w in self.widths if w > max(self.active))
        logits = self._binding(width).run()
        for row, request in self.active.items():
            request.sample(logits[row], self.eos_ids)
        return time.perf_counter() - start

    def _fill(self, decoded: float | None) -> None:
        """Prefill the first waiting long prompt by a chunk. While others decode, it earns the time
        their steps take (``decoded`` seconds each) and spends it in chunks of at least ``MIN_CHUNK``
        tokens, so prefill and decode share the time about evenly; with no one decoding (None) it runs
        ``LONG_PROMPT`` tokens a step, so requests arriving meanwhile join soon. A complete prompt
        samples its first token and joins the decode; a model fault fails that request alone."""
        row, (request, filled) = next(iter(self.filling.items()))
        remaining = len(request.prompt_ids) - filled
        if decoded is None:
            count, self._credit = min(remaining, LONG_PROMPT), 0.0
        else:
            self._credit += decoded
            if self._token_seconds and self._credit < min(remaining, MIN_CHUNK) * self._token_seconds:
                return  # not yet earned the smallest chunk
            count = min(remaining, max(MIN_CHUNK, int(self._credit / self._token_seconds) if self._token_seconds else 0))
        start = time.perf_counter()
        try:
            logits = self._prefill(row, request.prompt_ids[filled : filled + count], start=filled)
        except Exception as exc:  # noqa: BLE001 - a model fault in this prompt's run
            del self.filling[row]
            self._free(row)
            request.fail(exc)
            return
        spent = time.perf_counter() - start
        self._token_seconds = spent / count  # a chunk's fixed cost included: small chunks look dear
        if decoded is not None:
            self._credit -= spent
        if count < remaining:
            self.filling[row] = (request, filled + count)
            self._park(row, filled + count)
            return
        del self.filling[row]
        self._seat(row, request)
        request.sample(logits, self.eos_ids)

    def _park(self, row: int, filled: int) -> None:
        """A row whose prompt is partly prefilled decodes a dummy at position ``filled``: its next
        chunk writes there, so the dummy's KV never survives."""
        self.ids[row, 0] = self.pad_id
        self.mask[row] = 0
        self.mask[row, : filled + 1] = 1
        self.positions[row, 0] = filled

    def _binding(self, width: int) -> StepBinding:
        if width not in self._steps:
            self._steps[width] = StepBinding(self, width, graph_id=self.widths.index(width) + 1)  # graph ids start at 1
        return self._steps[width]

    def _prefill(self, row: int, prompt_ids: list[int], every_position: bool = False, start: int = 0) -> np.ndarray:
        """Run a prompt (or, from ``start``, its next chunk) into ``row`` of the cache; return its
        last-position logits ``[V]`` (float32), or with ``every_position`` the logits of every position
        ``[T, V]``."""
        runner = self.runner
        ids = np.asarray([prompt_ids], np.int64)
        end = start + ids.shape[1]
        mask = np.ones((1, end), np.int64)
        binding = runner.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        if runner.layout.has_position_ids:
            binding.bind_cpu_input("position_ids", np.arange(start, end, dtype=np.int64)[None])
        if runner.layout.lora_ids:
            binding.bind_cpu_input("lora_ids", self.lora_ids[row : row + 1].copy())
        binding.bind_output("logits", runner.device, runner.device_id)
        for resident in self.resident:
            resident.bind(binding, row, 1, fresh=True)
        runner.session.run_with_iobinding(binding, runner.no_graph)
        self.lengths[row] = end
        self.mask[row] = 0
        self.mask[row, :end] = 1
        logits = binding.get_outputs()[0]
        if every_position:
            return logits.numpy()[0]
        if runner.on_device:  # only the last position crosses to the host
            return runner.last_logits(logits)[0]
        return np.asarray(logits.numpy()[0, -1], dtype=np.float32)

    def _retire(self) -> None:
        for row, request in list(self.active.items()):
            if request.done:
                request.finish()
                del self.active[row]
                self._free(row)
        for row, (request, _) in list(self.filling.items()):
            if request.done:  # cancelled while its prompt was being prefilled
                request.finish()
                del self.filling[row]
                self._free(row)

    def _free(self, row: int) -> None:
        self.lengths[row] = 0
        self.lora_ids[row] = 0
        self.ids[row, 0] = self.pad_id
        self.mask[row] = 0
        self.mask[row, 0] = 1
        self.cache.give(row)
