"""An OpenAI-compatible API in front of a Triton generate model, and Triton's own HTTP API beside it.

Routes: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions`` and
``POST /v1/chat/completions``, streamed (server-sent events ending in ``data: [DONE]``) or not. The
model id is the Triton model name. Everything under ``/v2`` is passed through to Triton, so one port
serves both APIs (on Azure Container Apps it is the public ingress port); ``/v2/health/live`` is this
process's own liveness, ``/v2/health/ready`` Triton's readiness (503 while Triton is unreachable).

Behind it is Triton's HTTP generate extension, always ``/generate_stream`` with ``stream: true``: a
streamed request relays its events, a non-streamed one merges them into one answer (what /generate
would answer). Either way a client that disconnects closes the upstream stream, so Triton cancels the
request and the model stops generating (Triton notices a client gone only when it writes to it, so a
request that answers once is never cancelled). A chat goes to the model's ``messages`` input, so the model renders it with its own chat
template and its tokenizer counts the prompt after the template (``usage``). ``n`` choices are ``n``
requests to Triton at once (the model decodes them in one batch; with a ``seed``, choice ``i``
samples with ``seed + i``).

The edge (:class:`Edge`, an ASGI middleware in front of routing) refuses, before any work:
- without the key (``LORASHIP_API_KEY`` set): every path but health (``/v2/health/live``,
  ``/v2/health/ready``, ``/v2/models/M[/versions/V]/ready``) needs ``Authorization: Bearer KEY`` or
  ``x-api-key: KEY``, checked from the headers before a body byte is read; ``/v1`` answers 401 in
  OpenAI's shape, ``/v2`` 403 as Triton does;
- any Content-Type but ``application/json``, ``application/octet-stream`` (tritonclient's binary
  tensors) or none (415: Triton 2.51 crashes on a form-encoded body of 4 MiB, curl -d's default), and
  compressed bodies (415);
- bodies over the limit (413, read no further than the limit; see :class:`BodyLimit`);
- ``/v2`` generate bodies that do not fit the model's own inputs (400, see :func:`check_generate`),
  where Triton's JSON parser would answer 500 or wrap an integer.
Server faults reach clients as server faults: Triton unreachable, a dropped upstream connection or a
crashed model (``Stub process ... is not healthy``) are 503 with ``Retry-After`` (``/v1``: OpenAI's
shape, type ``server_error``), and a stream whose upstream dies ends with an error event. Errors use
OpenAI's shape on ``/v1`` (``{"error": {"message", "type", "param", "code"}}``) and Triton's on
``/v2`` (``{"error": "..."}``).

This file is self-contained (FastAPI, pydantic, httpx and uvicorn; no loraship import), so
``loraship repo --stage-wheels`` copies it into the container beside ``start.sh``:

    LORASHIP_API_KEY=... python openai_api.py --port 9000 --triton http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hmac
import json
import math
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

API_KEY_ENV = "LORASHIP_API_KEY"
TRITON_KEY_HEADER = "x-api-key"
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # the model's -> OpenAI's
MAX_CHOICES = 128  # OpenAI's limit on n
MAX_REQUESTS = 1024  # prompts x n of one completions request
MAX_LOGPROBS = 20  # the most likely tokens listed per position (the model's limit, and OpenAI's top_logprobs)
INT32_MAX = 2**31 - 1  # what Triton's INT32 inputs hold (its JSON parser wraps larger integers)
# Not forwarded by the /v2 proxy: connection-level headers (RFC 9110 7.6.1), those httpx recomputes, and
# the client's credentials (the frontend sends its own key).
HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "host", "content-length", "expect"}
CREDENTIALS = {"authorization", TRITON_KEY_HEADER}
RETRY_AFTER = "5"  # seconds, on every 503: the supervisor restarts a crashed Triton within a few
ACCEPTED_TYPES = ("application/json", "application/octet-stream")  # and none: what OpenAI's and Triton's clients send
HEALTH = re.compile(r"/v2/health/(?:live|ready)|/v2/models/[^/]+(?:/versions/[^/]+)?/ready")
GENERATE = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/[^/]+)?/generate(?P<stream>_stream)?")
# Triton's own answer to a /v2 request without its key (--http-restricted-api), kept byte for byte.
TRITON_KEY_REFUSAL = b'{"error":"This API is restricted, expecting header \'x-api-key\'"}'
SURROGATE = re.compile("[\ud800-\udfff]")  # JSON may escape them (\ud800); UTF-8 cannot encode them


class ApiError(Exception):
    """An error answered in OpenAI's shape on /v1 and in Triton's (``{"error": message}``) on /v2; a 503
    carries ``Retry-After``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    @property
    def headers(self) -> dict[str, str]:
        return {"Retry-After": RETRY_AFTER} if self.status == 503 else {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)

    def triton_response(self) -> JSONResponse:
        return JSONResponse({"error": self.message}, status_code=self.status, headers=self.headers)


