"""Triton's HTTP API as the frontend uses it: one pooled httpx client, each model's inputs (its config,
cached), Triton's errors as :class:`ApiError`, and the body limit sized from the served models' context."""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from loraship_contract import API_KEY_HEADER

from .errors import ApiError, unavailable
from .events import Event, merge_events, parse_event, parse_events

SCHEMA_TTL = 60.0  # seconds a model's inputs are trusted before they are fetched again
BODY_BASE = 1 << 20  # bytes of a body beside its prompt: sampling inputs, stop strings, a chat's JSON framing
BODY_PER_TOKEN = 64  # bytes per token of context a prompt may take as JSON (see BodyLimit)
DEFAULT_CONTEXT = 131072  # tokens, for a model whose config.pbtxt has no ``context`` parameter
LIMIT_TTL = 30.0  # seconds the served models' largest context is trusted before it is read again
#: One open upstream stream: its response (to close) and its events, in batches that arrived together.
Upstream = tuple[httpx.Response, AsyncIterator[list[Event]]]


class Triton:
    """Triton's HTTP API over one pooled async connection set; the frontend's key goes as x-api-key."""

    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url.rstrip("/")
        self.headers = {API_KEY_HEADER: api_key} if api_key else {}
        self.client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(None, connect=10.0),
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        self.schemas: dict[str, Schema] = {}

    async def send(self, method: str, path: str, json_body: Any = None, stream: bool = False, content: bytes | None = None,
                   headers: list[tuple[str, str]] | None = None, params: str | None = None, timeout: float | None = None) -> httpx.Response:
        """One request to Triton (with the frontend's key); unreachable: a 503 ApiError."""
        request = self.client.build_request(method, path, json=json_body, content=content, params=params,
                                            headers=[*(headers or ()), *self.headers.items()],
                                            timeout=httpx.Timeout(timeout, connect=10.0) if timeout else httpx.USE_CLIENT_DEFAULT)
        try:
            return await self.client.send(request, stream=stream)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise unavailable(f"Triton at {self.url} is not reachable ({type(exc).__name__})") from None
        except httpx.TimeoutException as exc:
            raise unavailable(f"Triton at {self.url} did not answer in time ({type(exc).__name__})") from None
        except httpx.HTTPError as exc:
            raise unavailable(f"Triton closed the connection before answering ({type(exc).__name__})") from None

    async def read(self, response: httpx.Response) -> bytes:
        """A streamed response's whole body, closed after; a connection that drops meanwhile: a 503 ApiError."""
        try:
            return await response.aread()
        except httpx.HTTPError as exc:
            raise unavailable(f"Triton closed the connection mid-response ({type(exc).__name__})") from None
        finally:
            await response.aclose()

    async def models(self) -> list[str]:
        response = await self.send("POST", "/v2/repository/index", {"ready": True}, timeout=10)
        if response.status_code != 200:
            raise triton_error("", response.status_code, error_text(response.content))
        return sorted({m["name"] for m in response.json() if m.get("state", "READY") == "READY"})

    async def schema(self, model: str, refresh: bool = False) -> Schema:
        """The model's inputs and served context, from its config (cached; refetched after a minute, on
        ``refresh``, or when a response names another version); Triton's refusal (an unknown model) as
        an ApiError with its status and message."""
        cached = self.schemas.get(model)
        age = time.monotonic() - cached.fetched if cached is not None else math.inf
        if age < SCHEMA_TTL and (not refresh or age < 5.0):  # refreshed at most every 5 s, however many bad bodies come
            return cached
        path = model_path(model)
        metadata, config = await asyncio.gather(self.send("GET", path, timeout=10), self.send("GET", f"{path}/config", timeout=10))
        for response in (metadata, config):
            if response.status_code != 200:
                raise ApiError(response.status_code, error_text(response.content), "server_error" if response.status_code >= 500 else "invalid_request_error")
        self.schemas[model] = schema = Schema.of(metadata.json(), config.json())
        return schema

    async def generate(self, model: str, body: dict[str, Any]) -> Event:
        """One answer, from a streamed request (``body`` has ``stream: true``) whose events are merged
        (:func:`merge_events`). Triton notices a client gone only when it writes to it, so only a stream
        is cancelled when this task is (its client gone): its upstream connection closes and Triton
        cancels the request at its next response."""
        status, outs = await self.once(f"{model_path(model)}/generate_stream", json_body=body)
        if isinstance(outs, str):
            raise triton_error(model, status, outs)
        for out in outs:
            if "error" in out:
                raise triton_error(model, 400, str(out["error"]))
        return merge_events(outs)

    async def once(self, path: str, **send: Any) -> tuple[int, list[Event] | str]:
        """A POST to a ``/generate_stream`` read whole (one read, not one per event): (200, its events),
        or (Triton's status, its error message)."""
        response = await self.send("POST", path, stream=True, **send)
        raw = await self.read(response)
        if response.status_code != 200:
            return response.status_code, error_text(raw)
        events = parse_events(raw)
        return (200, events) if events else (500, f"Triton answered no response on {path}")

    async def generate_all(self, model: str, bodies: list[dict[str, Any]]) -> list[Event]:
        """One generate per body, at once; the first error cancels the rest and is raised."""
        tasks = [asyncio.ensure_future(self.generate(model, body)) for body in bodies]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def stream_all(self, model: str, bodies: list[dict[str, Any]]) -> list[Upstream]:
        """One open stream per body; if any fails to open, the others are closed and its error raised."""
        opened = await asyncio.gather(*(self.stream(model, body) for body in bodies), return_exceptions=True)
        failed = [o for o in opened if isinstance(o, BaseException)]
        if failed:
            for o in opened:
                if not isinstance(o, BaseException):
                    await o[0].aclose()
            raise failed[0]
        return opened  # type: ignore[return-value]

    async def stream(self, model: str, body: dict[str, Any]) -> Upstream:
        """The open response and its events, in batches: the events that arrived together (several when
        this frontend fell behind, which it then answers with one chunk). An error in the first response
        comes back as an ApiError; a connection that drops mid-stream as a 503 ApiError from the events."""
        response = await self.send("POST", f"{model_path(model)}/generate_stream", body, stream=True)
        if response.status_code != 200:
            raise triton_error(model, response.status_code, error_text(await self.read(response)))

        async def events() -> AsyncIterator[list[Event]]:
            pending = b""
            try:
                async for data in response.aiter_bytes():
                    *complete, pending = (pending + data).split(b"\n\n")
                    batch = [parse_event(event) for event in complete if event.startswith(b"data:")]
                    if batch:
                        yield batch
            except httpx.HTTPError as exc:
                raise unavailable(f"Triton closed the stream mid-response ({type(exc).__name__})") from None

        return response, events()


