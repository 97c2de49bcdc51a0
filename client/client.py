"""`Client`: generate and stream text from a Triton generate model over HTTP or gRPC.

A thin layer over ``tritonclient.http`` and ``tritonclient.grpc`` (no second HTTP
stack). HTTP uses Triton's generate extension (``/generate`` and the
``/generate_stream`` server-sent events) through tritonclient's own
geventhttpclient connection, because ``InferenceServerClient.infer`` refuses
decoupled models; gRPC uses a decoupled bidirectional stream.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from loraship_contract import API_KEY_HEADER, GRPC_API_KEY_HEADER, LORASHIP, SAMPLING_DEFAULTS, sampling_inputs

from loraship.errors import LorashipError

PROTOCOLS = ("http", "grpc")

#: URL scheme -> (protocol, TLS). A URL without a scheme (``HOST:PORT``) means gRPC.
SCHEMES: dict[str, tuple[str, bool]] = {"http": ("http", False), "https": ("http", True), "grpc": ("grpc", False), "grpcs": ("grpc", True)}

#: Where a client without a URL looks: a local Triton's default ports.
DEFAULT_URLS = {"http": "http://127.0.0.1:8000", "grpc": "127.0.0.1:8001"}

#: The rule, as help texts state it.
URL_HELP = "http:// or https:// for HTTP; grpc://, grpcs:// or a bare HOST:PORT for gRPC"

#: Optional generate-model inputs (loraship's names) and the defaults the model applies when they are left out.
SAMPLING_OPTIONS: dict[str, Any] = {name: SAMPLING_DEFAULTS[spec.field] for name, spec in sampling_inputs(LORASHIP).items()
                                    if name not in ("max_tokens", "logprobs", "prompt_logprobs")}

#: A prompt is raw text (``text_input``) or a chat: a list of ``{"role", "content"}`` messages that the
#: server renders with the model's chat template (``messages``).
Prompt = str | Sequence[Mapping[str, Any]]


class EndpointError(LorashipError):
    """The endpoint is down, not ready, lacks the model, refused the key, or failed a request."""


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed text and when it arrived (seconds since the request started)."""

    text: str
    t: float


