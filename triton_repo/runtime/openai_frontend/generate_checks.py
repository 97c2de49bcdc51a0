"""The /v2 generate bodies the edge checks before Triton sees them (:func:`check_generate`): Triton's JSON
parser answers 500 for a wrong type and wraps integers into int32, and its HTTP parser ignores an input
the model does not have."""

from __future__ import annotations

import json
import math
from typing import Any

from loraship_contract import LORA_NAME

from .errors import SURROGATE, ApiError, shown
from .triton import Schema

INT_RANGES = {f"TYPE_{kind}{bits}": ((-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if kind == "INT" else (0, 2**bits - 1))
              for kind in ("INT", "UINT") for bits in (8, 16, 32, 64)}
FLOAT_MAX = {"TYPE_FP16": 65504.0, "TYPE_BF16": 3.3895313892515355e38, "TYPE_FP32": 3.4028234663852886e38,
             "TYPE_FP64": 1.7976931348623157e308}


class _Duplicate(ValueError):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    for key in keys:
        if keys.count(key) > 1:
            raise _Duplicate(f"input {_quoted(key)} is given twice: send each input once")
    return dict(pairs)


def _quoted(name: str) -> str:
    """A client's key for a message, in Triton's quotes ('name'), escaped (see :func:`shown`)."""
    return f"'{shown(name)[1:-1]}'"


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def check_generate(raw: bytes, schema: Schema, model: str, stream: bool) -> dict[str, Any]:
    """The parsed body of a /v2 generate (``stream``: generate_stream) request, or a 400 ApiError naming
    what is wrong and the fix: not a JSON object, an input the model does not have (Triton's HTTP
    parser ignores it; its gRPC one refuses it with these words), a value of the wrong JSON type or
    outside its Triton type (Triton answers 500 for the first and wraps integers into int32), a string
    UTF-8 cannot encode, or ``"stream": true`` on /generate (which answers once)."""
    try:
        body = json.loads(raw, object_pairs_hook=_unique, parse_constant=_no_constant) if raw.strip() else None
    except _Duplicate as exc:
        raise ApiError(400, str(exc)) from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({str(exc)[:120]}): send a JSON object of the model's inputs, "
                            f'e.g. {{"text_input": "Hello", "max_tokens": 32}}') from None
    if not isinstance(body, dict):
        kind = "empty" if body is None else f"a JSON {type(body).__name__}"
        raise ApiError(400, f"the request body is {kind}, not a JSON object: send the model's inputs, "
                            f'e.g. {{"text_input": "Hello", "max_tokens": 32}}')
    for key, value in body.items():
        if key == "id":
            if not isinstance(value, str) or SURROGATE.search(value):
                raise ApiError(400, f"id must be a string of valid Unicode, not {shown(value)}")
        elif key == "parameters":
            if not isinstance(value, dict):
                raise ApiError(400, f"parameters must be a JSON object of request parameters, not {shown(value)}")
            for name, item in value.items():
                if name in schema.inputs:  # Triton takes a parameter named like an input as that input
                    if name in body:
                        raise ApiError(400, f"input {_quoted(name)} is given twice (also in parameters): send it once")
                    _check_input(model, name, item, schema)
                elif SURROGATE.search(name) or not _parameter_ok(item):
                    raise ApiError(400, f"parameter {_quoted(name)} must be a string, a boolean, an integer within int64 "
                                        f"or a finite number, not {shown(item)}")
        elif key in schema.inputs:
            _check_input(model, key, value, schema)
        elif key == LORA_NAME:  # Triton passes a key that names no input as a request parameter: the adapter
            if not isinstance(value, str) or SURROGATE.search(value):
                raise ApiError(400, f"{LORA_NAME} must be an adapter's name (a string), not {shown(value)}")
        else:
            raise ApiError(400, f"unexpected inference input {_quoted(key)} for model '{model}': its inputs are "
                                f"{', '.join(schema.inputs)} (GET /v2/models/{model}/config lists them with their types)")
    if not stream and body.get("stream") in (True, [True]):
        raise ApiError(400, f'"stream": true is for POST /v2/models/{model}/generate_stream: /generate answers once; '
                            f'send "stream": false here, or use generate_stream')
    return body


def _parameter_ok(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    if isinstance(value, int):
        return INT_RANGES["TYPE_INT64"][0] <= value <= INT_RANGES["TYPE_INT64"][1]
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and not SURROGATE.search(value)


def _check_input(model: str, name: str, value: Any, schema: Schema) -> None:
    """A 400 unless ``value`` (one value, or a flat list of them) fits the input's Triton type and count."""
    dtype, dims = schema.inputs[name]
    where = f"input '{name}' of model '{model}' is {dtype}"
    if value is None:
        raise ApiError(400, f"input '{name}' is null: send a value, or leave the input out for its default")
    values = value if isinstance(value, list) else [value]
    if any(isinstance(v, (list, dict)) for v in values):
        raise ApiError(400, f"{where}: send a value or a flat list of values, not {shown(value)}")
    if not schema.batching and dims and all(d > 0 for d in dims) and len(values) != math.prod(dims):
        count = math.prod(dims)
        raise ApiError(400, f"{where} with {count} value{'s' if count > 1 else ''}, not {len(values)}: send "
                            + ("one value" if count == 1 else f"a list of {count}"))
    for v in values:
        if dtype == "TYPE_STRING":
            if not isinstance(v, str):
                raise ApiError(400, f"{where}: send a JSON string, not {shown(v)}")
            if SURROGATE.search(v):
                raise ApiError(400, f"input '{name}' is not valid Unicode (it holds a lone surrogate such as \\ud800): send UTF-8 text")
        elif dtype == "TYPE_BOOL":
            if not isinstance(v, bool):
                raise ApiError(400, f"{where}: send true or false, not {shown(v)}")
        elif dtype in INT_RANGES:
            lo, hi = INT_RANGES[dtype]
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ApiError(400, f"{where}: send an integer in [{lo}, {hi}], not {shown(v)}")
        elif dtype in FLOAT_MAX:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not abs(v) <= FLOAT_MAX[dtype]:
                raise ApiError(400, f"{where}: send a finite number within {FLOAT_MAX[dtype]:.6g} in magnitude, not {shown(v)}")

