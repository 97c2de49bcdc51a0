"""Penalties, min_tokens and ignore_eos: the logit processing against hand computations, and
generation on real ONNX Runtime sessions."""

from __future__ import annotations

import numpy as np
import pytest

from loraship.engine import RequestError, SamplingParams
from loraship.engine.sampling import next_token, process_logits

LOGITS = np.array([2.0, -1.0, 0.5, 3.0, -0.5, 1.2], np.float32)
PROMPT_IDS = [0, 1]
GENERATED = [3, 3, 4]


def test_penalties_match_a_hand_computation() -> None:
    """vLLM's order and scope: repetition over prompt and output tokens (positive logits divided,
    negative ones multiplied), then frequency x count and presence over output tokens only."""
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    got = process_logits(LOGITS, params, PROMPT_IDS, GENERATED)
    expected = [
        2.0 / 2,  # prompt token: repetition only
        -1.0 * 2,  # prompt token, negative logit: multiplied
        0.5,  # never seen
        3.0 / 2 - 0.5 * 2 - 0.25,  # generated twice
        -0.5 * 2 - 0.5 * 1 - 0.25,  # generated once
        1.2,
    ]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got.dtype == np.float32 and LOGITS[3] == 3.0, "the caller's logits stay untouched"
    assert next_token(LOGITS, SamplingParams(), np.random.default_rng(0)) == 3
    assert next_token(LOGITS, params, np.random.default_rng(0), PROMPT_IDS, GENERATED) == 5


def test_each_penalty_alone_and_fp16_logits() -> None:
    half = LOGITS.astype(np.float16)
    rep = process_logits(half, SamplingParams(repetition_penalty=0.5), PROMPT_IDS, GENERATED)  # < 1 favours repeats
    np.testing.assert_allclose(rep, [4.0, -0.5, 0.5, 6.0, -0.25, 1.2], rtol=1e-3)
    freq = process_logits(LOGITS, SamplingParams(frequency_penalty=-1.0), PROMPT_IDS, GENERATED)
    np.testing.assert_allclose(freq, [2.0, -1.0, 0.5, 5.0, 0.5, 1.2], rtol=1e-6)
    pres = process_logits(LOGITS, SamplingParams(presence_penalty=1.5), PROMPT_IDS, GENERATED)
    np.testing.assert_allclose(pres, [2.0, -1.0, 0.5, 1.5, -2.0, 1.2], rtol=1e-6)
    assert process_logits(LOGITS, SamplingParams(), PROMPT_IDS, GENERATED) is LOGITS  # nothing to do: no copy


def test_min_tokens_masks_every_eos_id_until_reached() -> None:
    params = SamplingParams(min_tokens=4)
    held = process_logits(LOGITS, params, PROMPT_IDS, GENERATED, eos_ids=frozenset({3, 5}))
    assert np.isneginf(held[[3, 5]]).all() and np.array_equal(held[[0, 1, 2, 4]], LOGITS[[0, 1, 2, 4]])
    assert next_token(LOGITS, params, np.random.default_rng(0), PROMPT_IDS, GENERATED, frozenset({3, 5})) == 0
    sampled = {next_token(LOGITS, SamplingParams(min_tokens=4, temperature=5.0), np.random.default_rng(i), PROMPT_IDS, GENERATED, {3, 5})
               for i in range(200)}
    assert sampled == {0, 1, 2, 4}
    reached = GENERATED + [0]
    assert process_logits(LOGITS, params, PROMPT_IDS, reached, eos_ids={3, 5}) is LOGITS


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (SamplingParams(repetition_penalty=float("nan")), "repetition_penalty"),
        (SamplingParams(presence_penalty=2.5), r"presence_penalty must be in \[-2, 2\]"),
        (SamplingParams(frequency_penalty=-3.0), "frequency_penalty"),
        (SamplingParams(max_tokens=8, min_tokens=9), r"min_tokens must be in \[0, max_tokens=8\]"),
        (SamplingParams(min_tokens=-1), "min_tokens"),
        (SamplingParams(seed=-1), r"seed must be in \[0, 2\*\*64\)"),
        (SamplingParams(seed=2**64), r"seed must be in \[0, 2\*\*64\), got 18446744073709551616"),
        (SamplingParams(temperature=float("inf"), min_tokens=2), "temperature must be a finite number, got inf"),
        (SamplingParams(temperature=float("nan")), "temperature must be a finite number, got nan"),
        (SamplingParams(top_p=float("nan")), "top_p must be a finite number"),
        (SamplingParams(presence_penalty=float("-inf")), "presence_penalty must be a finite number"),
        (SamplingParams(temperature="0.5"), "temperature must be a finite number, got '0.5'"),
        (SamplingParams(max_tokens=True), "max_tokens must be an integer, got True"),
        (SamplingParams(max_tokens=8.0), "max_tokens must be an integer, got 8.0"),
        (SamplingParams(top_k=2**31), r"top_k must be in \[0, 2\*\*31\)"),
        (SamplingParams(max_tokens=2**70), r"max_tokens \(1180591620717411303424\) exceeds the context of 100 tokens"),
        (SamplingParams(logprobs=21), r"logprobs must be in \[0, 20\]"),
        (SamplingParams(ignore_eos=1), "ignore_eos must be true or false, got 1"),
        (SamplingParams(stop=("ok", 3)), "stop must be strings"),
    ],
)
def test_bad_values_are_refused_with_one_line(params: SamplingParams, needle: str) -> None:
    with pytest.raises(RequestError, match=needle) as info:
        params.validate(5, max_context=100)
    assert "\n" not in str(info.value)


