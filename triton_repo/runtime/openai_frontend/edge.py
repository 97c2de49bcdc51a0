"""The edge: an ASGI middleware in front of routing that refuses, before any work, a request without the
key (from the headers alone), of a content type or encoding Triton should never see, or with a body over
the limit (:class:`Edge`)."""

from __future__ import annotations

import asyncio
import functools
import hmac
import re
from typing import Any

from loraship_contract import API_KEY_HEADER

from .errors import RETRY_AFTER, ApiError, is_v2, shown
from .triton import BodyLimit

ACCEPTED_TYPES = ("application/json", "application/octet-stream")  # and none: what OpenAI's and Triton's clients send
HEALTH = re.compile(r"/v2/health/(?:live|ready)|/v2/models/[^/]+(?:/versions/[^/]+)?/ready")
# Triton's own answer to a /v2 request without its key (--http-restricted-api), kept byte for byte.
TRITON_KEY_REFUSAL = f'{{"error":"This API is restricted, expecting header \'{API_KEY_HEADER}\'"}}'.encode()


def bearer(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header."""
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
        refuse = functools.partial(self.refuse, send, is_v2(path), has_body)
        if self.api_key is not None and not HEALTH.fullmatch(path):
            given = bearer(headers.get("authorization")) or headers.get(API_KEY_HEADER)
            if given is None or not hmac.compare_digest(given.encode(), self.api_key):
                if is_v2(path):
                    await answer(send, 403, TRITON_KEY_REFUSAL, "text/plain", close=has_body)
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
        await answer(send, error.status, response.body, "application/json", close)

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


async def answer(send: Any, status: int, body: bytes, content_type: str, close: bool) -> None:
    """A whole response from the edge; ``close``: the request's body is left unread, so the connection ends."""
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append((b"retry-after", RETRY_AFTER.encode()))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
