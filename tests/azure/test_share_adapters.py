"""`loraship azure add-adapter` / `remove-adapter` (issue 19): the real Azure SDK clients (ARM for the account
key, azure-storage-file-share with the shared key) against the loopback HTTPS fakes that stand in for Azure;
assertions on the bytes the fake share holds and on every write request it received. The model and its
adapters are real: the tiny phi3 ``lora_worlds`` (tests/conftest.py), its base with LoRA slots written as a
version by ``write_version`` and uploaded by `loraship azure upload`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from azure_fakes.helpers import RG

from loraship.infra.files_upload import STAGING
from loraship.triton_repo.config import ModelOptions
from loraship.triton_repo.layout import write_version

MODEL = "multi"
ROOT = "model_repository"
SHARE = "loraship"  # the packaged parameters' fileShareName


@pytest.fixture(scope="module")
def world(lora_worlds):
    return lora_worlds("phi3")


@pytest.fixture
def deployed(cli, files, world, tmp_path):
    """A provisioned fake Azure whose share holds version 1 of MODEL (the base with LoRA slots) and of
    ``plain`` (the base without), as `loraship azure upload` puts them."""
    repo = tmp_path / "work" / "repo"
    write_version(world.slots["gather"], repo, ModelOptions(name=MODEL, threads=1))
    write_version(world.base_onnx, repo, ModelOptions(name="plain", threads=1))
    assert cli("azure", "provision", "--params", str(cli.params_path), "--subscription", "sub", "-g", RG)[0] == 0
    code, out, err = cli("azure", "upload", "--repo", str(repo), "--params", str(cli.params_path))
    assert code == 0, err
    return repo


def run(cli, *args: str) -> tuple[int, str, str]:
    return cli("azure", *args, "--params", str(cli.params_path))


def on_model(cli, *args: str) -> tuple[int, str, str]:
    return run(cli, *args, "--model", MODEL)


def share(files) -> dict:
    return files.files[SHARE]


def registry(files) -> dict:
    return json.loads(bytes(share(files)[f"{ROOT}/{MODEL}/multi_lora.json"].data))


def on_share(files, folder: str) -> dict[str, bytes]:
    """The files under ``folder`` on the share: relative path -> bytes."""
    return {path[len(folder) + 1:]: bytes(f.data) for path, f in share(files).items() if path.startswith(folder + "/")}


def local(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def written(files, mark: int) -> list[str]:
    """The share paths changed since request ``mark`` (renames: their destination), staging included."""
    return [r.path.split("/", 3)[3] for r in files.writes()[mark:]]


def one_line(code: int, err: str) -> str:
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_add_uploads_only_the_adapter_then_the_registry_and_remove_deletes_it(cli, files, world, deployed):
    a0, a1 = world.converted[0], world.converted[1]
    version_files = {p: bytes(f.data) for p, f in share(files).items() if p.startswith(f"{ROOT}/{MODEL}/1/")}
    assert version_files  # the base export with slots went up with `azure upload`

    mark = len(files.writes())
    code, out, err = on_model(cli, "add-adapter", "--name", "a0", "--adapter", str(a0))
    assert code == 0, err
    assert f"uploaded {len(local(a0))} files ({sum(map(len, local(a0).values()))} bytes) to {ROOT}/{MODEL}/adapters/a0" in out
    assert on_share(files, f"{ROOT}/{MODEL}/adapters/a0") == local(a0)  # exactly the adapter's files, byte for byte
    assert registry(files) == {"a0": "adapters/a0"}
    paths = written(files, mark)
    published = {f"{ROOT}/{MODEL}/adapters", f"{ROOT}/{MODEL}/multi_lora.json"}  # outside the staging tree: these two only
    assert {p for p in paths if not p.startswith(STAGING)} == published
    staged = {p.removeprefix(f"{STAGING}/") for p in paths if p.startswith(f"{STAGING}/")}
    assert staged == {ROOT, f"{ROOT}/{MODEL}", f"{ROOT}/{MODEL}/multi_lora.json", f"{ROOT}/{MODEL}/adapters", f"{ROOT}/{MODEL}/adapters/a0"} | \
        {f"{ROOT}/{MODEL}/adapters/a0/{name}" for name in local(a0)}
    assert not [p for p in paths if p.startswith(f"{ROOT}/{MODEL}/1")]  # no version file re-uploaded
    renames = [r.path.split("/", 3)[3] for r in files.writes()[mark:] if r.query.get("comp") == "rename"]
    assert renames == [f"{ROOT}/{MODEL}/adapters", f"{ROOT}/{MODEL}/multi_lora.json"]  # the adapter whole, then the registry
    sent = sum(len(r.body) for r in files.put_ranges()[-3:])
    assert sent < 1 << 20  # an adapter is kilobytes here (MBs for Phi-3), never the base
    assert not [p for p in share(files) if p.startswith(STAGING)]

    mark = len(files.writes())
    code, out, err = on_model(cli, "add-adapter", "--name", "a0", "--adapter", str(a0))  # the same adapter again
    assert code == 0 and "already on the share with these weights: nothing changed" in out
    assert files.writes()[mark:] == []

    assert on_model(cli, "add-adapter", "--name", "org/a1", "--adapter", str(a1))[0] == 0
    assert registry(files) == {"a0": "adapters/a0", "org/a1": "adapters/org%2Fa1"}
    assert on_share(files, f"{ROOT}/{MODEL}/adapters/org%2Fa1") == local(a1)

    # another adapter under a taken name: refused, nothing written; --replace serves it, registry written again
    mark = len(files.writes())
    line = one_line(*on_model(cli, "add-adapter", "--name", "a0", "--adapter", str(a1))[::2])
    assert f"adapter 'a0' of '{MODEL}' on share {files.account}/{SHARE} is already installed (adapters/a0) with other weights" in line
    assert "--replace" in line and files.writes()[mark:] == []
    code, out, err = on_model(cli, "add-adapter", "--name", "a0", "--adapter", str(a1), "--replace")
    assert code == 0, err
    assert on_share(files, f"{ROOT}/{MODEL}/adapters/a0") == local(a1) and local(a1) != local(a0)
    renames = [r.path.split("/", 3)[3] for r in files.writes()[mark:] if r.query.get("comp") == "rename"]
    assert renames[-1] == f"{ROOT}/{MODEL}/multi_lora.json"  # same content, new file: every replica re-reads it
    assert registry(files) == {"a0": "adapters/a0", "org/a1": "adapters/org%2Fa1"}

    mark = len(files.writes())
    code, out, err = on_model(cli, "remove-adapter", "--name", "a0")
    assert code == 0, err
    assert f"removed adapter a0 of {MODEL}; it serves adapters: org/a1" in out
    assert registry(files) == {"org/a1": "adapters/org%2Fa1"}
    assert on_share(files, f"{ROOT}/{MODEL}/adapters/a0") == {} and f"{ROOT}/{MODEL}/adapters/a0" not in files.dirs[SHARE]
    first_delete = next(i for i, r in enumerate(files.writes()[mark:]) if r.method == "DELETE")
    assert f"{ROOT}/{MODEL}/multi_lora.json" in written(files, mark)[:first_delete]  # the registry before any delete
    assert not [p for p in share(files) if p.startswith(STAGING)]
    assert {p: bytes(f.data) for p, f in share(files).items() if p.startswith(f"{ROOT}/{MODEL}/1/")} == version_files

    line = one_line(*on_model(cli, "remove-adapter", "--name", "a0")[::2])
    assert f"no adapter named 'a0' is installed in '{MODEL}' on share {files.account}/{SHARE} (adapters: org/a1)" in line


def test_a_peft_adapter_is_converted_for_the_base_export_first(cli, files, world, deployed):
    code, out, err = run(cli, "add-adapter", "--name", "demo", "--adapter", str(world.adapters[0]), "--base-export",
                         str(world.slots["gather"]), "--model", MODEL)
    assert code == 0, err
    assert registry(files) == {"demo": "adapters/demo"}
    # converted here as `loraship convert-adapter` converts it
    assert on_share(files, f"{ROOT}/{MODEL}/adapters/demo") == local(world.converted[0])

    # an adapter named with digits lies in adapters/7/, no model version: it can be replaced
    assert on_model(cli, "add-adapter", "--name", "7", "--adapter", str(world.converted[0]))[0] == 0
    code, out, err = on_model(cli, "add-adapter", "--name", "7", "--adapter", str(world.converted[1]), "--replace")
    assert code == 0, err
    assert on_share(files, f"{ROOT}/{MODEL}/adapters/7") == local(world.converted[1])
    assert registry(files) == {"7": "adapters/7", "demo": "adapters/demo"}


def test_refusals_are_one_line_and_write_nothing(cli, files, world, deployed, tmp_path):
    from loraship.export.lora_convert import convert_adapter
    from loraship.export.lora_slots import add_lora_slots

    mark = len(files.writes())
    line = one_line(*run(cli, "add-adapter", "--name", "x", "--adapter", str(world.adapters[0]))[::2])
    assert f"{world.adapters[0]} is a peft adapter, not a converted one" in line and "--base-export" in line

    # converted for another base layout (slot rank 16, not the deployed 8): read from the share's loraship.json
    other = add_lora_slots(world.base_onnx, tmp_path / "slots-r16", max_adapters=2, max_rank=16)
    converted = convert_adapter(world.adapters[0], other, tmp_path / "converted-r16")
    line = one_line(*run(cli, "add-adapter", "--name", "x", "--adapter", str(converted), "--model", MODEL)[::2])
    assert f"adapter {converted} was converted for another base than version 1 of '{MODEL}' on share {files.account}/{SHARE}" in line
    assert "rank 8 per module" in line and "--base-export" in line
    line = one_line(*run(cli, "add-adapter", "--name", "x", "--adapter", str(world.adapters[0]), "--base-export", str(other),
                        "--model", MODEL)[::2])
    assert "was converted for another base than version 1" in line

    line = one_line(*run(cli, "add-adapter", "--name", "x", "--adapter", str(world.converted[0]))[::2])
    assert f"share {files.account}/{SHARE} holds 2 models in {ROOT}/ (multi, plain)" in line and "--model" in line
    line = one_line(*run(cli, "add-adapter", "--name", "x", "--adapter", str(world.converted[0]), "--model", "nope")[::2])
    assert f"model 'nope' is not on share {files.account}/{SHARE} (models in {ROOT}/: multi, plain)" in line
    line = one_line(*run(cli, "add-adapter", "--name", "x", "--adapter", str(world.converted[0]), "--model", "plain")[::2])
    assert "version 1 of plain was exported without LoRA slots, so it serves no adapters" in line
    line = one_line(*run(cli, "add-adapter", "--name", "-bad", "--adapter", str(world.converted[0]), "--model", MODEL)[::2])
    assert "adapter name '-bad' is not valid" in line

    linked = tmp_path / "linked"
    shutil.copytree(world.converted[0], linked)
    (tmp_path / "secret").write_text("SECRET\n")
    (linked / "notes.txt").symlink_to(tmp_path / "secret")
    line = one_line(*run(cli, "add-adapter", "--name", "x", "--adapter", str(linked), "--model", MODEL)[::2])
    assert f"{linked / 'notes.txt'} is a symlink to {tmp_path / 'secret'}, outside" in line
    assert files.writes()[mark:] == []

    # a registry file on the share that no replica can read: named, with its path on the share
    registry_path = f"{ROOT}/{MODEL}/multi_lora.json"
    from azure_fakes.files import FakeFile
    share(files)[registry_path] = FakeFile(bytearray(b'{"a0": '))
    mark = len(files.writes())
    line = one_line(*run(cli, "add-adapter", "--name", "x", "--adapter", str(world.converted[0]), "--model", MODEL)[::2])
    assert f"{files.account}/{SHARE}/{registry_path} is not readable JSON" in line
    assert one_line(*run(cli, "remove-adapter", "--name", "x", "--model", MODEL)[::2]) == line
    assert files.writes()[mark:] == []

    files.dirs.pop(SHARE)  # the share was deleted
    files.files.pop(SHARE)
    line = one_line(*run(cli, "add-adapter", "--name", "x", "--adapter", str(world.converted[0]), "--model", MODEL)[::2])
    assert "ShareNotFound" in line and "loraship azure provision" in line
    line = one_line(*run(cli, "remove-adapter", "--name", "x", "--model", MODEL)[::2])
    assert "ShareNotFound" in line
