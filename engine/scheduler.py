"""In-flight batching: requests join the running batch between decode steps."""

from __future__ import annotations

import threading
import time
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
        self._progress = time.monotonic()  # when the loop last finished a step, or work arrived while idle
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
            if not self._pending and not self._batch:  # work arrives at an idle loop: the stall clock starts now
                self._progress = time.monotonic()
            self._pending.append(seq)
            self._cond.notify()
        return seq

    def stalled_for(self, now: float | None = None) -> float:
        """Seconds the loop has had work (requests waiting or running) without finishing a step; 0 when idle."""
        if not self._pending and not self._batch:
            return 0.0
        return (time.monotonic() if now is None else now) - self._progress

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
                except Exception as exc:  # noqa: BLE001 - a model fault: fail the requests of the step, keep serving
                    batch.cancel_all(exc)
                    for seq in joining:
                        if seq.completion is None:
                            seq.finish(exc)
                self._progress = time.monotonic()
        finally:
            error = RequestError("the engine is shutting down")
            batch.cancel_all(error)
            with self._cond:
                pending, self._pending = self._pending, []
            for seq in pending:
                seq.finish(error)
            batch.close()


class Watchdog:
    """Calls ``on_hang(message)`` once, from its own thread, when ``scheduler`` has had work but finished
    no step for ``timeout`` seconds (a decode step that never returns: a wedged GPU, a deadlock). The
    generate model's ``on_hang`` ends its process, so the supervisor restarts the model."""

    def __init__(self, scheduler: Scheduler, timeout: float, on_hang: Callable[[str], None],
                 interval: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.scheduler = scheduler
        self.timeout = timeout
        self.on_hang = on_hang
        self.clock = clock
        self.interval = interval if interval is not None else min(5.0, max(timeout / 4, 0.05))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loraship-watchdog", daemon=True)
        self._thread.start()

    def check(self) -> str | None:
        """The hang's one-line description, or None while the loop keeps up."""
        stalled = self.scheduler.stalled_for(self.clock())
        if stalled < self.timeout:
            return None
        return (f"loraship: no decode step finished in {stalled:.0f} s while requests waited (hang_timeout {self.timeout:g} s); "
                "ending this model process so it is restarted")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            message = self.check()
            if message is not None:
                self.on_hang(message)
                return
