"""What the server, its clients and the Azure app agree on: the API key header, the APIs it guards, a sample call."""

from __future__ import annotations

API_KEY_HEADER = "x-api-key"
#: Where the key comes from: the CLI's environment, the container's secret (never a command line).
API_KEY_ENV = "LORASHIP_API_KEY"
#: Triton 2.51 expects restricted gRPC metadata under a prefixed key.
GRPC_API_KEY_HEADER = f"triton-grpc-protocol-{API_KEY_HEADER}"
#: Everything but health, so probes keep working while inference and model control need the key.
RESTRICTED_APIS = "metadata,inference,shared-memory,model-config,model-repository,statistics,trace,logging"


def sample_curl(url: str, model: str, header: str | None = None) -> str:
    """A `curl` of the generate endpoint; with ``header``, it sends the key from ``$LORASHIP_API_KEY`` (never the key itself).
    It names the JSON content type: curl -d sends a form by default, which the OpenAI frontend refuses (415)."""
    auth = f" -H '{header}: '${API_KEY_ENV}" if header else ""
    return (f"curl -s {url}/v2/models/{model}/generate{auth} -H 'Content-Type: application/json' "
            f"-d '{{\"text_input\": \"Hello\", \"max_tokens\": 32}}'")
