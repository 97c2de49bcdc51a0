"""Choosing the next token from one row of logits."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

from .params import GREEDY_BELOW, SamplingParams


def process_logits(
    logits: np.ndarray,
    params: SamplingParams,
    prompt_ids: Sequence[int] = (),
    generated: Sequence[int] = (),
    eos_ids: Collection[int] = (),
) -> np.ndarray:
    """``logits`` after the penalties and ``min_tokens`` of ``params``, with vLLM's semantics (see
    :class:`SamplingParams`); the input itself when nothing applies, else a float32 copy."""
    hold_eos = len(generated) < params.min_tokens and bool(eos_ids)
    if not params.penalized and not hold_eos:
        return logits
    scores = logits.astype(np.float32)  # a copy: never edit the runner's buffer
    vocab = scores.shape[-1]
    if params.repetition_penalty != 1.0:
        seen = np.unique(np.fromiter((*prompt_ids, *generated), np.int64))
        seen = seen[seen < vocab]
        values = scores[seen]
        scores[seen] = np.where(values > 0, values / params.repetition_penalty, values * params.repetition_penalty)
    if generated and (params.frequency_penalty or params.presence_penalty):
        ids, counts = np.unique(np.asarray(generated, np.int64), return_counts=True)
        keep = ids < vocab
        scores[ids[keep]] -= params.frequency_penalty * counts[keep] + params.presence_penalty
    if hold_eos:
        scores[[i for i in eos_ids if i < vocab]] = -np.inf
    return scores


def log_probs(logits: np.ndarray, tokens: Sequence[int], k: int) -> list[tuple[float, list[tuple[int, float]]]]:
    """For each row of ``logits [N, V]``: ``tokens[n]``'s log-probability (a log-softmax in float64)
    and the ``k`` most likely tokens with theirs, most likely first. Rows go 256 at a time, so a long
    prompt never needs N x V doubles at once."""
    out = []
    for start in range(0, len(tokens), 256):
        scores = logits[start : start + 256].astype(np.float64)
        top = scores.max(axis=-1, keepdims=True)
        scores -= top + np.log(np.exp(scores - top).sum(axis=-1, keepdims=True))
        rows = np.arange(scores.shape[0])
        chosen = scores[rows, np.asarray(tokens[start : start + 256])]
        if k == 0:
            out += [(float(v), []) for v in chosen]
            continue
        best = np.argpartition(-scores, k - 1, axis=-1)[:, :k]
        best = np.take_along_axis(best, np.argsort(-np.take_along_axis(scores, best, -1), axis=-1, kind="stable"), -1)
        out += [(float(v), [(int(i), float(scores[r, i])) for i in ids]) for r, (v, ids) in enumerate(zip(chosen, best))]
    return out


def next_token(
    logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    prompt_ids: Sequence[int] = (),
    generated: Sequence[int] = (),
    eos_ids: Collection[int] = (),
) -> int:
    """Penalties and ``min_tokens`` first (given the sequence's tokens so far), then greedy when
    temperature is 0 (or below ``GREEDY_BELOW``), otherwise temperature, top-k, top-p sampling."""
    logits = process_logits(logits, params, prompt_ids, generated, eos_ids)
    if params.temperature < GREEDY_BELOW:
        return int(np.argmax(logits))
    scores = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < scores.shape[-1]:
        kth = np.partition(scores, -params.top_k)[-params.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs)
        cumulative = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cumulative, params.top_p)) + 1]
        mask = np.zeros_like(probs)
        mask[keep] = probs[keep]
        probs = mask / mask.sum()
    return int(rng.choice(probs.shape[-1], p=probs))
