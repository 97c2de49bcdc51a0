"""`--stage-wheels`: manylinux wheels for the NGC tritonserver image's Python, installed offline at start.

The image's Python lacks onnxruntime-gpu, tokenizers, onnx (which the engine uses to edit an
optimum export's KV cache on the GPU) and jinja2 (chat templates), and FastAPI, uvicorn (with
uvloop and httptools) and httpx (the OpenAI-compatible frontend). They are downloaded here, next
to the model repository (``ROOT/repo`` and ``ROOT/wheels``: Triton refuses any directory without a
config.pbtxt inside the repository), with the frontend's ``openai_api.py``, and ``wheels/start.sh``
installs them with ``pip --no-index`` before it starts ``tritonserver`` (and, with
``--frontend-port``, the frontend), so nothing is fetched at container start.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from loraship.endpoint import RESTRICTED_APIS
from loraship.errors import LorashipError

# Requirements, optionally with a version range (the frontend is written for pydantic 2: refuse to
# stage 1.x, which an index without pydantic-core wheels for the target would otherwise resolve to).
PACKAGES = ("onnxruntime-gpu", "tokenizers", "numpy", "onnx", "jinja2", "fastapi", "pydantic>=2", "uvicorn", "uvloop",
            "httptools", "httpx")
FRONTEND = Path(__file__).with_name("openai_api.py")
PYTHON_VERSION = "3.12"  # NGC tritonserver 24.12+ images (Ubuntu 24.04)
IMAGE_GLIBC_MINOR = 39  # their glibc 2.39
# pip matches --platform tags exactly (it widens only the legacy aliases), and wheels name the oldest
# glibc they need (tokenizers and pydantic-core: manylinux_2_17), so every tag glibc 2.39 runs is listed.
PLATFORMS = tuple(f"manylinux_2_{minor}_x86_64" for minor in range(IMAGE_GLIBC_MINOR, 4, -1)) + (
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")

START_SCRIPT = """#!/bin/sh
# Written by `loraship repo --stage-wheels`. Installs the wheels in this folder offline,
# then runs tritonserver with the arguments given. With LORASHIP_API_KEY set, inference
# and model control need the header x-api-key (gRPC: triton-grpc-protocol-x-api-key).
#   sh /mnt/models/wheels/start.sh --model-repository=/mnt/models/repo --model-control-mode=none
# With --frontend-port=PORT first, Triton's HTTP API listens on 127.0.0.1 only, and loraship's
# frontend (openai_api.py, beside this script) serves PORT on all addresses: the OpenAI API under
# /v1 and Triton's HTTP API under /v2, behind the same key. When either process ends, the other is
# stopped and the script exits (non-zero, unless it was asked to stop).
#   sh /mnt/models/wheels/start.sh --frontend-port=8080 --model-repository=/mnt/models/repo --http-port=8000
set -e
here=$(cd "$(dirname "$0")" && pwd)
site="${LORASHIP_SITE:-/tmp/loraship-site}"
frontend_port=
case "${1:-}" in --frontend-port=*) frontend_port="${1#*=}"; shift ;; esac
python3 -m pip install --quiet --disable-pip-version-check --no-index --find-links="$here" \\
    --target="$site" -r "$here/requirements.txt"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$LORASHIP_API_KEY" ]; then
    set -- "$@" "--http-restricted-api=@APIS@:x-api-key=$LORASHIP_API_KEY" \\
        "--grpc-restricted-protocol=@APIS@:x-api-key=$LORASHIP_API_KEY"
fi
if [ -z "$frontend_port" ]; then
    exec "${TRITONSERVER:-tritonserver}" "$@"
fi
http_port=8000
for arg in "$@"; do
    case "$arg" in --http-port=*) http_port="${arg#*=}" ;; esac
done
set +e
"${TRITONSERVER:-tritonserver}" "$@" --http-address=127.0.0.1 &
triton=$!
python3 "$here/openai_api.py" --host "${LORASHIP_FRONTEND_HOST:-0.0.0.0}" --port "$frontend_port" --triton "http://127.0.0.1:$http_port" &
frontend=$!
stopping=0
trap 'stopping=1; kill -TERM "$triton" "$frontend" 2>/dev/null' TERM INT
while kill -0 "$triton" 2>/dev/null && kill -0 "$frontend" 2>/dev/null; do
    sleep 1
done
kill -TERM "$triton" "$frontend" 2>/dev/null
wait
[ "$stopping" = 1 ]
"""


def wheels_dir(repo: Path) -> Path:
    """Where staged wheels live: ``wheels/`` beside the repository, under the same upload root."""
    return Path(repo).resolve().parent / "wheels"


def target_options(python_version: str = PYTHON_VERSION, platforms: tuple[str, ...] = PLATFORMS) -> list[str]:
    """pip's options that pick wheels for the image's Python and glibc instead of this machine's."""
    abi = "cp" + python_version.replace(".", "")
    return ["--only-binary=:all:", *(arg for tag in platforms for arg in ("--platform", tag)),
            "--python-version", python_version, "--implementation", "cp", "--abi", abi]


def download_command(dest: Path, packages: tuple[str, ...] = PACKAGES, python_version: str = PYTHON_VERSION,
                     platforms: tuple[str, ...] = PLATFORMS) -> list[str]:
    """``pip download`` of binary wheels (with their dependencies) for another platform and Python."""
    return [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
            *target_options(python_version, platforms), "--dest", str(dest), *packages]


def stage_wheels(repo: Path, packages: tuple[str, ...] = PACKAGES, python_version: str = PYTHON_VERSION,
                 platforms: tuple[str, ...] = PLATFORMS) -> Path:
    """Download the wheels beside ``repo`` and write ``requirements.txt``, ``start.sh`` and the frontend; return the folder."""
    dest = wheels_dir(repo)
    dest.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(download_command(dest, packages, python_version, platforms), capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["pip failed"]
        raise LorashipError(f"could not download wheels for Python {python_version}: {tail[0]}",
                            "check that PyPI (or your pip index) is reachable, then re-run with --stage-wheels")
    pins = []
    for package in packages:
        name = re.split(r"[<>=!~ ]", package, maxsplit=1)[0]
        version = _staged_version(dest, name)
        if version is None:
            raise LorashipError(f"pip downloaded no wheel for {name}", "re-run with --stage-wheels")
        pins.append(f"{name}=={version}")
    (dest / "requirements.txt").write_text("\n".join(pins) + "\n")
    write_start_files(dest)
    return dest


def write_start_files(dest: Path) -> None:
    """``start.sh`` and the frontend it runs (``openai_api.py``) into the wheels folder."""
    from loraship.triton_repo.server import RESTRICTED_APIS

    (dest / "start.sh").write_text(START_SCRIPT.replace("@APIS@", RESTRICTED_APIS))
    shutil.copy2(FRONTEND, dest / FRONTEND.name)


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
