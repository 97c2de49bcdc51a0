"""`loraship ship --target local` as a user runs it: a real merge, export, verify and repo of the tiny demo
pair, then the real tritonserver in the foreground answering a request, Ctrl-C leaving no process and no
shared memory behind; a re-run skips the finished steps; a changed option re-runs from the step it feeds."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from .conftest import MAX_TOKENS, PROMPTS

MODEL = "tiny"
STEPS = ("merge", "export", "verify", "repo")


@dataclass
class Run:
    out: str
    err: str
    code: int
    reply: dict
    server_pids: list[int]
    openai_url: str  # the OpenAI base URL it printed
    openai_models: list[str]  # what GET /v1/models listed there
    samples: list[tuple[str, int, dict]]  # each command it printed after "try", pasted into bash: (command, status, body)


def run_pasted(command: str) -> tuple[int, dict]:
    """A printed command run by bash exactly as printed (curl's -w adds only the status after the body)."""
    result = subprocess.run(["bash", "-c", command + " -w '\\n%{http_code}'"], capture_output=True, text=True, timeout=120)
    body, _, status = result.stdout.rpartition("\n")
    assert result.returncode == 0, result.stderr
    return int(status), json.loads(body)


def read_until_serving(proc: subprocess.Popen, timeout: float = 600) -> list[str]:
    """The lines a foreground `ship` prints until it serves ("Ctrl-C to stop.")."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while not any("Ctrl-C to stop." in line for line in lines):
        assert time.monotonic() < deadline and proc.poll() is None, ("".join(lines), proc.stderr.read() if proc.poll() is not None else "")
        lines.append(proc.stdout.readline())
    return lines


def interrupt(proc: subprocess.Popen) -> tuple[list[int], str, str]:
    """Ctrl-C a foreground `ship` as a terminal would: the processes it served with, and what it printed after."""
    server_pids = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return server_pids, out, err


def ship_serve_and_stop(work: Path, base: Path, adapter: Path, calls, *extra: str, api_key: str | None = None) -> Run:
    """Start `loraship ship`, wait for "Ctrl-C to stop.", send one generate, paste the commands it printed,
    then SIGINT it like a terminal would."""
    key = ["--api-key", api_key] if api_key else []
    headers = {"x-api-key": api_key} if api_key else {}
    proc = subprocess.Popen([sys.executable, "-m", "loraship.cli.main", "--debug", "ship", "--base", str(base), "--adapter",
                             str(adapter), "--out", str(work), "--name", MODEL, *key, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={k: v for k, v in os.environ.items() if k != "LORASHIP_API_KEY"})
    try:
        lines = read_until_serving(proc)
        http = re.search(r"HTTP\s+(http://127\.0\.0\.1:\d+)", "".join(lines)).group(1)
        status, raw = calls.post(f"{http}/v2/models/{MODEL}/generate", {"text_input": PROMPTS[0], "max_tokens": MAX_TOKENS}, headers)
        assert status == 200, raw
        openai = re.search(r"OpenAI\s+(http://127\.0\.0\.1:\d+/v1)", "".join(lines)).group(1)
        request = urllib.request.Request(f"{openai}/models", headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        with urllib.request.urlopen(request, timeout=30) as resp:
            models = [m["id"] for m in json.loads(resp.read())["data"]]
        samples = [(m[1], *run_pasted(m[1])) for m in re.finditer(r"^try\s+(curl .*)$", "".join(lines), re.M)]
        server_pids, out, err = interrupt(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    return Run("".join(lines) + out, err, proc.returncode, json.loads(raw), server_pids, openai, models, samples)


def assert_stopped_cleanly(run: Run) -> None:
    assert run.code == 0, run.err
    assert "stopped." in run.err and "Traceback" not in run.err
    prefix = re.search(r"shm-region-prefix-name=(\w+)", run.err).group(1)
    assert not list(Path("/dev/shm").glob(f"{prefix}*"))
    assert run.server_pids and not [pid for pid in run.server_pids if psutil.pid_exists(pid)
                                    and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]


def summary_rows(out: str) -> dict[str, str]:
    """step -> result, from the summary table."""
    return {m[1]: m[2] for m in re.finditer(r"│ (merge|export|verify|repo|serve|first request)\s+│ (\w+)", out)}


KEY = "k3y-ship-test-5d2a"


@pytest.fixture(scope="module")
def shipped(demo_pair, calls, tmp_path_factory):
    """`loraship ship --api-key KEY` (with LORASHIP_API_KEY unset, as a new user has it)."""
    work = tmp_path_factory.mktemp("ship") / "work"
    return work, ship_serve_and_stop(work, *demo_pair, calls, api_key=KEY)


def test_ship_local_builds_serves_answers_and_stops_on_ctrl_c(shipped):
    from loraship.engine import Engine, SamplingParams

    work, run = shipped
    assert_stopped_cleanly(run)
    [expected] = Engine.load(work / "onnx").generate([PROMPTS[0]], SamplingParams(max_tokens=MAX_TOKENS))
    assert run.reply["text_output"] == expected.text and run.reply["completion_tokens"] == len(expected.token_ids)
    assert summary_rows(run.out) == {**dict.fromkeys(STEPS, "done"), "serve": "done", "first request": "done"}
    for step in STEPS:  # progress for every step
        assert f"({step}" in run.err, step
    # the commands it printed work pasted: /v2 generate and /v1 chat, with the key given and the JSON
    # content type, asking what its own first request asked (a chat: the model has a chat template)
    chat = [{"role": "user", "content": "Hello"}]
    [(v2, v2_status, v2_reply), (v1, v1_status, v1_reply)] = run.samples
    assert v2.startswith(f"curl -s http://127.0.0.1:") and f"/v2/models/{MODEL}/generate -H 'x-api-key: {KEY}' " in v2
    assert f"/v1/chat/completions -H 'Authorization: Bearer {KEY}' " in v1 and "$" not in v1 + v2
    assert all(" -H 'Content-Type: application/json' -d " in c for c in (v1, v2))
    assert v2_status == 200 and v2_reply["text_output"].strip() and v2_reply["finish_reason"] in ("length", "stop", "eos")
    assert v1_status == 200 and v1_reply["choices"][0]["message"]["content"].strip()
    assert v1_reply["choices"][0]["message"]["content"] == v2_reply["text_output"]  # both greedy, the same chat
    from loraship.engine.chat import ChatTemplate

    first = Engine.load(work / "onnx")
    [asked] = first.generate([ChatTemplate.load(work / "onnx").encode(chat, first.tokenizer)], SamplingParams(max_tokens=32))
    assert v2_reply["text_output"] == asked.text
    assert "prompt: Hello\nreply:  " + asked.text[:16] in run.out  # ship's own first request: that chat, streamed
    assert KEY not in run.err and not [f for f in work.rglob("*") if f.is_file() and KEY.encode() in f.read_bytes()]
    assert re.search(r"gRPC\s+127\.0\.0\.1:\d+", run.out) and re.search(r"metrics\s+http://127\.0\.0\.1:\d+/metrics", run.out)
    assert "reply:" in run.out  # ship's own first request through the client
    # the export's checksums cover every file and stayed right when verify added its report to the manifest
    manifest = json.loads((work / "onnx" / "loraship.json").read_text())
    assert manifest["verify"]["passed"]
    files = sorted(p.relative_to(work / "onnx").as_posix() for p in (work / "onnx").rglob("*") if p.is_file())
    assert sorted(manifest["files"]) == [f for f in files if f != "loraship.json"] and "model.onnx" in manifest["files"]
    for name, entry in manifest["files"].items():
        data = (work / "onnx" / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def test_rerun_skips_finished_steps_and_serves_again(shipped, demo_pair, calls, tmp_path):
    """The re-run also takes `loraship serve`'s --openai-port: the OpenAI API answers there too until Ctrl-C
    (without it, on the HTTP port)."""
    from loraship.triton_repo.localhost import free_port

    work = shutil.copytree(shipped[0], tmp_path / "work")  # same files and times: a re-run of the same ship
    port = free_port()
    run = ship_serve_and_stop(work, *demo_pair, calls, "--openai-port", str(port))
    assert_stopped_cleanly(run)
    assert run.openai_models == shipped[1].openai_models == [MODEL] and run.openai_url == f"http://127.0.0.1:{port}/v1"
    assert shipped[1].openai_url == re.search(r"HTTP\s+(http://\S+)", shipped[1].out).group(1) + "/v1"
    assert summary_rows(run.out) == {**dict.fromkeys(STEPS, "skipped"), "serve": "done", "first request": "done"}
    assert run.reply["text_output"] == shipped[1].reply["text_output"]
    assert sorted(p.name for p in (work / "repo" / MODEL).iterdir() if p.is_dir()) == ["1"]  # no new version


def test_changed_export_option_reruns_from_export_and_verify_past_tolerance_stops(shipped, demo_pair, run_cli, tmp_path):
    work = shutil.copytree(shipped[0], tmp_path / "work")
    state_before = json.loads((work / ".loraship-state.json").read_text())["steps"]
    base, adapter = demo_pair
    code, out, err = run_cli(["ship", "--base", str(base), "--adapter", str(adapter), "--out", str(work), "--name", MODEL,
                              "--engine", "optimum", "--dtype", "fp16", "--atol", "0"])
    assert code == 1
    error = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and "Traceback" not in err
    assert re.search(r"parity check failed: max logit diff [0-9.e-]+ \(atol 0\), greedy token agreement", error[0])
    assert "(merge) (unchanged since the last run: skipped)" in " ".join(err.split())
    state = json.loads((work / ".loraship-state.json").read_text())["steps"]
    assert state["merge"] == state_before["merge"]
    assert (state["export"]["engine"], state["export"]["dtype"]) == ("optimum", "fp16")
    assert "verify" not in state and state["repo"] == state_before["repo"]
    manifest = json.loads((work / "onnx" / "loraship.json").read_text())
    assert (manifest["engine"], manifest["dtype"]) == ("optimum", "fp16")
    assert sorted(p.name for p in (work / "repo" / MODEL).iterdir() if p.is_dir()) == ["1"]  # the failed ship wrote no version


def test_ship_refusals_are_one_line_and_write_nothing(demo_pair, run_cli, tmp_path):
    base, adapter = demo_pair
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    cases = [
        ([], foreign, "holds no earlier run"),
        (["--what-if"], tmp_path / "w1", "apply to --target azure"),
        (["--name", "bad name"], tmp_path / "w2", "is not valid"),
        (["--name", "модель"], tmp_path / "w2", "model name 'модель' is not valid (use 1-128 ASCII letters"),
        (["--name", ".hidden"], tmp_path / "w2", "model name '.hidden' is not valid"),
        (["--host", "0.0.0.0"], tmp_path / "w3", "without an API key"),
    ]
    for extra, out, message in cases:
        code, _, err = run_cli(["ship", "--base", str(base), "--adapter", str(adapter), "--out", str(out), *extra])
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert not [p.name for p in tmp_path.iterdir() if p.name != "mine"]


def test_default_names_from_adapter_folders_are_valid_model_names(tmp_path):
    from loraship.pipeline.ship import default_name
    from loraship.triton_repo.config import check_model_name

    for folder, name in [("phi3-lora", "phi3-lora"), ("модель", "model"), ("моя-lora.v2", "lora-v2"),
                         (".hidden", "hidden"), ("x" * 200, "x" * 128), ("lora_ü_1", "lora_-_1")]:
        (tmp_path / folder).mkdir()
        assert check_model_name(default_name(tmp_path / folder)) == name


def test_ship_asks_the_first_held_out_question_else_hello(onnx_dir, tmp_path):
    """What ship asks first and prints in its commands: an export's first eval case as a chat (the demo
    fine-tune's held-out questions travel in eval.jsonl); else "Hello", as a chat where the model has a
    chat template and as text where it has none."""
    from loraship.export.evalset import EvalCase, write_eval
    from loraship.pipeline.local import first_question

    assert first_question(onnx_dir) == [{"role": "user", "content": "Hello"}]
    assert first_question(tmp_path) == "Hello"  # no tokenizer_config, no template
    write_eval(tmp_path / "eval.jsonl", [EvalCase.ask("Write 47 in words.", "forty-seven"), EvalCase.ask("Write 3 in words.", "three")])
    assert first_question(tmp_path) == [{"role": "user", "content": "Write 47 in words."}]