def test_temperatures_too_small_to_divide_by_decode_greedily() -> None:
    """1e-300 is finite and valid, but dividing logits by it overflows to inf and NaN; below 1e-5 the
    sampler is greedy, as vLLM's is."""

    logits = np.array([1.0, 3.0, -2.0, 2.9], np.float32)
    rng = np.random.default_rng(0)
    for t in (1e-300, 1e-6):
        SamplingParams(temperature=t).validate(5, max_context=100)
        assert [next_token(logits, SamplingParams(temperature=t), rng) for _ in range(20)] == [1] * 20


# -- generation on real ONNX Runtime sessions --


def test_greedy_path_of_the_eos_export_ends_on_eos(eos_engine, eos_export) -> None:
    [done] = eos_engine.generate([eos_export.prompt], SamplingParams(max_tokens=24))
    assert done.finish_reason == "eos"
    assert len(done.token_ids) == eos_export.steps + 1 and done.token_ids[-1] == eos_export.eos


def test_ignore_eos_generates_exactly_max_tokens(eos_engine, eos_export) -> None:
    [plain] = eos_engine.generate([eos_export.prompt], SamplingParams(max_tokens=24))
    [done] = eos_engine.generate([eos_export.prompt], SamplingParams(max_tokens=24, ignore_eos=True))
    assert done.finish_reason == "length" and done.completion_tokens == 24
    assert done.token_ids[: eos_export.steps + 1] == plain.token_ids  # same greedy path, EOS included, then on


def test_min_tokens_holds_back_eos_and_picks_the_best_other_token(eos_engine, eos_export) -> None:
    steps, eos = eos_export.steps, eos_export.eos
    [plain] = eos_engine.generate([eos_export.prompt], SamplingParams(max_tokens=24))
    [done] = eos_engine.generate([eos_export.prompt], SamplingParams(max_tokens=24, min_tokens=steps + 4))
    assert done.token_ids[:steps] == plain.token_ids[:steps]
    assert not set(done.token_ids[: steps + 4]) & eos_engine.eos_ids
    assert done.completion_tokens >= steps + 4
    assert done.finish_reason == "length" or done.token_ids[-1] in eos_engine.eos_ids
    prompt_ids = eos_engine.encode(eos_export.prompt)
    [logits] = eos_engine.prefill_logits([prompt_ids + done.token_ids[:steps]])
    assert int(np.argmax(logits)) == eos  # EOS was the model's choice at that step...
    logits[list(eos_engine.eos_ids)] = -np.inf
    assert logits[done.token_ids[steps]] >= logits.max() - 1e-3  # ...and the best other token came instead


def test_repetition_penalty_changes_a_greedy_repetition_loop(engine) -> None:
    """On a prompt whose greedy path repeats itself, each penalized step is the argmax of the full
    prefill's logits penalized by hand (vLLM semantics), and the loop is broken."""
    prompts = ["What is the capital of France?", "Numbers: 0 1 2 3", "The quick brown fox", "Hello"]
    plain = {p: engine.generate([p], SamplingParams(max_tokens=16))[0].token_ids for p in prompts}
    prompt = max(prompts, key=lambda p: max(plain[p].count(t) for t in plain[p]))
    assert max(plain[prompt].count(t) for t in plain[prompt]) >= 3, plain
    params = SamplingParams(max_tokens=16, repetition_penalty=1.8, frequency_penalty=0.4, presence_penalty=0.3)
    [done] = engine.generate([prompt], params)
    assert done.token_ids != plain[prompt]
    assert max(done.token_ids.count(t) for t in done.token_ids) < max(plain[prompt].count(t) for t in plain[prompt])
    prompt_ids = engine.encode(prompt)
    for step, token in enumerate(done.token_ids):
        out = done.token_ids[:step]
        [logits] = engine.prefill_logits([prompt_ids + out])
        scores = logits.astype(np.float64)
        for t in set(prompt_ids) | set(out):
            scores[t] = scores[t] / 1.8 if scores[t] > 0 else scores[t] * 1.8
        for t in set(out):
            scores[t] -= 0.4 * out.count(t) + 0.3
        assert scores[token] >= scores.max() - 1e-3, f"step {step}: picked {token}, best {int(np.argmax(scores))}"
