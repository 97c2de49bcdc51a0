"""The generate model's request inputs, parsed: sampling parameters and answer options from whichever naming
convention a request uses (``loraship_contract.INPUTS``: loraship's own, TensorRT-LLM's ensemble, vLLM's
``sampling_parameters``), each value checked, one value given twice refused.

Copied beside ``model.py`` into every model version by `loraship repo` (with ``loraship_contract.py`` and
``loraship_engine``); it needs no Triton, only numpy and the engine.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from loraship_contract import ADAPTERS_QUERY, LORA_NAME, VLLM_NEUTRAL_KEYS, VLLM_SAMPLING_KEYS, sampling_inputs
from loraship_engine import RequestError, SamplingParams

#: A request's inputs: name -> its values, flattened.
Inputs = dict[str, np.ndarray]

# Request parameters Triton defines ("id": the generate extension passes a body's request id as one). Any
# other parameter is a key of a /generate JSON body that names no input (gRPC refuses an unknown input
# itself; HTTP's generate extension passes it on as a parameter).
TRITON_PARAMETERS = {"id", "sequence_id", "sequence_start", "sequence_end", "priority", "timeout", "binary_data_output"}
# Request parameters of this model: the adapter (Triton's vLLM backend's name) and the adapters query.
MODEL_PARAMETERS = {LORA_NAME, ADAPTERS_QUERY}
_CASTS: dict[str, Callable[[Any], Any]] = {"TYPE_INT32": int, "TYPE_UINT64": int, "TYPE_FP32": float, "TYPE_BOOL": bool}
# Input tensor -> (SamplingParams field, cast) for the single values; the string lists (stop, stop_words) apart.
SAMPLING_INPUTS = {name: (spec.field, _CASTS[spec.dtype]) for name, spec in sampling_inputs().items() if spec.dtype in _CASTS}
STOP_INPUTS = tuple(name for name, spec in sampling_inputs().items() if spec.dtype == "TYPE_STRING")


def request_parameters(request: Any) -> dict[str, Any]:
    """A Triton request's parameters (a /generate body's keys that name no input; gRPC's request parameters)."""
    try:
        parameters = json.loads(request.parameters() or "{}")
    except (AttributeError, TypeError, ValueError):
        return {}
    return parameters if isinstance(parameters, dict) else {}


def unknown_parameter(parameters: dict[str, Any]) -> str | None:
    """The first request parameter that is neither Triton's, this model's nor an input (HTTP's beam_width), or None."""
    return next((k for k in sorted(parameters) if k not in TRITON_PARAMETERS and k not in MODEL_PARAMETERS
                 and not k.startswith("triton_")), None)


def adapter_name(inputs: Inputs, parameters: dict[str, Any]) -> str | None:
    """The adapter a request chooses, as Triton's vLLM backend takes it: ``lora_name`` in sampling_parameters,
    or the request parameter ``lora_name``; None (absent, null or empty) is the base model."""
    chosen = {where: value for where, value in ((f"sampling_parameters.{LORA_NAME}", _sampling_json(inputs).get(LORA_NAME)),
                                                (LORA_NAME, parameters.get(LORA_NAME))) if value not in (None, "")}
    for where, value in chosen.items():
        if not isinstance(value, str):
            raise RequestError(f"{where} must be an adapter's name (a string), got {_short(value)}")
    if len(set(chosen.values())) > 1:
        raise RequestError(f"{' and '.join(chosen)} name different adapters; send it once")
    return next(iter(chosen.values()), None)


def scalar(inputs: Inputs, name: str, default: Any, cast: Callable[[Any], Any]) -> Any:
    """The one value of input ``name`` as ``cast`` makes it, or ``default`` when it is left out."""
    values = inputs.get(name)
    if values is None:
        return default
    if values.size != 1:
        raise RequestError(f"{name} must hold exactly one value, got {values.size}")
    return cast(values[0])


def text(value: Any, name: str) -> str:
    """A BYTES value as text; bytes UTF-8 cannot decode are the client's error."""
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"{name} is not valid UTF-8 text") from None


class Options:
    """How to answer a request: stream, echo the prompt, and the vLLM-style token counts."""

    def __init__(self, inputs: Inputs) -> None:
        self.stream = bool(scalar(inputs, "stream", False, bool))
        self.echo = not scalar(inputs, "exclude_input_in_output", True, bool)
        self.num_input_tokens = bool(scalar(inputs, "return_num_input_tokens", False, bool))
        self.num_output_tokens = bool(scalar(inputs, "return_num_output_tokens", False, bool))