@dataclass(frozen=True)
class Completion:
    """A finished generation. Token counts are the server tokenizer's counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float
    total_s: float
    finish_reason: str | None

    @property
    def tokens_per_s(self) -> float:
        """Output tokens per second over the whole request."""
        return self.completion_tokens / self.total_s if self.total_s > 0 else 0.0


class Stream:
    """Iterate for `Chunk`s; after the last one, `completion` holds the counts and timings."""

    def __init__(self, responses: Iterator[tuple[dict[str, Any], float]]) -> None:
        self._responses = responses
        self._parts: list[str] = []
        self._ttft: float | None = None
        self._fields: dict[str, Any] = {}
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[Chunk]:
        t = 0.0
        for fields, t in self._responses:
            text = fields.pop("text_output", "") or ""
            self._fields.update({k: v for k, v in fields.items() if v is not None})
            if text:
                if self._ttft is None:
                    self._ttft = t
                self._parts.append(text)
                yield Chunk(text, t)
        self.completion = Completion(
            text="".join(self._parts),
            prompt_tokens=_count(self._fields, "prompt_tokens"),
            completion_tokens=_count(self._fields, "completion_tokens"),
            ttft_s=t if self._ttft is None else self._ttft,
            total_s=t,
            finish_reason=self._fields.get("finish_reason"),
        )

    def collect(self) -> Completion:
        """Consume the stream and return its `Completion`."""
        for _ in self:
            pass
        assert self.completion is not None
        return self.completion


def _count(fields: dict[str, Any], name: str) -> int:
    if fields.get(name) is None:
        raise EndpointError(f"the server's response carries no {name} count", "serve a model repository built by `loraship repo`")
    return int(fields[name])


def _scalar(value: Any) -> Any:
    """A JSON/numpy output value as a plain Python scalar."""
    if isinstance(value, list):
        value = value[0] if value else None
    if hasattr(value, "reshape"):
        value = value.reshape(-1)[0] if value.size else None
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value.item() if hasattr(value, "item") else value


@dataclass(frozen=True)
class Endpoint:
    """Where a `Client` connects and in which protocol: ``url`` is its canonical form."""

    protocol: str
    ssl: bool
    host: str
    port: int
    base_path: str

    @property
    def url(self) -> str:
        if self.protocol == "grpc":
            return f"{self.host}:{self.port}"
        return f"{'https' if self.ssl else 'http'}://{self.host}:{self.port}{self.base_path}"


def parse_endpoint(url: str | None, protocol: str | None = None) -> Endpoint:
    """The one rule for endpoint URLs: the scheme picks the protocol (`SCHEMES`); a URL without one
    (``HOST:PORT``) uses ``protocol`` when given, else gRPC. No URL: the local default of ``protocol``
    (HTTP when that is not given either). A protocol that contradicts the scheme is refused."""
    if protocol is not None and protocol not in PROTOCOLS:
        raise EndpointError(f"unknown protocol {protocol!r}", "use http or grpc")
    if url is None:
        url = DEFAULT_URLS[protocol or "http"]
    scheme = url.split("://", 1)[0].lower() if "://" in url else None
    if scheme is not None and scheme not in SCHEMES:
        raise EndpointError(f"unknown URL scheme {scheme + '://'!r} in {url!r}", f"use {URL_HELP}")
    implied, ssl = SCHEMES[scheme] if scheme else (protocol or "grpc", False)
    if protocol is not None and protocol != implied:
        raise EndpointError(f"{url} is a{'n HTTP' if implied == 'http' else ' gRPC'} URL but the protocol is {protocol}",
                            "drop --protocol: the URL's scheme picks it")
    parts = urlsplit(url if scheme else f"//{url}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:  # a port that is not a number from 0 to 65535
        host = port = None
    if not host:
        raise EndpointError(f"cannot parse endpoint URL {url!r}", "use e.g. http://127.0.0.1:8000 for HTTP or 127.0.0.1:8001 for gRPC")
    default_port = 443 if ssl else (80 if implied == "http" else 8001)
    return Endpoint(implied, ssl, host, port or default_port, parts.path.rstrip("/"))


class Client:
    """Generate text from a Triton generate model.

    ``url`` is ``http://host:8000`` (or ``https://``) for HTTP, ``host:8001`` (or
    ``grpc://``/``grpcs://``) for gRPC: the rule of `parse_endpoint`, which ``protocol`` may only
    confirm (or pick, for a URL without a scheme). ``model`` may be left out when the server
    serves exactly one model. Safe to share between threads: each thread gets its
    own tritonclient connection.
    """

    def __init__(
        self,
        url: str | None = None,
        protocol: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
    ) -> None:
        endpoint = parse_endpoint(url, protocol)
        self.protocol, self.ssl, self.host, self.port, self.base_path = (
            endpoint.protocol, endpoint.ssl, endpoint.host, endpoint.port, endpoint.base_path)
        self.url = endpoint.url
        self.api_key = api_key
        self.timeout = timeout
        self._model = model
        self._inputs: dict[str, str] | None = None  # input name -> Triton datatype
        self._chat_template: bool | None = None
        self._local = threading.local()
        self._stubs: list[Any] = []  # every thread's connection, for close()
        self._stubs_lock = threading.Lock()

    # -- public API -------------------------------------------------------------

    @property
    def model(self) -> str:
        """The model name, discovered from the repository index when not given."""
        if self._model is None:
            self._model = self._only_model()
        return self._model

    def check(self) -> None:
        """Raise `EndpointError` unless the server is up, ready, serves the model and accepts the key."""
        with self._errors():
            if not self._call("is_server_live"):
                raise EndpointError(f"Triton at {self.url} is not live", "check the server's log")
            if not self._call("is_server_ready"):
                raise EndpointError(f"Triton at {self.url} is up but not ready", "wait for its models to load, or check its log")
            if not self._call("is_model_ready", self.model):
                raise EndpointError(f"model {self.model!r} is not ready on {self.url}{self._served_hint()}", "pass --model with a served model name")
        self.generate("Hello", max_tokens=1)  # proves the inference API accepts our key

    @property
    def chat_template(self) -> bool:
        """Whether the model renders chats (``messages``) with a chat template (read from its config)."""
        if self._chat_template is None:
            with self._errors():
                config = self._call("get_model_config", self.model)
            if isinstance(config, dict):
                value = config.get("parameters", {}).get("chat_template", {}).get("string_value")
            else:
                value = config.config.parameters["chat_template"].string_value if "chat_template" in config.config.parameters else None
            self._chat_template = value == "1" and "messages" in self._model_inputs()
        return self._chat_template

    def generate(
        self,
        prompt: Prompt,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        **sampling: Any,
    ) -> Completion:
        """One non-streaming request (a single response): ``ttft_s`` equals ``total_s``.

        ``prompt`` is text, or a chat (a list of ``{"role", "content"}`` messages) that the server renders
        with the model's chat template and generation prompt. ``sampling`` takes the server's other
        controls: ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``, ``ignore_eos``.
        """
        params = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop, **sampling)
        return Stream(self._responses(prompt, params, stream=False)).collect()

    def stream(
        self,
        prompt: Prompt,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | list[str] | None = None,
        **sampling: Any,
    ) -> Stream:
        """A streaming request: iterate the returned `Stream` for `Chunk`s, then read ``.completion``.

        ``prompt`` and ``sampling`` are as for `generate`.
        """
        params = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop, **sampling)
        return Stream(self._responses(prompt, params, stream=True))

    @property
    def headers(self) -> dict[str, str]:
        """The API-key headers (gRPC metadata) that every call carries."""
        return self._headers()

    # -- request building ---------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        if not self.api_key:
            return {}
        if self.protocol == "grpc":  # both, so servers with or without Triton's gRPC prefix accept it
            return {API_KEY_HEADER: self.api_key, GRPC_API_KEY_HEADER: self.api_key}
        return {API_KEY_HEADER: self.api_key}

    def request_inputs(self, prompt: Prompt, params: dict[str, Any], stream: bool) -> dict[str, tuple[str, Any]]:
        """What one request sends: input name -> (Triton datatype, value). ``params`` holds
        ``max_tokens`` and any of `SAMPLING_OPTIONS`; for load generators that build their own requests."""
        types = self._model_inputs()
        return {name: (types[name], value) for name, value in self._request_inputs(prompt, params, stream).items()}

    def _request_inputs(self, prompt: Prompt, params: dict[str, Any], stream: bool) -> dict[str, Any]:
        """Input name -> value; optional inputs that hold their defaults are left out."""
        inputs = self._model_inputs()
        unknown = set(params) - set(SAMPLING_OPTIONS) - {"max_tokens"}
        if unknown:
            raise EndpointError(f"unknown sampling option(s) {', '.join(sorted(unknown))}", f"use {', '.join(SAMPLING_OPTIONS)}")
        values: dict[str, Any] = {"max_tokens": int(params["max_tokens"]), "stream": stream}
        if isinstance(prompt, str):
            values["text_input"] = prompt
        elif "messages" not in inputs:
            raise EndpointError(f"model {self.model!r} takes no chat messages (its repository predates them)",
                                "rebuild it with `loraship repo`, or send the prompt as text")
        else:
            values["messages"] = json.dumps([dict(m) for m in prompt], ensure_ascii=False)
        for name, default in SAMPLING_OPTIONS.items():
            value = params.get(name, default)
            if value is None or value == default:  # the server's defaults are the same
                continue
            if name not in inputs:
                raise EndpointError(f"model {self.model!r} takes no {name!r} input", f"leave {name} at its default")
            values[name] = value
        return values

    def _model_inputs(self) -> dict[str, str]:
        if self._inputs is None:
            with self._errors():
                meta = self._call("get_model_metadata", self.model)
            items = meta["inputs"] if isinstance(meta, dict) else [{"name": i.name, "datatype": i.datatype} for i in meta.inputs]
            self._inputs = {i["name"]: i["datatype"] for i in items}
            if "text_input" not in self._inputs:
                raise EndpointError(f"model {self.model!r} has no text_input input; it is not a generate model", "pass --model with the generate model's name")
        return self._inputs

    def _responses(self, prompt: Prompt, params: dict[str, Any], stream: bool) -> Iterator[tuple[dict[str, Any], float]]:
        values = self._request_inputs(prompt, params, stream)
        if self.protocol == "http":
            return self._http_responses(values, stream)
        return self._grpc_responses(values)

    # -- HTTP: the generate extension over tritonclient's connection ----------------

    def _http_responses(self, values: dict[str, Any], stream: bool) -> Iterator[tuple[dict[str, Any], float]]:
        endpoint = "generate_stream" if stream else "generate"
        start = time.perf_counter()
        with self._errors():
            response = self._stub()._post(f"v2/models/{self.model}/{endpoint}", json.dumps(values), self._headers(), None)
            try:
                if response.status_code != 200 or not stream:
                    yield self._http_fields(response.read(), response.status_code), time.perf_counter() - start
                    return
                while line := response.readline(b"\n"):
                    if line.startswith(b"data:"):
                        yield self._http_fields(line[5:], 200), time.perf_counter() - start
            finally:
                response.release()

    def _http_fields(self, body: bytes, status: int) -> dict[str, Any]:
        try:
            data = json.loads(body)
        except ValueError:
            raise EndpointError(f"HTTP {status} from {self.url} with a non-JSON body: {body[:200]!r}", "check --url points at Triton's HTTP port") from None
        if "error" in data or status != 200:
            raise self._refused(str(data.get("error", data)), status)
        return {k: _scalar(v) for k, v in data.items()}

    # -- gRPC: a decoupled stream ---------------------------------------------------

    def _grpc_responses(self, values: dict[str, Any]) -> Iterator[tuple[dict[str, Any], float]]:
        import numpy as np
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import triton_to_np_dtype

        inputs = []
        for name, value in values.items():
            dtype = self._model_inputs()[name]
            items = value if isinstance(value, list) else [value]
            array = np.array([v.encode() if isinstance(v, str) else v for v in items], dtype=triton_to_np_dtype(dtype))
            tensor = grpcclient.InferInput(name, [len(items)], dtype)
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        results: queue.Queue = queue.Queue()
        stub = self._stub()
        start = time.perf_counter()
        done = False
        with self._errors():
            stub.start_stream(callback=lambda result, error: results.put((result, error)), stream_timeout=self.timeout, headers=self._headers())
            try:
                try:
                    stub.async_stream_infer(self.model, inputs, enable_empty_final_response=True)
                except Exception:  # the stream died before the send; its cause went to the callback
                    _, cause = results.get(timeout=self.timeout)
                    raise cause from None
                while not done:
                    try:
                        result, error = results.get(timeout=self.timeout)
                    except queue.Empty:
                        raise EndpointError(f"no response from {self.url} within {self.timeout:g} s", "raise --timeout or check the server") from None
                    if error is not None:
                        raise error
                    response = result.get_response()
                    params = {k: _grpc_param(v) for k, v in response.parameters.items()}
                    done = bool(params.pop("triton_final_response", True))
                    fields = {o.name: _scalar(result.as_numpy(o.name)) for o in response.outputs}
                    yield {**params, **fields}, time.perf_counter() - start
            finally:
                stub.stop_stream(cancel_requests=not done)

    # -- connections and errors -------------------------------------------------------

    def _stub(self) -> Any:
        """This thread's tritonclient InferenceServerClient."""
        stub = getattr(self._local, "stub", None)
        if stub is None:
            if self.protocol == "http":
                import tritonclient.http as httpclient

                stub = httpclient.InferenceServerClient(
                    f"{self.host}:{self.port}{self.base_path}", ssl=self.ssl, connection_timeout=self.timeout, network_timeout=self.timeout
                )
            else:
                import tritonclient.grpc as grpcclient

                stub = grpcclient.InferenceServerClient(f"{self.host}:{self.port}", ssl=self.ssl)
            self._local.stub = stub
            with self._stubs_lock:
                self._stubs.append(stub)
        return stub

    def _call(self, method: str, *args: Any) -> Any:
        """This thread's connection's ``method(*args)`` with the key headers; gRPC calls end after ``timeout``
        (tritonclient's HTTP connection has its own network timeout)."""
        deadline = {"client_timeout": self.timeout} if self.protocol == "grpc" else {}
        return getattr(self._stub(), method)(*args, headers=self._headers(), **deadline)

    def close(self) -> None:
        """Close every thread's connection (open gRPC channels delay a server's shutdown)."""
        with self._stubs_lock:
            stubs, self._stubs = self._stubs, []
            self._local = threading.local()
        for stub in stubs:
            stub.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _only_model(self) -> str:
        with self._errors():
            index = self._call("get_model_repository_index")
        if not isinstance(index, list):
            index = [{"name": m.name, "state": m.state} for m in index.models]
        ready = sorted({m["name"] for m in index if m.get("state") == "READY"})
        if len(ready) != 1:
            found = ", ".join(ready) or "none"
            raise EndpointError(f"cannot pick a model on {self.url}: ready models: {found}", "pass --model NAME")
        return ready[0]

    def _served_hint(self) -> str:
        try:
            index = self._call("get_model_repository_index")
        except Exception:  # noqa: BLE001 - only a hint
            return ""
        names = sorted({m["name"] for m in index} if isinstance(index, list) else {m.name for m in index.models})
        return f" (served: {', '.join(names)})" if names else ""

    def _refused(self, message: str, status: Any) -> EndpointError:
        """The EndpointError for a server-side error message."""
        first = message.strip().splitlines()[0] if message.strip() else f"status {status}"
        if "restricted" in first:
            if not self.api_key:
                return EndpointError(f"{self.url} requires an API key", "pass --api-key or set LORASHIP_API_KEY")
            return EndpointError(f"{self.url} refused the API key", "check --api-key / LORASHIP_API_KEY")
        if "unknown model" in first or ("not found" in first and "model" in first):
            return EndpointError(f"model {self.model!r} is not served by {self.url}{self._served_hint()}", "pass --model with a served model name")
        return EndpointError(f"request to {self.url} failed: {first}", "check the request parameters and the server's log")

    def _errors(self) -> _ErrorMapper:
        return _ErrorMapper(self)


