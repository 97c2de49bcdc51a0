"""How a `Client` talks to Triton: one `Transport` interface, over HTTP or gRPC.

Both sit on tritonclient's public API for health, metadata and configs. HTTP generates through Triton's
generate extension (``/generate`` and the ``/generate_stream`` server-sent events) on a geventhttpclient
connection, the HTTP stack tritonclient.http itself runs on (its ``infer`` refuses decoupled models);
gRPC through a decoupled bidirectional stream. Each transport is one connection: use it from one thread.
"""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from typing import Any, Protocol

from loraship.client.errors import EndpointError, ServerError
from loraship.client.url import Endpoint
from loraship.endpoint import API_KEY_HEADER, GRPC_API_KEY_HEADER

#: One response of a request: its fields (outputs and parameters as plain Python values), and when it
#: arrived in seconds since the request started.
Response = tuple[dict[str, Any], float]
#: What a request sends: input name -> (Triton datatype, value).
Inputs = dict[str, tuple[str, Any]]


class Transport(Protocol):
    """One connection to a Triton server, with the API key on every call."""

    def server_live(self) -> bool: ...

    def server_ready(self) -> bool: ...

    def model_ready(self, model: str) -> bool: ...

    def models(self) -> list[tuple[str, str]]:
        """(name, state) of each model in the repository index."""
        ...

    def model_inputs(self, model: str) -> dict[str, str]:
        """Input name -> Triton datatype."""
        ...

    def model_parameter(self, model: str, name: str) -> str | None:
        """A string parameter of the model's config (None if it has none of that name)."""
        ...

    def generate(self, model: str, inputs: Inputs, stream: bool) -> Iterator[Response]:
        """Send one request and yield its responses (one unless ``stream``); the server's errors raise `ServerError`."""
        ...

    def close(self) -> None: ...


def key_headers(protocol: str, api_key: str | None) -> dict[str, str]:
    """The API-key headers (gRPC metadata) every call carries: over gRPC both names, so servers with or
    without Triton's gRPC prefix accept it."""
    if not api_key:
        return {}
    if protocol == "grpc":
        return {API_KEY_HEADER: api_key, GRPC_API_KEY_HEADER: api_key}
    return {API_KEY_HEADER: api_key}


def open_transport(endpoint: Endpoint, api_key: str | None, timeout: float) -> Transport:
    """A transport of ``endpoint``'s protocol (connections open on first use)."""
    cls = HttpTransport if endpoint.protocol == "http" else GrpcTransport
    return cls(endpoint, key_headers(endpoint.protocol, api_key), timeout)


def scalar(value: Any) -> Any:
    """A JSON/numpy output value as a plain Python scalar."""
    if isinstance(value, list):
        value = value[0] if value else None
    if hasattr(value, "reshape"):
        value = value.reshape(-1)[0] if value.size else None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value.item() if hasattr(value, "item") else value


class HttpTransport:
    """tritonclient.http for health and metadata; the generate extension on a geventhttpclient connection."""

    def __init__(self, endpoint: Endpoint, headers: dict[str, str], timeout: float) -> None:
        import tritonclient.http as httpclient

        self.endpoint, self.headers, self.timeout = endpoint, headers, timeout
        self.stub = httpclient.InferenceServerClient(f"{endpoint.host}:{endpoint.port}{endpoint.base_path}", ssl=endpoint.ssl,
                                                     connection_timeout=timeout, network_timeout=timeout)
        self._http: Any = None  # the generate connection, opened on the first request

    def server_live(self) -> bool:
        return self.stub.is_server_live(headers=self.headers)

    def server_ready(self) -> bool:
        return self.stub.is_server_ready(headers=self.headers)

    def model_ready(self, model: str) -> bool:
        return self.stub.is_model_ready(model, headers=self.headers)

    def models(self) -> list[tuple[str, str]]:
        return [(m["name"], m.get("state", "")) for m in self.stub.get_model_repository_index(headers=self.headers)]

    def model_inputs(self, model: str) -> dict[str, str]:
        return {i["name"]: i["datatype"] for i in self.stub.get_model_metadata(model, headers=self.headers)["inputs"]}

    def model_parameter(self, model: str, name: str) -> str | None:
        config = self.stub.get_model_config(model, headers=self.headers)
        return config.get("parameters", {}).get(name, {}).get("string_value")

    def generate(self, model: str, inputs: Inputs, stream: bool) -> Iterator[Response]:
        path = f"{self.endpoint.base_path}/v2/models/{model}/{'generate_stream' if stream else 'generate'}"
        body = json.dumps({name: value for name, (_, value) in inputs.items()})
        start = time.perf_counter()
        response = self._connection().post(path, body, self.headers)
        try:
            if response.status_code != 200 or not stream:
                yield self._fields(response.read(), response.status_code), time.perf_counter() - start
                return
            while line := response.readline(b"\n"):
                if line.startswith(b"data:"):
                    yield self._fields(line[5:], 200), time.perf_counter() - start
        finally:
            response.release()

    def _connection(self) -> Any:
        if self._http is None:
            from geventhttpclient import HTTPClient
            from geventhttpclient.url import URL

            e = self.endpoint
            url = URL(f"{'https' if e.ssl else 'http'}://{e.host}:{e.port}{e.base_path}")
            self._http = HTTPClient.from_url(url, concurrency=1, connection_timeout=self.timeout, network_timeout=self.timeout)
        return self._http

    def _fields(self, body: bytes, status: int) -> dict[str, Any]:
        try:
            data = json.loads(body)
        except ValueError:
            raise EndpointError(f"HTTP {status} from {self.endpoint.url} with a non-JSON body: {body[:200]!r}",
                                "check --url points at Triton's HTTP port") from None
        if "error" in data or status != 200:
            raise ServerError(str(data.get("error", data)), status)
        return {k: scalar(v) for k, v in data.items()}

    def close(self) -> None:
        self.stub.close()
        if self._http is not None:
            self._http.close()


