"""`Client`: generate and stream text from a Triton generate model over HTTP or gRPC.

A thin layer over tritonclient (``transport``): the URL picks the protocol (``url``), one
`SamplingOptions` says how to generate (``sampling``), and every failure is one line (``errors``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from loraship.client.errors import EndpointError, ErrorMapper
from loraship.client.sampling import Prompt, SamplingOptions, request_values
from loraship.client.transport import Inputs, Response, Transport, key_headers, open_transport
from loraship.client.url import parse_endpoint


@dataclass(frozen=True)
class Chunk:
    """A piece of streamed text and when it arrived (seconds since the request started)."""

    text: str
    t: float


@dataclass(frozen=True)
class Reply:
    """A finished generation as the client saw it. Token counts are the server tokenizer's counts."""

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
    """Iterate for `Chunk`s; after the last one, `reply` holds the counts and timings."""

    def __init__(self, responses: Iterator[Response]) -> None:
        self._responses = responses
        self._parts: list[str] = []
        self._ttft: float | None = None
        self._fields: dict[str, Any] = {}
        self.reply: Reply | None = None

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
        self.reply = Reply(
            text="".join(self._parts),
            prompt_tokens=_count(self._fields, "prompt_tokens"),
            completion_tokens=_count(self._fields, "completion_tokens"),
            ttft_s=t if self._ttft is None else self._ttft,
            total_s=t,
            finish_reason=self._fields.get("finish_reason"),
        )

    def collect(self) -> Reply:
        """Consume the stream and return its `Reply`."""
        for _ in self:
            pass
        assert self.reply is not None
        return self.reply


def _count(fields: dict[str, Any], name: str) -> int:
    if fields.get(name) is None:
        raise EndpointError(f"the server's response carries no {name} count", "serve a model repository built by `loraship repo`")
    return int(fields[name])


class Client:
    """Generate text from a Triton generate model.

    ``url`` is ``http://host:8000`` (or ``https://``) for HTTP, ``host:8001`` (or
    ``grpc://``/``grpcs://``) for gRPC: the rule of `parse_endpoint`, which ``protocol`` may only
    confirm (or pick, for a URL without a scheme). ``model`` may be left out when the server
    serves exactly one model. Safe to share between threads: each thread gets its own transport.
    """

    def __init__(self, url: str | None = None, protocol: str | None = None, model: str | None = None,
                 api_key: str | None = None, timeout: float = 60.0) -> None:
        self.endpoint = endpoint = parse_endpoint(url, protocol)
        self.protocol, self.ssl, self.host, self.port, self.base_path = (
            endpoint.protocol, endpoint.ssl, endpoint.host, endpoint.port, endpoint.base_path)
        self.url = endpoint.url
        self.api_key = api_key
        self.timeout = timeout
        self._model = model
        self._inputs: dict[str, str] | None = None  # input name -> Triton datatype
        self._chat_template: bool | None = None
        self._local = threading.local()
        self._transports: list[Transport] = []  # every thread's, for close()
        self._lock = threading.Lock()

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
            t = self._transport()
            if not t.server_live():
                raise EndpointError(f"Triton at {self.url} is not live", "check the server's log")
            if not t.server_ready():
                raise EndpointError(f"Triton at {self.url} is up but not ready", "wait for its models to load, or check its log")
            if not t.model_ready(self.model):
                raise EndpointError(f"model {self.model!r} is not ready on {self.url}{self.served_hint()}", "pass --model with a served model name")
        self.generate("Hello", max_tokens=1)  # proves the inference API accepts our key

    @property
    def chat_template(self) -> bool:
        """Whether the model renders chats (``messages``) with a chat template (read from its config)."""
        if self._chat_template is None:
            with self._errors():
                value = self._transport().model_parameter(self.model, "chat_template")
            self._chat_template = value == "1" and "messages" in self._model_inputs()
        return self._chat_template

    def generate(self, prompt: Prompt, options: SamplingOptions | None = None, /, **changes: Any) -> Reply:
        """One non-streaming request (a single response): ``ttft_s`` equals ``total_s``.

        ``prompt`` is text, or a chat (a list of ``{"role", "content"}`` messages) that the server renders
        with the model's chat template and generation prompt. ``options`` (default: `SamplingOptions`'
        defaults), with ``changes`` to its fields, say how to generate: ``generate(p, max_tokens=8)``.
        """
        return Stream(self._responses(prompt, SamplingOptions.of(options, **changes), stream=False)).collect()

    def stream(self, prompt: Prompt, options: SamplingOptions | None = None, /, **changes: Any) -> Stream:
        """A streaming request: iterate the returned `Stream` for `Chunk`s, then read ``.reply``.
        Arguments as for `generate`."""
        return Stream(self._responses(prompt, SamplingOptions.of(options, **changes), stream=True))

    @property
    def headers(self) -> dict[str, str]:
        """The API-key headers (gRPC metadata) that every call carries."""
        return key_headers(self.protocol, self.api_key)

    def request_inputs(self, prompt: Prompt, options: SamplingOptions, stream: bool) -> Inputs:
        """What one request sends: input name -> (Triton datatype, value); for load generators that build
        their own requests."""
        types = self._model_inputs()
        return {name: (types[name], value) for name, value in request_values(self.model, types, prompt, options, stream).items()}

    def close(self) -> None:
        """Close every thread's connection (open gRPC channels delay a server's shutdown)."""
        with self._lock:
            transports, self._transports = self._transports, []
            self._local = threading.local()
        for transport in transports:
            transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def served_hint(self) -> str:
        """`` (served: a, b)``: the repository's models, for messages about a model it lacks ('' if unknown)."""
        try:
            names = sorted({name for name, _ in self._transport().models()})
        except Exception:  # noqa: BLE001 - only a hint
            return ""
        return f" (served: {', '.join(names)})" if names else ""

    # -- internals ----------------------------------------------------------------

    def _transport(self) -> Transport:
        """This thread's transport."""
        transport = getattr(self._local, "transport", None)
        if transport is None:
            transport = self._local.transport = open_transport(self.endpoint, self.api_key, self.timeout)
            with self._lock:
                self._transports.append(transport)
        return transport

    def _model_inputs(self) -> dict[str, str]:
        if self._inputs is None:
            with self._errors():
                self._inputs = self._transport().model_inputs(self.model)
            if "text_input" not in self._inputs:
                raise EndpointError(f"model {self.model!r} has no text_input input; it is not a generate model", "pass --model with the generate model's name")
        return self._inputs

    def _responses(self, prompt: Prompt, options: SamplingOptions, stream: bool) -> Iterator[Response]:
        inputs = self.request_inputs(prompt, options, stream)  # refused here, before any iteration
        return self._send(inputs, stream)

    def _send(self, inputs: Inputs, stream: bool) -> Iterator[Response]:
        with self._errors():
            yield from self._transport().generate(self.model, inputs, stream)

    def _only_model(self) -> str:
        with self._errors():
            index = self._transport().models()
        ready = sorted({name for name, state in index if state == "READY"})
        if len(ready) != 1:
            found = ", ".join(ready) or "none"
            raise EndpointError(f"cannot pick a model on {self.url}: ready models: {found}", "pass --model NAME")
        return ready[0]

    def _errors(self) -> ErrorMapper:
        return ErrorMapper(self)
