"""Log-probabilities of generated tokens: the engine's against a log-softmax of the real ONNX Runtime
logits, and the generate model's ``logprobs`` output through a real tritonserver against the engine."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loraship.engine import RequestError, SamplingParams

PROMPT = "Explain what a transformer is"


def log_softmax(logits: np.ndarray) -> np.ndarray:
    scores = logits.astype(np.float64)
    return scores - (scores.max() + np.log(np.exp(scores - scores.max()).sum()))


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 3, "repetition_penalty": 1.3}], ids=["greedy", "sampled"])
def test_logprobs_are_the_log_softmax_of_the_models_raw_logits(engine, sampling) -> None:
    """At every step, the log-softmax of the logits of the prompt and the tokens so far, run anew:
    the model's distribution, before temperature and penalties."""
    [done] = engine.generate([PROMPT], SamplingParams(max_tokens=12, logprobs=4, **sampling))
    assert len(done.logprobs) == done.completion_tokens == 12
    ids = engine.encode(PROMPT)
    for step, entry in enumerate(done.logprobs):
        expected = log_softmax(engine.prefill_logits([ids + done.token_ids[:step]])[0])
        assert entry.logprob == pytest.approx(expected[entry.token], abs=1e-4)
        assert [(i, v) for i, _, v in entry.top] == [(i, pytest.approx(expected[i], abs=1e-4))
                                                     for i in np.argsort(-expected, kind="stable")[:4]]
    assert "".join(e.text for e in done.logprobs) == done.text  # every token's text in context adds up to the reply


def test_greedy_logprobs_list_the_chosen_token_first(engine) -> None:
    [done] = engine.generate([PROMPT], SamplingParams(max_tokens=12, logprobs=4))
    for entry, token in zip(done.logprobs, done.token_ids):
        assert entry.token == token and len(entry.top) == 4
        values = [v for _, _, v in entry.top]
        assert values == sorted(values, reverse=True) and sum(np.exp(values)) <= 1 + 1e-9
        assert entry.top[0][0] == token and entry.top[0][2] == entry.logprob  # greedy takes the most likely
        assert dict((i, t) for i, t, _ in entry.top)[token] == entry.text


def test_logprobs_do_not_change_the_tokens_and_do_not_depend_on_the_neighbours(engine) -> None:
    sampled = dict(max_tokens=10, temperature=0.8, seed=3)
    [plain] = engine.generate([PROMPT], SamplingParams(**sampled))
    [alone] = engine.generate([PROMPT], SamplingParams(**sampled, logprobs=0))
    assert alone.token_ids == plain.token_ids and plain.logprobs is None and all(e.top == () for e in alone.logprobs)
    batch = engine.generate(["Hello, how are you today?", PROMPT, "Numbers: 0 1 2 3"],
                            [SamplingParams(max_tokens=6), SamplingParams(**sampled, logprobs=0), SamplingParams(max_tokens=14)])
    assert batch[1].token_ids == alone.token_ids and batch[0].logprobs is None
    assert [e.logprob for e in batch[1].logprobs] == pytest.approx([e.logprob for e in alone.logprobs], abs=1e-4)
    with pytest.raises(RequestError, match=r"logprobs must be in \[0, 20\]"):
        engine.generate([PROMPT], SamplingParams(logprobs=21))


@pytest.mark.parametrize("export", ["genai", "optimum"])
def test_prompt_logprobs_score_each_prompt_token_given_the_ones_before(onnx_dir, optimum_dir, export) -> None:
    """Each prompt token's log-probability equals the log-softmax of the last logits of its prefix run
    alone; left-padded beside a longer prompt (optimum's batch) gives the same."""
    from loraship.engine import Engine

    engine = Engine.load(onnx_dir if export == "genai" else optimum_dir)
    ids = engine.encode(PROMPT)
    [done] = engine.generate([ids], SamplingParams(max_tokens=1, prompt_logprobs=2))
    assert done.prompt_logprobs[0] is None and [e.token for e in done.prompt_logprobs[1:]] == ids[1:]
    for j in range(1, len(ids)):
        expected = log_softmax(engine.prefill_logits([ids[:j]])[0])
        entry = done.prompt_logprobs[j]
        assert entry.logprob == pytest.approx(expected[ids[j]], abs=1e-4)
        assert [t for t, _, _ in entry.top] == list(np.argsort(-expected, kind="stable")[:2])
    whole, first = (engine.tokenizer.decode(x, skip_special_tokens=False) for x in (ids, ids[:1]))
    assert "".join(e.text for e in done.prompt_logprobs[1:]) == whole[len(first) :]  # each token's text in context
    [scored] = engine.generate([ids], SamplingParams(max_tokens=0, prompt_logprobs=2))  # score only: nothing generated
    assert scored.token_ids == [] and scored.finish_reason == "length"
    assert [e.logprob for e in scored.prompt_logprobs[1:]] == [e.logprob for e in done.prompt_logprobs[1:]]
    longer = "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15"
    batch = engine.generate([longer, ids], [SamplingParams(max_tokens=3), SamplingParams(max_tokens=1, prompt_logprobs=2)])
    assert batch[0].prompt_logprobs is None
    assert [e.logprob for e in batch[1].prompt_logprobs[1:]] == pytest.approx([e.logprob for e in done.prompt_logprobs[1:]], abs=1e-4)
    with pytest.raises(RequestError, match="token id 999999 is not in the model's vocabulary"):
        engine.generate([[1, 999999]], SamplingParams(max_tokens=1))


