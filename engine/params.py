"""Sampling parameters and their validation."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

# The contract is copied beside the engine wherever it goes; its defaults are what a request leaves out.
from loraship_contract import INT32_MAX, MAX_LOGPROBS
from loraship_contract import SAMPLING_DEFAULTS as _DEFAULT

from .errors import RequestError

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily, as vLLM's do (dividing by less overflows)
_FLOATS = ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
_INTS = ("max_tokens", "top_k", "min_tokens", "seed", "logprobs", "prompt_logprobs")
_OPTIONAL = ("seed", "logprobs", "prompt_logprobs")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens: ``temperature == 0`` means greedy.

    The penalties follow vLLM: ``repetition_penalty`` (1 = off) divides the positive logits and
    multiplies the negative ones of every token already in the prompt or the output;
    ``frequency_penalty`` and ``presence_penalty`` (0 = off) subtract ``count`` and ``1`` times
    themselves from the logits of tokens already in the output. ``min_tokens`` holds back EOS
    until that many tokens are out; ``ignore_eos`` keeps generating past EOS up to ``max_tokens``.
    Stop strings still apply in both cases. ``logprobs`` (``None``: off) records each generated
    token's log-probability under the model (before any penalty or temperature) and that many of the
    most likely tokens at its position, with theirs; ``prompt_logprobs`` does the same for each prompt
    token after the first, given the tokens before it (vLLM's name); with it, ``max_tokens`` may be 0:
    the prompt is scored and nothing generated.
    """

    max_tokens: int = 64
    temperature: float = _DEFAULT["temperature"]
    top_p: float = _DEFAULT["top_p"]
    top_k: int = _DEFAULT["top_k"]
    seed: int | None = _DEFAULT["seed"]
    stop: tuple[str, ...] = _DEFAULT["stop"]
    repetition_penalty: float = _DEFAULT["repetition_penalty"]
    presence_penalty: float = _DEFAULT["presence_penalty"]
    frequency_penalty: float = _DEFAULT["frequency_penalty"]
    min_tokens: int = _DEFAULT["min_tokens"]
    ignore_eos: bool = _DEFAULT["ignore_eos"]
    logprobs: int | None = _DEFAULT["logprobs"]
    prompt_logprobs: int | None = _DEFAULT["prompt_logprobs"]

    @property
    def penalized(self) -> bool:
        """Whether any penalty changes the logits."""
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self, prompt_tokens: int, max_context: int) -> None:
        """Raise :class:`RequestError`, in one line naming the parameter, if these parameters cannot be
        served: every number finite, of its type and in its range."""
        self.check_types()
        if prompt_tokens <= 0:
            raise RequestError("empty prompt: send a non-empty text_input")
        if self.max_tokens <= 0 and not (self.max_tokens == 0 and self.prompt_logprobs is not None):
            raise RequestError(f"max_tokens must be positive (0 only to score the prompt, with prompt_logprobs), got {self.max_tokens}")
        if prompt_tokens >= max_context:
            raise RequestError(
                f"prompt is {prompt_tokens} tokens but the model's context is {max_context}; shorten the prompt"
            )
        if prompt_tokens + self.max_tokens > max_context:
            raise RequestError(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({self.max_tokens}) exceeds the context of "
                f"{max_context} tokens; lower max_tokens to at most {max_context - prompt_tokens}"
            )
        if not self.temperature >= 0.0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.top_k <= INT32_MAX:
            raise RequestError(f"top_k must be in [0, 2**31) (0 is off), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise RequestError(f"seed must be in [0, 2**64), got {self.seed}")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must be non-empty")
        if not self.repetition_penalty > 0.0:
            raise RequestError(f"repetition_penalty must be > 0 (1 is off), got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise RequestError(f"{name} must be in [-2, 2] (0 is off), got {getattr(self, name)}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise RequestError(f"{name} must be in [0, {MAX_LOGPROBS}] (the most likely tokens listed per position), got {k}")

    def check_types(self) -> None:
        """Numbers of the right kind and finite (bools are not numbers); stop is strings; ignore_eos a bool."""
        for name in _FLOATS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
                raise RequestError(f"{name} must be a finite number, got {value!r}")
        for name in _INTS:
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if isinstance(value, bool) or not isinstance(value, Integral):
                raise RequestError(f"{name} must be an integer, got {value!r}")
        if not isinstance(self.ignore_eos, bool):
            raise RequestError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        if not isinstance(self.stop, (tuple, list)) or not all(isinstance(s, str) for s in self.stop):
            raise RequestError("stop must be strings")
