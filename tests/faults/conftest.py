"""The fault suite's server: the session's tiny export (``onnx_dir``) as a one-model repository, served by a
real tritonserver (nvidia-pytriton's binary, API key on) with the real OpenAI frontend process in front of
it, as `loraship serve --openai-port --api-key` and the container run them; one for the whole folder.

Hostile bodies go over raw sockets (:func:`hostile`), so a test sees what the frontend does before a body
is sent, and how much of it the frontend reads.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from loraship_contract import API_KEY_HEADER

from loraship.client.metrics import scrape
from loraship.triton_repo.frontend import OpenAIFrontend
from loraship.triton_repo.localhost import free_port
from loraship.triton_repo.server import TritonServer

API_KEY = "fault-suite-key-7c41e2"
MODEL = "tiny"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Served:
    """tritonserver (fixed ports, so it can be restarted under the frontend) and the frontend before it."""

    triton: TritonServer
    frontend: OpenAIFrontend
    repo: Path
    context: int  # the served context: the export's, which `loraship repo` wrote as the ``context`` parameter
    restarts: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.frontend.port

    def openai(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.frontend.url, api_key=API_KEY, max_retries=0, timeout=120, **kw)

    def tritonclient(self, url: str | None = None):
        """tritonclient's HTTP client on the frontend (or ``url``, host:port)."""
        import tritonclient.http as httpclient

        return httpclient.InferenceServerClient(url or f"127.0.0.1:{self.port}", network_timeout=120)

    def post(self, path: str, body, headers: dict | None = None, direct: bool = False, timeout: float = 120) -> httpx.Response:
        """POST JSON (or bytes as they are) to the frontend, or straight to Triton (``direct``), with the key."""
        root = self.triton.http_url if direct else self.frontend.root
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(f"{root}{path}", content=content, timeout=timeout,
                          headers={"Content-Type": "application/json", API_KEY_HEADER: API_KEY, **(headers or {})})

    def counters(self) -> dict[str, float]:
        """The model's counters on Triton's /metrics (loraship_requests_cancelled, loraship_completion_tokens, ...)."""
        return scrape(self.triton.metrics_url, MODEL)

    def triton_alive(self) -> bool:
        return self.triton.process is not None and self.triton.process.poll() is None

    def ensure_triton(self) -> None:
        """Start tritonserver again on its ports if a test stopped it (the frontend stays up)."""
        if not self.triton_alive() or not self.triton.is_ready():
            self.triton.stop()
            self.triton.start()
            self.restarts.append("restarted")


@pytest.fixture(scope="session")
def served(onnx_dir, tmp_path_factory):
    from loraship.triton_repo.config import ModelOptions, read_config
    from loraship.triton_repo.layout import write_version

    repo = tmp_path_factory.mktemp("faults") / "repo"
    write_version(onnx_dir, repo, ModelOptions(name=MODEL, max_batch_size=8, threads=2))
    context = int(read_config(repo / MODEL / "config.pbtxt").parameters["context"].string_value)
    triton = TritonServer(repo, api_key=API_KEY, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          ready_timeout=120)
    with triton, OpenAIFrontend(triton.http_url, api_key=API_KEY) as frontend:
        yield Served(triton, frontend, repo, context)
    assert not triton.shm_regions(), "tritonserver left shared-memory regions behind"


@pytest.fixture
def live(served) -> Served:
    """The server, with tritonserver up (restarted if an earlier test stopped it)."""
    served.ensure_triton()
    return served


def hostile(port: int, path: str, headers: dict[str, str], total: int, chunked: bool = False,
            chunk: int = 1 << 20) -> tuple[int, bytes, int]:
    """POST ``total`` bytes to ``path`` over a raw socket, as fast as the server takes them: headers first
    (with ``Content-Length: total``, or chunked), then the body, until the server answers or closes.

    Returns (status, response body, body bytes the socket accepted). A reader thread takes the answer as
    it comes, so a server that answers from the headers and closes is seen doing exactly that.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    received = bytearray()
    answered = threading.Event()

    def read() -> None:
        try:
            while data := sock.recv(65536):
                received.extend(data)
                answered.set()
        except OSError:
            pass
        answered.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    head += "Transfer-Encoding: chunked\r\n\r\n" if chunked else f"Content-Length: {total}\r\n\r\n"
    sent = 0
    block = b"a" * chunk
    try:
        sock.sendall(head.encode())
        while sent < total and not answered.is_set():
            data = block[: total - sent]
            sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            sent += len(data)
        if chunked and not answered.is_set():
            sock.sendall(b"0\r\n\r\n")
    except OSError:  # the server closed the connection: it read no more
        pass
    reader.join(60)
    sock.close()
    head_bytes, _, body = bytes(received).partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ")[1]) if head_bytes.startswith(b"HTTP/1.1 ") else 0
    while status == 100:  # "100 Continue", then the answer
        head_bytes, _, body = body.partition(b"\r\n\r\n")
        status = int(head_bytes.split(b" ")[1])
    return status, body, sent


def peak_rss_mib(pid: int) -> tuple[float, float]:
    """(peak RSS, RSS) of a process in MiB (VmHWM, VmRSS)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024


def reset_peak_rss(pid: int) -> None:
    """Start the process's peak RSS again from its RSS now (``clear_refs`` 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def stub_processes(triton: TritonServer) -> list[psutil.Process]:
    """The python backend stubs (the model's processes) under tritonserver."""
    return [p for p in psutil.Process(triton.process.pid).children(recursive=True)
            if "triton_python_backend_stub" in " ".join(p.cmdline()[:1])]