def _grpc_param(p: Any) -> Any:
    kind = p.WhichOneof("parameter_choice")
    return getattr(p, kind) if kind else None


class _ErrorMapper:
    """Turns connection, protocol and tritonclient errors into one-line `EndpointError`s."""

    def __init__(self, client: Client) -> None:
        self.client = client

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, (EndpointError, GeneratorExit)):
            return False
        import http.client
        import socket

        from tritonclient.utils import InferenceServerException

        c = self.client
        if isinstance(exc, InferenceServerException):
            status, message = str(exc.status() or ""), exc.message() or str(exc)
            if "restricted" in message:
                raise c._refused(message, status) from None
            if "resolv" in message or "lookup" in message:
                raise _unresolved(c) from None
            connect_failed = "failed to connect" in message
            if connect_failed and ("Socket closed" in message or "Failed parsing HTTP/2" in message) or "http2 header with status" in message:
                raise _wrong_protocol(c) from None  # the port answered, but not in gRPC's HTTP/2
            if connect_failed or "Connection refused" in message:
                raise _unreachable(c) from None
            if "DEADLINE_EXCEEDED" in status or "Deadline" in message:
                raise _silent(c) from None
            raise c._refused(message, status) from None
        if isinstance(exc, TimeoutError) or type(exc).__name__ == "Timeout":  # gevent.Timeout is a BaseException
            raise _silent(c) from None
        if isinstance(exc, http.client.HTTPException):  # geventhttpclient's parse errors: not an HTTP server
            raise _wrong_protocol(c) from None
        if isinstance(exc, socket.gaierror):
            raise _unresolved(c) from None
        if isinstance(exc, OSError):
            raise _unreachable(c) from None
        return False


