"""One endpoint for several fine-tunes (issue 19): `loraship ship --adapter NAME=DIR ...` and `loraship demo --multi`.

Real exports with LoRA slots, real conversions and merges, verify through the real multi-adapter engine, the
real tritonserver behind loraship's OpenAI frontend, asked through the official ``openai`` package and the
`curl` ship prints. The demo test reuses the session's trained fine-tunes (``trained``, ``trained_roman``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from .test_ship import interrupt, read_until_serving

MODEL = "tiny"
MULTI_STEPS = ("export", "convert words", "convert org/two", "merge words", "merge org/two", "verify", "repo", "adapters")


@pytest.fixture(scope="module")
def second_adapter(demo_pair, tmp_path_factory) -> Path:
    """A second random adapter on the demo base: another rank (4) and other targets than the demo's (8, all)."""
    from loraship.export.demo_model import random_adapter

    return random_adapter(demo_pair[0], tmp_path_factory.mktemp("second") / "two", ["qkv_proj", "o_proj"], 4, seed=5)


def summary_rows(out: str) -> dict[str, str]:
    """step -> result, from a summary table."""
    return {m[1].strip(): m[2] for m in re.finditer(r"│ ([\w/ -]+?)\s+│ (done|skipped|failed)", out)}


def engine_reply(onnx: Path, converted: dict[str, Path], name: str | None, messages: list[dict], max_tokens: int) -> str:
    """The in-process multi-adapter engine's greedy reply to a chat on adapter ``name`` (None: the base)."""
    from loraship.engine import Engine, SamplingParams
    from loraship.engine.chat import ChatTemplate

    engine = Engine.load(onnx)
    for adapter, folder in converted.items():
        engine.adapters.register(adapter, folder)
    ids = ChatTemplate.load(onnx).encode(messages, engine.tokenizer)
    [done] = engine.generate([ids], SamplingParams(max_tokens=max_tokens), adapters=[name])
    return done.text


@pytest.fixture(scope="module")
def built(demo_pair, second_adapter, tmp_path_factory):
    """`ship --adapter words=... --adapter org/two=... --max-adapters 3`'s build steps (``pipeline.multi``, what
    the command runs before serving), in-process: the work folder and each step's result."""
    from rich.console import Console

    from loraship.pipeline.multi import SlotOptions, build_multi
    from loraship.pipeline.runner import Pipeline
    from loraship.triton_repo.config import ModelOptions

    base, words = demo_pair
    work = tmp_path_factory.mktemp("ship-multi") / "built"
    p = Pipeline(work, Console(stderr=True))
    build_multi(p, base, {"words": words, "org/two": second_adapter}, ModelOptions(name=MODEL), slots=SlotOptions(max_adapters=3))
    return work, {r.name: r.result for r in p.records}


