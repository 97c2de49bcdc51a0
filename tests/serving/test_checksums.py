"""Checksummed exports: `loraship repo` refuses a missing, truncated or altered file, and an export without
checksums until `loraship export --rehash` records them; nothing is written by a refusal."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest


def damaged(onnx_dir, tmp_path, damage: str, name: str = "model.onnx"):
    folder = shutil.copytree(onnx_dir, tmp_path / "onnx")
    path = folder / name
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(data[:-1])
    else:
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    return folder, path, len(data)


@pytest.mark.parametrize("damage,name", [("missing", "model.onnx"), ("truncated", "model.onnx"), ("altered", "model.onnx"),
                                         ("altered", "tokenizer.json")])
def test_repo_refuses_a_damaged_export_and_writes_nothing(onnx_dir, tmp_path, run_cli, damage, name):
    folder, path, size = damaged(onnx_dir, tmp_path, damage, name)
    code, out, err = run_cli(["repo", "--onnx", str(folder), "--out", str(tmp_path / "repo"), "--name", "m"])
    expected = {"missing": f"{path} is missing from the export",
                "truncated": f"{path} is {size - 1} bytes, but the export wrote {size} (truncated or replaced)",
                "altered": f"{path} differs from the export (its sha256 is not the one in loraship.json)"}[damage]
    assert code == 1 and err.strip() == (f"Error: {expected} (re-run `loraship export`, or if you changed it on purpose, "
                                         f"record it with `loraship export --rehash {folder}`; nothing was written)")
    assert not (tmp_path / "repo").exists()


def test_export_without_checksums_is_refused_until_rehash(onnx_dir, tmp_path, run_cli):
    folder = shutil.copytree(onnx_dir, tmp_path / "old-export")
    manifest = json.loads((folder / "loraship.json").read_text())
    del manifest["files"]  # as `loraship export` wrote it before checksums
    (folder / "loraship.json").write_text(json.dumps(manifest))
    args = ["repo", "--onnx", str(folder), "--out", str(tmp_path / "repo"), "--name", "m"]
    code, out, err = run_cli(args)
    assert code == 1 and len(err.strip().splitlines()) == 1
    assert "was exported without checksums" in err and f"`loraship export --rehash {folder}`" in err
    assert not (tmp_path / "repo").exists()

    code, out, err = run_cli(["export", "--rehash", str(folder), "--out", str(tmp_path / "x")])
    assert code == 1 and "--rehash takes an existing export" in err
    code, out, err = run_cli(["export", "--rehash", str(folder)])
    assert code == 0, err
    files = json.loads((folder / "loraship.json").read_text())["files"]
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != "loraship.json")
    assert sorted(files) == on_disk and f"recorded {len(on_disk)} files" in out
    for name, entry in files.items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    code, out, err = run_cli(args)
    assert code == 0, err
    assert (tmp_path / "repo" / "m" / "1" / "onnx" / "model.onnx").is_file()


def test_export_needs_model_and_out_without_rehash(run_cli, tmp_path):
    code, out, err = run_cli(["export", "--model", str(tmp_path)])
    assert code == 1 and err.strip() == ("Error: export needs --model and --out (pass the merged model folder and an "
                                         "output folder (or --rehash DIR))")


BLOCKED = "import onnxruntime is blocked in this test"


def _without_onnxruntime(tmp_path, code: str, *args: str):
    """Run ``code`` in a fresh interpreter where ``import onnxruntime`` fails (a stand-in package first on
    the path raises), as on a machine that only hashes and uploads exports."""
    import os
    import subprocess
    import sys

    blocker = tmp_path / "blocked" / "onnxruntime"
    blocker.mkdir(parents=True, exist_ok=True)
    (blocker / "__init__.py").write_text(f"raise ImportError({BLOCKED!r})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker.parent), os.environ.get("PYTHONPATH", "")])}
    check = "\nimport sys\nassert 'onnxruntime' not in sys.modules\n"
    return subprocess.run([sys.executable, "-c", code + check, *args], env=env, capture_output=True, text=True, timeout=120)


def test_rehash_and_the_upload_check_run_without_onnxruntime(onnx_dir, tmp_path):
    """`export --rehash` (through the CLI), hashing an export, and `azure upload`'s check of a repository
    import neither onnxruntime nor the engine's decoder: the blocked import would fail them."""
    probe = _without_onnxruntime(tmp_path, "import onnxruntime")
    assert probe.returncode == 1 and BLOCKED in probe.stderr  # the block is real

    folder = shutil.copytree(onnx_dir, tmp_path / "old-export")
    manifest = json.loads((folder / "loraship.json").read_text())
    expected = manifest.pop("files")
    (folder / "loraship.json").write_text(json.dumps(manifest))
    done = _without_onnxruntime(tmp_path, "import sys\nfrom loraship.cli.main import main\ntry:\n    main()\nexcept SystemExit as e:\n"
                                          "    assert not e.code, e.code", "export", "--rehash", str(folder))
    assert done.returncode == 0, done.stderr
    assert f"recorded {len(expected)} files" in done.stdout
    assert json.loads((folder / "loraship.json").read_text())["files"] == expected

    repo = tmp_path / "repo"
    shutil.copytree(folder, repo / "m" / "1" / "onnx")
    upload_check = ("import sys\nfrom pathlib import Path\nfrom loraship.engine.integrity import checksums\n"
                    "from loraship.infra.files_upload import check_exports\n"
                    "print(len(checksums(Path(sys.argv[1]) / 'm' / '1' / 'onnx')))\ncheck_exports(Path(sys.argv[1]))")
    intact = _without_onnxruntime(tmp_path, upload_check, str(repo))
    assert intact.returncode == 0 and intact.stdout.split() == [str(len(expected))], intact.stderr
    (repo / "m" / "1" / "onnx" / "tokenizer.json").write_text("{}")
    refused = _without_onnxruntime(tmp_path, upload_check, str(repo))
    assert refused.returncode == 1 and "tokenizer.json is 2 bytes, but the export wrote" in refused.stderr
    assert "nothing was uploaded" in refused.stderr and BLOCKED not in refused.stderr
