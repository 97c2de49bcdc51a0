"""A request and what happens to it: its status, how it finished, and the per-row work every batch
shares (sampling its next token with logprobs, scoring its prompt, finishing it, failing it alone).

As vLLM's ``Request``: a batch only decides which row runs when; everything about one row's tokens
happens here, once, whatever the KV strategy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from .detok import CONTEXT, TextStream, texts_in_context
from .errors import one_line
from .params import SamplingParams
from .sampling import log_probs, next_token

PAD_TOKEN = 0  # what stands in a row whose request samples nothing this step


class FinishReason(str, Enum):
    """Why a request ended; the value is what the Triton model sends as ``finish_reason``."""

    LENGTH = "length"  # max_tokens reached (or, with max_tokens 0, the prompt scored)
    EOS = "eos"  # an end-of-sequence token
    STOP = "stop"  # a stop string
    CANCELLED = "cancelled"  # by its consumer, or by a fault (then with an error: the consumer gets the error, not this)

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class RequestStatus(Enum):
    """Where a request is, as vLLM's ``RequestStatus``."""

    WAITING = "waiting"  # queued for a row
    PREFILLING = "prefilling"  # in a row, its long prompt being prefilled in chunks between decode steps
    RUNNING = "running"  # decoding
    FINISHED_STOPPED = "finished_stopped"  # EOS or a stop string
    FINISHED_LENGTH_CAPPED = "finished_length_capped"
    FINISHED_ABORTED = "finished_aborted"  # cancelled by its consumer
    FINISHED_ERROR = "finished_error"  # its own fault (a RowError) or a model run it was in failed

    @property
    def finished(self) -> bool:
        return self.name.startswith("FINISHED")


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's text and log-probability, and the most likely tokens at its position (id,
    text, log-probability), when the request asked for ``logprobs``."""

    token: int
    text: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


TokenCallback = Callable[[int, str, "TokenLogprob | None"], None]  # token id, text delta, its logprobs if asked
DoneCallback = Callable[["Completion | None", "BaseException | None"], None]  # the completion, or None and the error


@dataclass
class Completion:
    """The result of one request."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: FinishReason
    logprobs: list[TokenLogprob] | None = None  # one per generated token, when asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (None for the first), when asked for

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class RowError(RuntimeError):
    """Sampling or detokenizing one request failed (say, NaN logits): that request alone ends with it."""


_STATUS = {FinishReason.LENGTH: RequestStatus.FINISHED_LENGTH_CAPPED, FinishReason.EOS: RequestStatus.FINISHED_STOPPED,
           FinishReason.STOP: RequestStatus.FINISHED_STOPPED, FinishReason.CANCELLED: RequestStatus.FINISHED_ABORTED}


