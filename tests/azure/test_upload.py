"""upload against a loopback HTTPS fake that stands in for Azure Files (and the ARM fake for listKeys),
through the real azure-storage-file-share client with the account's shared key."""

from __future__ import annotations

import hashlib

import pytest
from azure_fakes.files import FakeFiles
from azure_fakes.helpers import RG, make_repo

from loraship.errors import LorashipError
from loraship.infra.clients import Clients
from loraship.infra.files_upload import STAGING, scan, sync, upload
from loraship.infra.provisioner import provision


@pytest.fixture
def provisioned(arm, settings, params, tmp_path):
    provision(params, settings, RG, config_path=tmp_path / "c.json")
    return params


def _share(files: FakeFiles, name: str) -> dict:
    return files.files[name]


def _assert_share_matches(files, share, root, repo):
    for f in scan([(repo, "model_repository"), (root / "wheels", "wheels")]):
        remote = _share(files, share)[f.dest]
        assert bytes(remote.data) == f.path.read_bytes(), f.dest
        assert remote.content_md5 == hashlib.md5(f.path.read_bytes()).digest()


def test_upload_puts_repo_and_wheels_on_share(files, settings, provisioned, tmp_path):
    """The fake stands in for Azure Files; it verifies each request's SharedKey signature."""
    repo = make_repo(tmp_path / "work")
    result = upload(provisioned, settings, RG, repo, progress=False)
    share = provisioned.fileShareName
    assert sorted(result.uploaded) == sorted(f.dest for f in scan([(repo, "model_repository"), (tmp_path / "work" / "wheels", "wheels")]))
    _assert_share_matches(files, share, tmp_path / "work", repo)
    assert not [p for p in _share(files, share) if p.startswith(STAGING)]  # everything was published
    # the 3 MiB model went up as parallel ranged uploads with per-range MD5
    ranges = [r for r in files.put_ranges() if "model.onnx" in r.path]
    assert len(ranges) == 1 and all("content-md5" in r.headers for r in ranges)

    again = upload(provisioned, settings, RG, repo, progress=False)
    assert again.uploaded == [] and again.bytes_sent == 0 and len(again.unchanged) == len(result.uploaded)
    assert again.digest == result.digest


def test_interrupted_upload_resumes_and_is_never_visible_half_done(files, settings, tmp_path):
    """The fake stands in for Azure Files; it fails Put Range with 503 ServerBusy halfway through."""
    files.create_share("models")
    share = Clients(settings).share(files.account, "models", files.key)
    repo = make_repo(tmp_path / "work", size=10 * 256 * 1024 + 17)  # 11 chunks of 256 KiB
    chunks = 11 + 1 + 1  # model.onnx, model.py, config.pbtxt
    trees = [(repo, "model_repository")]

    files.fail_put_range_after = 6
    with pytest.raises(Exception, match="ServerBusy|server is currently unable"):
        sync(share, trees, chunk=256 * 1024, workers=1, progress=False)
    done = files.ranges_ok
    assert done == 6
    assert not [p for p in files.files["models"] if p.startswith("model_repository/")]  # nothing half-visible
    assert "model_repository" not in files.dirs["models"]

    staged = sum(e - s + 1 for f in files.files["models"].values() for s, e in f.ranges)
    files.fail_put_range_after = None
    before = len(files.put_ranges())
    result = sync(share, trees, chunk=256 * 1024, workers=4, progress=False)
    resent = len(files.put_ranges()) - before
    assert resent == chunks - done  # only the missing ranges went up again
    assert result.bytes_sent == sum(f.size for f in scan(trees)) - staged
    for f in scan(trees):
        remote = files.files["models"][f.dest]
        assert bytes(remote.data) == f.path.read_bytes() and remote.content_md5 == f.md5


def test_new_version_published_whole_then_config_last(files, settings, tmp_path):
    """The fake stands in for Azure Files; a new version directory appears by one rename, before config.pbtxt."""
    files.create_share("models")
    share = Clients(settings).share(files.account, "models", files.key)
    repo = make_repo(tmp_path / "work", size=1000)
    sync(share, [(repo, "model_repository")], progress=False)
    make_repo(tmp_path / "work", version=2, size=2000)
    (repo / "tiny" / "config.pbtxt").write_text('name: "tiny"\nbackend: "python"\nversion_policy { latest { num_versions: 2 } }\n')
    mark = len(files.requests)
    result = sync(share, [(repo, "model_repository")], progress=False)
    assert sorted(result.uploaded) == ["model_repository/tiny/2/model.py", "model_repository/tiny/2/onnx/model.onnx", "model_repository/tiny/config.pbtxt"]
    renames = [(r.path.split("/", 3)[3], r.query.get("restype")) for r in files.requests[mark:] if r.query.get("comp") == "rename"]
    assert renames == [("model_repository/tiny/2", "directory"), ("model_repository/tiny/config.pbtxt", None)]
    assert bytes(files.files["models"]["model_repository/tiny/config.pbtxt"].data) == (repo / "tiny" / "config.pbtxt").read_bytes()
    assert bytes(files.files["models"]["model_repository/tiny/1/model.py"].data) == b"# version 1\n"


