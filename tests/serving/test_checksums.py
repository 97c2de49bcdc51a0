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
