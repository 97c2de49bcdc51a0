"""`--api-key`: Triton's restricted-API options on a real tritonserver."""

from __future__ import annotations

import json
import secrets
import urllib.request

import numpy as np
import pytest

from loraship_contract import API_KEY_HEADER

from loraship.triton_repo.server import TritonServer

from .conftest import MAX_TOKENS, MODEL, PROMPTS

KEY = secrets.token_urlsafe(24)
GRPC_HEADER = f"triton-grpc-protocol-{API_KEY_HEADER}"


@pytest.fixture(scope="module")
def locked(repo):
    server = TritonServer(repo, api_key=KEY, ready_timeout=120)
    with server:
        yield server
    assert not server.shm_regions()


def test_key_never_reaches_the_printed_command(locked):
    assert KEY in " ".join(locked.command())
    assert KEY not in locked.masked_command() and "x-api-key=***" in locked.masked_command()


def test_http_inference_needs_the_key(locked, reference, calls):
    url = f"{locked.http_url}/v2/models/{MODEL}/generate"
    body = {"text_input": PROMPTS[0], "max_tokens": MAX_TOKENS}
    for headers in ({}, {API_KEY_HEADER: "wrong"}):
        status, raw = calls.post(url, body, headers)
        assert status == 403 and "restricted" in json.loads(raw)["error"], raw
    status, raw = calls.post(f"{locked.http_url}/v2/repository/index", b"{}")
    assert status == 403, raw  # model control is locked too
    status, raw = calls.post(url, body, {API_KEY_HEADER: KEY})
    assert status == 200 and json.loads(raw)["text_output"] == reference[PROMPTS[0]][0]
    with urllib.request.urlopen(f"{locked.http_url}/v2/health/ready") as resp:
        assert resp.status == 200  # probes stay open


def test_grpc_stream_needs_the_key(locked, reference, calls):
    fields = {"text_input": np.array([PROMPTS[0].encode()], np.object_),
              "max_tokens": np.array([MAX_TOKENS], np.int32), "stream": np.array([True])}
    refused = calls.grpc_stream(locked.grpc_url, MODEL, fields)
    assert isinstance(refused, str) and "restricted" in refused
    events = calls.grpc_stream(locked.grpc_url, MODEL, fields, headers={GRPC_HEADER: KEY})
    assert "".join(e["text_output"] for e in events) == reference[PROMPTS[0]][0]


def test_unusable_key_is_refused_before_start(repo):
    from loraship.errors import LorashipError

    with pytest.raises(LorashipError, match="API key"):
        TritonServer(repo, api_key="has space").command()
