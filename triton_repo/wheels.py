"""`--stage-wheels`: manylinux wheels for the NGC tritonserver image's Python, installed offline at start.

The image's Python lacks onnxruntime-gpu and tokenizers (and onnx, which the engine uses to edit an
optimum export's KV cache on the GPU). They are downloaded here, next to
the model repository (``ROOT/repo`` and ``ROOT/wheels``: Triton refuses any directory
without a config.pbtxt inside the repository), and ``wheels/start.sh`` installs them with
``pip --no-index`` before it execs ``tritonserver``, so nothing is fetched at container start.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from loraship.endpoint import RESTRICTED_APIS
from loraship.errors import LorashipError

PACKAGES = ("onnxruntime-gpu", "tokenizers", "numpy", "onnx")
PLATFORM = "manylinux_2_28_x86_64"
PYTHON_VERSION = "3.12"  # NGC tritonserver 24.12+ images (Ubuntu 24.04)

START_SCRIPT = """#!/bin/sh
# Written by `loraship repo --stage-wheels`. Installs the wheels in this folder offline,
# then execs tritonserver with the arguments given. With LORASHIP_API_KEY set, inference
# and model control need the header x-api-key (gRPC: triton-grpc-protocol-x-api-key).
#   sh /mnt/models/wheels/start.sh --model-repository=/mnt/models/repo --model-control-mode=none
set -e
here=$(cd "$(dirname "$0")" && pwd)
site="${LORASHIP_SITE:-/tmp/loraship-site}"
python3 -m pip install --quiet --disable-pip-version-check --no-index --find-links="$here" \\
    --target="$site" -r "$here/requirements.txt"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$LORASHIP_API_KEY" ]; then
    set -- "$@" "--http-restricted-api=@APIS@:x-api-key=$LORASHIP_API_KEY" \\
        "--grpc-restricted-protocol=@APIS@:x-api-key=$LORASHIP_API_KEY"
fi
exec "${TRITONSERVER:-tritonserver}" "$@"
"""


def wheels_dir(repo: Path) -> Path:
    """Where staged wheels live: ``wheels/`` beside the repository, under the same upload root."""
    return Path(repo).resolve().parent / "wheels"


def download_command(dest: Path, packages: tuple[str, ...] = PACKAGES, python_version: str = PYTHON_VERSION,
                     platform: str = PLATFORM) -> list[str]:
    """``pip download`` of binary wheels (with their dependencies) for another platform and Python."""
    abi = "cp" + python_version.replace(".", "")
    return [
        sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--only-binary=:all:",
        "--platform", platform, "--python-version", python_version, "--implementation", "cp", "--abi", abi,
        "--dest", str(dest), *packages,
    ]


def stage_wheels(repo: Path, packages: tuple[str, ...] = PACKAGES, python_version: str = PYTHON_VERSION,
                 platform: str = PLATFORM) -> Path:
    """Download the wheels beside ``repo`` and write ``requirements.txt`` and ``start.sh``; return the folder."""
    dest = wheels_dir(repo)
    dest.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(download_command(dest, packages, python_version, platform), capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["pip failed"]
        raise LorashipError(f"could not download wheels for Python {python_version}: {tail[0]}",
                            "check that PyPI (or your pip index) is reachable, then re-run with --stage-wheels")
    pins = []
    for package in packages:
        version = _staged_version(dest, package)
        if version is None:
            raise LorashipError(f"pip downloaded no wheel for {package}", "re-run with --stage-wheels")
        pins.append(f"{package}=={version}")
    (dest / "requirements.txt").write_text("\n".join(pins) + "\n")
    (dest / "start.sh").write_text(START_SCRIPT.replace("@APIS@", RESTRICTED_APIS))
    return dest


def _staged_version(dest: Path, package: str) -> str | None:
    """The version of ``package`` among the wheels in ``dest`` (newest if several)."""
    stem = re.sub(r"[-_.]+", "_", package).lower()
    found = []
    for wheel in dest.glob("*.whl"):
        name, version = wheel.name.split("-")[:2]
        if re.sub(r"[-_.]+", "_", name).lower() == stem:
            found.append(version)
    return max(found, key=_version_key) if found else None


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.+]", version))
