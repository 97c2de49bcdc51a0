"""Triton's Prometheus ``/metrics``: scrape, parse, and diff the per-model counters."""

from __future__ import annotations

import http.client
import re
import urllib.error
import urllib.request
from dataclasses import dataclass

from loraship.client.errors import EndpointError

_LINE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

#: Counters summed over a model's versions (and failure reasons).
COUNTERS = (
    "nv_inference_request_success",
    "nv_inference_request_failure",
    "nv_inference_count",
    "nv_inference_exec_count",
    "nv_inference_request_duration_us",
    "nv_inference_queue_duration_us",
    "nv_inference_compute_input_duration_us",
    "nv_inference_compute_infer_duration_us",
    "nv_inference_compute_output_duration_us",
    "loraship_completion_tokens",  # the generate model's own: tokens generated, cancelled requests included
    "loraship_requests_cancelled",
    "loraship_decode_steps",  # in-flight batching: decode steps, and the requests they ran summed over steps
    "loraship_decode_rows",
)


def parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition: (name, labels, value)."""
    samples = []
    for line in text.splitlines():
        match = _LINE.match(line)
        if match and not line.startswith("#"):
            labels = dict(_LABEL.findall(match["labels"] or ""))
            samples.append((match["name"], labels, float(match["value"])))
    return samples


def model_counters(text: str, model: str) -> dict[str, float]:
    """`COUNTERS` for ``model``, summed over versions and label values."""
    totals = dict.fromkeys(COUNTERS, 0.0)
    for name, labels, value in parse(text):
        if name in totals and labels.get("model") == model:
            totals[name] += value
    return totals


def scrape(url: str, model: str, timeout: float = 10.0) -> dict[str, float]:
    """Read ``url`` (Triton's ``http://host:8002/metrics``) and return ``model``'s counters."""
    fix = "pass Triton's metrics endpoint, e.g. --metrics-url http://127.0.0.1:8002/metrics, or leave --metrics-url out"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode("utf-8", errors="replace")
    except ValueError:  # urllib's "unknown url type": no http:// scheme
        raise EndpointError(f"cannot read Triton metrics at {url}: not an http:// URL", fix) from None
    except http.client.HTTPException:  # something that does not speak HTTP, such as a gRPC port
        raise EndpointError(f"cannot read Triton metrics at {url}: it does not answer HTTP", fix) from None
    except (urllib.error.URLError, OSError) as exc:
        raise EndpointError(f"cannot read Triton metrics at {url}: {getattr(exc, 'reason', exc)}", fix) from None
    if "nv_inference_request_success" not in text:
        raise EndpointError(f"{url} serves no Triton inference metrics", fix)
    return model_counters(text, model)


@dataclass(frozen=True)
class ServerDelta:
    """What Triton itself recorded for the benchmark's requests."""

    requests: int  # success + failure
    failures: int
    queue_ms_mean: float
    compute_ms_mean: float  # the model's execute() time per request (input + infer + output)
    request_ms_mean: float

    @classmethod
    def between(cls, before: dict[str, float], after: dict[str, float]) -> "ServerDelta":
        d = {k: after[k] - before[k] for k in COUNTERS}
        success, failures = d["nv_inference_request_success"], d["nv_inference_request_failure"]
        n = max(success, 1.0)
        compute = d["nv_inference_compute_input_duration_us"] + d["nv_inference_compute_infer_duration_us"] + d["nv_inference_compute_output_duration_us"]
        return cls(
            requests=int(round(success + failures)),
            failures=int(round(failures)),
            queue_ms_mean=d["nv_inference_queue_duration_us"] / n / 1000,
            compute_ms_mean=compute / n / 1000,
            request_ms_mean=d["nv_inference_request_duration_us"] / n / 1000,
        )
