"""What the /v1 routers need (:class:`LLMEngine`, as Triton's own OpenAI frontend calls it), and its one
implementation over Triton's generate extension (:class:`TritonLLMEngine`).

Behind it is always ``/generate_stream`` with ``stream: true``: a streamed request relays its events, a
non-streamed one merges them into one answer (what /generate would answer). Either way a client that
disconnects closes the upstream stream, so Triton cancels the request and the model stops generating
(Triton notices a client gone only when it writes to it, so a request that answers once is never
cancelled).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Protocol

from .schemas import ChatRequest, CompletionRequest
from .streaming import EventStream, sse, stream_events
from .translate import ChatChunks, CompletionChunks, chat_bodies, chat_response, completion_bodies, completion_response
from .triton import Triton


class LLMEngine(Protocol):
    """The served models and the two completions, each answered whole (a dict, OpenAI's JSON) or as an
    :class:`EventStream` when the request asks for ``stream``. Errors are ``ApiError``."""

    async def models(self) -> list[str]: ...

    async def chat(self, request: ChatRequest) -> dict[str, Any] | EventStream: ...

    async def completion(self, request: CompletionRequest) -> dict[str, Any] | EventStream: ...


class TritonLLMEngine:
    """:class:`LLMEngine` over a Triton generate model: the OpenAI ``model`` is the Triton model name."""

    def __init__(self, triton: Triton) -> None:
        self.triton = triton

    async def models(self) -> list[str]:
        return await self.triton.models()

    async def chat(self, request: ChatRequest) -> dict[str, Any] | EventStream:
        bodies = chat_bodies(request)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not request.stream:
            return chat_response(request, rid, created, await self.triton.generate_all(request.model, bodies))
        upstreams = await self.triton.stream_all(request.model, bodies)
        chunk = ChatChunks(request, rid, created)
        first = [sse(chunk(i, "", None, None, [], role="assistant")) for i in range(len(bodies))]
        return EventStream(stream_events(upstreams, chunk, chunk.include_usage, len(bodies), first), upstreams)

    async def completion(self, request: CompletionRequest) -> dict[str, Any] | EventStream:
        bodies = completion_bodies(request)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if not request.stream:
            return completion_response(request, rid, created, await self.triton.generate_all(request.model, bodies))
        upstreams = await self.triton.stream_all(request.model, bodies)
        chunk = CompletionChunks(request, rid, created, len(bodies))
        return EventStream(stream_events(upstreams, chunk, chunk.include_usage, request.n or 1), upstreams)
