"""Client fixtures: a real tritonserver (nvidia-pytriton's binary, on loopback, API key on).

The served model is the real generate model: the ``loraship.triton_repo`` layout over the
session's tiny exported ONNX folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from testkit import post_json

from loraship.client import API_KEY_HEADER, Client
from loraship.triton_repo.localhost import free_port
from loraship.triton_repo.server import TritonServer

API_KEY = "client-tests-key-7f3a9c"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@dataclass(frozen=True)
class Served:
    server: TritonServer
    model: str
    api_key: str
    clients: list[Client] = field(default_factory=list)

    def client(self, protocol: str = "http", **kw) -> Client:
        """A Client of this server (closed at session end, so the server stops promptly)."""
        url = self.server.http_url if protocol == "http" else self.server.grpc_url
        client = Client(url, protocol=protocol, model=kw.pop("model", self.model), api_key=kw.pop("api_key", self.api_key), **kw)
        self.clients.append(client)
        return client

    def raw_generate(self, prompt: str | list[dict], **params) -> dict:
        """Triton's own answer on POST /generate (urllib, not the client under test) to a text or a chat."""
        fields = {"text_input": prompt} if isinstance(prompt, str) else {"messages": json.dumps(prompt)}
        status, body = post_json(f"{self.server.http_url}/v2/models/{self.model}/generate", {**fields, "stream": False, **params},
                                 {API_KEY_HEADER: self.api_key})
        reply = json.loads(body)
        assert status == 200 and "error" not in reply, reply
        return reply


@pytest.fixture(scope="session")
def served(onnx_dir, tmp_path_factory) -> Served:
    from loraship.triton_repo.config import ModelOptions
    from loraship.triton_repo.layout import write_version

    repo, model = tmp_path_factory.mktemp("clients-triton") / "repo", "tiny"
    write_version(onnx_dir, repo, ModelOptions(name=model, max_batch_size=8, threads=2))
    with TritonServer(repo, api_key=API_KEY, ready_timeout=120) as server:
        served = Served(server, model, API_KEY)
        yield served
        for client in served.clients:
            client.close()


@pytest.fixture
def dead_url() -> str:
    """A loopback port nothing listens on."""
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
def browser_context(tmp_path):
    """Real headless Debian Chromium through Playwright, with a fresh profile."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (the Makefile's setup does it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def silent_url():
    """A loopback port that accepts connections and never says a word in any protocol."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # the kernel completes the handshakes; nothing ever reads or answers
        yield f"127.0.0.1:{listener.getsockname()[1]}"
