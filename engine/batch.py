"""The batch protocol: the requests of one engine decoding together, rows joining and leaving between steps.

Two implementations, one per KV strategy of the decoder (``Manifest.shares_kv``):

- :class:`~.kv_rows.KVRowsBatch` (GroupQueryAttention exports, onnxruntime-genai's builder): each request
  holds a row of the KV buffers planned at load (:mod:`.kv_rows_cache`); the decoder appends in place, a
  step runs over the first rows at a fixed width, long prompts prefill in chunks between steps.
- :class:`~.kv_grown.KVGrownBatch` (optimum exports): the decoder returns a grown cache each step; the
  batch's cache is left-padded, joined and trimmed by small graphs beside the decoder (:mod:`.kv_grown_ops`).

Both leave every token decision to the :class:`~.request.Request` of a row (sampling, logprobs,
finishing, failing alone), and the :class:`~.scheduler.Scheduler` drives either the same way.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from .request import Request


class Batch(Protocol):
    """What the scheduler and ``Engine`` use of a batch. Only the scheduler's thread (or the one thread
    running ``Engine.generate``) calls these; requests may be cancelled from any thread."""

    @property
    def room(self) -> int:
        """How many more requests can join now."""
        ...

    def __len__(self) -> int:
        """Requests in the batch (decoding, or with a prompt still being prefilled); 0: the batch is idle."""
        ...

    def add(self, requests: list[Request]) -> None:
        """Join ``requests`` (at most :attr:`room`): prefill their prompts and sample each one's first
        token, or queue a long prompt's prefill in chunks. A model fault in a request's prefill fails
        that request alone; the batch goes on."""
        ...

    def step(self) -> None:
        """Retire requests that are done or cancelled, then one decode step for every running request,
        then retire those it finished (each request's ``on_done`` runs here). A model fault raises: the
        caller then calls :meth:`cancel_all`."""
        ...

    def cancel_all(self, error: BaseException) -> None:
        """End every request with ``error`` (a step failed); the batch is empty and usable."""
        ...

    def close(self) -> None:
        """Hand back what the batch holds (the engine's KV rows); no request may be in it."""
        ...

    def prefill_logits(self, requests: list[Request]) -> np.ndarray:
        """Last-position logits ``[B, V]`` (float32) of the requests' prompts; nothing joins the batch."""
        ...
