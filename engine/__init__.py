"""The ONNX Runtime generation engine (numpy, onnxruntime and tokenizers only).

It is copied verbatim into Triton model versions, so it uses relative imports only, besides the
zero-import ``loraship_contract`` (its limits), which is copied beside it.
"""

from .batch import Completion, TokenLogprob
from .engine import Engine
from .errors import RequestError
from .params import SamplingParams

__all__ = ["Completion", "Engine", "RequestError", "SamplingParams", "TokenLogprob"]
