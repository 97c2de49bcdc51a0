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

from loraship_contract import LORA_NAME

from .adapters import Adapters, Route, not_found
from .errors import ApiError
from .schemas import ChatRequest, CompletionRequest
from .streaming import EventStream, sse, stream_events
from .translate import ChatChunks, CompletionChunks, chat_bodies, chat_response, completion_bodies, completion_response
from .triton import Triton


class LLMEngine(Protocol):
    """The served models (base models and their adapters) and the two completions, each answered whole (a
    dict, OpenAI's JSON) or as an :class:`EventStream` when the request asks for ``stream``. Errors are
    ``ApiError``."""

    async def models(self) -> list[Route]: ...

    async def chat(self, request: ChatRequest) -> dict[str, Any] | EventStream: ...

    async def completion(self, request: CompletionRequest) -> dict[str, Any] | EventStream: ...


class TritonLLMEngine:
    """:class:`LLMEngine` over Triton generate models: the OpenAI ``model`` is a Triton model's name, or the
    name of an adapter one of them serves (sent to it as ``lora_name``)."""

    def __init__(self, triton: Triton, adapters: Adapters) -> None:
        self.triton = triton
        self.adapters = adapters

    async def models(self) -> list[Route]:
        return await self.adapters.names()

    async def _route(self, name: str, bodies: list[dict[str, Any]]) -> str:
        """The Triton model for ``name``; an adapter's name goes into each body as ``lora_name``."""
        route = await self.adapters.route(name)
        if route.adapter is not None:
            for body in bodies:
                body[LORA_NAME] = route.adapter
        return route.model

    async def chat(self, request: ChatRequest) -> dict[str, Any] | EventStream:
        try:
            return await self._chat(request)
        except ApiError as exc:
            raise not_found(request.model) if exc.code == "model_not_found" else exc

    async def completion(self, request: CompletionRequest) -> dict[str, Any] | EventStream:
        try:
            return await self._completion(request)
        except ApiError as exc:
            raise not_found(request.model) if exc.code == "model_not_found" else exc

    async def _chat(self, request: ChatRequest) -> dict[str, Any] | EventStream:
        bodies = chat_bodies(request)
        model = await self._route(request.model, bodies)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not request.stream:
            return chat_response(request, rid, created, await self.triton.generate_all(model, bodies))
        upstreams = await self.triton.stream_all(model, bodies)
        chunk = ChatChunks(request, rid, created)
        first = [sse(chunk(i, "", None, None, [], role="assistant")) for i in range(len(bodies))]
        return EventStream(stream_events(upstreams, chunk, chunk.include_usage, len(bodies), first), upstreams)

    async def _completion(self, request: CompletionRequest) -> dict[str, Any] | EventStream:
        bodies = completion_bodies(request)
        model = await self._route(request.model, bodies)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if not request.stream:
            return completion_response(request, rid, created, await self.triton.generate_all(model, bodies))
        upstreams = await self.triton.stream_all(model, bodies)
        chunk = CompletionChunks(request, rid, created, len(bodies))
        return EventStream(stream_events(upstreams, chunk, chunk.include_usage, request.n or 1), upstreams)
