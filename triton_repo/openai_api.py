"""An OpenAI-compatible API in front of a Triton generate model, and Triton's own HTTP API beside it.

Routes: ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/completions`` and
``POST /v1/chat/completions``, streamed (server-sent events ending in ``data: [DONE]``) or not. The
model id is the Triton model name. Everything under ``/v2/`` is passed through to Triton unchanged,
so one port serves both APIs (on Azure Container Apps it is the public ingress port).

Behind it is Triton's HTTP generate extension: ``/generate`` for one response, ``/generate_stream``
for a stream. A chat goes to the model's ``messages`` input, so the model renders it with its own
chat template and its tokenizer counts the prompt after the template (``usage``). ``n`` choices are
``n`` requests to Triton at once (the model decodes them in one batch; with a ``seed``, choice ``i``
samples with ``seed + i``). A client that disconnects closes the upstream streams; Triton then
cancels the requests and the model stops generating.

With ``LORASHIP_API_KEY`` set, ``/v1`` requires ``Authorization: Bearer KEY`` (or ``x-api-key: KEY``)
and answers 401 in OpenAI's error shape otherwise; the frontend sends the key to Triton as
``x-api-key``, which Triton checks on ``/v2`` itself (health stays open for probes). Errors use
OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

This file is self-contained (FastAPI, pydantic, httpx and uvicorn; no loraship import), so
``loraship repo --stage-wheels`` copies it into the container beside ``start.sh``:

    LORASHIP_API_KEY=... python openai_api.py --port 9000 --triton http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException

API_KEY_ENV = "LORASHIP_API_KEY"
TRITON_KEY_HEADER = "x-api-key"
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # the model's -> OpenAI's
MAX_CHOICES = 128  # OpenAI's limit on n
MAX_REQUESTS = 1024  # prompts x n of one completions request
MAX_LOGPROBS = 20  # the most likely tokens listed per position (the model's limit, and OpenAI's top_logprobs)
# Not forwarded by the /v2 proxy: connection-level headers (RFC 9110 7.6.1) and those httpx recomputes.
HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "host", "content-length"}


class OpenAIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


# -- request bodies -------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields /v1/completions and /v1/chat/completions share; unknown fields are ignored, as OpenAI's
    optional ones are here (``user``, ``metadata``, ...)."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
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
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0: score the prompt (echo and logprobs), generate nothing
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
            raise OpenAIError(400, message, param=param)


def _prompts(req: CompletionRequest) -> list[dict[str, Any]]:
    """Each prompt of a completions request as the model's input: ``text_input``, or ``input_ids``
    for a prompt of token ids (a list of ints, or one list per prompt)."""
    prompt = req.prompt
    items: list[Any] = [prompt] if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)) else list(prompt)
    if not items or any(isinstance(p, list) and not p for p in items):
        raise OpenAIError(400, "prompt is empty: send a string, a list of strings, or token ids", param="prompt")
    if len(items) * (req.n or 1) > MAX_REQUESTS:
        raise OpenAIError(400, f"{len(items)} prompts x n={req.n or 1} is more than {MAX_REQUESTS} completions per request",
                          param="prompt")
    return [{"text_input": p} if isinstance(p, str) else {"input_ids": p} for p in items]


def _messages(req: ChatRequest) -> list[dict[str, Any]]:
    """The chat as the model's ``messages`` input: text parts joined, other fields kept for the template."""
    out = []
    for i, message in enumerate(req.messages):
        content = message.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise OpenAIError(400, "only text content parts are supported", param=f"messages.[{i}].content")
            content = "\n".join(part.text for part in content)
        out.append({**(message.model_extra or {}), "role": message.role, "content": content})
    return out


def _bodies(req: _Sampling, prompt: dict[str, Any], max_tokens: int | None, stream: bool) -> list[dict[str, Any]]:
    """The Triton generate inputs of each of the request's ``n`` choices: choice ``i`` samples with
    ``seed + i``, so the choices differ and each is reproducible."""
    body = {**prompt, **_generate_body(req, max_tokens, stream)}
    if "seed" not in body:
        return [body] * (req.n or 1)
    return [{**body, "seed": (body["seed"] + i) % 2**64} for i in range(req.n or 1)]