def unavailable(message: str) -> ApiError:
    """A 503 ``server_error``: Triton unreachable, its connection dropped, or the model crashed."""
    return ApiError(503, f"{message}: the server is recovering, retry shortly", "server_error")


def shown(value: Any, limit: int = 60) -> str:
    """A client's value for an error message: JSON with non-ASCII escaped (a lone surrogate cannot be
    encoded), cut to ``limit`` characters."""
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def surrogate_at(data: Any) -> str | None:
    """Where in decoded JSON a string (or a key) holds a lone surrogate, as OpenAI names a parameter
    (``messages.[0].content``); None if nowhere. Iterative: JSON nests deeper than Python recurses."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if SURROGATE.search(value):
                return path or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                if SURROGATE.search(key):
                    return f"{path}.{shown(key)}" if path else shown(key)
                stack.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            stack.extend((f"{path}.[{i}]", item) for i, item in enumerate(value))
    return None


# -- request bodies -------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields /v1/completions and /v1/chat/completions share; unknown fields are ignored, as OpenAI's
    optional ones are here (``user``, ``metadata``, ...)."""

    model: str
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _unicode(cls, data: Any) -> Any:
        """400 naming the parameter for a string UTF-8 cannot encode (a lone surrogate), before it gets further."""
        if (param := surrogate_at(data)) is not None:
            raise ApiError(400, f"{param} is not valid Unicode (it holds a lone surrogate such as \\ud800): send UTF-8 text",
                           param=param)
        return data


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ...: the template may use them
    role: str
    content: str | list[ContentPart] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0, le=INT32_MAX)  # 0: score the prompt (echo and logprobs), generate nothing
    echo: bool | None = False
    suffix: str | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None


def _refuse_unsupported(req: _Sampling) -> None:
    """400 for options this server cannot honour, rather than silently ignoring them."""
    unsupported = [
        ("logit_bias", bool(req.logit_bias), "logit_bias is not supported"),
        ("stream_options", req.stream_options is not None and not req.stream, "stream_options needs stream: true"),
    ]
    if isinstance(req, ChatRequest):
        unsupported += [
            ("top_logprobs", req.top_logprobs is not None and not req.logprobs, "top_logprobs needs logprobs: true"),
            ("tools", bool(req.tools) or req.tool_choice not in (None, "none"), "tools and tool_choice are not supported"),
            ("response_format", (req.response_format or {}).get("type", "text") != "text",
             "response_format other than text is not supported"),
        ]
    else:
        unsupported += [
            ("suffix", bool(req.suffix), "suffix is not supported"),
            ("logprobs", req.logprobs is not None and bool(req.echo) and bool(req.stream),
             "logprobs with echo are not streamed: send stream: false"),
            ("max_tokens", req.max_tokens == 0 and not (req.echo and req.logprobs is not None),
             "max_tokens 0 only scores the prompt: send echo: true and logprobs"),
            ("best_of", req.best_of not in (None, 1, req.n or 1), "best_of other than n is not supported (no ranking)"),
        ]
    for param, bad, message in unsupported:
        if bad:
            raise ApiError(400, message, param=param)


def _prompts(req: CompletionRequest) -> list[dict[str, Any]]:
    """Each prompt of a completions request as the model's input: ``text_input``, or ``input_ids``
    for a prompt of token ids (a list of ints, or one list per prompt)."""
    prompt = req.prompt
    items: list[Any] = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    if not items or any(isinstance(p, list) and not p for p in items):
        raise ApiError(400, "prompt is empty: send a string, a list of strings, or token ids", param="prompt")
    if len(items) * (req.n or 1) > MAX_REQUESTS:
        raise ApiError(400, f"{len(items)} prompts x n={req.n or 1} is more than {MAX_REQUESTS} completions per request",
                       param="prompt")
    for p in items:
        bad = next((t for t in p if not 0 <= t <= INT32_MAX), None) if isinstance(p, list) else None
        if bad is not None:  # Triton's INT32 input would wrap it into some other token
            raise ApiError(400, f"prompt: token id {bad} is not in [0, {INT32_MAX}]: send the tokenizer's ids", param="prompt")
    return [{"text_input": p} if isinstance(p, str) else {"input_ids": p} for p in items]


def _messages(req: ChatRequest) -> list[dict[str, Any]]:
    """The chat as the model's ``messages`` input: text parts joined, other fields kept for the template."""
    out = []
    for i, message in enumerate(req.messages):
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise ApiError(400, "only text content parts are supported", param=f"messages.[{i}].content")
            content = "\n".join(part.text for part in content)
        out.append({**(message.model_extra or {}), "role": message.role, "content": content})
    return out


