"""The events of Triton's ``/generate_stream``: one JSON object of the model's outputs per ``data:`` event."""

from __future__ import annotations

import json
from typing import Any

Event = dict[str, Any]  # one response's outputs: text_output, completion_tokens, finish_reason, ...


def parse_event(event: bytes) -> Event:
    """The JSON of one ``data:`` event (bytes UTF-8 cannot decode become U+FFFD, as the model's own text does)."""
    return json.loads(event[5:].decode("utf-8", errors="replace"))


def parse_events(raw: bytes) -> list[Event]:
    """Every whole ``data:`` event in ``raw``."""
    return [parse_event(event) for event in raw.split(b"\n\n") if event.startswith(b"data:")]


def entries(event: Event, output: str = "logprobs") -> list[dict[str, Any]]:
    """The token entries of a response's ``logprobs`` (or ``prompt_logprobs``) output, a JSON list."""
    return json.loads(event[output]) if event.get(output) else []


def merge_events(events: list[Event]) -> Event:
    """One answer from a stream's responses, equal to the model's non-streamed answer: the text and the
    ``logprobs`` entries joined, ``num_output_tokens`` (each response's own count) summed, every other
    output (the counts so far, ``finish_reason``, ``prompt_logprobs``) as last sent."""
    out: Event = {}
    joined: list[dict[str, Any]] | None = None
    for event in events:
        for key, value in event.items():
            if key == "text_output":
                out[key] = out.get(key, "") + (value or "")
            elif key == "logprobs":
                joined = (joined or []) + entries(event)
            elif key == "num_output_tokens":
                out[key] = out.get(key, 0) + int(value)
            else:
                out[key] = value
    if joined is not None:
        out["logprobs"] = json.dumps(joined)  # as the model writes it
    return dict(sorted(out.items()))  # Triton's order