def _unreachable(c: Client) -> EndpointError:
    """Nothing listens at the client's port (or the host refuses)."""
    return EndpointError(f"cannot reach Triton at {c.url} ({c.protocol})", "start it with `loraship serve --repo REPO`, or check --url")


def _unresolved(c: Client) -> EndpointError:
    """The client's host name does not resolve."""
    return EndpointError(f"cannot resolve host {c.host!r} of {c.url}", "check --url's host name")


def _wrong_protocol(c: Client) -> EndpointError:
    """Something listens at the client's port but does not speak its protocol."""
    if c.protocol == "http":
        return EndpointError(f"{c.url} does not answer HTTP: is it a gRPC port?",
                             f"for gRPC pass --url {c.host}:{c.port} without a scheme; Triton's HTTP port is 8000 by default")
    return EndpointError(f"{c.url} does not answer gRPC: is it an HTTP port?",
                         f"for HTTP pass --url http://{c.host}:{c.port}; Triton's gRPC port is 8001 by default")


def _silent(c: Client) -> EndpointError:
    """The connection opened but no answer came in time."""
    name = "HTTP" if c.protocol == "http" else "gRPC"
    return EndpointError(f"no {name} answer from {c.url} within {c.timeout:g} s",
                         f"check that --url is Triton's {name} port, or raise --timeout")