def _bodies(req: _Sampling, prompt: dict[str, Any], max_tokens: int | None) -> list[dict[str, Any]]:
    """The Triton generate inputs of each of the request's ``n`` choices: choice ``i`` samples with
    ``seed + i``, so the choices differ and each is reproducible."""
    body = {**prompt, **_generate_body(req, max_tokens)}
    if "seed" not in body:
        return [body] * (req.n or 1)
    return [{**body, "seed": (body["seed"] + i) % 2**64} for i in range(req.n or 1)]


def _generate_body(req: _Sampling, max_tokens: int | None) -> dict[str, Any]:
    """The Triton generate inputs for an OpenAI request; what it leaves out takes the model's defaults
    (greedy, and the repository's ``--max-tokens``)."""
    body: dict[str, Any] = {"stream": True}  # streamed upstream even for one answer: see Triton.generate
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if req.temperature is not None:
        body["temperature"] = req.temperature
    if req.top_p is not None:
        body["top_p"] = req.top_p
    if req.seed is not None:
        body["seed"] = req.seed % 2**64  # the model takes UINT64; OpenAI allows any integer
    stop = [req.stop] if isinstance(req.stop, str) else req.stop
    if stop:
        body["stop"] = stop
    for penalty in ("presence_penalty", "frequency_penalty"):  # sent only when used: models that lack them refuse
        if getattr(req, penalty):
            body[penalty] = getattr(req, penalty)
    if (k := _logprobs_asked(req)) is not None:
        body["logprobs"] = k
    return body