@dataclass(eq=False)
class Request:
    """One generation request, from the queue to its completion. Built and validated by
    ``Engine.request``; only :meth:`cancel` may be called from another thread."""

    prompt_ids: list[int]
    params: SamplingParams
    stream: TextStream
    on_token: TokenCallback | None = None
    on_done: DoneCallback | None = None
    adapter: str | None = None  # the adapter this request decodes with, by name; None: the model as exported (the base)
    lora: Any = None  # its registration (adapter_registry.Registered), resolved when the request was made
    slot: int = 0  # the LoRA slot its rows read (lora_ids), given when it joins the batch; 0: the base
    status: RequestStatus = RequestStatus.WAITING
    generated: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: FinishReason | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    completion: Completion | None = None
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.rng = np.random.default_rng(self.params.seed)
        if self.params.logprobs is not None:
            self.logprobs = []

    def cancel(self) -> None:
        """Ask the batch to drop this request before its next step (any thread)."""
        self.cancelled.set()

    @property
    def done(self) -> bool:
        """Finished, or cancelled by its consumer: it leaves its batch before the next step."""
        return self.finish_reason is not None or self.cancelled.is_set()

    def sample(self, logits: np.ndarray, eos_ids: frozenset[int]) -> int:
        """Sample the next token from this request's logits ``[V]`` and record it (with its logprobs, if
        asked); a request for no tokens (a prompt to score) ends here instead. Returns the token, or
        :data:`PAD_TOKEN` to stand in its row where it sampled none.

        Whatever fails here (sampling, say on NaN logits; detokenizing; the consumer's callback) ends this
        request alone, with a :class:`RowError`; the other rows go on."""
        if self.done:  # cancelled since the step began, or its prompt failed to score: it leaves after this step
            return PAD_TOKEN
        if self.params.max_tokens == 0:
            self.finish_reason = FinishReason.LENGTH
            return PAD_TOKEN
        try:
            token = next_token(logits, self.params, self.rng, self.prompt_ids, self.generated, eos_ids)
            logprob = None
            if self.params.logprobs is not None:
                [(value, top)] = log_probs(logits[None], [token], self.params.logprobs)
                text, *texts = self.stream.token_texts([token, *(i for i, _ in top)])
                logprob = TokenLogprob(token, text, value, tuple((i, t, v) for (i, v), t in zip(top, texts)))
            self._accept(token, eos_ids, logprob)
        except Exception as exc:  # noqa: BLE001 - this row's fault: drop only this request
            self._row_error(f"generating token {len(self.generated) + 1} of this request failed: {one_line(exc)}")
            return PAD_TOKEN
        return token

    def score_prompt(self, logits: np.ndarray) -> None:
        """Record each prompt token's log-probability given the tokens before it, from the prompt's
        logits ``[T, V]`` (position ``j`` predicts token ``j + 1``); the first token has none. A failure
        ends this request alone, as in :meth:`sample`."""
        try:
            ids, k = self.prompt_ids, self.params.prompt_logprobs
            scored = log_probs(logits[:-1], ids[1:], k)
            contexts = [ids[max(0, i - CONTEXT) : i] for i in range(1, len(ids))]
            texts = texts_in_context(self.stream.tokenizer, contexts,
                                     [[ids[i + 1], *(t for t, _ in top)] for i, (_, top) in enumerate(scored)])
            self.prompt_logprobs = [None] + [
                TokenLogprob(ids[i + 1], text, value, tuple((t, tt, v) for (t, v), tt in zip(top, alt_texts)))
                for i, ((value, top), (text, *alt_texts)) in enumerate(zip(scored, texts))]
        except Exception as exc:  # noqa: BLE001 - this row's fault: drop only this request
            self._row_error(f"scoring the prompt of this request failed: {one_line(exc)}")

    def finish(self) -> None:
        """Build the completion and hand it (or the request's error) to the consumer."""
        self.finish_reason = self.finish_reason or FinishReason.CANCELLED
        self.status = RequestStatus.FINISHED_ERROR if self.error is not None else _STATUS[self.finish_reason]
        self.completion = Completion(self.stream.text, self.generated, len(self.prompt_ids), self.finish_reason,
                                     self.logprobs, self.prompt_logprobs)
        if self.on_done is not None:
            self.on_done(None if self.error is not None else self.completion, self.error)

    def fail(self, error: BaseException) -> None:
        """End with ``error`` (a model run this request was in failed, or the engine is shutting down)."""
        self.error = self.error or error
        self.finish()

    def _accept(self, token: int, eos_ids: frozenset[int], logprob: TokenLogprob | None) -> None:
        """Record a sampled token, stream its text, and decide whether the request is done."""
        self.generated.append(token)
        if logprob is not None:
            self.logprobs.append(logprob)
        if token in eos_ids and not self.params.ignore_eos:
            self.finish_reason, delta = FinishReason.EOS, self.stream.finish()
        else:
            delta = self.stream.push(token)
            if self.stream.stopped:
                self.finish_reason = FinishReason.STOP
            elif len(self.generated) >= self.params.max_tokens:
                delta += self.stream.finish()
                self.finish_reason = FinishReason.STOP if self.stream.stopped else FinishReason.LENGTH
        if self.on_token is not None:
            self.on_token(token, delta, logprob)

    def _row_error(self, message: str) -> None:
        self.finish_reason = FinishReason.CANCELLED
        self.error = RowError(message)
