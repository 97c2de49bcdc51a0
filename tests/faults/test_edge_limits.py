"""The frontend's edge against hostile bodies, over raw sockets: the key is checked from the headers before a
body byte is read, only JSON (or tritonclient's binary tensors) reaches Triton, and a body over the limit
is refused reading no further than the limit; the frontend's peak RSS says how much it held."""

from __future__ import annotations

import httpx
import pytest

from loraship_contract import API_KEY_HEADER

from .conftest import API_KEY, AUTH, MODEL, hostile, peak_rss_mib, reset_peak_rss

FORM = {"Content-Type": "application/x-www-form-urlencoded"}  # what `curl -d` sends
JSON = {"Content-Type": "application/json"}
TRITON_KEY_REFUSAL = b'{"error":"This API is restricted, expecting header \'x-api-key\'"}'
MIB = 1 << 20


def test_a_5mb_form_body_never_reaches_triton_and_triton_keeps_serving(live):
    """Triton 2.51 dies (SIGSEGV) on a form-encoded body of 4 MiB or more on any path, before its key check.
    Without a key the edge answers from the headers (401 on /v1, Triton's own 403 on /v2); with the key,
    415 naming the fix. tritonserver is the same process afterwards, and serves."""
    pid = live.triton.process.pid
    size = 5_000_000
    status, body, _ = hostile(live.port, f"/v2/models/{MODEL}/generate", FORM, size)
    assert (status, body) == (403, TRITON_KEY_REFUSAL)
    status, body, _ = hostile(live.port, "/v1/chat/completions", FORM, size)
    assert status == 401 and b'"code":"invalid_api_key"' in body
    for path in (f"/v2/models/{MODEL}/generate", "/v2/repository/index", "/v1/chat/completions"):
        status, body, _ = hostile(live.port, path, {**FORM, API_KEY_HEADER: API_KEY}, size)
        assert status == 415, (path, body)
        assert b"Content-Type: application/json" in body and b"application/x-www-form-urlencoded" in body
    for kind in ("multipart/form-data; boundary=x", "text/plain"):
        status, body, _ = hostile(live.port, f"/v2/models/{MODEL}/generate", {"Content-Type": kind, **AUTH}, 10)
        assert status == 415, body
    assert live.triton_alive() and live.triton.process.pid == pid
    reply = live.post(f"/v2/models/{MODEL}/generate", {"text_input": "Hello", "max_tokens": 3})
    assert reply.status_code == 200 and reply.json()["completion_tokens"] == 3


@pytest.mark.parametrize("path", ["/v1/chat/completions", f"/v2/models/{MODEL}/generate"])
def test_a_256mib_body_without_the_key_is_refused_before_it_is_read(live, path):
    """The answer comes from the headers; the connection closes, so the socket takes only what the kernel
    buffers hold, and the frontend's peak RSS does not grow by the body (it grew by 510 MiB before)."""
    pid = live.frontend.process.pid
    reset_peak_rss(pid)
    _, rss = peak_rss_mib(pid)
    status, body, sent = hostile(live.port, path, JSON, 256 * MIB)
    peak, _ = peak_rss_mib(pid)
    assert status == (401 if path.startswith("/v1") else 403), body
    assert sent < 64 * MIB, f"the frontend took {sent / MIB:.0f} MiB of a body it refused from the headers"
    assert peak - rss < 16, f"peak RSS grew by {peak - rss:.1f} MiB"
    print(f"{path}: refused after {sent / MIB:.0f} MiB sent; peak RSS +{peak - rss:.1f} MiB")


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", f"/v2/models/{MODEL}/generate"])
def test_an_oversize_authenticated_body_gets_413_reading_no_further_than_the_limit(live, path, chunked):
    """The limit is sized from the served context (1 MiB + 64 bytes a token). A Content-Length over it is
    refused at once; a chunked body is read up to it. Either way the frontend holds at most the limit."""
    limit = (1 << 20) + 64 * live.context
    pid = live.frontend.process.pid
    reset_peak_rss(pid)
    _, rss = peak_rss_mib(pid)
    status, body, sent = hostile(live.port, path, {**JSON, **AUTH}, 256 * MIB, chunked=chunked)
    peak, _ = peak_rss_mib(pid)
    assert status == 413, body
    assert f"larger than {limit} bytes".encode() in body and b"--max-body-bytes" in body
    assert sent < 64 * MIB and peak - rss < 16, (sent / MIB, peak - rss)
    print(f"{path} {'chunked' if chunked else 'content-length'}: 413 after {sent / MIB:.0f} MiB sent; peak RSS +{peak - rss:.1f} MiB")