def test_live_version_is_never_overwritten(files, settings, tmp_path):
    """The fake stands in for Azure Files; a changed file inside a published version is refused."""
    files.create_share("models")
    share = Clients(settings).share(files.account, "models", files.key)
    repo = make_repo(tmp_path / "work", size=1000)
    sync(share, [(repo, "model_repository")], progress=False)
    (repo / "tiny" / "1" / "model.py").write_text("# changed\n")
    with pytest.raises(LorashipError, match="live model version is never overwritten"):
        sync(share, [(repo, "model_repository")], progress=False)
    assert bytes(files.files["models"]["model_repository/tiny/1/model.py"].data) == b"# version 1\n"


def test_upload_cli_and_errors(cli, files, arm, settings, tmp_path):
    """The fakes stand in for Azure; a wrong account key is refused by Files with 403, shown as one line."""
    code, out, err = cli("azure", "provision", "--params", str(cli.params_path), "--subscription", settings.subscription_id, "-g", RG)
    assert code == 0, err
    repo = make_repo(tmp_path / "work", size=5000)
    code, out, err = cli("azure", "upload", "--repo", str(repo), "--params", str(cli.params_path))  # subscription/RG from the config file
    assert code == 0, err
    assert "uploaded 5 files" in out
    code, out, err = cli("azure", "upload", "--repo", str(tmp_path), "--params", str(cli.params_path))
    assert code == 1 and "is not a Triton model repository" in err
    files.key_rotated = True
    (repo / "tiny" / "config.pbtxt").write_text('name: "tiny"\n')
    code, out, err = cli("azure", "upload", "--repo", str(repo), "--params", str(cli.params_path))
    assert code == 1 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and "storage account key was refused while uploading to share" in err and "allowSharedKeyAccess" in err


@pytest.mark.parametrize("damage", ["missing", "truncated", "altered"])
def test_upload_refuses_a_damaged_export_and_sends_nothing(cli, arm, files, tmp_path, damage):
    """The fakes stand in for Azure; a version whose export lost, cut or changed a file is refused in one
    line naming the file, before any request (checksums as `loraship export` records them)."""
    import json

    repo = make_repo(tmp_path / "work", size=5000)
    onnx = repo / "tiny" / "1" / "onnx"
    data = (onnx / "model.onnx").read_bytes()
    (onnx / "loraship.json").write_text(json.dumps({"format": 1, "files": {
        "model.onnx": {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}}}))
    if damage == "missing":
        (onnx / "model.onnx").unlink()
    elif damage == "truncated":
        (onnx / "model.onnx").write_bytes(data[:100])
    else:
        (onnx / "model.onnx").write_bytes(bytes([data[0] ^ 1]) + data[1:])
    code, out, err = cli("azure", "upload", "--repo", str(repo), "--params", str(cli.params_path), "--subscription", "s", "-g", RG)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(onnx / "model.onnx") in err and {"missing": "missing", "truncated": "is 100 bytes", "altered": "sha256"}[damage] in err
    assert "nothing was uploaded" in err and "loraship export" in err
    assert files.requests == [] and arm.requests == []


