"""Engine pieces that need no model: streaming detokenization, stop strings, sampling, validation."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from loraship.engine import RequestError, SamplingParams
from loraship.engine.detok import TextStream
from loraship.engine.sampling import next_token


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the quick brown fox jumps over the lazy dog", "héllo wörld, ünïcode ✓ STOP here"] * 40
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def _stream(tokenizer: Tokenizer, text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    deltas = []
    for token in tokenizer.encode(text).ids:
        deltas.append(stream.push(token))
        if stream.stopped:
            break
    deltas.append(stream.finish())
    return deltas, stream


def test_deltas_concatenate_to_the_decoded_text(tokenizer: Tokenizer) -> None:
    text = "héllo wörld, ünïcode ✓ the lazy dog"
    deltas, stream = _stream(tokenizer, text)
    assert "".join(deltas) == text == stream.text
    assert not any("\ufffd" in d for d in deltas), "partial UTF-8 characters must be held back"


def test_stop_string_truncates_and_is_never_streamed(tokenizer: Tokenizer) -> None:
    deltas, stream = _stream(tokenizer, "the quick brown fox STOP here and more", stop=("STOP",))
    assert stream.stopped
    assert stream.text == "the quick brown fox "
    assert "".join(deltas) == "the quick brown fox "
    assert not any("S" in d for d in deltas)


def test_partial_stop_prefix_is_released_when_it_does_not_complete(tokenizer: Tokenizer) -> None:
    deltas, stream = _stream(tokenizer, "the quick STOx brown", stop=("STOP",))
    assert not stream.stopped
    assert "".join(deltas) == "the quick STOx brown"


def test_greedy_is_argmax_and_seeded_sampling_is_reproducible() -> None:
    logits = np.array([0.1, 2.0, 1.9, -3.0], np.float32)
    greedy = SamplingParams()
    assert next_token(logits, greedy, np.random.default_rng(0)) == 1
    params = SamplingParams(temperature=1.0, seed=3)
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    draws_a = [next_token(logits, params, rng_a) for _ in range(50)]
    draws_b = [next_token(logits, params, rng_b) for _ in range(50)]
    assert draws_a == draws_b
    assert set(draws_a) <= {0, 1, 2, 3} and len(set(draws_a)) > 1


def test_top_k_and_top_p_restrict_the_candidates() -> None:
    logits = np.array([5.0, 4.0, 0.0, -1.0, -2.0], np.float32)
    rng = np.random.default_rng(0)
    top_k = {next_token(logits, SamplingParams(temperature=2.0, top_k=2), rng) for _ in range(200)}
    assert top_k == {0, 1}
    top_p = {next_token(logits, SamplingParams(temperature=1.0, top_p=0.5), rng) for _ in range(200)}
    assert top_p == {0}


DRAWS = 20_000
SAMPLED_LOGITS = np.array([2.0, 1.0, 0.5, 0.0, -1.0, -3.0], np.float32)


def _expected_probs(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """softmax(logits / T), then the ``top_k`` most likely, then the smallest most-likely set whose mass
    reaches ``top_p``, each renormalised (vLLM's order)."""
    probs = np.exp(logits.astype(np.float64) / temperature)
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = order[:top_k] if top_k else order
    kept = probs[keep] / probs[keep].sum()
    if top_p < 1.0:
        keep = keep[: int(np.argmax(np.cumsum(kept) >= top_p)) + 1]
    out = np.zeros_like(probs)
    out[keep] = probs[keep] / probs[keep].sum()
    return out


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [
    (0.5, 0, 1.0), (2.0, 0, 1.0),  # two temperatures: the distribution sharpens and flattens
    (1.5, 3, 1.0),  # top-k: three candidates, renormalised
    (1.0, 0, 0.8),  # top-p: the three most likely reach 0.87
    (0.7, 4, 0.95),  # all three: top-k cuts to four, top-p to the three that reach 0.96 of those
])
def test_sampled_frequencies_follow_softmax_of_logits_over_temperature(temperature, top_k, top_p) -> None:
    """Seeded draws: tokens outside the expected set never appear, and each token's frequency is within
    5 standard errors of its probability (about 1 in 1.7 million per token by chance; the seed fixes it)."""
    expected = _expected_probs(SAMPLED_LOGITS, temperature, top_k, top_p)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    rng = np.random.default_rng(20)
    draws = np.array([next_token(SAMPLED_LOGITS, params, rng) for _ in range(DRAWS)])
    freq = np.bincount(draws, minlength=len(SAMPLED_LOGITS)) / DRAWS
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(expected))  # nothing outside the kept set, ever
    bound = 5 * np.sqrt(expected * (1 - expected) / DRAWS)
    assert np.all(np.abs(freq - expected) <= bound), (freq.round(4), expected.round(4))


def test_temperature_changes_the_distribution_beyond_the_bound() -> None:
    """The temperatures above are far enough apart that sampling at the wrong one fails the bound."""
    for temperature in (0.5, 2.0):
        gap = np.abs(_expected_probs(SAMPLED_LOGITS, temperature) - _expected_probs(SAMPLED_LOGITS, 1.0)).max()
        assert gap > 20 * np.sqrt(0.25 / DRAWS)


@pytest.mark.parametrize(
    ("params", "prompt_tokens", "needle"),
    [
        (SamplingParams(max_tokens=0), 5, "max_tokens must be positive"),
        (SamplingParams(max_tokens=10), 0, "empty prompt"),
        (SamplingParams(max_tokens=10), 100, "context is 100"),
        (SamplingParams(max_tokens=60), 50, "lower max_tokens to at most 50"),
        (SamplingParams(top_p=0.0), 5, "top_p"),
        (SamplingParams(temperature=-1.0), 5, "temperature"),
        (SamplingParams(top_k=-2), 5, "top_k"),
    ],
)
def test_bad_requests_are_refused_with_one_line(params: SamplingParams, prompt_tokens: int, needle: str) -> None:
    with pytest.raises(RequestError, match=needle) as info:
        params.validate(prompt_tokens, max_context=100)
    assert "\n" not in str(info.value)
