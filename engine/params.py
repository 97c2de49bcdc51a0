"""Sampling parameters and their validation."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens: ``temperature == 0`` means greedy."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def validate(self, prompt_tokens: int, max_context: int) -> None:
        """Raise :class:`RequestError` if these parameters cannot be served."""
        if prompt_tokens <= 0:
            raise RequestError("empty prompt: send a non-empty text_input")
        if self.max_tokens <= 0:
            raise RequestError(f"max_tokens must be positive, got {self.max_tokens}")
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
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0, got {self.top_k}")
        if any(not s for s in self.stop):
            raise RequestError("stop strings must be non-empty")
