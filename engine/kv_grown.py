"""The batch of decoders that return a grown KV cache each step (optimum's exports).

The batch's cache is one tensor per layer ``[batch, kv_heads, width, head_dim]``, left-padded: a joining
request's prompt is prefilled (left-padded with the others joining with it), its cache padded to the
common width and concatenated; finished rows are gathered out and the columns that are padding for every
row left are dropped (:mod:`.kv_grown_ops`, on the decoder's provider). At most ``max_batch`` requests
decode together.
"""

from __future__ import annotations

import numpy as np

from .kv_grown_ops import KVGrownOps
from .request import Request, RequestStatus
from .runner import Runner


class KVGrownBatch:
    """Left-padded KV cache for the active requests of one engine; implements :class:`~.batch.Batch`."""

    def __init__(self, runner: Runner, kv_ops: KVGrownOps, eos_ids: frozenset[int], pad_id: int, max_batch: int) -> None:
        self.runner = runner
        self.kv_ops = kv_ops
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.requests: list[Request] = []  # row i's request
        self.mask = np.zeros((0, 0), np.int64)
        self.past: list = []
        self.last = np.zeros(0, np.int64)  # each row's last token: the next step's input

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def room(self) -> int:
        return self.max_batch - len(self.requests)

    def prefill_logits(self, requests: list[Request]) -> np.ndarray:
        return self._prefill(requests)[0]

    def add(self, requests: list[Request]) -> None:
        scored = [r.params.prompt_logprobs is not None for r in requests]
        try:
            logits, mask, past = self._prefill(requests, every_position=any(scored))
        except Exception as exc:  # noqa: BLE001 - a model fault in these prompts' run
            for request in requests:
                request.fail(exc)
            return
        if any(scored):
            for row, request in enumerate(requests):
                if scored[row]:
                    request.score_prompt(logits[row, logits.shape[1] - len(request.prompt_ids) :])
            logits = np.ascontiguousarray(logits[:, -1, :], dtype=np.float32)
        if self.requests:
            width = max(self.mask.shape[1], mask.shape[1])
            past = self.kv_ops.merge(self.past, past, width)
            mask = np.concatenate([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.requests, self.mask, self.past = self.requests + requests, mask, past
        self.last = np.concatenate([self.last, np.zeros(len(requests), np.int64)])
        for request in requests:
            request.status = RequestStatus.RUNNING
        self._sample(logits, range(len(self.requests) - len(requests), len(self.requests)))

    def step(self) -> None:
        self._retire()
        if not self.requests:
            return
        mask = np.concatenate([self.mask, np.ones((len(self.requests), 1), np.int64)], axis=1)
        logits, self.past = self.runner.run(self.last[:, None], mask, self.past)
        self.mask = mask
        self._sample(logits, range(len(self.requests)))

    def cancel_all(self, error: BaseException) -> None:
        requests, self.requests = self.requests, []
        self._clear()
        for request in requests:
            request.fail(error)

    def close(self) -> None:
        """Nothing to hand back: the cache lives and dies with the batch."""

    def _prefill(self, requests: list[Request], every_position: bool = False) -> tuple[np.ndarray, np.ndarray, list]:
        """Run the prompts of ``requests`` together; return last logits (or every position's, left-padded),
        mask and KV cache."""
        width = max(len(r.prompt_ids) for r in requests)
        ids = np.full((len(requests), width), self.pad_id, np.int64)
        mask = np.zeros((len(requests), width), np.int64)
        for row, request in enumerate(requests):
            ids[row, width - len(request.prompt_ids) :] = request.prompt_ids
            mask[row, width - len(request.prompt_ids) :] = 1
        logits, past = self.runner.run(ids, mask, self.runner.empty_past(len(requests)), every_position)
        return logits, mask, past

    def _sample(self, logits: np.ndarray, rows: range) -> None:
        """Pick a token for each of ``rows`` (``logits`` holds one row per entry of ``rows``)."""
        for k, row in enumerate(rows):
            self.last[row] = self.requests[row].sample(logits[k], self.eos_ids)
        self._retire()

    def _retire(self) -> None:
        done = [i for i, r in enumerate(self.requests) if r.done]
        if not done:
            return
        for i in done:
            self.requests[i].finish()
        keep = [i for i in range(len(self.requests)) if i not in set(done)]
        self.requests = [self.requests[i] for i in keep]
        if not keep:
            self._clear()
            return
        mask = self.mask[keep]
        start = int(np.argmax(mask.any(axis=0)))  # drop columns that are padding for every row left
        self.mask, self.last = mask[:, start:], self.last[keep]
        self.past = self.kv_ops.select(self.past, keep, start)

    def _clear(self) -> None:
        self.mask, self.past, self.last = np.zeros((0, 0), np.int64), [], np.zeros(0, np.int64)


def _pad_left(mask: np.ndarray, width: int) -> np.ndarray:
    return np.pad(mask, [(0, 0), (width - mask.shape[1], 0)])