def _generate_body(req: _Sampling, max_tokens: int | None, stream: bool) -> dict[str, Any]:
    """The Triton generate inputs for an OpenAI request; what it leaves out takes the model's defaults
    (greedy, and the repository's ``--max-tokens``)."""
    body: dict[str, Any] = {"stream": stream}
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

    async def send(self, method: str, path: str, json_body: Any = None, stream: bool = False) -> httpx.Response:
        request = self.client.build_request(method, path, json=json_body, headers=self.headers)
        try:
            return await self.client.send(request, stream=stream)
        except httpx.HTTPError as exc:
            raise OpenAIError(503, f"Triton at {self.url} is not reachable ({type(exc).__name__})", "server_error") from None

    async def models(self) -> list[str]:
        response = await self.send("POST", "/v2/repository/index", {"ready": True})
        if response.status_code != 200:
            raise _triton_error("", response.status_code, _error_text(response.content))
        return sorted({m["name"] for m in response.json() if m.get("state", "READY") == "READY"})

    async def generate(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self.send("POST", f"{_model_path(model)}/generate", body)
        try:
            data = response.json()
        except ValueError:
            data = {"error": response.text[:200]}
        if response.status_code != 200 or "error" in data:
            raise _triton_error(model, response.status_code, str(data.get("error", data)))
        return data

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
        comes back as an OpenAIError."""
        response = await self.send("POST", f"{_model_path(model)}/generate_stream", body, stream=True)
        if response.status_code != 200:
            raw = await response.aread()
            await response.aclose()
            raise _triton_error(model, response.status_code, _error_text(raw))

        async def events() -> AsyncIterator[list[dict[str, Any]]]:
            pending = b""
            async for data in response.aiter_bytes():
                *complete, pending = (pending + data).split(b"\n\n")
                batch = [json.loads(event[5:]) for event in complete if event.startswith(b"data:")]
                if batch:
                    yield batch

        return response, events()


def _model_path(model: str) -> str:
    """Triton's path of a model; a name Triton could not hold (a path, say) is an unknown model."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", model) or set(model) == {"."}:
        raise OpenAIError(404, f"The model `{model}` does not exist", param="model", code="model_not_found")
    return f"/v2/models/{model}"


def _error_text(raw: bytes) -> str:
    """The ``error`` of a Triton JSON or SSE error body."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        return str(json.loads(text.removeprefix("data:")).get("error", text))
    except (ValueError, AttributeError):
        return text[:300]


def _triton_error(model: str, status: int, message: str) -> OpenAIError:
    """A Triton error as OpenAI's: unknown model 404, context overflow 400, other bad requests 400."""
    first = message.strip().splitlines()[0] if message.strip() else f"Triton answered HTTP {status}"
    if "unknown model" in first or ("not found" in first and "model" in first):
        return OpenAIError(404, f"The model `{model}` does not exist (GET /v1/models lists the served models)",
                           param="model", code="model_not_found")
    if status in (401, 403) or "restricted" in first:
        return OpenAIError(500, f"Triton refused the frontend's API key: {first}", "server_error")
    if "context" in first:
        return OpenAIError(400, first, code="context_length_exceeded")
    for name, what in (("messages", "chat messages"), ("logprobs", "logprobs"), ("prompt_logprobs", "prompt logprobs"),
                       ("input_ids", "token-id prompts"), ("exclude_input_in_output", "echo")):
        if f"unexpected inference input '{name}'" in first:
            return OpenAIError(400, f"model `{model}` takes no {what} (its repository predates them): re-run `loraship repo`",
                               param="model")
    if status >= 500:
        return OpenAIError(500, first, "server_error")
    return OpenAIError(400, first)


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
        if include_usage and len(finals) == len(streams):
            yield _sse(chunk(None, None, None, _total_usage([finals[i] for i in range(len(streams))], n), []))
        yield "data: [DONE]\n\n"
    finally:
        await merged.aclose()
        for response, _ in streams:  # a client gone mid-stream: closing the upstreams makes Triton cancel the requests
            await response.aclose()


def create_app(triton_url: str, api_key: str | None = None) -> FastAPI:
    """The FastAPI app: /v1 (OpenAI) and /v2 (Triton, passed through)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.triton = Triton(triton_url, api_key)
        app.state.started = int(time.time())
        yield
        await app.state.triton.client.aclose()

    app = FastAPI(title="loraship OpenAI-compatible API", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(OpenAIError)
    async def openai_error(request: Request, exc: OpenAIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        if error.get("type") == "json_invalid":
            return OpenAIError(400, f"the request body is not valid JSON: {error.get('msg')}").response()
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return OpenAIError(400, f"{param + ': ' if param else ''}{error.get('msg', 'invalid request')}", param=param).response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:  # unknown routes, wrong methods
        return OpenAIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}").response()

    @app.get("/v1/models")
    async def list_models(request: Request) -> dict[str, Any]:
        names = await request.app.state.triton.models()
        return {"object": "list", "data": [_model_card(request, name) for name in names]}

    @app.get("/v1/models/{model_id}")
    async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
        if model_id not in await request.app.state.triton.models():
            raise OpenAIError(404, f"The model `{model_id}` does not exist", param="model", code="model_not_found")
        return _model_card(request, model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request) -> Any:
        _refuse_unsupported(req)
        messages = {"messages": json.dumps(_messages(req), ensure_ascii=False)}
        bodies = _bodies(req, messages, req.max_completion_tokens or req.max_tokens, bool(req.stream))
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
        bodies = [body for fields in _prompts(req) for body in _bodies(req, {**fields, **extra}, req.max_tokens, bool(req.stream))]
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

    @app.api_route("/v2/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "HEAD"])
    async def triton_api(path: str, request: Request) -> StreamingResponse:
        """Triton's own API, passed through (streamed, so /generate_stream events arrive as they are sent)."""
        triton = request.app.state.triton
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
        bearer = _bearer(request.headers.get("authorization"))
        if bearer and TRITON_KEY_HEADER not in request.headers:  # the OpenAI-style key works on /v2 too
            headers.append((TRITON_KEY_HEADER, bearer))
        upstream = triton.client.build_request(request.method, f"/v2/{path}", params=request.url.query or None,
                                               headers=headers, content=await request.body())
        try:
            response = await triton.client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            return JSONResponse({"error": f"Triton at {triton.url} is not reachable ({type(exc).__name__})"}, status_code=503)
        reply_headers = {k: v for k, v in response.headers.items() if k.lower() not in HOP_HEADERS}
        return StreamingResponse(response.aiter_raw(), status_code=response.status_code, headers=reply_headers,
                                 background=BackgroundTask(response.aclose))

    if api_key:
        app.add_middleware(KeyCheck, api_key=api_key)
    return app


def _model_card(request: Request, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": request.app.state.started, "owned_by": "loraship"}


def _bearer(value: str | None) -> str | None:
    if value and value[:7].lower() == "bearer ":
        return value[7:].strip()
    return None


class KeyCheck:
    """ASGI middleware: /v1 needs the key as ``Authorization: Bearer`` or ``x-api-key``; 401 in OpenAI's shape.

    A plain ASGI wrapper, not BaseHTTPMiddleware, so a streamed response still sees its client disconnect.
    """

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.api_key = app, api_key.encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            given = _bearer(headers.get("authorization")) or headers.get(TRITON_KEY_HEADER)
            if given is None:
                error = OpenAIError(401, "You didn't provide an API key: send the header Authorization: Bearer KEY",
                                    code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
            if not hmac.compare_digest(given.encode(), self.api_key):
                await OpenAIError(401, "Incorrect API key provided", code="invalid_api_key").response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def main(argv: list[str] | None = None) -> None:
    """Serve the API with uvicorn; the key comes from the environment (LORASHIP_API_KEY), never the command line."""
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=9000, help="port to listen on (default 9000)")
    parser.add_argument("--triton", default="http://127.0.0.1:8000", help="Triton's HTTP endpoint (default http://127.0.0.1:8000)")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    args = parser.parse_args(argv)
    app = create_app(args.triton, os.environ.get(API_KEY_ENV) or None)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
