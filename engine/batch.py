"""A batch of sequences decoding together; rows join and leave between steps."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .detok import CONTEXT, TextStream, texts_in_context
from .errors import one_line
from .kvops import KVOps
from .params import SamplingParams
from .runner import Runner
from .sampling import log_probs, next_token


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's text and log-probability, and the most likely tokens at its position (id,
    text, log-probability), when the request asked for ``logprobs``."""

    token: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


TokenCallback = Callable[[int, str, "TokenLogprob | None"], None]  # token id, text delta, its logprobs if asked
DoneCallback = Callable[["Completion | None", "BaseException | None"], None]


@dataclass
class Completion:
    """The result of one request."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # length | eos | stop | cancelled
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (None for the first), when asked for

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass(eq=False)
class Sequence:
    """One request being generated."""

    prompt_ids: list[int]
    params: SamplingParams
    stream: TextStream
    on_token: TokenCallback | None = None
    on_done: DoneCallback | None = None
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: str | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    completion: Completion | None = None
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.params.seed)
        if self.params.logprobs is not None:
            self.logprobs = []

    def cancel(self) -> None:
        """Ask the batch to drop this sequence before its next step."""
        self.cancelled.set()

    def accept(self, token: int, eos_ids: frozenset[int], logprob: TokenLogprob | None = None) -> None:
        """Record a sampled token, stream its text, and decide whether the sequence is done."""
        self.generated.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if token in eos_ids and not self.params.ignore_eos:
            self.finish_reason, delta = "eos", self.stream.finish()
        else:
            delta = self.stream.push(token)
            if self.stream.stopped:
                self.finish_reason = "stop"
            elif len(self.generated) >= self.params.max_tokens:
                delta += self.stream.finish()
                self.finish_reason = "stop" if self.stream.stopped else "length"
        if self.on_token is not None:
            self.on_token(token, delta, logprob)

    @property
    def done(self) -> bool:
        """Finished, or cancelled by its consumer."""
        return bool(self.finish_reason) or self.cancelled.is_set()

    def finish(self, error: BaseException | None = None) -> None:
        self.completion = Completion(self.stream.text, self.generated, len(self.prompt_ids), self.finish_reason or "cancelled",
                                     self.logprobs, self.prompt_logprobs)
        if self.on_done is not None:
            self.on_done(None if error else self.completion, error)

    def score_prompt(self, logits: np.ndarray) -> None:
        """Record each prompt token's log-probability given the tokens before it, from the prompt's
        logits ``[T, V]`` (position ``j`` predicts token ``j + 1``); the first token has none."""
        ids, k = self.prompt_ids, self.params.prompt_logprobs
        scored = log_probs(logits[:-1], ids[1:], k)
        contexts = [ids[max(0, i - CONTEXT) : i] for i in range(1, len(ids))]
        texts = texts_in_context(self.stream.tokenizer, contexts, [[ids[i + 1], *(t for t, _ in top)] for i, (_, top) in enumerate(scored)])
        self.prompt_logprobs = [None] + [
            TokenLogprob(ids[i + 1], text, value, tuple((t, tt, v) for (t, v), tt in zip(top, alt_texts)))
            for i, ((value, top), (text, *alt_texts)) in enumerate(zip(scored, texts))]


class RowError(RuntimeError):
    """Sampling or detokenizing one request failed (say, NaN logits): that request alone ends with it."""


def sample_row(seq: Sequence, logits: np.ndarray, eos_ids: frozenset[int]) -> int:
    """Sample ``seq``'s next token from its logits ``[V]`` and record it (with its logprobs, if asked);
    a request for no tokens (a prompt to score) ends here instead, and the pad id 0 stands in its row.

    Whatever fails here (sampling, say on NaN logits; detokenizing; a consumer's callback) ends this
    sequence alone, with a :class:`RowError`; the pad id stands in its row and the other rows go on."""
    if seq.done:  # cancelled since the step began, or its prompt failed to score: it leaves after this step
        return 0
    if seq.params.max_tokens == 0:
        seq.finish_reason = "length"
        return 0
    try:
        token = next_token(logits, seq.params, seq.rng, seq.prompt_ids, seq.generated, eos_ids)
        logprob = None
        if seq.params.logprobs is not None:
            [(value, top)] = log_probs(logits[None], [token], seq.params.logprobs)
            text, *texts = seq.stream.token_texts([token, *(i for i, _ in top)])
            logprob = TokenLogprob(token, text, value, tuple((i, t, v) for (i, v), t in zip(top, texts)))
        seq.accept(token, eos_ids, logprob)
    except Exception as exc:  # noqa: BLE001 - this row's fault: drop only its sequence
        seq.finish_reason = "cancelled"
        seq.error = RowError(f"generating token {len(seq.generated) + 1} of this request failed: {one_line(exc)}")
        return 0
    return token


def score_row(seq: Sequence, logits: np.ndarray) -> None:
    """Record the prompt logprobs of ``seq`` from its prompt's logits ``[T, V]``; a failure ends this
    sequence alone, as in :func:`sample_row`."""
    try:
        seq.score_prompt(logits)
    except Exception as exc:  # noqa: BLE001 - this row's fault: drop only its sequence
        seq.finish_reason = "cancelled"
        seq.error = RowError(f"scoring the prompt of this request failed: {one_line(exc)}")


def fail(seqs: list[Sequence], error: BaseException) -> None:
    """End ``seqs`` with ``error`` (a model run they were in failed)."""
    for seq in seqs:
        seq.finish_reason = seq.finish_reason or "cancelled"
        seq.finish(error)


class DecodeBatch:
    """Left-padded KV cache for the active sequences of one engine (exports whose decoder returns a
    grown cache each step: optimum's). At most ``max_batch`` sequences decode together."""

    def __init__(self, runner: Runner, kv_ops: KVOps, eos_ids: frozenset[int], pad_id: int, max_batch: int) -> None:
        self.runner = runner
        self.kv_ops = kv_ops
        self.eos_ids = eos_ids
        self.pad_id = pad_id
        self.max_batch = max_batch
        self.seqs: list[Sequence] = []
        self.mask = np.zeros((0, 0), np.int64)
        self.past: list = []
        self.last = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def room(self) -> int:
        """How many more requests can join now."""
        return self.max_batch - len(self.seqs)

    def prefill_logits(self, seqs: list[Sequence]) -> np.ndarray:
        """Last-position logits ``[B, V]`` of the prompts, run together left-padded."""
        return self.prefill(seqs)[0]

    def prefill(self, seqs: list[Sequence], every_position: bool = False) -> tuple[np.ndarray, np.ndarray, list]:
        """Run the prompts of ``seqs`` together; return last logits (or every position's, left-padded),
        mask and KV cache."""
        width = max(len(s.prompt_ids) for s in seqs)
        ids = np.full((len(seqs), width), self.pad_id, np.int64)
        mask = np.zeros((len(seqs), width), np.int64)
        for row, seq in enumerate(seqs):
            ids[row, width - len(seq.prompt_ids) :] = seq.prompt_ids
            mask[row, width - len(seq.prompt_ids) :] = 1
        logits, past = self.runner.run(ids, mask, self.runner.empty_past(len(seqs)), every_position)
        return logits, mask, past

    def add(self, seqs: list[Sequence]) -> None:
        """Prefill new sequences, sample their first token, and join them to the batch. A model fault
        in their prefill fails them alone: the running rows go on."""
        scored = [s.params.prompt_logprobs is not None for s in seqs]
        try:
            logits, mask, past = self.prefill(seqs, every_position=any(scored))
        except Exception as exc:  # noqa: BLE001 - a model fault in these prompts' run
            fail(seqs, exc)
            return
        if any(scored):
            for row, seq in enumerate(seqs):
                if scored[row]:
                    score_row(seq, logits[row, logits.shape[1] - len(seq.prompt_ids) :])
            logits = np.ascontiguousarray(logits[:, -1, :], dtype=np.float32)
        if self.seqs:
            width = max(self.mask.shape[1], mask.shape[1])
            past = self.kv_ops.merge(self.past, past, width)
            mask = np.concatenate([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.seqs, self.mask, self.past = self.seqs + seqs, mask, past
        self.last = np.concatenate([self.last, np.zeros(len(seqs), np.int64)])
        self._sample(logits, range(len(self.seqs) - len(seqs), len(self.seqs)))

    def step(self) -> None:
        """One decode step for every active sequence (those cancelled since the last step leave first)."""
        self._retire()
        if not self.seqs:
            return
        mask = np.concatenate([self.mask, np.ones((len(self.seqs), 1), np.int64)], axis=1)
        logits, self.past = self.runner.run(self.last[:, None], mask, self.past)
        self.mask = mask
        self._sample(logits, range(len(self.seqs)))

    def _sample(self, logits: np.ndarray, rows: range) -> None:
        """Pick a token for each of ``rows`` (``logits`` holds one row per entry of ``rows``)."""
        for k, row in enumerate(rows):
            self.last[row] = sample_row(self.seqs[row], logits[k], self.eos_ids)
        self._retire()

    def _retire(self) -> None:
        done = [i for i, s in enumerate(self.seqs) if s.done]
        if not done:
            return
        for i in done:
            self.seqs[i].finish(self.seqs[i].error)
        keep = [i for i in range(len(self.seqs)) if i not in set(done)]
        self.seqs = [self.seqs[i] for i in keep]
        if not keep:
            self._clear()
            return
        mask = self.mask[keep]
        start = int(np.argmax(mask.any(axis=0)))  # drop columns that are padding for every row left
        self.mask, self.last = mask[:, start:], self.last[keep]
        self.past = self.kv_ops.select(self.past, keep, start)

    def cancel_all(self, error: BaseException) -> None:
        """End every active sequence with ``error`` (a decode step failed); the batch is empty and usable."""
        seqs, self.seqs = self.seqs, []
        self._clear()
        fail(seqs, error)

    def _clear(self) -> None:
        self.mask, self.past, self.last = np.zeros((0, 0), np.int64), [], np.zeros(0, np.int64)

    def close(self) -> None:
        """Nothing to hand back: the cache lives and dies with the batch."""


def _pad_left(mask: np.ndarray, width: int) -> np.ndarray:
    return np.pad(mask, [(0, 0), (width - mask.shape[1], 0)])