def test_a_body_within_the_limit_passes_and_the_limit_is_an_option():
    """``create_app(max_body_bytes=N)`` (``--max-body-bytes N``) fixes the limit: N bytes pass the edge, N + 1
    get 413 naming the option (in-process, so no Triton is needed to size it)."""
    import asyncio

    from loraship.triton_repo.runtime.openai_frontend.app import create_app

    app = create_app("http://127.0.0.1:9", None, max_body_bytes=1000)

    async def post(size: int) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            return await client.post("/v1/completions", content=b"{" + b" " * (size - 2) + b"}", headers=JSON)

    within, over = asyncio.run(post(1000)), asyncio.run(post(1001))
    assert within.status_code == 400 and within.json()["error"]["param"] == "model"  # through the edge, to validation
    assert over.status_code == 413 and "larger than 1000 bytes" in over.json()["error"]["message"]
    assert "(--max-body-bytes)" in over.json()["error"]["message"]


def test_health_needs_no_key_and_everything_else_does(live):
    root = live.frontend.root
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL}/ready", f"/v2/models/{MODEL}/versions/1/ready"):
        assert httpx.get(f"{root}{path}", timeout=30).status_code == 200, path
    for path in ("/v2", f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/config", "/v2/models/stats"):
        response = httpx.get(f"{root}{path}", timeout=30)
        assert (response.status_code, response.content) == (403, TRITON_KEY_REFUSAL), path
        assert httpx.get(f"{root}{path}", headers=AUTH, timeout=30).status_code == 200, path
    assert httpx.get(f"{root}/", timeout=30).status_code == 401
    wrong = httpx.get(f"{root}/v2", headers={API_KEY_HEADER: "wrong"}, timeout=30)
    assert (wrong.status_code, wrong.content) == (403, TRITON_KEY_REFUSAL)


def test_tritonclient_works_through_the_frontend_as_on_triton(live):
    """GET /v2 (server metadata) answered 307 then 404 through the frontend; now every tritonclient call the
    public port serves answers as Triton does: metadata, config, repository index, health, and infer with
    binary tensors (tritonclient sends no Content-Type), which Triton itself refuses for a decoupled model."""
    import numpy as np
    from tritonclient.http import InferInput
    from tritonclient.utils import InferenceServerException

    headers = {API_KEY_HEADER: API_KEY}
    via, direct = live.tritonclient(), live.tritonclient(live.triton.http_url.removeprefix("http://"))
    assert via.get_server_metadata(headers=headers) == direct.get_server_metadata(headers=headers)
    assert via.get_server_metadata(headers=headers)["name"] == "triton"
    assert via.get_model_metadata(MODEL, headers=headers) == direct.get_model_metadata(MODEL, headers=headers)
    assert via.get_model_config(MODEL, headers=headers) == direct.get_model_config(MODEL, headers=headers)
    assert via.get_model_repository_index(headers=headers) == [{"name": MODEL, "version": "1", "state": "READY"}]
    assert via.is_server_live() and via.is_server_ready() and via.is_model_ready(MODEL)
    errors = []
    for client in (via, direct):
        ids = InferInput("input_ids", [3], "INT32")
        ids.set_data_from_numpy(np.array([1, 2, 3], np.int32), binary_data=True)
        with pytest.raises(InferenceServerException) as info:
            client.infer(MODEL, [ids], headers=headers)
        errors.append((info.value.status(), info.value.message()))
    assert errors[0] == errors[1] and "decoupled" in errors[0][1]
    with pytest.raises(InferenceServerException, match="restricted"):
        via.get_server_metadata()
