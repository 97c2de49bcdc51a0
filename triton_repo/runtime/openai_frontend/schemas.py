"""The OpenAI request bodies this frontend takes (pydantic): /v1/chat/completions and /v1/completions."""

from __future__ import annotations

from typing import Any

from loraship_contract import INT32_MAX, MAX_LOGPROBS
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .errors import ApiError, surrogate_at

MAX_CHOICES = 128  # OpenAI's limit on n


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields /v1/completions and /v1/chat/completions share; unknown fields are ignored, as OpenAI's
    optional ones are here (``user``, ``metadata``, ...)."""

    model: str
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        """400 naming the parameter for a string UTF-8 cannot encode (a lone surrogate), before it gets further."""
        if (param := surrogate_at(data)) is not None:
            raise ApiError(400, f"{param} is not valid Unicode (it holds a lone surrogate such as \\ud800): send UTF-8 text",
                           param=param)
        return data


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: the template may use them
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0, le=INT32_MAX)  # 0: score the prompt (echo and logprobs), generate nothing
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None


class LoadLoraRequest(BaseModel):
    """vLLM's ``POST /v1/load_lora_adapter`` body; ``model`` (loraship's) names the base model when several take adapters."""

    lora_name: str = ""
    lora_path: str = ""
    model: str | None = None


class UnloadLoraRequest(BaseModel):
    """vLLM's ``POST /v1/unload_lora_adapter`` body (``lora_int_id`` is accepted and unused, as in vLLM)."""

    lora_name: str = ""
    lora_int_id: int | None = None
