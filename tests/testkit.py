"""Helpers every test folder shares (tests/conftest.py puts this folder on ``sys.path``; importlib import mode)."""

from __future__ import annotations

import json
import queue
import urllib.error
import urllib.request

import numpy as np

SHORT_CONTEXT = 48  # the context of ``tiny-short`` on the session's plain_triton (tests/conftest.py)


def grpc_stream(url: str, model: str, fields: dict[str, np.ndarray], headers: dict | None = None,
                timeout: float = 60) -> list[dict[str, np.ndarray]] | str:
    """One request on a decoupled gRPC stream (tritonclient): each response's outputs as numpy arrays, up to
    the final response, or the error text. ``fields`` maps input names to numpy arrays (the dtype picks the
    Triton type unless it is already a Triton type name, as ``(datatype, array)``)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    events: queue.Queue = queue.Queue()

    def callback(result, error):
        if error is not None:
            events.put(str(error))
            return
        response = result.get_response()
        if response.outputs:
            events.put({o.name: result.as_numpy(o.name) for o in response.outputs})
        if response.parameters["triton_final_response"].bool_param:
            events.put(None)

    client = grpcclient.InferenceServerClient(url)
    client.start_stream(callback=callback, headers=headers)
    try:
        inputs = []
        for name, value in fields.items():
            datatype, arr = value if isinstance(value, tuple) else (np_to_triton_dtype(value.dtype), value)
            tensor = grpcclient.InferInput(name, list(arr.shape), datatype)
            tensor.set_data_from_numpy(arr)
            inputs.append(tensor)
        try:
            client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        except InferenceServerException:  # the stream died before the send; the cause went to the callback
            pass
        responses = []
        while (event := events.get(timeout=timeout)) is not None:
            if isinstance(event, str):
                return event
            responses.append(event)
        return responses
    finally:
        client.stop_stream()
        client.close()


def scalars(outputs: dict[str, np.ndarray]) -> dict:
    """A response's outputs as Python values (text decoded, numbers as int or float)."""
    return {k: (v.reshape(-1)[0].decode() if v.dtype == object else v.reshape(-1)[0].item()) for k, v in outputs.items()}


def metrics_text(url: str) -> str:
    """Triton's Prometheus /metrics page."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def post_json(url: str, body: dict | bytes, headers: dict | None = None, timeout: float = 60) -> tuple[int, bytes]:
    """POST JSON (or bytes as they are) with urllib, not a client under test: (status, body) for successes and
    HTTP errors alike."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
