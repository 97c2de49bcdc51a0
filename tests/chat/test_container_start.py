"""The container's start path (``wheels/start.sh --frontend-port``, which execs the supervisor), run here
with the real tritonserver: Triton's HTTP API behind the frontend, the OpenAI API and Triton's /v2 on one
port behind one key, tritonserver restarted when a model's python stub dies (readiness 503 meanwhile),
and the supervisor stopping both processes when asked or failing when the frontend dies."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from loraship_contract import API_KEY_HEADER

from loraship.triton_repo.install import find_tritonserver, server_env
from loraship.triton_repo.localhost import free_port
from loraship.triton_repo.wheels import write_start_files

from .conftest import CONVERSATION, MAX_TOKENS, MODEL

KEY = "container-start-key-90c2d1"


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


@pytest.fixture
def start_script(chat_server, tmp_path):
    """Launch ``sh start.sh --frontend-port=PORT <triton args>`` as the container does (on loopback here)."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    write_start_files(wheels)
    (wheels / "requirements.txt").write_text("")  # this venv already has the packages the wheels would bring
    inst = find_tritonserver()
    prefix = f"loraship_start_{free_port()}_"
    started = []

    def launch() -> tuple[subprocess.Popen, int]:
        port = free_port()
        args = [f"--frontend-port={port}", f"--model-repository={chat_server.repo}", f"--backend-directory={inst.backend_dir}",
                f"--cache-directory={inst.cache_dir}", f"--http-port={free_port()}", f"--grpc-port={free_port()}",
                f"--metrics-port={free_port()}", "--grpc-address=127.0.0.1", "--metrics-address=127.0.0.1",
                "--model-control-mode=none", "--allow-sagemaker=false", "--allow-vertex-ai=false",
                f"--backend-config=python,shm-region-prefix-name={prefix}"]
        env = {**server_env(), "TRITONSERVER": str(inst.binary), "LORASHIP_API_KEY": KEY,
               "LORASHIP_SITE": str(tmp_path / "site"), "LORASHIP_FRONTEND_HOST": "127.0.0.1"}
        proc = subprocess.Popen(["sh", str(wheels / "start.sh"), *args], env=env, stdout=subprocess.DEVNULL,
                                stderr=open(tmp_path / "start.log", "ab"), start_new_session=True)
        started.append(proc)
        return proc, port

    yield launch
    for proc in started:
        try:
            family = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        if proc.poll() is None:  # a test that failed half-way: the supervisor stops tritonserver and the frontend
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        for child in family:  # whatever is left: each child leads its own process group
            if child.is_running():  # the same process (psutil checks its start time), not a reused pid
                try:
                    os.killpg(child.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    for region in Path("/dev/shm").glob(f"{prefix}*"):
        region.unlink()


def test_start_script_serves_both_apis_on_the_frontend_port_and_stops_on_sigterm(start_script, chat_server):
    import openai

    proc, port = start_script()
    root = f"http://127.0.0.1:{port}"
    _wait_ready(proc, root)
    client = openai.OpenAI(base_url=f"{root}/v1", api_key=KEY, max_retries=0)
    expected = chat_server.openai().chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=MAX_TOKENS)
    reply = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == expected.choices[0].message.content and reply.usage == expected.usage
    body = b'{"text_input": "Hello", "max_tokens": 3}'
    request = urllib.request.Request(f"{root}/v2/models/{MODEL}/generate", data=body, headers={API_KEY_HEADER: KEY, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert resp.status == 200 and b'"completion_tokens":3' in resp.read()
    assert _status(urllib.request.Request(f"{root}/v2/models/{MODEL}/generate", data=body)) >= 400  # Triton's own key check
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{root}/v1", api_key="wrong", max_retries=0).models.list()

    children = psutil.Process(proc.pid).children(recursive=True)
    assert any(c.name() == "tritonserver" for c in children) and any("openai_frontend" in " ".join(c.cmdline()) for c in children)
    [frontend] = [c.cmdline() for c in children if "openai_frontend" in " ".join(c.cmdline())]
    assert frontend[frontend.index("--model-repository") + 1] == str(chat_server.repo)  # where it hot-loads adapters
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def _wait_ready(proc: subprocess.Popen, root: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while _status(f"{root}/v2/health/ready") != 200:  # the probes' path, through the frontend
        assert proc.poll() is None and time.monotonic() < deadline, "start.sh did not come up"
        time.sleep(0.3)


def test_start_script_restarts_tritonserver_when_a_model_stub_dies(start_script, chat_server, tmp_path):
    """The readiness probe's path answers 503 until the model serves again, which it does by itself, with
    the same answer; the container's log says one line. The other model's stub is restarted with it."""
    import openai

    proc, port = start_script()
    root = f"http://127.0.0.1:{port}"
    _wait_ready(proc, root)
    client = openai.OpenAI(base_url=f"{root}/v1", api_key=KEY, max_retries=0)
    before = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=MAX_TOKENS)
    supervisor = psutil.Process(proc.pid)  # start.sh execs it
    assert "loraship_runtime.supervisor" in " ".join(supervisor.cmdline())
    [triton] = [c for c in supervisor.children() if c.name() == "tritonserver"]
    stubs = {c.cmdline()[-2]: c for c in triton.children() if c.status() != psutil.STATUS_ZOMBIE}
    assert sorted(stubs) == [f"{MODEL}-raw_0_0", f"{MODEL}_0_0"]
    stubs[f"{MODEL}_0_0"].kill()
    killed = time.monotonic()
    seen = []
    while not (seen and seen[-1] == 200 and 503 in seen):
        assert time.monotonic() - killed < 60 and proc.poll() is None, seen
        seen.append(_status(f"{root}/v2/health/ready"))
        time.sleep(0.05)
    assert 200 not in seen[seen.index(503):-1]
    after = client.chat.completions.create(model=MODEL, messages=CONVERSATION, max_tokens=MAX_TOKENS)
    assert after.choices[0].message.content == before.choices[0].message.content and after.usage == before.usage
    [new] = [c for c in supervisor.children() if c.name() == "tritonserver"]
    assert new.pid != triton.pid and not any(s.is_running() and s.status() != psutil.STATUS_ZOMBIE for s in stubs.values())
    line = re.compile(rf"^recovered: ({MODEL}'s python stub( {MODEL}_0_0)? died|tritonserver was killed by SIGABRT); "
                      r"tritonserver restarted, serving again after [\d.]+ s$", re.MULTILINE)
    while not line.search(log := (tmp_path / "start.log").read_text()):  # said once the supervisor saw it ready too
        assert time.monotonic() - killed < 60, log
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0


def test_start_script_stops_triton_and_fails_when_the_frontend_dies(start_script, tmp_path):
    proc, port = start_script()
    deadline = time.monotonic() + 60
    while _status(f"http://127.0.0.1:{port}/v2/health/live") is None:  # the frontend answers (Triton may still load)
        assert proc.poll() is None and time.monotonic() < deadline, "the frontend did not come up"
        time.sleep(0.2)
    children = psutil.Process(proc.pid).children(recursive=True)
    [frontend] = [c for c in children if "openai_frontend" in " ".join(c.cmdline())]
    [triton] = [c for c in children if c.name() == "tritonserver"]
    frontend.kill()
    assert proc.wait(timeout=60) == 1
    assert not triton.is_running() or triton.status() == psutil.STATUS_ZOMBIE  # its python stubs too
    assert ("loraship supervisor: the OpenAI frontend was killed by SIGKILL while Triton kept running"
            in (tmp_path / "start.log").read_text().splitlines())