def _logprobs_asked(req: _Sampling) -> int | None:
    """How many alternatives per token the request wants log-probabilities for; None: no logprobs."""
    if isinstance(req, ChatRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return getattr(req, "logprobs", None)


def _entries(event: dict[str, Any], output: str = "logprobs") -> list[dict[str, Any]]:
    """The token entries of a Triton response's ``logprobs`` (or ``prompt_logprobs``) output, a JSON list."""
    return json.loads(event[output]) if event.get(output) else []


def _chat_logprobs(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: each token with its UTF-8 bytes and its most likely alternatives."""
    def token(e: dict[str, Any]) -> dict[str, Any]:
        return {"token": e["token"], "logprob": e["logprob"], "bytes": list(e["token"].encode("utf-8"))}

    return {"content": [{**token(e), "top_logprobs": [token(t) for t in e["top_logprobs"]]} for e in entries], "refusal": None}


def _completion_logprobs(entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """OpenAI's completions ``logprobs``: tokens, their log-probabilities, the alternatives as
    ``{token: logprob}`` and each token's offset in the text (from ``offset``). An echoed prompt's
    first token has no log-probability (null, as OpenAI's)."""
    offsets = []
    for e in entries:
        offsets.append(offset)
        offset += len(e["token"])
    tops = [None if e["top_logprobs"] is None else {t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries]
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": tops, "text_offset": offsets}


# -- Triton -----------------------------------------------------------------------------------------

class Triton:
    """Triton's HTTP API over one pooled async connection set; the frontend's key goes as x-api-key."""

    def __init__(self, url: str, api_key: str | None) -> None:
        self.url = url.rstrip("/")
        self.headers = {TRITON_KEY_HEADER: api_key} if api_key else {}
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
            raise _triton_error("", response.status_code, _error_text(response.content))
        return sorted({m["name"] for m in response.json() if m.get("state", "READY") == "READY"})

    async def schema(self, model: str, refresh: bool = False) -> Schema:
        """The model's inputs and served context, from its config (cached; refetched after a minute, on
        ``refresh``, or when a response names another version); Triton's refusal (an unknown model) as
        an ApiError with its status and message."""
        cached = self.schemas.get(model)
        age = time.monotonic() - cached.fetched if cached is not None else math.inf
        if age < SCHEMA_TTL and (not refresh or age < 5.0):  # refreshed at most every 5 s, however many bad bodies come
            return cached
        path = _model_path(model)
        metadata, config = await asyncio.gather(self.send("GET", path, timeout=10), self.send("GET", f"{path}/config", timeout=10))
        for response in (metadata, config):
            if response.status_code != 200:
                raise ApiError(response.status_code, _error_text(response.content), "server_error" if response.status_code >= 500 else "invalid_request_error")
        self.schemas[model] = schema = Schema.of(metadata.json(), config.json())
        return schema

    async def generate(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """One answer, from a streamed request (``body`` has ``stream: true``) whose events are merged
        (:func:`merge_events`). Triton notices a client gone only when it writes to it, so only a stream
        is cancelled when this task is (its client gone): its upstream connection closes and Triton
        cancels the request at its next response."""
        status, outs = await self.once(f"{_model_path(model)}/generate_stream", json_body=body)
        if isinstance(outs, str):
            raise _triton_error(model, status, outs)
        for out in outs:
            if "error" in out:
                raise _triton_error(model, 400, str(out["error"]))
        return merge_events(outs)

    async def once(self, path: str, **send: Any) -> tuple[int, list[dict[str, Any]] | str]:
        """A POST to a ``/generate_stream`` read whole (one read, not one per event): (200, its events),
        or (Triton's status, its error message)."""
        response = await self.send("POST", path, stream=True, **send)
        raw = await self.read(response)
        if response.status_code != 200:
            return response.status_code, _error_text(raw)
        events = [_event(event) for event in raw.split(b"\n\n") if event.startswith(b"data:")]
        return (200, events) if events else (500, f"Triton answered no response on {path}")

    async def generate_all(self, model: str, bodies: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One generate per body, at once; the first error cancels the rest and is raised."""
        tasks = [asyncio.ensure_future(self.generate(model, body)) for body in bodies]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    async def stream_all(self, model: str, bodies: list[dict[str, Any]]) -> list[tuple[httpx.Response, AsyncIterator[list[dict[str, Any]]]]]:
        """One open stream per body; if any fails to open, the others are closed and its error raised."""
        opened = await asyncio.gather(*(self.stream(model, body) for body in bodies), return_exceptions=True)
        failed = [o for o in opened if isinstance(o, BaseException)]
        if failed:
            for o in opened:
                if not isinstance(o, BaseException):
                    await o[0].aclose()
            raise failed[0]
        return opened  # type: ignore[return-value]

    async def stream(self, model: str, body: dict[str, Any]) -> tuple[httpx.Response, AsyncIterator[list[dict[str, Any]]]]:
        """The open response and its events, in batches: the events that arrived together (several when
        this frontend fell behind, which it then answers with one chunk). An error in the first response
        comes back as an ApiError; a connection that drops mid-stream as a 503 ApiError from the events."""
        response = await self.send("POST", f"{_model_path(model)}/generate_stream", body, stream=True)
        if response.status_code != 200:
            raise _triton_error(model, response.status_code, _error_text(await self.read(response)))

        async def events() -> AsyncIterator[list[dict[str, Any]]]:
            pending = b""
            try:
                async for data in response.aiter_bytes():
                    *complete, pending = (pending + data).split(b"\n\n")
                    batch = [_event(event) for event in complete if event.startswith(b"data:")]
                    if batch:
                        yield batch
            except httpx.HTTPError as exc:
                raise unavailable(f"Triton closed the stream mid-response ({type(exc).__name__})") from None

        return response, events()


def _event(event: bytes) -> dict[str, Any]:
    """The JSON of one ``data:`` event (bytes UTF-8 cannot decode become U+FFFD, as the model's own text does)."""
    return json.loads(event[5:].decode("utf-8", errors="replace"))


def merge_events(events: list[dict[str, Any]]) -> dict[str, Any]:
    """One answer from a stream's responses, equal to the model's non-streamed answer: the text and the
    ``logprobs`` entries joined, ``num_output_tokens`` (each response's own count) summed, every other
    output (the counts so far, ``finish_reason``, ``prompt_logprobs``) as last sent."""
    out: dict[str, Any] = {}
    entries: list[dict[str, Any]] | None = None
    for event in events:
        for key, value in event.items():
            if key == "text_output":
                out[key] = out.get(key, "") + (value or "")
            elif key == "logprobs":
                entries = (entries or []) + _entries(event)
            elif key == "num_output_tokens":
                out[key] = out.get(key, 0) + int(value)
            else:
                out[key] = value
    if entries is not None:
        out["logprobs"] = json.dumps(entries)  # as the model writes it
    return dict(sorted(out.items()))  # Triton's order


def _model_path(model: str) -> str:
    """Triton's path of a model; a name Triton could not hold (a path, say) is an unknown model."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", model) or set(model) == {"."}:
        raise ApiError(404, f"The model `{model}` does not exist", param="model", code="model_not_found")
    return f"/v2/models/{model}"


def _error_text(raw: bytes) -> str:
    """The ``error`` of a Triton JSON or SSE error body."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        return str(json.loads(text.removeprefix("data:")).get("error", text))
    except (ValueError, AttributeError):
        return text[:300]


def _triton_error(model: str, status: int, message: str) -> ApiError:
    """A Triton error as OpenAI's: unknown model 404, context overflow 400, other bad requests 400."""
    first = message.strip().splitlines()[0] if message.strip() else f"Triton answered HTTP {status}"
    if "unknown model" in first or ("not found" in first and "model" in first):
        return ApiError(404, f"The model `{model}` does not exist (GET /v1/models lists the served models)",
                           param="model", code="model_not_found")
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


# -- the edge: /v2 generate bodies and the body limit ----------------------------------------------

SCHEMA_TTL = 60.0  # seconds a model's inputs are trusted before they are fetched again
GENERATE_KEYS = ("id", "parameters")  # what Triton's generate extension takes beside the model's inputs
INT_RANGES = {f"TYPE_{kind}{bits}": ((-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if kind == "INT" else (0, 2**bits - 1))
              for kind in ("INT", "UINT") for bits in (8, 16, 32, 64)}
FLOAT_MAX = {"TYPE_FP16": 65504.0, "TYPE_BF16": 3.3895313892515355e38, "TYPE_FP32": 3.4028234663852886e38,
             "TYPE_FP64": 1.7976931348623157e308}
BODY_BASE = 1 << 20  # bytes of a body beside its prompt: sampling inputs, stop strings, a chat's JSON framing
BODY_PER_TOKEN = 64  # bytes per token of context a prompt may take as JSON (see BodyLimit)
DEFAULT_CONTEXT = 131072  # tokens, for a model whose config.pbtxt has no ``context`` parameter
LIMIT_TTL = 30.0  # seconds the served models' largest context is trusted before it is read again


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


# -- responses --------------------------------------------------------------------------------------

def _usage(fields: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(fields.get("prompt_tokens", 0)), int(fields.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _total_usage(outs: list[dict[str, Any]], n: int) -> dict[str, int]:
    """Usage of ``n`` choices of each prompt (``outs`` in choice order): each prompt once, every
    completion."""
    usages = [_usage(out) for out in outs]
    prompt = sum(u["prompt_tokens"] for u in usages[::n])
    completion = sum(u["completion_tokens"] for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish(out: dict[str, Any]) -> str:
    finish = out.get("finish_reason", "stop")
    return FINISH_REASONS.get(finish, finish)


def _event_stream(events: AsyncIterator[str], streams: list[tuple[httpx.Response, Any]]) -> StreamingResponse:
    async def close() -> None:
        for response, _ in streams:
            await response.aclose()

    return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(close))


def _sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _merged(streams: list[AsyncIterator[list[dict[str, Any]]]]) -> AsyncIterator[tuple[int, list[dict[str, Any]]]]:
    """(choice index, batch of events) from all streams as they arrive; one stream is read directly."""
    if len(streams) == 1:
        async for batch in streams[0]:
            yield 0, batch
        return
    queue: asyncio.Queue[tuple[int, list[dict[str, Any]] | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, events: AsyncIterator[list[dict[str, Any]]]) -> None:
        try:
            async for batch in events:
                await queue.put((index, batch))
        except Exception as exc:  # noqa: BLE001 - raised where the chunks are read
            await queue.put((index, exc))
            return
        await queue.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, events)) for i, events in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            index, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item is None:
                open_streams -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def _stream_events(streams: list[tuple[httpx.Response, AsyncIterator[list[dict[str, Any]]]]], chunk: Any,
                         include_usage: bool, n: int, first: list[str] | None = None) -> AsyncIterator[str]:
    """SSE chunks built by ``chunk(index, text, finish_reason, usage, logprob_entries)``: for each choice,
    the text (and logprobs) of each batch of its Triton responses in one chunk, then its finish reason;
    then usage (prompt tokens once, completion tokens summed over the choices), then [DONE]."""
    finals: dict[int, dict[str, Any]] = {}  # each choice's last event: its counts and finish reason
    merged = _merged([events for _, events in streams])
    try:
        if first:
            yield "".join(first)
        try:
            async for index, batch in merged:
                out = []
                text = "".join(event.get("text_output") or "" for event in batch)
                entries = [e for event in batch for e in _entries(event)]
                if text or entries:
                    out.append(_sse(chunk(index, text, None, None, entries)))
                for event in batch:
                    if "error" in event:
                        out.append(_sse({"error": {"message": str(event["error"]), "type": "server_error", "param": None, "code": None}}))
                        yield "".join(out)
                        return
                    if event.get("finish_reason"):
                        finals[index] = event
                        out.append(_sse(chunk(index, None, _finish(event), None, [])))
                if out:
                    yield "".join(out)
        except ApiError as exc:  # the upstream died mid-stream: an error event ends the stream, never a hang or a cut body
            yield _sse({"error": {"message": exc.message, "type": exc.type, "param": None, "code": exc.code}})
            return
        if include_usage and len(finals) == len(streams):
            yield _sse(chunk(None, None, None, _total_usage([finals[i] for i in range(len(streams))], n), []))
        yield "data: [DONE]\n\n"
    finally:
        await merged.aclose()
        for response, _ in streams:  # a client gone mid-stream: closing the upstreams makes Triton cancel the requests
            await response.aclose()


def create_app(triton_url: str, api_key: str | None = None, max_body_bytes: int | None = None) -> FastAPI:
    """The FastAPI app: /v1 (OpenAI) and /v2 (Triton, passed through), behind the :class:`Edge`.

    ``max_body_bytes``: the largest request body; None sizes it from the served models' context
    (:class:`BodyLimit`)."""
    triton = Triton(triton_url, api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.triton = triton
        app.state.started = int(time.time())
        yield
        await triton.client.aclose()

    app = FastAPI(title="loraship OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.triton_response() if _is_v2(request.url.path) else exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        if error.get("type") == "json_invalid":
            return ApiError(400, f"the request body is not valid JSON: {error.get('msg')}").response()
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return ApiError(400, f"{param + ': ' if param else ''}{error.get('msg', 'invalid request')}", param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # unknown routes, wrong methods
        return await api_error(request, ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        names = await request.app.state.triton.models()
        return {"object": "list", "data": [_model_card(request, name) for name in names]}

    @app.get("/v1/models/{model_id}")
    async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
        if model_id not in await request.app.state.triton.models():
            raise ApiError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
        return _model_card(request, model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Any:
        _refuse_unsupported(req)
        messages = {"messages": json.dumps(_messages(req), ensure_ascii=False)}
        bodies = _bodies(req, messages, req.max_completion_tokens or req.max_tokens)
        rid, created, triton = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), request.app.state.triton
        if not req.stream:
            outs = await triton.generate_all(req.model, bodies)
            return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": out.get("text_output", "")},
                                 "logprobs": _chat_logprobs(_entries(out)) if req.logprobs else None,
                                 "finish_reason": _finish(out)} for i, out in enumerate(outs)],
                    "usage": _total_usage(outs, len(outs))}
        streams = await triton.stream_all(req.model, bodies)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(index: int | None, text: str | None, finish: str | None, usage: dict[str, int] | None,
                  entries: list[dict[str, Any]], role: str | None = None) -> dict[str, Any]:
            data: dict[str, Any] = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
            if usage is not None:
                data["choices"] = []
            else:
                delta = {"role": role, "content": text} if role else ({"content": text} if text is not None else {})
                logprobs = _chat_logprobs(entries) if req.logprobs and entries else None
                data["choices"] = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
            if include_usage:
                data["usage"] = usage
            return data

        first = [_sse(chunk(i, "", None, None, [], role="assistant")) for i in range(len(bodies))]
        return _event_stream(_stream_events(streams, chunk, include_usage, len(bodies), first), streams)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Any:
        """Each prompt (text or token ids) x ``n`` is one request to Triton; the model echoes the prompt
        (``exclude_input_in_output``) and, with ``echo`` and ``logprobs``, scores it (``prompt_logprobs``)."""
        _refuse_unsupported(req)
        extra: dict[str, Any] = {}
        if req.echo:
            extra["exclude_input_in_output"] = False
            if req.logprobs is not None:
                extra["prompt_logprobs"] = req.logprobs
        n = req.n or 1
        bodies = [body for fields in _prompts(req) for body in _bodies(req, {**fields, **extra}, req.max_tokens)]
        rid, created, triton = f"cmpl-{uuid.uuid4().hex}", int(time.time()), request.app.state.triton
        if not req.stream:
            outs = await triton.generate_all(req.model, bodies)
            return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                    "choices": [{"index": i, "text": out.get("text_output", ""),
                                 "logprobs": _completion_logprobs(_entries(out, "prompt_logprobs") + _entries(out), 0)
                                 if req.logprobs is not None else None,
                                 "finish_reason": _finish(out)} for i, out in enumerate(outs)],
                    "usage": _total_usage(outs, n)}
        streams = await triton.stream_all(req.model, bodies)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        offsets = [0] * len(bodies)  # each choice's text so far: where its next token's text_offset starts

        def chunk(index: int | None, text: str | None, finish: str | None, usage: dict[str, int] | None,
                  entries: list[dict[str, Any]]) -> dict[str, Any]:
            data: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
            logprobs = None
            if req.logprobs is not None and entries:
                logprobs = _completion_logprobs(entries, offsets[index])
                offsets[index] += sum(len(e["token"]) for e in entries)
            data["choices"] = [] if usage is not None else [{"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}]
            if include_usage:
                data["usage"] = usage
            return data

        return _event_stream(_stream_events(streams, chunk, include_usage, n), streams)

    @app.api_route("/v2/health/live", methods=["GET", "HEAD"])
    async def live() -> Response:
        """This process's liveness (200 while it runs): a restart of Triton under it does not end the
        container; readiness (/v2/health/ready, Triton's) tells the load balancer to wait."""
        return Response(status_code=200)

    @app.api_route("/v2", methods=["GET", "HEAD"])
    @app.api_route("/v2/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "HEAD"])
    async def triton_api(request: Request) -> Response:
        """Triton's own API, passed through; generate bodies are checked first (:func:`check_generate`)."""
        path, body = request.url.path, await request.body()
        if request.method == "POST" and (match := GENERATE.fullmatch(path)):
            model, stream = match["model"], bool(match["stream"])
            schema = await triton.schema(model)
            try:
                fields = check_generate(body, schema, model, stream)
            except ApiError as exc:
                if not exc.message.startswith("unexpected inference input"):
                    raise
                schema = await triton.schema(model, refresh=True)  # the model may have gained that input since
                fields = check_generate(body, schema, model, stream)
            if not stream:
                return await _generate_once(triton, request, model, schema, fields)
        upstream = await triton.send(request.method, path, content=body, stream=True, params=request.url.query or None,
                                     headers=_forwarded(request, triton))
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
        if upstream.status_code == 200 and upstream.headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(_relay_events(upstream), status_code=200, headers=headers)
        content = await triton.read(upstream)  # whole, so that a connection dropped meanwhile is a clean 503
        if upstream.status_code == 400 and b"is not healthy" in content:
            raise unavailable(_error_text(content))
        return Response(content, status_code=upstream.status_code, headers=headers)

    app.add_middleware(Edge, api_key=api_key, limit=BodyLimit(triton, max_body_bytes))
    return app


def _is_v2(path: str) -> bool:
    return path == "/v2" or path.startswith("/v2/")


def _forwarded(request: Request, triton: Triton) -> list[tuple[str, str]]:
    """The client's headers for Triton, less hop-by-hop ones; the key is the frontend's own when it has
    one (the edge checked the client's), else the client's (a Bearer token goes as x-api-key)."""
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS and k.lower() not in CREDENTIALS]
    if not triton.headers:
        given = _bearer(request.headers.get("authorization")) or request.headers.get(TRITON_KEY_HEADER)
        headers += [(TRITON_KEY_HEADER, given)] if given else []
    return headers


async def _generate_once(triton: Triton, request: Request, model: str, schema: Schema, body: dict[str, Any]) -> Response:
    """/generate as Triton answers it (one JSON reply, or ``{"error"}`` with Triton's status), from a
    stream: Triton's /generate_stream with ``stream: true``, its events merged (:func:`merge_events`),
    so that a client that goes away (the edge cancels this task) makes Triton cancel the request (it
    notices a client gone only when it writes to it)."""
    if "stream" in schema.inputs:
        body = {**body, "stream": True}
    headers = [(k, v) for k, v in _forwarded(request, triton) if k.lower() != "content-type"] + [("content-type", "application/json")]
    status, events = await triton.once(f"{request.url.path}_stream", content=json.dumps(body, ensure_ascii=False).encode(),
                                       params=request.url.query or None, headers=headers)
    errors = [events] if isinstance(events, str) else [str(e["error"]) for e in events if "error" in e]
    if errors:
        raise unavailable(errors[0]) if "is not healthy" in errors[0] else ApiError(400 if status == 200 else status, errors[0])
    if events[-1].get("model_version") not in (None, schema.version):
        triton.schemas.pop(model, None)  # a new version: its inputs are read again
    return Response(json.dumps(merge_events(events), ensure_ascii=False, separators=(",", ":")), media_type="application/json")


async def _relay_events(upstream: httpx.Response) -> AsyncIterator[bytes]:
    """Triton's server-sent events as they come, whole events only; if the connection drops, an error
    event ends the stream (never a hang, never a cut chunk). Closing it (a client gone) closes the
    upstream, so Triton cancels the request."""
    pending = b""
    try:
        async for data in upstream.aiter_raw():
            pending += data
            cut = pending.rfind(b"\n\n") + 2
            if cut >= 2:
                yield pending[:cut]
                pending = pending[cut:]
        if pending:
            yield pending
    except httpx.HTTPError as exc:
        error = unavailable(f"Triton closed the stream mid-response ({type(exc).__name__})")
        yield f"data: {json.dumps({'error': error.message})}\n\n".encode()
    finally:
        await upstream.aclose()


def _model_card(request: Request, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": request.app.state.started, "owned_by": "loraship"}


def _bearer(value: str | None) -> str | None:
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None


class Edge:
    """ASGI middleware in front of routing: what a request must pass before any of it is read or sent on.

    1. The key (when set), from the headers alone: every path but health. /v1 (and anything not /v2)
       gets 401 in OpenAI's shape, /v2 what Triton answers (403 ``This API is restricted ...``).
    2. A body's Content-Type: JSON, Triton's binary tensors (octet-stream), or none; else 415 with the fix
       (Triton 2.51 crashes on form-encoded bodies of 4 MiB or more, and curl -d sends that type).
       A compressed body (Content-Encoding) is refused too: its size says nothing of what it holds.
    3. Size: a Content-Length over the limit is 413 at once; a chunked body is read up to the limit.
       Refusals with a body unread close the connection, so it is never read (as nginx does).
    Then the body (held, at most the limit) is handed to the app, and while the app has not begun its
    answer, a client that disconnects cancels it: the upstream request to Triton is closed and Triton
    cancels it. Once an answer streams, Starlette sees the disconnect itself.

    A plain ASGI wrapper, not BaseHTTPMiddleware, so a streamed response still sees its client disconnect.
    """

    def __init__(self, app: Any, api_key: str | None, limit: BodyLimit) -> None:
        self.app, self.api_key, self.limit = app, api_key.encode() if api_key else None, limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        headers: dict[str, str] = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        refuse = functools.partial(self.refuse, send, _is_v2(path), has_body)
        if self.api_key is not None and not HEALTH.fullmatch(path):
            given = _bearer(headers.get("authorization")) or headers.get(TRITON_KEY_HEADER)
            if given is None or not hmac.compare_digest(given.encode(), self.api_key):
                if _is_v2(path):
                    await _answer(send, 403, TRITON_KEY_REFUSAL, "text/plain", close=has_body)
                elif given is None:
                    await refuse(ApiError(401, "You didn't provide an API key: send the header Authorization: Bearer KEY",
                                          code="invalid_api_key"))
                else:
                    await refuse(ApiError(401, "Incorrect API key provided", code="invalid_api_key"))
                return
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if has_body and media and media not in ACCEPTED_TYPES:  # (a GET that names a type carries nothing to refuse)
            await refuse(ApiError(415, f"Content-Type {shown(headers['content-type'])} is not accepted: send JSON with "
                                       f"-H 'Content-Type: application/json' (curl -d sends a form by default); "
                                       f"Triton's binary tensors may be application/octet-stream", code="unsupported_media_type"))
            return
        if has_body and headers.get("content-encoding", "identity").lower() != "identity":
            await refuse(ApiError(415, f"Content-Encoding {shown(headers['content-encoding'])} is not accepted: send the body "
                                       "uncompressed", code="unsupported_media_type"))
            return
        body = await self.read_body(headers, has_body, receive, refuse)
        if body is not None:
            await self.serve(scope, body, receive, send)

    async def read_body(self, headers: dict[str, str], has_body: bool, receive: Any, refuse: Any) -> bytes | None:
        """The whole body, or None after a 413 (or when the client left while sending it)."""
        limit = await self.limit.get() if has_body else 0
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            limit = await self.limit.get(refresh=True)
            if int(length) > limit:
                await refuse(self.too_large(limit))
                return None
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit and size - len(chunk) <= limit:
                limit = await self.limit.get(refresh=True)
            if size > limit:
                await refuse(self.too_large(limit))
                return None
            chunks.append(chunk)
            more = message.get("more_body", False)
        return b"".join(chunks)

    def too_large(self, limit: int) -> ApiError:
        basis = "--max-body-bytes" if self.limit.fixed else f"sized from the served context of {self.limit.context} tokens"
        return ApiError(413, f"the request body is larger than {limit} bytes, this server's limit ({basis}): send a shorter "
                             "request, or start the frontend with a larger --max-body-bytes", code="request_too_large")

    @staticmethod
    async def refuse(send: Any, v2: bool, close: bool, error: ApiError) -> None:
        response = error.triton_response() if v2 else error.response()
        await _answer(send, error.status, response.body, "application/json", close)

    async def serve(self, scope: dict[str, Any], body: bytes, receive: Any, send: Any) -> None:
        """Run the app on the held body; cancel it if its client disconnects before the answer starts."""
        started, gone, replayed = False, asyncio.Event(), False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def tracked(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        app = asyncio.ensure_future(self.app(scope, replay, tracked))
        watcher = asyncio.ensure_future(watch())
        try:
            await asyncio.wait((app, watcher), return_when=asyncio.FIRST_COMPLETED)
            if not app.done() and not started:
                app.cancel()  # the client left before its answer: drop the work (and the upstream request)
            await asyncio.wait((app,))
        except asyncio.CancelledError:
            app.cancel()
            raise
        finally:
            watcher.cancel()
        if not app.cancelled():
            app.result()  # the app's own failure, for uvicorn to log and answer 500


async def _answer(send: Any, status: int, body: bytes, content_type: str, close: bool) -> None:
    """A whole response from the edge; ``close``: the request's body is left unread, so the connection ends."""
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", RETRY_AFTER.encode()))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def main(argv: list[str] | None = None) -> None:
    """Serve the API with uvicorn; the key comes from the environment (LORASHIP_API_KEY), never the command line."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="port to listen on (default 9000)")
    parser.add_argument("--triton", default="http://127.0.0.1:8000", help="Triton's HTTP endpoint (default http://127.0.0.1:8000)")
    parser.add_argument("--max-body-bytes", type=int, default=None, metavar="N",
                        help="refuse request bodies over N bytes with 413 (default: 1 MiB + 64 bytes per token of the "
                             "served models' largest context)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    if args.max_body_bytes is not None and args.max_body_bytes < 1:
        parser.error(f"--max-body-bytes {args.max_body_bytes} is not positive: pass a byte count, e.g. 10485760")
    app = create_app(args.triton, os.environ.get(API_KEY_ENV) or None, args.max_body_bytes)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