@pytest.fixture(scope="module")
def shipped_multi(built, demo_pair, second_adapter, tmp_path_factory):
    """`loraship ship --adapter words=... --adapter org/two=...` in the foreground on a copy of ``built`` (so it
    resumes: every build step skipped): its output once it serves, what the test asked meanwhile through the
    openai package and the printed curl, then Ctrl-C."""
    import openai

    base, words = demo_pair
    work = shutil.copytree(built[0], tmp_path_factory.mktemp("ship-multi") / "work")  # same files and times
    proc = subprocess.Popen([sys.executable, "-m", "loraship.cli.main", "ship", "--base", str(base), "--adapter", f"words={words}",
                             "--adapter", f"org/two={second_adapter}", "--out", str(work), "--name", MODEL, "--max-adapters", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    asked: dict = {}
    try:
        lines = read_until_serving(proc)
        out = "".join(lines)
        url = re.search(r"OpenAI\s+(http://127\.0\.0\.1:\d+/v1)", out).group(1)
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        asked["models"] = {m.id: m for m in client.models.list().data}
        for name in ("words", "org/two", MODEL):
            reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hello"}], max_tokens=12,
                                                   temperature=0)
            asked[name] = reply.choices[0].message.content
        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "Hello"}], max_tokens=4)
        asked["missing"] = missing.value
        curl = next(line.split("try", 1)[1].strip() for line in lines if line.startswith("try") and '"model": "org/two"' in line)
        asked["curl"] = json.loads(subprocess.run(shlex.split(curl), capture_output=True, text=True, timeout=60).stdout)
        server_pids, rest, err = interrupt(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    return work, out + rest, err, proc.returncode, asked, server_pids


def test_ship_named_adapters_serves_each_by_model_name_from_one_base(built, shipped_multi):
    work, out, err, code, asked, server_pids = shipped_multi
    assert built[1] == dict.fromkeys(MULTI_STEPS, "done")
    assert code == 0 and "Traceback" not in err and "stopped." in err, err
    assert not [pid for pid in server_pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    rows = summary_rows(out)  # the ship resumed the same build: every step skipped
    assert {step: rows.get(step) for step in MULTI_STEPS} == dict.fromkeys(MULTI_STEPS, "skipped"), out
    assert rows["serve"] == rows["first request words"] == rows["first request org/two"] == "done"
    # the slots are sized from the adapters: the largest rank, the union of the targets; 3 slots as asked
    slots = json.loads((work / "onnx" / "loraship.json").read_text())["lora_slots"]
    assert (slots["max_adapters"], slots["max_rank"]) == (3, 8)
    assert set(slots["targets"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    registry = json.loads((work / "repo" / MODEL / "multi_lora.json").read_text())
    assert registry == {"org/two": "adapters/org%2Ftwo", "words": "adapters/words"}
    assert sorted(p.name for p in (work / "repo" / MODEL).iterdir() if p.is_dir() and p.name.isdigit()) == ["1"]
    # each adapter checked through the multi-adapter engine against its own merged model, recorded with it
    for name in ("words", "org%2Ftwo"):
        report = json.loads((work / "repo" / MODEL / "adapters" / name / "loraship.json").read_text())["verify"]
        assert report["passed"] and report["tokens_identical"] and report["max_abs_logit_diff"] < 1e-4, name
    # every name answers as the in-process engine does on that adapter, and the three answers differ
    converted = {"words": work / "adapters" / "words", "org/two": work / "adapters" / "org%2Ftwo"}
    hello = [{"role": "user", "content": "Hello"}]
    for name, adapter in (("words", "words"), ("org/two", "org/two"), (MODEL, None)):
        assert asked[name] == engine_reply(work / "onnx", converted, adapter, hello, 12), name
    assert len({asked["words"], asked["org/two"], asked[MODEL]}) == 3
    assert {"words", "org/two", MODEL} <= set(asked["models"])
    assert asked["missing"].status_code == 404
    # the printed curl works as printed: Content-Type, the adapter's name as the model
    assert asked["curl"]["model"] == "org/two"  # its max_tokens is 32: the same greedy reply, longer
    assert asked["curl"]["choices"][0]["message"]["content"].startswith(asked["org/two"])
    assert re.search(r"try\s+curl -s http://127\.0\.0\.1:\d+/v1/chat/completions -H 'Content-Type: application/json' "
                     r"-d '\{\"model\": \"words\", \"messages\"", out)
    assert re.search(r"model: words\s+question: Hello", out) and re.search(r"model: org/two\s+question: Hello", out)


def test_ship_named_adapters_drops_an_adapter_no_longer_named(built, demo_pair, tmp_path):
    """One adapter fewer, with the same slots: the export and the other adapter's steps are skipped, and the
    repository then serves exactly the adapters named."""
    from rich.console import Console

    from loraship.pipeline.multi import SlotOptions, build_multi
    from loraship.pipeline.runner import Pipeline
    from loraship.triton_repo.config import ModelOptions

    base, words = demo_pair
    work = shutil.copytree(built[0], tmp_path / "work")
    p = Pipeline(work, Console(stderr=True))
    build_multi(p, base, {"words": words}, ModelOptions(name=MODEL), slots=SlotOptions(max_adapters=3, max_rank=8))
    results = {r.name: r.result for r in p.records}
    assert results["export"] == results["convert words"] == results["merge words"] == "skipped", results
    assert results["verify"] == results["adapters"] == "done", results
    assert json.loads((work / "repo" / MODEL / "multi_lora.json").read_text()) == {"words": "adapters/words"}
    assert not (work / "repo" / MODEL / "adapters" / "org%2Ftwo").exists()


def test_ship_named_adapters_refusals_are_one_line_and_write_nothing(demo_pair, second_adapter, run_cli, tmp_path):
    base, words = demo_pair
    cases = [
        (["--adapter", str(words), "--adapter", f"two={second_adapter}"], "has no name, beside other adapters"),
        (["--adapter", f"a={words}", "--adapter", f"a={second_adapter}"], "names 'a' twice"),
        (["--adapter", f"bad name={words}"], "adapter name 'bad name' is not valid"),
        (["--adapter", f"{MODEL}={words}", "--name", MODEL], "has the model's name"),
        (["--adapter", str(words), "--max-adapters", "2"], "size the slots of NAME=DIR adapters"),
        (["--adapter", f"a={words}", "--max-lora-rank", "4"], "--max-lora-rank 4 is below the adapters' rank 8"),
        (["--adapter", f"a={tmp_path / 'missing'}"], "adapter folder not found"),
        (["--adapter", f"a={words}", "--engine", "optimum"], "need the onnxruntime-genai builder's graph"),
        (["--adapter", f"a={words}", "--target", "azure", "-g", "rg", "--subscription", "sub"], "several adapters serve locally"),
    ]
    for extra, message in cases:
        code, _, err = run_cli(["ship", "--base", str(base), "--out", str(tmp_path / "w"), *extra])
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not (tmp_path / "w").exists()


@pytest.fixture(scope="module")
def demo_multi(trained, trained_roman, tmp_path_factory):
    """`loraship demo --multi` in a folder where an earlier demo trained the model (the session's ``trained``
    fine-tunes stand in for it: the demo's training steps are recorded as done), run as the user runs it."""
    from unittest import mock

    from rich.console import Console

    from loraship.pipeline.demo import demo_model_step
    from loraship.pipeline.demo_multi import second_adapter_step
    from loraship.pipeline.runner import Pipeline

    out = tmp_path_factory.mktemp("demo-multi") / "demo-out"
    p = Pipeline(out, Console(stderr=True))
    with mock.patch("loraship.export.demo_model.demo_model", lambda dst, **kw: shutil.copytree(trained.demo, dst)):
        demo_model_step(p)
    with mock.patch("loraship.export.demo_task.task_adapter", lambda base, dst, *a, **kw: shutil.copytree(trained_roman, dst)):
        second_adapter_step(p)
    result = subprocess.run([sys.executable, "-m", "loraship.cli.main", "demo", "--multi", "--out", str(out), "--max-tokens", "12"],
                            capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "250"})
    return out, result


def test_demo_multi_one_endpoint_answers_each_task_by_model_name(demo_multi):
    """One command: the words adapter writes numbers in words and the Roman adapter writes Roman numerals,
    each when the request names it, from ONE served base; then through the openai package as well."""
    import openai

    from loraship.export.evalset import is_correct, read_eval
    from loraship.pipeline.demo import pick_questions
    from loraship.triton_repo.serve import ServeOptions

    out, result = demo_multi
    assert result.returncode == 0, result.stderr[-3000:]
    stdout = " ".join(result.stdout.split())  # the demo prints its steps and answers on stdout
    assert "(demo-model) (unchanged since the last run: skipped)" in stdout  # reused, not trained again
    assert "(demo-model --second-task roman) (unchanged since the last run: skipped)" in stdout
    shown = {}
    for name, pattern, least, eval_least in (("words", r"[a-z]+(-[a-z]+)?", 2, 20), ("roman", r"[IVXLC]+", 1, 12)):
        shown[name] = re.findall(rf"model: {name} question: (.+?) reply: (.*?) expected: (\S+) (✓|✗)", stdout)
        assert len(shown[name]) == 3 and sum(mark == "✓" for *_, mark in shown[name]) >= least, (name, result.stdout)
        assert all(re.fullmatch(pattern, reply) for _, reply, _, _ in shown[name]), (name, shown[name])
        row = re.search(rf"│ {name}\s+│ numbers in [\w ]+│ max \|logit diff\| [0-9.e-]+, tokens 100% identical\s+│ (\d+)/24\s+│ "
                        rf"(\d)/3 correct", stdout)
        assert row and int(row[1]) >= eval_least and int(row[2]) == sum(mark == "✓" for *_, mark in shown[name]), (name, stdout)

    # the same questions through the openai package: the same replies, each adapter in its own notation
    server = ServeOptions().server(out / "multi" / "repo").start()
    try:
        client = openai.OpenAI(base_url=server.openai_url, api_key="unused", max_retries=0)
        asked = {name: [(c, client.chat.completions.create(model=name, messages=list(c.messages), max_tokens=12, temperature=0)
                         .choices[0].message.content.strip())
                        for c in pick_questions(read_eval(out / "multi" / "adapters" / name / "eval.jsonl"))] for name in shown}
    finally:
        server.stop()
    for name in shown:
        assert [(c.question, reply, c.answer) for c, reply in asked[name]] == [(q, r, a) for q, r, a, _ in shown[name]], name
        assert [is_correct(reply, c.answer) for c, reply in asked[name]] == [mark == "✓" for *_, mark in shown[name]]


def test_verify_per_adapter_from_the_cli(built, second_adapter, demo_pair, onnx_dir, run_cli):
    """`loraship verify --onnx BASE_WITH_SLOTS --adapter NAME=PEFT_DIR ...`: each adapter through the multi-adapter
    engine against its own merged model (fp32: logits within 1e-4, identical greedy tokens); bad input is one line."""
    base, words = demo_pair
    slots = built[0] / "onnx"
    code, out, err = run_cli(["verify", "--onnx", str(slots), "--adapter", f"words={words}", "--adapter",
                              f"org/two={second_adapter}", "--base", str(base), "--max-new-tokens", "8", "--json"])
    assert code == 0, err
    reports = json.loads(out)
    assert sorted(reports) == ["org/two", "words"]
    for name, report in reports.items():
        assert report["passed"] and report["tokens_identical"] and report["max_abs_logit_diff"] < 1e-4, name
        assert report["max_new_tokens"] == 8 and all(len(c["onnx_tokens"][0]) > 0 for c in report["cases"]), name
    # the two adapters' tokens differ: each row ran its own adapter
    assert reports["words"]["cases"][0]["onnx_tokens"] != reports["org/two"]["cases"][0]["onnx_tokens"]
    # the default base is the one each adapter_config.json names; the table per adapter without --json
    code, out, err = run_cli(["verify", "--onnx", str(slots), "--adapter", f"words={words}", "--max-new-tokens", "4"])
    assert code == 0 and "adapter words" in err and "PASS" in err, err
    cases = [
        (["--onnx", str(slots), "--adapter", str(words)], "--adapter takes NAME=DIR"),
        (["--onnx", str(slots), "--adapter", f"w={words}", "--merged", str(words)], "and no --merged or --eval"),
        (["--onnx", str(slots), "--adapter", f"w={built[0] / 'adapters' / 'words'}"], "is a converted adapter"),
        (["--onnx", str(onnx_dir), "--adapter", f"w={words}"], "has no LoRA slots"),
        (["--onnx", str(slots)], "verify needs --merged"),
    ]
    for args, message in cases:
        code, _, err = run_cli(["verify", *args])
        assert code == 1 and message in err and len(err.strip().splitlines()) == 1, (args, err)