def _entries(responses: list[dict]) -> list[dict]:
    return [e for r in responses for e in json.loads(r["logprobs"].reshape(-1)[0])]


@pytest.mark.parametrize("stream", [True, False])
def test_the_generate_model_returns_the_engines_logprobs(served, engine, stream) -> None:
    [expected] = engine.generate([PROMPT], SamplingParams(max_tokens=10, logprobs=2))
    responses = served.infer("tiny", {"text_input": [PROMPT], "max_tokens": [10], "logprobs": [2], "stream": [stream]})
    assert not isinstance(responses, str), responses
    entries = _entries(responses)
    assert [e["token_id"] for e in entries] == expected.token_ids
    assert [e["token"] for e in entries] == [e.text for e in expected.logprobs]
    assert [e["logprob"] for e in entries] == pytest.approx([e.logprob for e in expected.logprobs], abs=1e-5)
    assert [[t["token_id"] for t in e["top_logprobs"]] for e in entries] == [[i for i, _, _ in e.top] for e in expected.logprobs]
    assert served.text(responses) == expected.text
    plain = served.infer("tiny", {"text_input": [PROMPT], "max_tokens": [4], "stream": [stream]})
    assert all("logprobs" not in r for r in plain)  # only when asked for
    error = served.infer("tiny", {"text_input": [PROMPT], "logprobs": [21]})
    assert isinstance(error, str) and "logprobs must be in [0, 20]" in error


def test_the_generate_model_scores_token_id_prompts(served, engine) -> None:
    """input_ids with prompt_logprobs: the last response carries each prompt token's entry (the first
    with a null logprob), equal to the engine's; what lm-eval's loglikelihood requests need of a server."""
    ids = engine.encode(PROMPT)
    [expected] = engine.generate([ids], SamplingParams(max_tokens=2, prompt_logprobs=1))
    for stream in (False, True):
        responses = served.infer("tiny", {"input_ids": ids, "max_tokens": [2], "prompt_logprobs": [1], "stream": [stream]})
        assert not isinstance(responses, str), responses
        assert all("prompt_logprobs" not in r for r in responses[:-1])
        entries = json.loads(responses[-1]["prompt_logprobs"].reshape(-1)[0])
        assert entries[0] == {"token_id": ids[0], "token": engine.tokenizer.decode(ids[:1], skip_special_tokens=False),
                              "logprob": None, "top_logprobs": None}
        assert [e["token_id"] for e in entries[1:]] == ids[1:]
        assert [e["logprob"] for e in entries[1:]] == pytest.approx([e.logprob for e in expected.prompt_logprobs[1:]], abs=1e-5)
        assert [(e["token"], [(t["token_id"], t["token"]) for t in e["top_logprobs"]]) for e in entries[1:]] == [
            (e.text, [(i, text) for i, text, _ in e.top]) for e in expected.prompt_logprobs[1:]]
        assert [[t["logprob"] for t in e["top_logprobs"]] for e in entries[1:]] == [
            pytest.approx([v for _, _, v in e.top], abs=1e-5) for e in expected.prompt_logprobs[1:]]
        assert served.text(responses) == expected.text
    echoed = served.infer("tiny", {"input_ids": ids, "max_tokens": [2], "exclude_input_in_output": [False]})
    assert served.text(echoed) == engine.tokenizer.decode(ids, skip_special_tokens=False) + expected.text
    for row, needle in [({"input_ids": ids, "text_input": [PROMPT]}, "send one of text_input, messages or input_ids"),
                        ({"input_ids": [1, 10**6]}, "token id 1000000 is not in the model's vocabulary")]:
        error = served.infer("tiny", row)
        assert isinstance(error, str) and needle in error, error
