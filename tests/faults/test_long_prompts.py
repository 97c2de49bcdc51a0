"""Chunked prefill on the genai export's KV rows, on real ONNX Runtime sessions: a long prompt is
prefilled in chunks between the others' decode steps, so it never stalls them for its whole prefill,
and every request still gets exactly the tokens it gets alone (or unchunked)."""

from __future__ import annotations

import math

import pytest

from loraship.engine import Engine, SamplingParams
from loraship.engine import kv_rows
from loraship.engine.request import Request

SHORT = ["Hello, how are you today?", "The quick brown fox", "LoRA adds small low-rank matrices"]
LONG_TEXT = " projections" * 1200  # 1201 tokens with BOS


@pytest.fixture(scope="module")
def engine(rows_engine) -> Engine:
    return rows_engine


def _unchunked(engine: Engine, prompt: str, params: SamplingParams, monkeypatch) -> list[int]:
    with monkeypatch.context() as m:
        m.setattr(kv_rows, "LONG_PROMPT", 10**9)
        return engine.generate([prompt], params)[0].token_ids


def test_a_long_prompt_alone_is_prefilled_in_chunks_to_the_same_tokens(engine, monkeypatch):
    params = SamplingParams(max_tokens=12)
    whole = _unchunked(engine, LONG_TEXT, params, monkeypatch)
    seq = engine.request(LONG_TEXT, params)
    batch = engine.new_batch()
    steps_to_first = 0
    try:
        batch.add([seq])
        assert len(batch) == 1 and not batch.active and seq.generated == []  # waiting for its chunks
        while not seq.generated:
            batch.step()
            steps_to_first += 1
        while batch:
            batch.step()
    finally:
        batch.close()
    assert steps_to_first == math.ceil(len(seq.prompt_ids) / kv_rows.LONG_PROMPT)  # 256 tokens a step, no one decoding
    assert seq.completion.token_ids == whole
    assert engine.kv.free == engine.kv.rows


def test_the_others_keep_decoding_while_a_long_prompt_fills(engine, monkeypatch):
    """Three short requests decode; a long one joins. While its prompt fills, each step still gives
    every short one a token; all four end with exactly their own tokens."""
    params = SamplingParams(max_tokens=60)
    alone = [engine.generate([p], params)[0].token_ids for p in SHORT]
    long_alone = _unchunked(engine, LONG_TEXT, SamplingParams(max_tokens=8), monkeypatch)
    seqs = [engine.request(p, params) for p in SHORT]
    long = engine.request(LONG_TEXT, SamplingParams(max_tokens=8))
    batch = engine.new_batch()
    tokens_while_filling = []
    try:
        batch.add(seqs)
        batch.step()
        batch.add([long])
        while batch.filling:
            running, before = sum(not s.done for s in seqs), sum(len(s.generated) for s in seqs)
            batch.step()
            tokens_while_filling.append((running, sum(len(s.generated) for s in seqs) - before))
        while batch:
            batch.step()
    finally:
        batch.close()
    assert all(got == running for running, got in tokens_while_filling)  # every running request: a token each step
    assert sum(running == 3 for running, _ in tokens_while_filling) > 10
    assert [s.completion.token_ids for s in seqs] == alone
    assert long.completion.token_ids == long_alone
    assert engine.kv.free == engine.kv.rows


def test_a_request_cancelled_or_faulting_while_it_fills_leaves_alone(engine, monkeypatch):
    params = SamplingParams(max_tokens=30)
    alone = engine.generate([SHORT[0]], params)[0].token_ids
    cancelled = engine.request(LONG_TEXT, SamplingParams(max_tokens=4))
    ids = engine.encode(LONG_TEXT)
    ended: list = []
    faulty = Request(ids[:600] + [10**6] + ids[600:900], SamplingParams(max_tokens=4), cancelled.stream,
                      on_done=lambda completion, error: ended.append((completion, error)))  # an id past the embedding table, in a later chunk
    short = engine.request(SHORT[0], params)
    batch = engine.new_batch()
    try:
        batch.add([short])
        batch.add([cancelled, faulty])
        batch.step()
        cancelled.cancel()
        while batch:
            batch.step()
    finally:
        batch.close()
    assert short.completion.token_ids == alone
    assert cancelled.completion.finish_reason == "cancelled" and cancelled.completion.token_ids == []
    [(completion, error)] = ended
    assert completion is None and error is not None
    assert engine.kv.free == engine.kv.rows
