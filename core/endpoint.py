"""A sample call of the endpoint; the API key's names that the server, its clients and the Azure app agree on
are ``loraship_contract``'s, re-exported here."""

from __future__ import annotations

from loraship_contract import API_KEY_ENV, API_KEY_HEADER, GRPC_API_KEY_HEADER, RESTRICTED_APIS  # defined there, once

__all__ = ["API_KEY_ENV", "API_KEY_HEADER", "GRPC_API_KEY_HEADER", "RESTRICTED_APIS", "sample_chat_curl", "sample_curl"]


def sample_curl(url: str, model: str, header: str | None = None) -> str:
    """A `curl` of the generate endpoint; with ``header``, it sends the key from ``$LORASHIP_API_KEY`` (never the key itself).
    It names the JSON content type: curl -d sends a form by default, which the OpenAI frontend refuses (415)."""
    auth = f" -H '{header}: '${API_KEY_ENV}" if header else ""
    return (f"curl -s {url}/v2/models/{model}/generate{auth} -H 'Content-Type: application/json' "
            f"-d '{{\"text_input\": \"Hello\", \"max_tokens\": 32}}'")


def sample_chat_curl(url: str, model: str, content: str = "Hello", key: bool = False) -> str:
    """A `curl` of the OpenAI chat endpoint for ``model`` (an adapter's name, or the base's); with ``key``, it
    sends ``Authorization: Bearer`` with the key from ``$LORASHIP_API_KEY`` (never the key itself)."""
    import json
    import shlex

    auth = f" -H 'Authorization: Bearer '${API_KEY_ENV}" if key else ""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 32})
    return f"curl -s {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' -d {shlex.quote(body)}"
