"""The ONNX Runtime generation engine (numpy, onnxruntime and tokenizers only).

It is copied verbatim into Triton model versions, so it uses relative imports only, besides the
zero-import ``loraship_contract`` (its limits and defaults), which is copied beside it. Its names load
on first use (PEP 562), so ``integrity`` and ``manifest`` (hashing an export, reading its manifest)
never import onnxruntime or numpy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {  # name -> the module that defines it
    "AdapterRegistry": "adapter_registry",
    "Completion": "request",
    "Engine": "engine",
    "FinishReason": "request",
    "Manifest": "manifest",
    "Request": "request",
    "RequestError": "errors",
    "RequestStatus": "request",
    "SamplingParams": "params",
    "TokenLogprob": "request",
    "UnknownAdapter": "adapter_registry",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .adapter_registry import AdapterRegistry, UnknownAdapter
    from .engine import Engine
    from .errors import RequestError
    from .manifest import Manifest
    from .params import SamplingParams
    from .request import Completion, FinishReason, Request, RequestStatus, TokenLogprob


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
