"""Adapters installed in a Triton model repository (``loraship.triton_repo.adapters``, `loraship repo --adapter`):
converted folders beside the numbered versions and the ``multi_lora.json`` that names them; the tiny phi3
``lora_worlds`` (tests/conftest.py) gives the base with slots and its converted adapters."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest

from loraship.engine.adapter_registry import REGISTRY_FILE
from loraship.engine.adapters import WEIGHTS_FILE, adapter_digest
from loraship.errors import LorashipError
from loraship.triton_repo.adapters import add_adapter, list_adapters, remove_adapter
from loraship.triton_repo.runtime.adapter_store import folder_name
from loraship.triton_repo.config import ModelOptions
from loraship.triton_repo.layout import write_version

MODEL = "multi"


@pytest.fixture(scope="module")
def world(lora_worlds):
    return lora_worlds("phi3")


@pytest.fixture
def repo(world, tmp_path) -> Path:
    write_version(world.slots["gather"], tmp_path / "repo", ModelOptions(name=MODEL, threads=1))
    return tmp_path / "repo"


def registry(repo: Path) -> dict:
    return json.loads((repo / MODEL / REGISTRY_FILE).read_text())


def leftovers(repo: Path) -> list[str]:
    return sorted(p.name for p in (repo / MODEL / "adapters").iterdir() if p.name.startswith("."))


def test_add_list_remove(world, repo):
    a0, a1 = world.converted[0], world.converted[1]
    dest = add_adapter(repo, MODEL, "a0", a0)
    assert dest == repo / MODEL / "adapters" / "a0"
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in a0.iterdir())
    assert adapter_digest(dest) == adapter_digest(a0)
    assert registry(repo) == {"a0": "adapters/a0"}
    add_adapter(repo, MODEL, "org/a1", a1)
    assert registry(repo) == {"a0": "adapters/a0", "org/a1": "adapters/org%2Fa1"}
    assert list_adapters(repo, MODEL) == {"a0": dest, "org/a1": repo / MODEL / "adapters" / folder_name("org/a1")}
    assert add_adapter(repo, MODEL, "a0", a0) == dest  # the same adapter again: nothing changes
    remove_adapter(repo, MODEL, "a0")
    assert registry(repo) == {"org/a1": "adapters/org%2Fa1"}
    assert not dest.exists() and leftovers(repo) == []
    with pytest.raises(LorashipError, match=r"no adapter named 'a0' is installed \(adapters: org/a1\)"):
        remove_adapter(repo, MODEL, "a0")
    assert list_adapters(repo, "nothing-here") == {}


def test_another_adapter_of_a_name_needs_replace(world, repo):
    add_adapter(repo, MODEL, "x", world.converted[0])
    with pytest.raises(LorashipError, match="adapter 'x' is already installed .* with other weights"):
        add_adapter(repo, MODEL, "x", world.converted[2])
    assert adapter_digest(repo / MODEL / "adapters" / "x") == adapter_digest(world.converted[0])
    add_adapter(repo, MODEL, "x", world.converted[2], replace=True)
    assert adapter_digest(repo / MODEL / "adapters" / "x") == adapter_digest(world.converted[2])
    assert registry(repo) == {"x": "adapters/x"} and leftovers(repo) == []


def test_bad_adapters_are_refused_in_one_line_and_leave_nothing(world, repo, tmp_path, onnx_dir):
    add_adapter(repo, MODEL, "a0", world.converted[0])
    before = registry(repo)
    with pytest.raises(LorashipError, match="is a peft adapter, not a converted one.*loraship convert-adapter"):
        add_adapter(repo, MODEL, "peft", world.adapters[1])
    damaged = shutil.copytree(world.converted[1], tmp_path / "damaged")
    data = bytearray((damaged / WEIGHTS_FILE).read_bytes())
    data[-4:] = b"\x00\x00\x80\x7f"
    (damaged / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(LorashipError, match="sha256") as caught:
        add_adapter(repo, MODEL, "damaged", damaged)
    assert "\n" not in str(caught.value) and str(damaged) in str(caught.value)
    with pytest.raises(LorashipError, match="adapter name '../x' is not valid"):
        add_adapter(repo, MODEL, "../x", world.converted[1])
    with pytest.raises(LorashipError, match="is not a folder"):
        add_adapter(repo, MODEL, "gone", tmp_path / "missing")
    assert registry(repo) == before and leftovers(repo) == []
    assert sorted(p.name for p in (repo / MODEL / "adapters").iterdir()) == ["a0"]
    write_version(onnx_dir, repo, ModelOptions(name="plain", threads=1))
    with pytest.raises(LorashipError, match="exported without LoRA slots.*loraship export --max-adapters"):
        add_adapter(repo, "plain", "a0", world.converted[0])
    with pytest.raises(LorashipError, match="holds no model version"):
        add_adapter(repo, "absent", "a0", world.converted[0])


def test_a_new_version_keeps_the_set(world, repo):
    add_adapter(repo, MODEL, "a0", world.converted[0])
    write_version(world.slots["masked"], repo, ModelOptions(name=MODEL, threads=1))  # same layout, other design
    assert sorted((repo / MODEL).iterdir()) == [repo / MODEL / n for n in (".multi_lora.lock", "1", "2", "adapters",
                                                                           "config.pbtxt", REGISTRY_FILE)]
    assert list_adapters(repo, MODEL) == {"a0": repo / MODEL / "adapters" / "a0"}
    add_adapter(repo, MODEL, "a3", world.converted[3])  # checked against version 2
    assert set(registry(repo)) == {"a0", "a3"}


def test_concurrent_adds_lose_no_entry(world, repo):
    errors = []

    def add(i: int) -> None:
        try:
            add_adapter(repo, MODEL, f"a{i}", world.converted[i])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert registry(repo) == {f"a{i}": f"adapters/a{i}" for i in range(4)}


def test_repo_cli_installs_adapters_beside_the_version(world, tmp_path, run_cli, onnx_dir):
    out = tmp_path / "cli-repo"
    code, stdout, stderr = run_cli(["repo", "--onnx", str(world.slots["gather"]), "--out", str(out), "--name", MODEL,
                                    "--threads", "1", "--adapter", f"a0={world.converted[0]}", "--adapter", f"org/a1={world.converted[1]}"])
    assert code == 0, stderr
    assert registry(out) == {"a0": "adapters/a0", "org/a1": "adapters/org%2Fa1"}
    assert "installed adapters a0, org/a1" in " ".join(stderr.split())
    for args, needle in (
        (["--adapter", f"x={world.converted[0]}", "--onnx", str(onnx_dir)], "was exported without LoRA slots"),
        (["--adapter", f"x={world.adapters[1]}", "--onnx", str(world.slots["gather"])], "is a peft adapter, not a converted one"),
        (["--adapter", str(world.converted[0]), "--onnx", str(world.slots["gather"])], "is not NAME=DIR"),
        (["--adapter", f"x={world.converted[0]}", "--adapter", f"x={world.converted[1]}", "--onnx", str(world.slots["gather"])],
         "names 'x' twice"),
    ):
        code, _, stderr = run_cli(["repo", "--out", str(tmp_path / "refused"), "--name", MODEL, *args])
        assert code == 1 and needle in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "refused").exists()  # refused before anything is written
