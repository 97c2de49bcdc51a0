"""What a request asks for: the prompt (text or a chat) and one `SamplingOptions`, and the generate model's
inputs they become."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from loraship_contract import LORASHIP, sampling_inputs
from loraship_contract import SAMPLING_DEFAULTS as MODEL_DEFAULTS

from loraship.client.errors import EndpointError

#: The generate model's optional inputs (loraship's names) and the defaults it applies when a request leaves them
#: out, read from its input contract; stop None here: no stop strings, as the model's empty list.
OPTION_DEFAULTS: dict[str, Any] = {name: MODEL_DEFAULTS[spec.field] for name, spec in sampling_inputs(LORASHIP).items()
                                   if name not in ("max_tokens", "logprobs", "prompt_logprobs")} | {"stop": None}

#: A prompt is raw text (``text_input``) or a chat: a list of ``{"role", "content"}`` messages that the
#: server renders with the model's chat template (``messages``).
Prompt = str | Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class SamplingOptions:
    """How to generate: ``max_tokens`` (always sent), and the model's optional inputs at the model's own
    defaults (`OPTION_DEFAULTS`; those left at them are not sent)."""

    max_tokens: int = 64
    temperature: float = OPTION_DEFAULTS["temperature"]
    top_p: float = OPTION_DEFAULTS["top_p"]
    top_k: int = OPTION_DEFAULTS["top_k"]
    seed: int | None = OPTION_DEFAULTS["seed"]
    stop: str | list[str] | None = OPTION_DEFAULTS["stop"]
    repetition_penalty: float = OPTION_DEFAULTS["repetition_penalty"]
    presence_penalty: float = OPTION_DEFAULTS["presence_penalty"]
    frequency_penalty: float = OPTION_DEFAULTS["frequency_penalty"]
    ignore_eos: bool = OPTION_DEFAULTS["ignore_eos"]

    @classmethod
    def of(cls, options: SamplingOptions | None = None, **changes: Any) -> SamplingOptions:
        """``options`` (default: the defaults) with ``changes``; an unknown name is refused in one line."""
        unknown = set(changes) - {f.name for f in fields(cls)}
        if unknown:
            raise EndpointError(f"unknown sampling option(s) {', '.join(sorted(unknown))}", f"use {', '.join(OPTION_DEFAULTS)}")
        return replace(options or cls(), **changes)

    def changed(self) -> dict[str, Any]:
        """The optional inputs that differ from the model's defaults (what a request must send)."""
        values = asdict(self)
        return {name: values[name] for name, default in OPTION_DEFAULTS.items()
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
