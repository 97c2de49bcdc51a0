"""What a request asks for: the prompt (text or a chat) and one `SamplingOptions`, and the generate model's
inputs they become."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from loraship.client.errors import EndpointError

#: The generate model's optional inputs and the defaults it applies when a request leaves them out
#: (read here only: once triton_repo writes the model's input contract down, import it in this line's place).
SAMPLING_DEFAULTS: dict[str, Any] = {
    "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None, "stop": None,
    "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "ignore_eos": False,
}

#: A prompt is raw text (``text_input``) or a chat: a list of ``{"role", "content"}`` messages that the
#: server renders with the model's chat template (``messages``).
Prompt = str | Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class SamplingOptions:
    """How to generate: ``max_tokens`` (always sent), and the model's optional inputs at the model's own
    defaults (`SAMPLING_DEFAULTS`; those left at them are not sent)."""

    max_tokens: int = 64
    temperature: float = SAMPLING_DEFAULTS["temperature"]
    top_p: float = SAMPLING_DEFAULTS["top_p"]
    top_k: int = SAMPLING_DEFAULTS["top_k"]
    seed: int | None = SAMPLING_DEFAULTS["seed"]
    stop: str | list[str] | None = SAMPLING_DEFAULTS["stop"]
    repetition_penalty: float = SAMPLING_DEFAULTS["repetition_penalty"]
    presence_penalty: float = SAMPLING_DEFAULTS["presence_penalty"]
    frequency_penalty: float = SAMPLING_DEFAULTS["frequency_penalty"]
    ignore_eos: bool = SAMPLING_DEFAULTS["ignore_eos"]

    @classmethod
    def of(cls, options: SamplingOptions | None = None, **changes: Any) -> SamplingOptions:
        """``options`` (default: the defaults) with ``changes``; an unknown name is refused in one line."""
        unknown = set(changes) - {f.name for f in fields(cls)}
        if unknown:
            raise EndpointError(f"unknown sampling option(s) {', '.join(sorted(unknown))}", f"use {', '.join(SAMPLING_DEFAULTS)}")
        return replace(options or cls(), **changes)

    def changed(self) -> dict[str, Any]:
        """The optional inputs that differ from the model's defaults (what a request must send)."""
        values = asdict(self)
        return {name: values[name] for name, default in SAMPLING_DEFAULTS.items()
                if values[name] is not None and values[name] != default}


def request_values(model: str, inputs: Mapping[str, str], prompt: Prompt, options: SamplingOptions,
                   stream: bool) -> dict[str, Any]:
    """Input name -> value of one request to ``model``, whose inputs are ``inputs`` (name -> Triton datatype);
    optional inputs that hold their defaults are left out, and one the model lacks is refused."""
    values: dict[str, Any] = {"max_tokens": int(options.max_tokens), "stream": stream}
    if isinstance(prompt, str):
        values["text_input"] = prompt
    elif "messages" not in inputs:
        raise EndpointError(f"model {model!r} takes no chat messages (its repository predates them)",
                            "rebuild it with `loraship repo`, or send the prompt as text")
    else:
        values["messages"] = json.dumps([dict(m) for m in prompt], ensure_ascii=False)
    for name, value in options.changed().items():
        if name not in inputs:
            raise EndpointError(f"model {model!r} takes no {name!r} input", f"leave {name} at its default")
        values[name] = value
    return values