def model_path(model: str) -> str:
    """Triton's path of a model; a name Triton could not hold (a path, say) is an unknown model."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", model) or set(model) == {"."}:
        raise ApiError(404, f"The model `{model}` does not exist", param="model", code="model_not_found")
    return f"/v2/models/{model}"


def error_text(raw: bytes) -> str:
    """The ``error`` of a Triton JSON or SSE error body."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        return str(json.loads(text.removeprefix("data:")).get("error", text))
    except (ValueError, AttributeError):
        return text[:300]


def triton_error(model: str, status: int, message: str) -> ApiError:
    """A Triton error as OpenAI's: unknown model 404, context overflow 400, other bad requests 400."""
    first = message.strip().splitlines()[0] if message.strip() else f"Triton answered HTTP {status}"
    if "unknown model" in first or ("not found" in first and "model" in first):
        return ApiError(404, f"The model `{model}` does not exist (GET /v1/models lists the served models)",
                           param="model", code="model_not_found")
    if "is not served by this model" in first:  # an adapter unloaded since the request was routed
        return ApiError(404, first, param="model", code="model_not_found")
    if "is not healthy" in first or status == 503:  # the model's process died; Triton or its supervisor brings it back
        return unavailable(f"model `{model}` is not available ({first})")
    if status in (401, 403) or "restricted" in first:
        return ApiError(500, f"Triton refused the frontend's API key: {first}", "server_error")
    if "context" in first:
        return ApiError(400, first, code="context_length_exceeded")
    for name, what in (("messages", "chat messages"), ("logprobs", "logprobs"), ("prompt_logprobs", "prompt logprobs"),
                       ("input_ids", "token-id prompts"), ("exclude_input_in_output", "echo")):
        if f"unexpected inference input '{name}'" in first:
            return ApiError(400, f"model `{model}` takes no {what} (its repository predates them): re-run `loraship repo`",
                               param="model")
    if status >= 500:
        return ApiError(500, first, "server_error")
    return ApiError(400, first)


