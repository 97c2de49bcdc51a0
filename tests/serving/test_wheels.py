"""`--stage-wheels`: a real `pip download` for another platform/Python, then start.sh installing offline.

Downloads through pip's configured index (PyPI or a mirror) on purpose: it checks the exact pip
invocation the command runs; the tests that download skip only when pip itself cannot. The staged package is the tiny pure-Python `six`, to keep it quick.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

from pathlib import Path

import loraship_contract
import pytest

import loraship.triton_repo
from loraship.errors import LorashipError
from loraship.triton_repo.wheels import check_staged, download_command, image_cuda, packages, stage_wheels, target_options, wheels_dir


@pytest.fixture(scope="module")
def pip_index(tmp_path_factory) -> None:
    """Skip unless pip downloads through its configured index (pip.conf, PIP_INDEX_URL, ...) exactly as
    stage_wheels does: one tiny wheel (six) for the image's Python and platform. Whatever index pip is set
    up with, these tests then run; a probe of one particular host would skip them behind a mirror."""
    dest = tmp_path_factory.mktemp("pip-probe")
    cmd = download_command(dest, ("six",))
    cmd[-1:-1] = ["--no-deps", "--no-cache-dir", "--timeout", "20", "--retries", "1"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if result.returncode != 0 or not list(dest.glob("six-*.whl")):
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
        pytest.skip(f"pip cannot download through its configured index: {tail[0]}")


def test_download_command_targets_the_image_python_and_platform(tmp_path):
    cmd = download_command(tmp_path, packages())
    assert cmd[1:4] == ["-m", "pip", "download"] and "--only-binary=:all:" in cmd
    platforms = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--platform"]
    assert platforms[0] == "manylinux_2_39_x86_64" and "manylinux_2_28_x86_64" in platforms and "manylinux_2_17_x86_64" in platforms
    assert platforms[-3:] == ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and cmd[cmd.index("--abi") + 1] == "cp312"
    assert cmd[-11:] == ["onnxruntime-gpu<1.27", "tokenizers", "numpy<2", "onnx", "jinja2", "fastapi", "pydantic>=2", "uvicorn",
                         "uvloop", "httptools", "httpx"]
    assert wheels_dir(tmp_path / "root" / "repo") == (tmp_path / "root" / "wheels").resolve()


def test_the_image_tag_picks_the_onnxruntime_build_for_its_cuda():
    """NGC tritonserver moved to CUDA 13 in 25.08; PyPI's onnxruntime-gpu did at 1.27."""
    assert image_cuda("24.12") == image_cuda("25.07") == 12 and image_cuda("25.08") == image_cuda("25.10") == 13
    assert packages("24.12")[0] == "onnxruntime-gpu<1.27" and packages("25.10")[0] == "onnxruntime-gpu>=1.27"
    with pytest.raises(LorashipError, match=r"tritonserver:24.05-py3 has no Python 3.12") as info:
        image_cuda("24.05")
    assert "24.12 or later" in info.value.fix
    with pytest.raises(LorashipError, match="'latest' is not an NGC release"):
        image_cuda("latest")


