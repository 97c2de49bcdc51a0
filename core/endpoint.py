"""A sample call of the endpoint; the API key's names that the server, its clients and the Azure app agree on
are ``loraship_contract``'s, re-exported here."""

from __future__ import annotations

from loraship_contract import API_KEY_ENV, API_KEY_HEADER, GRPC_API_KEY_HEADER, RESTRICTED_APIS  # defined there, once

__all__ = ["API_KEY_ENV", "API_KEY_HEADER", "GRPC_API_KEY_HEADER", "RESTRICTED_APIS", "sample_curl"]


def sample_curl(url: str, model: str, header: str | None = None) -> str:
    """A `curl` of the generate endpoint; with ``header``, it sends the key from ``$LORASHIP_API_KEY`` (never the key itself).
    It names the JSON content type: curl -d sends a form by default, which the OpenAI frontend refuses (415)."""
    auth = f" -H '{header}: '${API_KEY_ENV}" if header else ""
    return (f"curl -s {url}/v2/models/{model}/generate{auth} -H 'Content-Type: application/json' "
            f"-d '{{\"text_input\": \"Hello\", \"max_tokens\": 32}}'")