def test_upload_refuses_wheels_built_for_another_cuda_and_sends_nothing(cli, arm, files, tmp_path):
    """The fakes stand in for Azure; onnxruntime-gpu staged for CUDA 13 beside a repository bound for the
    default CUDA 12 image (tritonserver:24.12) would leave the container without its CUDA provider."""
    repo = make_repo(tmp_path / "work", size=5000)
    (tmp_path / "work" / "wheels" / "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"PK")
    code, out, err = cli("azure", "upload", "--repo", str(repo), "--params", str(cli.params_path), "--subscription", "s", "-g", RG)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "onnxruntime-gpu 1.31.1 (CUDA 13), but tritonserver:24.12-py3 has CUDA 12" in err and "--image-tag 24.12" in err
    assert files.requests == [] and arm.requests == []


def _one_line_refusal(code: int, err: str) -> str:
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize("where", ["file in the repository", "folder in the repository", "file in the wheels", "relative file"])
def test_upload_refuses_a_symlink_that_leaves_the_repository(cli, arm, files, tmp_path, where):
    """The fakes stand in for Azure; a link pointing outside the uploaded tree (a file, a folder, in the
    repository or the staged wheels) is refused in one line naming it, before any request: no byte
    from outside reaches the share."""
    repo = make_repo(tmp_path / "work", size=5000)
    outside = tmp_path / "private"
    outside.mkdir()
    (outside / "id_rsa").write_text("SECRET KEY\n")
    link, target = {
        "file in the repository": (repo / "tiny" / "1" / "onnx" / "notes.txt", outside / "id_rsa"),
        "folder in the repository": (repo / "tiny" / "1" / "extra", outside),
        "file in the wheels": (tmp_path / "work" / "wheels" / "notes.txt", outside / "id_rsa"),
        "relative file": (repo / "tiny" / "1" / "notes.txt", "../../../../private/id_rsa"),
    }[where]
    link.symlink_to(target)
    line = _one_line_refusal(*cli("azure", "upload", "--repo", str(repo), "--params", str(cli.params_path), "--subscription", "s", "-g", RG)[::2])
    assert f"{link} is a symlink to {outside / 'id_rsa' if where != 'folder in the repository' else outside}, outside" in line
    assert "nothing was uploaded" in line
    assert files.requests == [] and arm.requests == []


def test_a_symlink_inside_the_repository_goes_up_as_a_copy_of_its_file(files, settings, tmp_path):
    """The fake stands in for Azure Files, which has no symlinks: a link to a file inside the tree is
    uploaded as that file's bytes under the link's name; links to folders and dangling links are refused."""
    files.create_share("models")
    share = Clients(settings).share(files.account, "models", files.key)
    repo = make_repo(tmp_path / "work", size=3000)
    onnx = repo / "tiny" / "1" / "onnx"
    (onnx / "weights.bin").symlink_to("model.onnx")
    sync(share, [(repo, "model_repository")], progress=False)
    on_share = files.files["models"]
    assert bytes(on_share["model_repository/tiny/1/onnx/weights.bin"].data) == (onnx / "model.onnx").read_bytes()
    assert bytes(on_share["model_repository/tiny/1/onnx/model.onnx"].data) == (onnx / "model.onnx").read_bytes()

    (repo / "tiny" / "2").mkdir()
    (repo / "tiny" / "2" / "onnx").symlink_to(onnx)
    with pytest.raises(LorashipError, match=r"is a symlink to the folder .*Azure Files has no symlinks: replace the link with the folder itself"):
        scan([(repo, "model_repository")])
    (repo / "tiny" / "2" / "onnx").unlink()
    (repo / "tiny" / "2" / "model.py").symlink_to(repo / "tiny" / "2" / "gone.py")
    with pytest.raises(LorashipError, match="which does not exist; nothing was uploaded"):
        scan([(repo, "model_repository")])


@pytest.mark.parametrize("name", [".hidden", "модель", "phi3.5"])
def test_upload_refuses_a_model_whose_name_triton_or_the_share_would_not_take(cli, arm, files, tmp_path, name):
    """The fakes stand in for Azure; a dot-name would be skipped on the share, a non-ASCII name stops
    the server from starting: refused in one line naming the rule, before any request."""
    repo = make_repo(tmp_path / "work", size=1000)
    make_repo(tmp_path / "work", name=name, size=1000)
    line = _one_line_refusal(*cli("azure", "upload", "--repo", str(repo), "--params", str(cli.params_path), "--subscription", "s", "-g", RG)[::2])
    assert f"{repo}: model {name!r} is not valid (use 1-128 ASCII letters, digits, '_' or '-', not starting with '-' or '.')" in line
    assert files.requests == [] and arm.requests == []


def test_deploy_refuses_a_bad_or_absent_model_name(cli, arm, files, tmp_path):
    repo = make_repo(tmp_path / "work", size=1000)
    base = ("azure", "deploy", "--repo", str(repo), "--params", str(cli.params_path), "--subscription", "s", "-g", RG)
    line = _one_line_refusal(*cli(*base, "--model", "модель")[::2])
    assert "--model 'модель' is not valid (use 1-128 ASCII letters" in line
    line = _one_line_refusal(*cli(*base, "--model", "other")[::2])
    assert f"--model other is not in {repo} (found ['tiny'])" in line
    assert files.requests == [] and arm.requests == []