def test_wheels_staged_for_another_cuda_are_refused(tmp_path):
    (tmp_path / "onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    with pytest.raises(LorashipError, match=r"onnxruntime-gpu 1.31.1 \(CUDA 13\), but tritonserver:24.12-py3 has CUDA 12") as info:
        check_staged(tmp_path, "24.12")
    assert "--image-tag 24.12" in info.value.fix
    check_staged(tmp_path, "25.10")
    check_staged(tmp_path / "none", "24.12")  # no onnxruntime-gpu staged: nothing to check


@pytest.mark.parametrize(("tag", "cuda13"), [("24.12", False), ("25.10", True)])
def test_the_default_packages_resolve_for_the_image(pip_index, tmp_path, tag, cuda13):
    """The whole set resolves for Python 3.12 on glibc 2.39 with the options stage_wheels uses, from the
    index's metadata (pip's dry run downloads no wheel), with the onnxruntime-gpu built for the image's
    CUDA. Before every manylinux tag was named, tokenizers (manylinux_2_17 only) did not resolve, and
    pydantic-core fell to a 0.0.1 stub."""
    import json

    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--quiet", "--dry-run",
           "--ignore-installed", "--report", str(report), "--target", str(tmp_path / "t"), *target_options(), *packages(tag)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    install = json.loads(report.read_text())["install"]
    wheels = {i["metadata"]["name"].lower().replace("_", "-"): (i["metadata"]["version"], i["download_info"]["url"].rsplit("/", 1)[-1])
              for i in install}
    for name in ("onnxruntime-gpu", "tokenizers", "numpy", "onnx", "jinja2", "fastapi", "uvicorn", "uvloop", "httptools", "httpx"):
        assert name in wheels, name
    assert int(wheels["pydantic"][0].split(".")[0]) == 2 and int(wheels["pydantic-core"][0].split(".")[0]) == 2
    assert wheels["numpy"][0].startswith("1.")  # what the python backend's BYTES tensors are tested with
    ort = next(i["metadata"] for i in install if i["metadata"]["name"] == "onnxruntime-gpu")
    runtime = [d for d in ort.get("requires_dist", []) if "cuda-runtime" in d]
    assert runtime and all(("13" in d) == cuda13 for d in runtime), runtime  # the wheel's own CUDA extra
    for version, filename in wheels.values():
        assert filename.endswith("-none-any.whl") or ("-cp312-" in filename or "-abi3-" in filename) and "manylinux" in filename, filename


def test_a_failed_download_leaves_the_staged_folder_as_it_was(pip_index, tmp_path):
    repo = tmp_path / "root" / "repo"
    repo.mkdir(parents=True)
    wheels = stage_wheels(repo, requirements=("six>=1.10",))
    before = sorted(p.name for p in wheels.iterdir())
    with pytest.raises(LorashipError, match="could not download wheels for Python 3.12"):
        stage_wheels(repo, requirements=("six>=1.10", "loraship-no-such-package-on-any-index"))
    assert sorted(p.name for p in wheels.iterdir()) == before
    assert sorted(p.name for p in wheels.parent.iterdir()) == ["repo", "wheels"]  # no temporary folder left


def test_staged_wheels_install_offline_before_tritonserver_starts(pip_index, tmp_path):
    repo = tmp_path / "root" / "repo"
    repo.mkdir(parents=True)
    wheels = stage_wheels(repo, requirements=("six>=1.10",))
    assert wheels == (tmp_path / "root" / "wheels").resolve()
    assert [w.name.startswith("six-") for w in wheels.glob("*.whl")] == [True]
    assert (wheels / "requirements.txt").read_text().startswith("six==")
    runtime, staged = Path(loraship.triton_repo.__file__).parent / "runtime", wheels / "loraship_runtime"
    copied = {p.relative_to(staged): p.read_bytes() for p in staged.rglob("*.py")}  # the supervisor start.sh runs, its frontend
    assert copied == {p.relative_to(runtime): p.read_bytes() for p in runtime.rglob("*.py")} and len(copied) > 10
    assert (wheels / "loraship_contract.py").read_bytes() == Path(loraship_contract.__file__).read_bytes()
    assert not (repo / "wheels").exists()  # Triton refuses directories without config.pbtxt in the repo

    # A stand-in for tritonserver that shows what it was started with and what it can import.
    fake = tmp_path / "tritonserver"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c 'import sys, six; print(six.__file__); print(sys.argv[1:])' \"$@\"\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": os.environ["PATH"], "TRITONSERVER": str(fake), "LORASHIP_SITE": str(tmp_path / "site"),
           "LORASHIP_API_KEY": "k3y", "PIP_INDEX_URL": "http://127.0.0.1:9/"}  # any index access would fail
    result = subprocess.run(["sh", str(wheels / "start.sh"), "--model-repository=/mnt/repo"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    six_path, argv = result.stdout.strip().splitlines()[-2:]
    assert six_path.startswith(str(tmp_path / "site"))
    assert "--model-repository=/mnt/repo" in argv and "inference" in argv and ":x-api-key=k3y" in argv
