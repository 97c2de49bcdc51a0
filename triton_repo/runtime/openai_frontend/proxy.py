"""Triton's own API under /v2, passed through: generate bodies checked first (:func:`check_generate`),
/generate answered from a stream (so that a client gone cancels it), server-sent events relayed whole."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from loraship_contract import API_KEY_HEADER

from .edge import bearer
from .errors import ApiError, unavailable
from .events import merge_events
from .generate_checks import check_generate
from .triton import Schema, Triton, error_text

GENERATE = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/[^/]+)?/generate(?P<stream>_stream)?")
# Not forwarded: connection-level headers (RFC 9110 7.6.1), those httpx recomputes, and the client's
# credentials (the frontend sends its own key).
HOP_HEADERS = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
               "transfer-encoding", "upgrade", "host", "content-length", "expect"}
CREDENTIALS = {"authorization", API_KEY_HEADER}


async def passthrough(request: Request, triton: Triton) -> Response:
    """Triton's answer to ``request``; a generate body that does not fit the model is a 400 here."""
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
            return await generate_once(triton, request, model, schema, fields)
    upstream = await triton.send(request.method, path, content=body, stream=True, params=request.url.query or None,
                                 headers=forwarded(request, triton))
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
    if upstream.status_code == 200 and upstream.headers.get("content-type", "").startswith("text/event-stream"):
        return StreamingResponse(relay_events(upstream), status_code=200, headers=headers)
    content = await triton.read(upstream)  # whole, so that a connection dropped meanwhile is a clean 503
    if upstream.status_code == 400 and b"is not healthy" in content:
        raise unavailable(error_text(content))
    return Response(content, status_code=upstream.status_code, headers=headers)


def forwarded(request: Request, triton: Triton) -> list[tuple[str, str]]:
    """The client's headers for Triton, less hop-by-hop ones; the key is the frontend's own when it has
    one (the edge checked the client's), else the client's (a Bearer token goes as x-api-key)."""
    headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS and k.lower() not in CREDENTIALS]
    if not triton.headers:
        given = bearer(request.headers.get("authorization")) or request.headers.get(API_KEY_HEADER)
        headers += [(API_KEY_HEADER, given)] if given else []
    return headers


async def generate_once(triton: Triton, request: Request, model: str, schema: Schema, body: dict[str, Any]) -> Response:
    """/generate as Triton answers it (one JSON reply, or ``{"error"}`` with Triton's status), from a
    stream: Triton's /generate_stream with ``stream: true``, its events merged (:func:`merge_events`),
    so that a client that goes away (the edge cancels this task) makes Triton cancel the request (it
    notices a client gone only when it writes to it)."""
    if "stream" in schema.inputs:
        body = {**body, "stream": True}
    headers = [(k, v) for k, v in forwarded(request, triton) if k.lower() != "content-type"] + [("content-type", "application/json")]
    status, events = await triton.once(f"{request.url.path}_stream", content=json.dumps(body, ensure_ascii=False).encode(),
                                       params=request.url.query or None, headers=headers)
    errors = [events] if isinstance(events, str) else [str(e["error"]) for e in events if "error" in e]
    if errors:
        raise unavailable(errors[0]) if "is not healthy" in errors[0] else ApiError(400 if status == 200 else status, errors[0])
    if events[-1].get("model_version") not in (None, schema.version):
        triton.schemas.pop(model, None)  # a new version: its inputs are read again
    return Response(json.dumps(merge_events(events), ensure_ascii=False, separators=(",", ":")), media_type="application/json")


async def relay_events(upstream: httpx.Response) -> AsyncIterator[bytes]:
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
