"""`loraship serve` as a user runs it: a real tritonserver behind loraship's frontend (Triton's /v2 and the
OpenAI /v1 on the public HTTP port, Triton's own HTTP on a private loopback port), endpoints printed,
Ctrl-C stops it cleanly; a busy or repeated port is one line before anything starts."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from loraship.triton_repo.localhost import free_port

from .conftest import MAX_TOKENS, MODEL, PROMPTS, copy_repo

KEY = "serve-cli-key-4f1e8b"


@pytest.mark.parametrize("openai_port", [False, True], ids=["triton", "with-openai-port"])
def test_serve_prints_endpoints_serves_and_stops_cleanly_on_ctrl_c(repo, reference, calls, tmp_path, openai_port):
    """With --openai-port (and an API key), the OpenAI API answers too, and Ctrl-C stops the frontend with Triton."""
    args, env = ["--debug", "serve", "--repo", str(repo)], {k: v for k, v in os.environ.items() if k != "LORASHIP_API_KEY"}
    if openai_port:
        args += ["--openai-port", str(free_port())]
        env["LORASHIP_API_KEY"] = KEY
    proc = subprocess.Popen([sys.executable, "-m", "loraship.cli.main", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 120
        while not any("Ctrl-C" in line for line in lines):
            assert time.monotonic() < deadline and proc.poll() is None, lines
            lines.append(proc.stdout.readline())
        http = re.search(r"HTTP\s+(http://127\.0\.0\.1:\d+)", "".join(lines)).group(1)
        assert re.search(r"gRPC\s+127\.0\.0\.1:\d+", "".join(lines))
        assert re.search(r"metrics\s+http://127\.0\.0\.1:\d+/metrics", "".join(lines))
        # each instance's load line: the KV rows it planned (the repo fixture: --max-batch-size 8, tiny fp32)
        assert re.search(rf"model\s+{MODEL} v1 on \['CPUExecutionProvider'\], context 2048, in-flight batch 8; "
                         r"KV cache: 8 rows x 2048 positions \(float32\), 2\.0 MiB a row, 16\.0 MiB in all", "".join(lines))
        auth = r" -H 'x-api-key: '\$LORASHIP_API_KEY" if openai_port else ""
        assert re.search(rf"try\s+curl -s {http}/v2/models/{MODEL}/generate{auth} -H 'Content-Type: application/json' -d ", "".join(lines))
        headers = {"x-api-key": KEY} if openai_port else {}
        status, raw = calls.post(f"{http}/v2/models/{MODEL}/generate", {"text_input": PROMPTS[0], "max_tokens": MAX_TOKENS}, headers)
        assert status == 200 and json.loads(raw)["text_output"] == reference[PROMPTS[0]][0]
        import openai

        url = re.search(r"OpenAI\s+(http://127\.0\.0\.1:\d+/v1)", "".join(lines)).group(1)
        assert url == (f"http://127.0.0.1:{args[-1]}/v1" if openai_port else f"{http}/v1")
        assert ("Authorization: Bearer KEY" in "".join(lines)) == openai_port
        for base in {url, f"{http}/v1"}:  # the OpenAI API on the HTTP port always, and on --openai-port
            client = openai.OpenAI(base_url=base, api_key=KEY if openai_port else "none", max_retries=0)
            assert [m.id for m in client.models.list().data] == [MODEL]
            reply = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS)
            assert reply.choices[0].text == reference[PROMPTS[0]][0]
        [triton] = [p for p in psutil.Process(proc.pid).children() if p.name() == "tritonserver"]
        private = int(re.search(r"--http-port=(\d+)", " ".join(triton.cmdline())).group(1))
        assert "--http-address=127.0.0.1" in triton.cmdline() and f":{private}" not in "".join(lines)  # never printed
        server_pids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
        assert len(server_pids) >= (2 if openai_port else 1)  # tritonserver (+ python stubs), the frontend
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped." in err and KEY not in out + err
    prefix = re.search(r"shm-region-prefix-name=(\w+)", err).group(1)
    assert not list(Path("/dev/shm").glob(f"{prefix}*"))
    assert not [pid for pid in server_pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def test_serve_refuses_a_public_address_without_api_key(repo):
    result = subprocess.run([sys.executable, "-m", "loraship.cli.main", "serve", "--repo", str(repo), "--host", "0.0.0.0"],
                            capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 1
    assert "without an API key" in result.stderr and "Traceback" not in result.stderr


def test_missing_repo_is_a_one_line_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "loraship.cli.main", "serve", "--repo", str(tmp_path / "nope")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "does not exist" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_folder_that_is_no_model_repository_is_one_line(onnx_dir, tmp_path):
    """An export folder (no NAME/config.pbtxt) is refused before tritonserver starts: no option table, no log."""
    for folder in (onnx_dir, tmp_path):
        result = subprocess.run([sys.executable, "-m", "loraship.cli.main", "serve", "--repo", str(folder)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.strip() == (f"Error: {folder} is not a Triton model repository: no folder in it holds a "
                                         "config.pbtxt (pass --repo the folder `loraship repo --out` wrote)")


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_a_model_that_fails_to_load_is_one_line_with_its_error_and_the_log(repo, tmp_path, damage):
    """truncated: the model's load check (sizes in loraship.json) names the file; corrupt (same size): ONNX Runtime's
    own error. Either way one line, the full log's path, and nothing left running."""
    broken = copy_repo(repo, tmp_path / "repo")
    model = broken / MODEL / "1" / "onnx" / "model.onnx"
    data = model.read_bytes()
    model.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\0" * len(data))
    result = subprocess.run([sys.executable, "-m", "loraship.cli.main", "serve", "--repo", str(broken)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: model {MODEL} version 1 failed to load: ")
    if damage == "truncated":
        assert f"IntegrityError: {model} is {len(data) // 2} bytes, but the export wrote {len(data)}" in line
        assert "re-run `loraship export`, then `loraship repo`" in line
    else:
        assert "[ONNXRuntimeError]" in line and str(model) in line
    log = Path(re.search(r"full log: (\S+?)\)$", line).group(1))
    assert log.is_file() and "failed to load" in log.read_text()
    assert "Option" not in line and "server_version" not in result.stderr
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(broken) in " ".join(p.info["cmdline"] or [])]


def test_debug_shows_the_log_tail_of_a_failed_start(repo, tmp_path):
    broken = copy_repo(repo, tmp_path / "repo")
    (broken / MODEL / "1" / "onnx" / "tokenizer.json").unlink()
    result = subprocess.run([sys.executable, "-m", "loraship.cli.main", "--debug", "serve", "--repo", str(broken)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "tokenizer.json is missing from the export" in result.stderr
    assert "server_version" in result.stderr and "Traceback" in result.stderr  # --debug: Triton's table and the traceback


@pytest.mark.parametrize("option", ["--http-port", "--openai-port", "--grpc-port", "--metrics-port"])
def test_a_busy_port_is_one_line_before_anything_starts(repo, option):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-m", "loraship.cli.main", "serve", "--repo", str(repo), option, str(port)],
                                capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == (f"Error: {option} {port} is already in use on 127.0.0.1 (stop what listens there, or pick "
                             "another port; without the option a free one is used)\n")
    assert time.monotonic() - start < 30  # refused before tritonserver loaded anything


def test_one_port_for_two_servers_is_one_line(repo):
    port = str(free_port())
    result = subprocess.run([sys.executable, "-m", "loraship.cli.main", "serve", "--repo", str(repo), "--grpc-port", port,
                             "--metrics-port", port], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"Error: --grpc-port and --metrics-port are both {port} (give each its own port)\n"