def _parameter(p: Any) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


class GrpcTransport:
    """tritonclient.grpc: calls end after ``timeout``; generation over a decoupled bidirectional stream."""

    def __init__(self, endpoint: Endpoint, headers: dict[str, str], timeout: float) -> None:
        import tritonclient.grpc as grpcclient

        self.endpoint, self.headers, self.timeout = endpoint, headers, timeout
        self.stub = grpcclient.InferenceServerClient(f"{endpoint.host}:{endpoint.port}", ssl=endpoint.ssl)

    def _call(self, method: str, *args: Any) -> Any:
        return getattr(self.stub, method)(*args, headers=self.headers, client_timeout=self.timeout)

    def server_live(self) -> bool:
        return self._call("is_server_live")

    def server_ready(self) -> bool:
        return self._call("is_server_ready")

    def model_ready(self, model: str) -> bool:
        return self._call("is_model_ready", model)

    def models(self) -> list[tuple[str, str]]:
        return [(m.name, m.state) for m in self._call("get_model_repository_index").models]

    def model_inputs(self, model: str) -> dict[str, str]:
        return {i.name: i.datatype for i in self._call("get_model_metadata", model).inputs}

    def model_parameter(self, model: str, name: str) -> str | None:
        parameters = self._call("get_model_config", model).config.parameters
        return parameters[name].string_value if name in parameters else None

    def generate(self, model: str, inputs: Inputs, stream: bool) -> Iterator[Response]:
        import numpy as np
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import triton_to_np_dtype

        tensors = []
        for name, (datatype, value) in inputs.items():
            items = value if isinstance(value, list) else [value]
            array = np.array([v.encode() if isinstance(v, str) else v for v in items], dtype=triton_to_np_dtype(datatype))
            tensor = grpcclient.InferInput(name, [len(items)], datatype)
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        results: queue.Queue = queue.Queue()
        start = time.perf_counter()
        done = False
        self.stub.start_stream(callback=lambda result, error: results.put((result, error)), stream_timeout=self.timeout,
                               headers=self.headers)
        try:
            try:
                self.stub.async_stream_infer(model, tensors, enable_empty_final_response=True)
            except Exception:  # the stream died before the send; its cause went to the callback
                _, cause = results.get(timeout=self.timeout)
                raise cause from None
            while not done:
                try:
                    result, error = results.get(timeout=self.timeout)
                except queue.Empty:
                    raise EndpointError(f"no response from {self.endpoint.url} within {self.timeout:g} s",
                                        "raise --timeout or check the server") from None
                if error is not None:
                    raise error
                response = result.get_response()
                params = {k: _parameter(v) for k, v in response.parameters.items()}
                done = bool(params.pop("triton_final_response", True))
                fields = {o.name: scalar(result.as_numpy(o.name)) for o in response.outputs}
                yield {**params, **fields}, time.perf_counter() - start
        finally:
            self.stub.stop_stream(cancel_requests=not done)

    def close(self) -> None:
        self.stub.close()
