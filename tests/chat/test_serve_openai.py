"""`loraship serve --openai-port` as a user runs it: Triton and the OpenAI frontend, one Ctrl-C stops both."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import psutil

from loraship.triton_repo.server import free_port

from .conftest import MODEL, RAW_MODEL

KEY = "serve-openai-key-2b7c41"


def test_serve_with_openai_port_serves_v1_and_stops_both_on_ctrl_c(chat_server):
    import openai

    port = free_port()
    env = {**os.environ, "LORASHIP_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "loraship.cli.main", "serve", "--repo", str(chat_server.repo), "--openai-port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines: list[str] = []
        deadline = time.monotonic() + 120
        while not any("Ctrl-C" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, (lines, proc.stderr.read() if proc.poll() is not None else "")
            lines.append(proc.stdout.readline())
        url = re.search(r"OpenAI\s+(http://127\.0\.0\.1:\d+/v1)", "".join(lines)).group(1)
        assert url == f"http://127.0.0.1:{port}/v1" and "Authorization: Bearer KEY" in "".join(lines)
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL, RAW_MODEL]
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=4)
        assert reply.usage.completion_tokens == 4
        children = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(children) >= 2  # tritonserver (+ its python stubs) and the frontend
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped." in err and KEY not in out + err
    assert not [pid for pid in children if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
