"""`--stage-wheels`: a real `pip download` for another platform/Python, then start.sh installing offline.

Downloads from the package index (PyPI) on purpose: it checks the exact pip invocation the
command runs. The staged package is the tiny pure-Python `six`, to keep it quick.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import urllib.request

from pathlib import Path

import pytest

import loraship.triton_repo
from loraship.triton_repo.wheels import PACKAGES, download_command, stage_wheels, target_options, wheels_dir


def pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/six/", timeout=10).close()
        return True
    except OSError:
        return False


def test_download_command_targets_the_image_python_and_platform(tmp_path):
    cmd = download_command(tmp_path)
    assert cmd[1:4] == ["-m", "pip", "download"] and "--only-binary=:all:" in cmd
    platforms = [cmd[i + 1] for i, arg in enumerate(cmd) if arg == "--platform"]
    assert platforms[0] == "manylinux_2_39_x86_64" and "manylinux_2_28_x86_64" in platforms and "manylinux_2_17_x86_64" in platforms
    assert platforms[-3:] == ["manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"]
    assert cmd[cmd.index("--python-version") + 1] == "3.12" and cmd[cmd.index("--abi") + 1] == "cp312"
    assert cmd[-11:] == ["onnxruntime-gpu", "tokenizers", "numpy", "onnx", "jinja2", "fastapi", "pydantic>=2", "uvicorn", "uvloop",
                         "httptools", "httpx"]
    assert wheels_dir(tmp_path / "root" / "repo") == (tmp_path / "root" / "wheels").resolve()


@pytest.mark.skipif(not pypi_reachable(), reason="the package index is not reachable")
def test_the_default_packages_resolve_for_the_image(tmp_path):
    """The whole default set resolves for Python 3.12 on glibc 2.39 with the options stage_wheels
    uses, from the index's metadata (pip's dry run downloads no wheel). Before every manylinux tag was
    named, tokenizers (manylinux_2_17 only) did not resolve, and pydantic-core fell to a 0.0.1 stub."""
    import json

    report = tmp_path / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--quiet", "--dry-run",
           "--ignore-installed", "--report", str(report), "--target", str(tmp_path / "t"), *target_options(), *PACKAGES]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    wheels = {i["metadata"]["name"].lower().replace("_", "-"): (i["metadata"]["version"], i["download_info"]["url"].rsplit("/", 1)[-1])
              for i in json.loads(report.read_text())["install"]}
    for name in ("onnxruntime-gpu", "tokenizers", "numpy", "onnx", "jinja2", "fastapi", "uvicorn", "uvloop", "httptools", "httpx"):
        assert name in wheels, name
    assert int(wheels["pydantic"][0].split(".")[0]) == 2 and int(wheels["pydantic-core"][0].split(".")[0]) == 2
    for version, filename in wheels.values():
        assert filename.endswith("-none-any.whl") or ("-cp312-" in filename or "-abi3-" in filename) and "manylinux" in filename, filename


@pytest.mark.skipif(not pypi_reachable(), reason="the package index is not reachable")
def test_staged_wheels_install_offline_before_tritonserver_starts(tmp_path):
    repo = tmp_path / "root" / "repo"
    repo.mkdir(parents=True)
    wheels = stage_wheels(repo, packages=("six>=1.10",))
    assert wheels == (tmp_path / "root" / "wheels").resolve()
    assert [w.name.startswith("six-") for w in wheels.glob("*.whl")] == [True]
    assert (wheels / "requirements.txt").read_text().startswith("six==")
    assert (wheels / "openai_api.py").read_bytes() == (Path(loraship.triton_repo.__file__).parent / "openai_api.py").read_bytes()
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
