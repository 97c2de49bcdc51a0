"""In-flight batching: requests join the running batch between decode steps."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .batch import Completion, Sequence, TokenCallback
from .errors import RequestError
from .params import SamplingParams

if TYPE_CHECKING:
    from .engine import Engine


class Scheduler:
    """One background thread running decode steps for every active request of an engine.

    Requests join the running batch between steps while it has room (``engine.max_batch`` rows);
    the others wait in order of arrival. A request cancelled while it waits leaves the queue at the
    next step; one cancelled while it runs gives its row back after the current step.
    """

    def __init__(self, engine: "Engine") -> None:
        self.engine = engine
        self._batch = engine.new_batch()  # owns the engine's KV rows until close()
        self._pending: list[Sequence] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="loraship-scheduler", daemon=True)
        self._thread.start()

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        on_token: TokenCallback,
        on_done: Callable[[Completion | None, BaseException | None], None],
    ) -> Sequence:
        """Queue a request; raises :class:`RequestError` at once if it is invalid.

        The returned sequence's ``cancel()`` drops it before its next step.
        """
        seq = self.engine.sequence(prompt, params, on_token, on_done)
        with self._cond:
            if self._closed:
                raise RequestError("the engine is shutting down; retry on another instance")
            self._pending.append(seq)
            self._cond.notify()
        return seq

    def close(self) -> None:
        """Stop the thread; requests still queued or running end with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def _loop(self) -> None:
        batch = self._batch
        try:
            while True:
                with self._cond:
                    while not self._pending and not batch and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        break
                    dropped = [s for s in self._pending if s.cancelled.is_set()]
                    waiting = [s for s in self._pending if not s.cancelled.is_set()]
                    joining, self._pending = waiting[: batch.room], waiting[batch.room :]
                for seq in dropped:
                    seq.finish()
                try:
                    if joining:
                        batch.add(joining)
                    if batch:
                        batch.step()
                except Exception as exc:  # noqa: BLE001 - fail the requests, keep serving
                    batch.cancel_all(exc)
                    for seq in joining:
                        if seq.completion is None:
                            seq.finish(exc)
        finally:
            error = RequestError("the engine is shutting down")
            batch.cancel_all(error)
            with self._cond:
                pending, self._pending = self._pending, []
            for seq in pending:
                seq.finish(error)
            batch.close()
