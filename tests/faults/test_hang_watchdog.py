"""The generate model's hang watchdog, driven in-process: a real engine and scheduler on ONNX Runtime
whose decode step is held (not a real hang of the server), and a watchdog whose verdict is recorded
instead of ending the process."""

from __future__ import annotations

import threading
import time

import pytest

from loraship.engine import Engine, SamplingParams
from loraship.engine.scheduler import Watchdog


@pytest.fixture(scope="module")
def engine(onnx_dir) -> Engine:
    return Engine.load(onnx_dir, max_batch=2)


class Clock:
    """monotonic() plus an offset the test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset


def _finished():
    done = threading.Event()
    return done, (lambda completion, error: done.set())


def test_watchdog_fires_once_when_work_waits_and_no_step_finishes(engine, monkeypatch):
    scheduler = engine.scheduler()
    release, entered = threading.Event(), threading.Event()
    step = type(scheduler._batch).step

    def held_step(batch):  # the decode step that does not come back until released
        entered.set()
        release.wait(60)
        step(batch)

    verdicts: list[str] = []
    clock = Clock()
    watchdog = Watchdog(scheduler, timeout=30, on_hang=verdicts.append, interval=0.02, clock=clock)
    try:
        clock.offset = 1000  # idle for long: no work, no verdict
        time.sleep(0.2)
        assert scheduler.stalled_for(clock()) == 0 and watchdog.check() is None and verdicts == []
        clock.offset = 0

        done, on_done = _finished()
        scheduler.submit("Hello there", SamplingParams(max_tokens=8), lambda t, d, lp: None, on_done)
        assert done.wait(60)  # a served request moves the progress clock
        monkeypatch.setattr(type(scheduler._batch), "step", held_step)
        done, on_done = _finished()
        scheduler.submit("Hello there", SamplingParams(max_tokens=8), lambda t, d, lp: None, on_done)
        assert entered.wait(60)
        time.sleep(0.2)
        assert verdicts == [] and watchdog.check() is None  # held, but not for 30 s yet
        clock.offset = 31  # 31 s later, still inside the same step
        deadline = time.monotonic() + 10
        while not verdicts and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(verdicts) == 1
        assert "no decode step finished in 31 s" in verdicts[0] and "hang_timeout 30 s" in verdicts[0] and "\n" not in verdicts[0]
        time.sleep(0.2)
        assert len(verdicts) == 1  # once: the process ends on the first verdict
    finally:
        release.set()
        watchdog.stop()
        monkeypatch.undo()
        assert done.wait(60)
        scheduler.close()
    assert scheduler.stalled_for() == 0


def test_a_moving_loop_is_not_a_hang(engine):
    """Steps keep finishing while a long request runs: the stall clock restarts at each step instead
    of counting from the request's arrival, and the watchdog stays quiet."""
    scheduler = engine.scheduler()
    verdicts: list[str] = []
    watchdog = Watchdog(scheduler, timeout=30, on_hang=verdicts.append, interval=0.05)
    done, on_done = _finished()
    seen: list[tuple[float, float]] = []  # (seconds since submit, stalled_for) at each token
    start = time.monotonic()
    try:
        scheduler.submit("Numbers: 1 2 3", SamplingParams(max_tokens=400),
                         lambda t, d, lp: seen.append((time.monotonic() - start, scheduler.stalled_for())), on_done)
        assert done.wait(120)
    finally:
        watchdog.stop()
        scheduler.close()
    assert verdicts == [] and len(seen) == 400
    elapsed, stalled = seen[-1]
    assert stalled < elapsed / 20  # one step's worth, not the 400 steps since the request came