@dataclass(frozen=True)
class Schema:
    """What the edge checks a model's generate body against: each input's Triton type and dims."""

    version: str  # the newest version Triton serves
    inputs: dict[str, tuple[str, list[int]]]
    batching: bool  # max_batch_size > 0: Triton adds a batch dimension, so counts are not checked here
    context: int | None  # the ``context`` parameter `loraship repo` writes: the tokens the model serves
    fetched: float = field(default_factory=time.monotonic)

    @classmethod
    def of(cls, metadata: dict[str, Any], config: dict[str, Any]) -> Schema:
        context = ((config.get("parameters") or {}).get("context") or {}).get("string_value", "")
        return cls(version=max(metadata.get("versions") or ["0"], key=lambda v: int(v) if v.isdigit() else -1),
                   inputs={i["name"]: (i["data_type"], [int(d) for d in i.get("dims", [])]) for i in config.get("input", [])},
                   batching=int(config.get("max_batch_size") or 0) > 0, context=int(context) if context.isdigit() else None)


def body_limit(context: int) -> int:
    """The body limit for a largest served context of ``context`` tokens: ``BODY_BASE`` + ``BODY_PER_TOKEN``
    per token. A prompt that fills the context is at most a few bytes of text per token, and JSON
    escapes a byte as ``\\u00XX`` (6 bytes) at most, so a chat in ``messages`` (JSON inside a JSON
    string, escaped twice) or ``input_ids`` (up to 11 bytes an id) of a full context stays well within
    64 bytes a token; the MiB beside it holds everything else (stop strings, the sampling inputs). 4k
    tokens: 1.25 MiB; 128k: 9 MiB."""
    return BODY_BASE + BODY_PER_TOKEN * context


class BodyLimit:
    """The most bytes a request body may have: fixed (``--max-body-bytes``), or sized from the served
    models' largest context (their ``context`` parameter, read through Triton's model config API and
    trusted for ``LIMIT_TTL`` seconds; ``DEFAULT_CONTEXT`` for a model without it, and while Triton is
    unreachable, when it is read again within seconds)."""

    def __init__(self, triton: Triton, fixed: int | None = None) -> None:
        self.triton, self.fixed = triton, fixed
        self.context = DEFAULT_CONTEXT
        self.value = fixed or body_limit(DEFAULT_CONTEXT)
        self.measured, self.ttl = -math.inf, 0.0
        self.lock = asyncio.Lock()

    async def get(self, refresh: bool = False) -> int:
        """The limit now; ``refresh``: read the models again first, at most once a second (a body over
        the limit may be for a model loaded since)."""
        if self.fixed:
            return self.fixed
        if self._stale(refresh):
            async with self.lock:
                if self._stale(refresh):
                    await self._measure()
        return self.value

    def _stale(self, refresh: bool) -> bool:
        age = time.monotonic() - self.measured
        return age >= self.ttl or (refresh and age >= 1.0)

    async def _measure(self) -> None:
        try:
            names = await self.triton.models()
            schemas = await asyncio.gather(*(self.triton.schema(name) for name in names), return_exceptions=True)
            contexts = [s.context or DEFAULT_CONTEXT if isinstance(s, Schema) else DEFAULT_CONTEXT for s in schemas]
            ttl = LIMIT_TTL if names else 2.0
        except ApiError:
            contexts, ttl = [], 2.0
        self.context = max(contexts, default=DEFAULT_CONTEXT)
        self.value, self.measured, self.ttl = body_limit(self.context), time.monotonic(), ttl

