"""The scheduler: requests wait in order of arrival and join the batch between decode steps.

:meth:`Scheduler.step` is the one join-then-step loop body: ``Engine.generate`` calls it until the work
is done, and :meth:`Scheduler.start` runs it on a background thread for in-flight batching (the Triton
model). :class:`Watchdog` ends a model process whose loop stops finishing steps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Protocol

from .batch import Batch
from .errors import RequestError
from .params import SamplingParams
from .request import DoneCallback, Request, TokenCallback

Prompt = str | list[int]
Admit = Callable[..., Request]  # (prompt, params, on_token, on_done, adapter=None): a valid request, or raises


class Admission(Protocol):
    """Which waiting requests join the batch at a turn (scheduler thread only)."""

    def select(self, waiting: list[Request], room: int) -> tuple[list[Request], list[Request]]:
        """``waiting`` in order of arrival -> (those that join now, at most ``room``; those that wait on)."""
        ...

    def settle(self) -> None:
        """After a turn: hand back what the requests that finished held."""
        ...


class FirstCome:
    """Strict order of arrival, as many as there are free rows."""

    def select(self, waiting: list[Request], room: int) -> tuple[list[Request], list[Request]]:
        return waiting[:room], waiting[room:]

    def settle(self) -> None:
        pass


class Scheduler:
    """Runs ``batch`` for every request submitted, first come first served.

    Requests join the batch between steps while it has room; the others wait in order of arrival. A
    request cancelled while it waits leaves the queue at the next step; one cancelled while it runs gives
    its row back before the next step. A model fault fails the requests of that step alone, and the batch
    serves on. ``admit`` tokenizes and validates a request (``Engine.request``); ``admission`` decides who
    joins (default :class:`FirstCome`; an engine serving adapters passes its
    :class:`~.adapter_admission.SlotAdmission`, which also needs a LoRA slot for each).
    """

    def __init__(self, batch: Batch, admit: Admit, admission: Admission | None = None) -> None:
        self._batch = batch  # owns the engine's KV rows until close()
        self._admit = admit
        self._admission = admission or FirstCome()
        self._pending: list[Request] = []
        self._cond = threading.Condition()
        self._closed = False
        self._progress = time.monotonic()  # when a step last finished, or work arrived while idle
        self._thread: threading.Thread | None = None
        # batching at work, for the model's /metrics: decode steps run, requests they ran (summed), the most in one
        self.steps = self.rows_stepped = self.peak_active = 0

    def start(self) -> "Scheduler":
        """Run the loop on a background thread (in-flight batching) until :meth:`close`."""
        self._thread = threading.Thread(target=self._loop, name="loraship-scheduler", daemon=True)
        self._thread.start()
        return self

    def submit(self, prompt: Prompt, params: SamplingParams, on_token: TokenCallback | None = None,
               on_done: DoneCallback | None = None, adapter: str | None = None) -> Request:
        """Queue a request (on ``adapter``, by its registered name; None: the base model); raises
        :class:`RequestError` at once if it is invalid (an unknown adapter: ``UnknownAdapter``). The returned
        request's ``cancel()`` drops it before its next step."""
        request = self._admit(prompt, params, on_token, on_done, adapter=adapter)
        self.enqueue(request)
        return request

    def enqueue(self, request: Request) -> None:
        """Queue a request already admitted."""
        with self._cond:
            if self._closed:
                raise RequestError("the engine is shutting down; retry on another instance")
            if not self.has_work:  # work arrives at an idle loop: the stall clock starts now
                self._progress = time.monotonic()
            self._pending.append(request)
            self._cond.notify()

    @property
    def has_work(self) -> bool:
        """Requests waiting or in the batch."""
        return bool(self._pending or self._batch)

    def step(self) -> None:
        """One turn: requests cancelled while waiting leave the queue, the first waiting join while the
        batch has room, then one decode step. A model fault fails the requests of this turn."""
        batch = self._batch
        with self._cond:
            dropped = [r for r in self._pending if r.cancelled.is_set()]
            queued = [r for r in self._pending if not r.cancelled.is_set()]
            self._pending = list(queued)
        for request in dropped:
            request.finish()
        joining: list[Request] = []
        try:
            joining, waiting = self._admission.select(queued, batch.room)  # may copy adapters into slots
            with self._cond:  # requests queued meanwhile stay behind these
                self._pending[: len(queued)] = waiting
            if joining:
                batch.add(joining)
            if batch:
                self.steps, self.rows_stepped = self.steps + 1, self.rows_stepped + len(batch)
                self.peak_active = max(self.peak_active, len(batch))
                batch.step()
        except Exception as exc:  # noqa: BLE001 - a model fault: fail the requests of the step, keep serving
            batch.cancel_all(exc)
            for request in joining:
                if request.completion is None:
                    request.fail(exc)
        finally:
            self._admission.settle()
        self._progress = time.monotonic()

    def run_until_done(self) -> None:
        """Step until nothing waits or runs (``Engine.generate``: no thread)."""
        while self.has_work:
            self.step()

    def stalled_for(self, now: float | None = None) -> float:
        """Seconds the loop has had work (requests waiting or running) without finishing a step; 0 when idle."""
        if not self.has_work:
            return 0.0
        return (time.monotonic() if now is None else now) - self._progress

    def close(self) -> None:
        """Stop the loop; requests still queued or running end with an error, and the batch is closed."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()  # the loop shuts down as it ends
        else:
            self._shut_down()

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self.has_work and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        break
                self.step()
        finally:
            self._shut_down()

    def _shut_down(self) -> None:
        error = RequestError("the engine is shutting down")
        self._batch.cancel_all(error)
        with self._cond:
            pending, self._pending = self._pending, []
        for request in pending:
            request.fail(error)
        self._admission.settle()
        self._batch.close()


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
