"""Server-sent events for /v1: the upstream streams of a request's choices merged into OpenAI's chunks, and
an error event (never a hang or a cut body) when an upstream dies mid-stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from .errors import ApiError
from .events import Event, entries
from .translate import finish, total_usage
from .triton import Upstream

#: Builds one chunk: ``chunk(index, text, finish_reason, usage, logprob_entries)`` (translate's ChatChunks, CompletionChunks).
Chunk = Callable[..., dict[str, Any]]


@dataclass
class EventStream:
    """A streamed answer: its SSE text, and the upstream streams to close once it is sent (or its client is gone)."""

    events: AsyncIterator[str]
    upstreams: list[Upstream]

    async def close(self) -> None:
        for response, _ in self.upstreams:
            await response.aclose()


def sse(data: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _merged(streams: list[AsyncIterator[list[Event]]]) -> AsyncIterator[tuple[int, list[Event]]]:
    """(choice index, batch of events) from all streams as they arrive; one stream is read directly."""
    if len(streams) == 1:
        async for batch in streams[0]:
            yield 0, batch
        return
    queue: asyncio.Queue[tuple[int, list[Event] | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, events: AsyncIterator[list[Event]]) -> None:
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


async def stream_events(streams: list[Upstream], chunk: Chunk, include_usage: bool, n: int,
                        first: list[str] | None = None) -> AsyncIterator[str]:
    """SSE chunks built by ``chunk(index, text, finish_reason, usage, logprob_entries)``: for each choice,
    the text (and logprobs) of each batch of its Triton responses in one chunk, then its finish reason;
    then usage (prompt tokens once, completion tokens summed over the choices), then [DONE]."""
    finals: dict[int, Event] = {}  # each choice's last event: its counts and finish reason
    merged = _merged([events for _, events in streams])
    try:
        if first:
            yield "".join(first)
        try:
            async for index, batch in merged:
                out = []
                text = "".join(event.get("text_output") or "" for event in batch)
                tokens = [e for event in batch for e in entries(event)]
                if text or tokens:
                    out.append(sse(chunk(index, text, None, None, tokens)))
                for event in batch:
                    if "error" in event:
                        out.append(sse({"error": {"message": str(event["error"]), "type": "server_error", "param": None, "code": None}}))
                        yield "".join(out)
                        return
                    if event.get("finish_reason"):
                        finals[index] = event
                        out.append(sse(chunk(index, None, finish(event), None, [])))
                if out:
                    yield "".join(out)
        except ApiError as exc:  # the upstream died mid-stream: an error event ends the stream, never a hang or a cut body
            yield sse({"error": {"message": exc.message, "type": exc.type, "param": None, "code": exc.code}})
            return
        if include_usage and len(finals) == len(streams):
            yield sse(chunk(None, None, None, total_usage([finals[i] for i in range(len(streams))], n), []))
        yield "data: [DONE]\n\n"
    finally:
        await merged.aclose()
        for response, _ in streams:  # a client gone mid-stream: closing the upstreams makes Triton cancel the requests
            await response.aclose()
