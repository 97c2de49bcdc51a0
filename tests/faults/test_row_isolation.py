"""One request, one fault, inside the engine: real ONNX Runtime sessions of both KV strategies (the
genai export's KV rows, ``KVRowsBatch``; optimum's grown cache, ``KVGrownBatch``).

A poisoned row (NaN in its sampling, a consumer that raises) ends alone with its own error while its
neighbours produce exactly the tokens each produces alone; a real ONNX Runtime run error fails the
requests of the run it hit, and the batch and the scheduler go on serving.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from loraship.engine import Engine, SamplingParams
from loraship.engine.request import Request, RowError
from loraship.engine.detok import TextStream

PROMPTS = ["Hello, how are you today?", "The quick brown fox jumps over the lazy dog", "LoRA adds small low-rank matrices"]
LONG = SamplingParams(max_tokens=40)


@pytest.fixture(scope="module", params=["genai", "optimum"])
def engine(request, onnx_dir: Path, optimum_dir: Path) -> Engine:
    engine = Engine.load(onnx_dir if request.param == "genai" else optimum_dir, max_batch=4)
    assert (engine.kv is not None) == (request.param == "genai")  # KVRowsBatch, else KVGrownBatch
    return engine


@pytest.fixture(scope="module")
def alone(engine) -> list[list[int]]:
    return [engine.generate([p], LONG)[0].token_ids for p in PROMPTS]


def _unchecked(engine: Engine, prompt: str | list[int], params: SamplingParams, **callbacks) -> Request:
    """A sequence built without the engine's validation: what a request that slipped past it would be."""
    ids = engine.encode(prompt) if isinstance(prompt, str) else prompt
    return Request(ids, params, TextStream(engine.tokenizer, tuple(params.stop)), **callbacks)


def _run(batch, seqs_by_step: dict[int, list[Request]]) -> None:
    step = 0
    while batch or any(k >= step for k in seqs_by_step):
        if seqs_by_step.get(step):
            batch.add(seqs_by_step[step])
        if batch:
            batch.step()
        step += 1


def _raise(*_):
    raise ValueError("the consumer broke")


POISONS = {
    # temperature inf with min_tokens: EOS held back at -inf, and -inf / inf is NaN (issue 17, row 3)
    "infinite temperature with min_tokens": dict(params=SamplingParams(max_tokens=20, temperature=float("inf"), min_tokens=5),
                                                 error="probabilities contain NaN"),
    "NaN repetition penalty": dict(params=SamplingParams(max_tokens=20, temperature=0.8, repetition_penalty=float("nan")),
                                   error="probabilities contain NaN"),
    "a consumer that raises": dict(params=SamplingParams(max_tokens=20), on_token=_raise, error="the consumer broke"),
}


@pytest.mark.parametrize("poison", POISONS, ids=list(POISONS))
@pytest.mark.parametrize("join", ["together", "mid-flight"])
def test_a_poisoned_row_fails_alone_and_its_neighbours_are_unchanged(engine, alone, poison, join):
    case = POISONS[poison]
    seqs = [engine.request(p, LONG) for p in PROMPTS]
    bad = _unchecked(engine, "Numbers: 1 2 3 4 5", case["params"], on_token=case.get("on_token"))
    ended: list = []
    bad.on_done = lambda completion, error: ended.append((completion, error))
    batch = engine.new_batch()
    try:
        _run(batch, {0: [*seqs[:2], bad], 3: [seqs[2]]} if join == "together" else {0: seqs, 5: [bad]})
    finally:
        batch.close()
    assert [s.completion.token_ids for s in seqs] == alone
    assert [s.completion.finish_reason for s in seqs] == ["length"] * 3
    [(completion, error)] = ended
    assert completion is None and isinstance(error, RowError)
    assert case["error"] in str(error) and "\n" not in str(error)
    if engine.kv is not None:
        assert engine.kv.free == engine.kv.rows


def test_a_model_fault_in_a_step_fails_that_step_and_the_batch_serves_on(engine, alone):
    """A real ONNX Runtime error (a token id past the embedding table, fed to the next step) fails the
    requests of that step; the batch is empty and usable, and the next requests equal each alone."""
    errors: list = []
    seqs = [engine.request(p, LONG, on_done=lambda c, e: errors.append(e)) for p in PROMPTS[:2]]
    batch = engine.new_batch()
    try:
        batch.add(seqs)
        batch.step()
        seqs[1].generated[-1] = 10**6  # KVGrownBatch feeds batch.last, KVRowsBatch the last generated token
        if engine.kv is None:
            batch.last[1] = 10**6
        with pytest.raises(Exception, match="(?i)gather|out of|indices|invalid") as fault:
            batch.step()
        batch.cancel_all(fault.value)
        assert not batch and errors == [fault.value, fault.value]
        assert [s.completion.finish_reason for s in seqs] == ["cancelled", "cancelled"]
        again = [engine.request(p, LONG) for p in PROMPTS]
        _run(batch, {0: again[:2], 2: again[2:]})
    finally:
        batch.close()
    assert [s.completion.token_ids for s in again] == alone
    if engine.kv is not None:
        assert engine.kv.free == engine.kv.rows


def test_a_model_fault_in_a_prefill_fails_only_that_request_and_the_scheduler_serves_on(engine, alone, monkeypatch):
    """Three long requests run in the scheduler; a fourth whose prompt holds an id past the embedding
    table (the engine told its vocabulary is larger, so the id reaches ONNX Runtime) fails in its
    prefill, alone; the three finish with the tokens each gets alone, and a fifth request is served."""
    scheduler = engine.scheduler()
    results: dict[int, tuple] = {}
    started = threading.Event()
    finished = threading.Condition()

    def on_done(i):
        def done(completion, error):
            with finished:
                results[i] = (completion, error)
                finished.notify_all()
        return done

    def wait_for(n: int) -> None:
        with finished:
            assert finished.wait_for(lambda: len(results) >= n, timeout=120)

    try:
        for i, prompt in enumerate(PROMPTS):
            scheduler.submit(prompt, LONG, (lambda t, d, lp: started.set()) if i == 2 else (lambda t, d, lp: None), on_done(i))
        assert started.wait(60)
        monkeypatch.setattr(engine, "vocab", 10**7)
        scheduler.submit([5, 10**6, 7], SamplingParams(max_tokens=4), lambda t, d, lp: None, on_done(3))
        wait_for(4)
        monkeypatch.undo()
        scheduler.submit(PROMPTS[0], LONG, lambda t, d, lp: None, on_done(4))
        wait_for(5)
    finally:
        scheduler.close()
    completion, error = results[3]
    assert completion is None and error is not None and "\n" not in str(error).strip()
    assert [results[i][0].token_ids for i in range(3)] == alone and all(results[i][1] is None for i in range(3))
    assert results[4][0].token_ids == alone[0]
    if engine.kv is not None:
        assert engine.kv.free == engine.kv.rows
