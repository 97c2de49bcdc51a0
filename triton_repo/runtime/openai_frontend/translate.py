"""OpenAI requests as Triton generate bodies, and the model's responses as OpenAI's answers and chunks.

A chat goes to the model's ``messages`` input, so the model renders it with its own chat template and its
tokenizer counts the prompt after the template (``usage``). ``n`` choices are ``n`` bodies (the model
decodes them in one batch; with a ``seed``, choice ``i`` samples with ``seed + i``). What a body leaves
out takes the model's defaults (greedy, and the repository's ``--max-tokens``).
"""

from __future__ import annotations

import json
from typing import Any

from loraship_contract import INT32_MAX

from .errors import ApiError
from .events import Event, entries
from .schemas import ChatRequest, CompletionRequest, SamplingRequest

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # the model's -> OpenAI's
MAX_REQUESTS = 1024  # prompts x n of one completions request
Body = dict[str, Any]  # a Triton generate body: the model's inputs


# -- requests -----------------------------------------------------------------------------------------

def chat_bodies(req: ChatRequest) -> list[Body]:
    """The Triton generate body of each of a chat's ``n`` choices."""
    refuse_unsupported(req)
    messages = {"messages": json.dumps(_messages(req), ensure_ascii=False)}
    return _bodies(req, messages, req.max_completion_tokens or req.max_tokens)


def completion_bodies(req: CompletionRequest) -> list[Body]:
    """One body per prompt (text or token ids) x ``n``; with ``echo`` the model puts the prompt before the
    text (``exclude_input_in_output``) and, with ``logprobs`` too, scores it (``prompt_logprobs``)."""
    refuse_unsupported(req)
    extra: dict[str, Any] = {}
    if req.echo:
        extra["exclude_input_in_output"] = False
        if req.logprobs is not None:
            extra["prompt_logprobs"] = req.logprobs
    return [body for fields in _prompts(req) for body in _bodies(req, {**fields, **extra}, req.max_tokens)]


def refuse_unsupported(req: SamplingRequest) -> None:
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
    elif isinstance(req, CompletionRequest):
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


def _prompts(req: CompletionRequest) -> list[Body]:
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


def _bodies(req: SamplingRequest, prompt: Body, max_tokens: int | None) -> list[Body]:
    """The Triton generate inputs of each of the request's ``n`` choices: choice ``i`` samples with
    ``seed + i``, so the choices differ and each is reproducible."""
    body = {**prompt, **_sampling(req, max_tokens)}
    if "seed" not in body:
        return [body] * (req.n or 1)
    return [{**body, "seed": (body["seed"] + i) % 2**64} for i in range(req.n or 1)]


def _sampling(req: SamplingRequest, max_tokens: int | None) -> Body:
    """The Triton generate inputs for an OpenAI request's sampling fields (streamed upstream even for one
    answer: see ``Triton.generate``)."""
    body: Body = {"stream": True}
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


def _logprobs_asked(req: SamplingRequest) -> int | None:
    """How many alternatives per token the request wants log-probabilities for; None: no logprobs."""
    if isinstance(req, ChatRequest):
        return (req.top_logprobs or 0) if req.logprobs else None
    return getattr(req, "logprobs", None)


# -- responses ----------------------------------------------------------------------------------------

def chat_response(req: ChatRequest, rid: str, created: int, outs: list[Event]) -> dict[str, Any]:
    """A non-streamed chat completion from each choice's merged answer."""
    return {"id": rid, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": out.get("text_output", "")},
                         "logprobs": _chat_logprobs(entries(out)) if req.logprobs else None,
                         "finish_reason": finish(out)} for i, out in enumerate(outs)],
            "usage": total_usage(outs, len(outs))}


def completion_response(req: CompletionRequest, rid: str, created: int, outs: list[Event]) -> dict[str, Any]:
    """A non-streamed text completion from each choice's merged answer (an echoed prompt's scores first)."""
    return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
            "choices": [{"index": i, "text": out.get("text_output", ""),
                         "logprobs": _completion_logprobs(entries(out, "prompt_logprobs") + entries(out), 0)
                         if req.logprobs is not None else None,
                         "finish_reason": finish(out)} for i, out in enumerate(outs)],
            "usage": total_usage(outs, req.n or 1)}


class ChatChunks:
    """The chunks of one streamed chat completion: ``chunk(index, text, finish_reason, usage, entries)``."""

    def __init__(self, req: ChatRequest, rid: str, created: int) -> None:
        self.req, self.rid, self.created = req, rid, created
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def __call__(self, index: int | None, text: str | None, finish: str | None, usage: dict[str, int] | None,
                 entries: list[dict[str, Any]], role: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.req.model}
        if usage is not None:
            data["choices"] = []
        else:
            delta = {"role": role, "content": text} if role else ({"content": text} if text is not None else {})
            logprobs = _chat_logprobs(entries) if self.req.logprobs and entries else None
            data["choices"] = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]
        if self.include_usage:
            data["usage"] = usage
        return data


class CompletionChunks:
    """The chunks of one streamed text completion; each choice's ``text_offset`` runs on across chunks."""

    def __init__(self, req: CompletionRequest, rid: str, created: int, choices: int) -> None:
        self.req, self.rid, self.created = req, rid, created
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)
        self.offsets = [0] * choices  # each choice's text so far: where its next token's text_offset starts

    def __call__(self, index: int | None, text: str | None, finish: str | None, usage: dict[str, int] | None,
                 entries: list[dict[str, Any]]) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.req.model}
        logprobs = None
        if self.req.logprobs is not None and entries:
            logprobs = _completion_logprobs(entries, self.offsets[index])
            self.offsets[index] += sum(len(e["token"]) for e in entries)
        data["choices"] = [] if usage is not None else [{"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}]
        if self.include_usage:
            data["usage"] = usage
        return data


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


def _usage(fields: Event) -> dict[str, int]:
    prompt, completion = int(fields.get("prompt_tokens", 0)), int(fields.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def total_usage(outs: list[Event], n: int) -> dict[str, int]:
    """Usage of ``n`` choices of each prompt (``outs`` in choice order): each prompt once, every
    completion."""
    usages = [_usage(out) for out in outs]
    prompt = sum(u["prompt_tokens"] for u in usages[::n])
    completion = sum(u["completion_tokens"] for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish(out: Event) -> str:
    """OpenAI's finish reason for the model's."""
    reason = out.get("finish_reason", "stop")
    return FINISH_REASONS.get(reason, reason)
