"""A sample call of the endpoint; the API key's names that the server, its clients and the Azure app agree on
are ``loraship_contract``'s, re-exported here."""

from __future__ import annotations

import json
import shlex

from loraship_contract import API_KEY_ENV, API_KEY_HEADER, GRPC_API_KEY_HEADER, RESTRICTED_APIS  # defined there, once

__all__ = ["API_KEY_ENV", "API_KEY_HEADER", "GRPC_API_KEY_HEADER", "RESTRICTED_APIS", "sample_chat_curl", "sample_curl", "sample_curls"]

Chat = list[dict[str, str]]


def _curl(url: str, headers: list[str], body: dict) -> str:
    """One pasteable `curl` POST of ``body`` as JSON. It names the JSON content type: curl -d sends a form by
    default, which the OpenAI frontend refuses (415)."""
    auth = "".join(f" -H {h}" for h in headers)
    return f"curl -s {url}{auth} -H 'Content-Type: application/json' -d {shlex.quote(json.dumps(body))}"


def sample_curl(url: str, model: str, header: str | None = None) -> str:
    """A `curl` of the generate endpoint; with ``header``, it sends the key from ``$LORASHIP_API_KEY`` (never the key itself)."""
    return _curl(f"{url}/v2/models/{model}/generate", [f"'{header}: '${API_KEY_ENV}"] if header else [],
                 {"text_input": "Hello", "max_tokens": 32})


def sample_curls(url: str, model: str, prompt: str | Chat, api_key: str | None = None, max_tokens: int = 32) -> list[str]:
    """Two pasteable `curl`s asking ``prompt`` (a chat, or text for a model without a chat template): Triton's
    /v2 generate and the OpenAI API's /v1 (chat) completions, each with ``api_key`` itself when there is one
    (what the user gave, so the command works pasted into any shell); greedy, as `verify` scored the model."""
    v2_body = {"messages": json.dumps(prompt)} if isinstance(prompt, list) else {"text_input": prompt}
    v1 = ("chat/completions", {"messages": prompt}) if isinstance(prompt, list) else ("completions", {"prompt": prompt})
    return [
        _curl(f"{url}/v2/models/{model}/generate", [shlex.quote(f"{API_KEY_HEADER}: {api_key}")] if api_key else [],
              {**v2_body, "max_tokens": max_tokens, "temperature": 0}),
        _curl(f"{url}/v1/{v1[0]}", [shlex.quote(f"Authorization: Bearer {api_key}")] if api_key else [],
              {"model": model, **v1[1], "max_tokens": max_tokens, "temperature": 0}),
    ]


def sample_chat_curl(url: str, model: str, content: str = "Hello", api_key: str | None = None, max_tokens: int = 32) -> str:
    """A `curl` of the OpenAI chat endpoint for ``model`` (an adapter's name, or the base's), greedy, with
    ``api_key`` itself as ``Authorization: Bearer`` when there is one (what the user gave)."""
    return _curl(f"{url}/v1/chat/completions", [shlex.quote(f"Authorization: Bearer {api_key}")] if api_key else [],
                 {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0})