def sampling_params(inputs: Inputs, default_max_tokens: int) -> SamplingParams:
    """SamplingParams from whichever convention the request uses; one value given twice is an error.
    A request without max_tokens gets ``default_max_tokens``."""
    given: dict[str, tuple[Any, str]] = {}  # field -> (value, where it came from)

    def put(field: str, value: Any, where: str) -> None:
        if field in given:
            raise RequestError(f"{where} and {given[field][1]} both set {field}; send it once")
        given[field] = (value, where)

    for name, (field, cast) in SAMPLING_INPUTS.items():
        value = scalar(inputs, name, None, cast)
        if value is not None:
            put(field, value, name)
    for name in STOP_INPUTS:
        values = inputs.get(name)
        if values is not None:
            put("stop", tuple(text(s, name) for s in values), name)
    for key, value in vllm_sampling_parameters(inputs).items():
        put(key, value, f"sampling_parameters.{key}")
    fields = {field: value for field, (value, _) in given.items()}
    fields.setdefault("max_tokens", default_max_tokens)
    return SamplingParams(**fields)


def vllm_sampling_parameters(inputs: Inputs) -> dict[str, Any]:
    """The fields of a vLLM ``sampling_parameters`` JSON object. Like vLLM's Triton backend, numbers
    may come as strings (genai-perf sends ``{"max_tokens": "32"}``), nulls are left out, top_k -1 is off."""
    fields = {}
    for key, value in _sampling_json(inputs).items():
        if key == LORA_NAME:  # the adapter: adapter_name()
            continue
        if key in VLLM_NEUTRAL_KEYS:
            _neutral(f"sampling_parameters.{key}", value, VLLM_NEUTRAL_KEYS[key])
            continue
        kind = VLLM_SAMPLING_KEYS.get(key)
        if kind is None:
            raise RequestError(f"sampling_parameters.{key} is not supported; use {', '.join(VLLM_SAMPLING_KEYS)}")
        if value is not None:
            fields[key] = _json_value(f"sampling_parameters.{key}", value, kind)
    if fields.get("top_k") == -1:
        fields["top_k"] = 0
    return fields


def _sampling_json(inputs: Inputs) -> dict[str, Any]:
    """The sampling_parameters input as a JSON object ({} when it is left out or empty)."""
    values = inputs.get("sampling_parameters")
    if values is None:
        return {}
    if values.size != 1:
        raise RequestError(f"sampling_parameters must hold one JSON object, got {values.size} values")
    raw = text(values[0], "sampling_parameters")
    try:
        params = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError):
        raise RequestError('sampling_parameters is not valid JSON: send an object such as {"max_tokens": 32}') from None
    if not isinstance(params, dict):
        raise RequestError('sampling_parameters must be a JSON object, such as {"max_tokens": 32}')
    return params


def _json_value(name: str, value: Any, kind: str) -> Any:
    """``value`` of a sampling_parameters key as the kind the engine takes."""
    if kind == "strings":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise RequestError(f"{name} must be a string or a list of strings")
        return tuple(items)
    if kind == "bool":
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise RequestError(f"{name} must be true or false, got {_short(value)}")
        return value
    try:
        if isinstance(value, bool) or isinstance(value, (list, dict)):
            raise ValueError
        number = float(value) if kind == "float" else int(value if isinstance(value, int) else str(value).strip())
    except (ValueError, OverflowError):
        raise RequestError(f"{name} must be {'a number' if kind == 'float' else 'an integer'}, got {_short(value)}") from None
    if kind == "float" and not math.isfinite(number):
        raise RequestError(f"{name} must be a finite number, got {_short(value)}")
    low, high, bounds = (0, 2**64, "[0, 2**64)") if kind == "uint64" else (-(2**31), 2**31, "[-2**31, 2**31)")
    if kind != "float" and not low <= number < high:
        raise RequestError(f"{name} must be in {bounds}, got {_short(value)}")
    return number


def _short(value: Any) -> str:
    """``value`` as the error message shows it: at most 40 characters."""
    shown = repr(value)
    return shown if len(shown) <= 40 else shown[:37] + "..."


def _neutral(name: str, value: Any, allowed: tuple[Any, ...]) -> None:
    """Accept ``value`` only if it is null or asks for nothing (n=1, logprobs=false, ...); numbers and
    booleans may come as strings, as in the other keys."""
    if isinstance(value, str):
        try:
            value = json.loads(value.strip().lower())
        except ValueError:
            pass
    if value is None or any(type(value) is type(a) and value == a for a in allowed):
        return
    if allowed[0] == 1:
        raise RequestError(f"{name} must be 1: one completion per request")
    raise RequestError(f"{name} is not supported; leave it out or send {json.dumps(allowed[0])}")
