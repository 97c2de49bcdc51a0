"""`--stage-wheels`: manylinux wheels for the NGC tritonserver image's Python, installed offline at start.

The image's Python lacks onnxruntime-gpu, tokenizers, onnx (which the engine uses to edit an
optimum export's KV cache on the GPU) and jinja2 (chat templates), and FastAPI, uvicorn (with
uvloop and httptools) and httpx (the OpenAI-compatible frontend). They are downloaded here, next
to the model repository (``ROOT/repo`` and ``ROOT/wheels``: Triton refuses any directory without a
config.pbtxt inside the repository), with the ``runtime`` package (the supervisor and the frontend) as
``loraship_runtime`` and ``loraship_contract.py`` beside it, and ``wheels/start.sh`` installs them with ``pip --no-index`` before it starts ``tritonserver`` (with
``--frontend-port``, the supervisor, which runs tritonserver and the frontend and restarts
tritonserver when a model crashes), so nothing is fetched at container start.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from loraship_contract import API_KEY_ENV, API_KEY_HEADER, GRPC_API_KEY_HEADER, RESTRICTED_APIS

from loraship.errors import LorashipError
from loraship.fsutil import atomic_dir
from loraship.triton_repo.layout import CONTRACT_FILE, copy_package

# Requirements besides onnxruntime-gpu, optionally with a version range. numpy stays below 2: the staged
# numpy comes first on the stub's path, and Triton lists numpy 2 in the python backend as a known issue
# (BYTES tensors come out garbled), while numpy 1.26 is what the tests run the real tritonserver with.
# The frontend is written for pydantic 2: refuse to stage 1.x, which an index without pydantic-core
# wheels for the target would otherwise resolve to.
COMMON_PACKAGES = ("tokenizers", "numpy<2", "onnx", "jinja2", "fastapi", "pydantic>=2", "uvicorn", "uvloop", "httptools", "httpx")
RUNTIME = Path(__file__).with_name("runtime")  # the supervisor and the frontend: what start.sh runs
RUNTIME_PACKAGE = "loraship_runtime"  # its name in wheels/
DEFAULT_IMAGE_TAG = "24.12"  # infra's tritonImageTag default: CUDA 12.6
FIRST_IMAGE = (24, 12)  # the first NGC tritonserver on Ubuntu 24.04 with Python 3.12
FIRST_CUDA13_IMAGE = (25, 8)  # NGC tritonserver moved from CUDA 12 to CUDA 13 in 25.08
FIRST_CUDA13_ONNXRUNTIME = (1, 27)  # PyPI's onnxruntime-gpu: built for CUDA 12 before 1.27, for CUDA 13 from it
_CUT = ".".join(map(str, FIRST_CUDA13_ONNXRUNTIME))
ONNXRUNTIME = {12: f"onnxruntime-gpu<{_CUT}", 13: f"onnxruntime-gpu>={_CUT}"}
PYTHON_VERSION = "3.12"  # NGC tritonserver 24.12+ images (Ubuntu 24.04)
IMAGE_GLIBC_MINOR = 39  # their glibc 2.39
# pip matches --platform tags exactly (it widens only the legacy aliases), and wheels name the oldest
# glibc they need (tokenizers and pydantic-core: manylinux_2_17), so every tag glibc 2.39 runs is listed.
PLATFORMS = tuple(f"manylinux_2_{minor}_x86_64" for minor in range(IMAGE_GLIBC_MINOR, 4, -1)) + (
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")

START_SCRIPT = """#!/bin/sh
# Written by `loraship repo --stage-wheels`. Installs the wheels in this folder offline,
# then runs tritonserver with the arguments given. With @KEY_ENV@ set, inference
# and model control need the header @HEADER@ (gRPC: @GRPC_HEADER@).
#   sh /mnt/models/wheels/start.sh --model-repository=/mnt/models/repo --model-control-mode=none
# With --frontend-port=PORT first, loraship's supervisor (loraship_runtime, beside this script) runs
# tritonserver, its HTTP API on 127.0.0.1 only, and the OpenAI frontend on PORT on all
# addresses: the OpenAI API under /v1 and Triton's HTTP API under /v2, behind the same key. The
# supervisor restarts tritonserver when a model's python stub dies or the server exits (readiness
# answers 503 meanwhile), and exits non-zero when the frontend dies or the restarts keep failing,
# so the container is restarted; on SIGTERM it stops both and exits 0.
#   sh /mnt/models/wheels/start.sh --frontend-port=8080 --model-repository=/mnt/models/repo --http-port=8000
set -e
here=$(cd "$(dirname "$0")" && pwd)
site="${LORASHIP_SITE:-/tmp/loraship-site}"
frontend_port=
case "${1:-}" in --frontend-port=*) frontend_port="${1#*=}"; shift ;; esac
python3 -m pip install --quiet --disable-pip-version-check --no-index --find-links="$here" \\
    --target="$site" -r "$here/requirements.txt"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "$@KEY_ENV@" ]; then
    set -- "$@" "--http-restricted-api=@APIS@:@HEADER@=$@KEY_ENV@" \\
        "--grpc-restricted-protocol=@APIS@:@HEADER@=$@KEY_ENV@"
fi
if [ -z "$frontend_port" ]; then
    exec "${TRITONSERVER:-tritonserver}" "$@"
fi
export PYTHONPATH="$here:$PYTHONPATH"  # @RUNTIME@ and loraship_contract.py
exec python3 -m @RUNTIME@.supervisor --frontend-port="$frontend_port" --frontend-host="${LORASHIP_FRONTEND_HOST:-0.0.0.0}" \\
    -- "${TRITONSERVER:-tritonserver}" "$@"
"""


def wheels_dir(repo: Path) -> Path:
    """Where staged wheels live: ``wheels/`` beside the repository, under the same upload root."""
    return Path(repo).resolve().parent / "wheels"


def image_cuda(tag: str) -> int:
    """The CUDA major version of the NGC ``tritonserver:<tag>-py3`` image (a ``YY.MM`` release)."""
    match = re.fullmatch(r"(\d{2})\.(\d{2})(?:[.-].*)?", tag)
    if match is None:
        raise LorashipError(f"tritonserver image tag {tag!r} is not an NGC release (YY.MM)", f"use a release such as {DEFAULT_IMAGE_TAG}")
    release = (int(match[1]), int(match[2]))
    if release < FIRST_IMAGE:
        raise LorashipError(f"tritonserver:{tag}-py3 has no Python {PYTHON_VERSION}, which the staged wheels are built for",
                            f"use {FIRST_IMAGE[0]}.{FIRST_IMAGE[1]} or later")
    return 13 if release >= FIRST_CUDA13_IMAGE else 12


def packages(image_tag: str = DEFAULT_IMAGE_TAG) -> tuple[str, ...]:
    """What the image needs staged: the onnxruntime-gpu built for its CUDA, and the rest."""
    return (ONNXRUNTIME[image_cuda(image_tag)], *COMMON_PACKAGES)


def check_staged(wheels: Path, image_tag: str) -> None:
    """Refuse staged wheels whose onnxruntime-gpu was built for another CUDA than the image's: the
    CUDA provider would fail to load in the container, and every model with it."""
    version = _staged_version(Path(wheels), "onnxruntime-gpu")
    if version is None:
        return
    built_for = 13 if _version_key(version) >= FIRST_CUDA13_ONNXRUNTIME else 12
    image = image_cuda(image_tag)
    if built_for != image:
        raise LorashipError(f"{wheels} holds onnxruntime-gpu {version} (CUDA {built_for}), but tritonserver:{image_tag}-py3 "
                            f"has CUDA {image}",
                            f"re-stage them with `loraship repo ... --stage-wheels --image-tag {image_tag}`")


def target_options() -> list[str]:
    """pip's options that pick wheels for the image's Python and glibc instead of this machine's."""
    return ["--only-binary=:all:", *(arg for tag in PLATFORMS for arg in ("--platform", tag)),
            "--python-version", PYTHON_VERSION, "--implementation", "cp", "--abi", "cp" + PYTHON_VERSION.replace(".", "")]


def download_command(dest: Path, requirements: tuple[str, ...]) -> list[str]:
    """``pip download`` of binary wheels (with their dependencies) for the image's platform and Python."""
    return [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", *target_options(), "--dest", str(dest),
            *requirements]


def stage_wheels(repo: Path, image_tag: str = DEFAULT_IMAGE_TAG, requirements: tuple[str, ...] | None = None) -> Path:
    """Download the wheels ``tritonserver:<image_tag>-py3`` needs (default: :func:`packages`) beside
    ``repo`` with ``requirements.txt``, ``start.sh`` and the frontend; return the folder. The folder is
    written aside and renamed into place, so a failed download leaves the previous one as it was."""
    requirements = packages(image_tag) if requirements is None else requirements
    dest = wheels_dir(repo)
    with atomic_dir(dest, force=True) as tmp:
        result = subprocess.run(download_command(tmp, requirements), capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["pip failed"]
            raise LorashipError(f"could not download wheels for Python {PYTHON_VERSION}: {tail[0]}",
                                "check that PyPI (or your pip index) is reachable, then re-run with --stage-wheels")
        pins = []
        for requirement in requirements:
            name = re.split(r"[<>=!~ ]", requirement, maxsplit=1)[0]
            version = _staged_version(tmp, name)
            if version is None:
                raise LorashipError(f"pip downloaded no wheel for {name}", "re-run with --stage-wheels")
            pins.append(f"{name}=={version}")
        (tmp / "requirements.txt").write_text("\n".join(pins) + "\n")
        write_start_files(tmp)
    return dest


def write_start_files(dest: Path) -> None:
    """``start.sh``, the runtime it runs (the supervisor, which runs the frontend) and the contract they
    import, into the wheels folder."""
    script = START_SCRIPT
    for name, value in (("@APIS@", RESTRICTED_APIS), ("@KEY_ENV@", API_KEY_ENV), ("@GRPC_HEADER@", GRPC_API_KEY_HEADER),
                        ("@HEADER@", API_KEY_HEADER), ("@RUNTIME@", RUNTIME_PACKAGE)):
        script = script.replace(name, value)
    (dest / "start.sh").write_text(script)
    copy_package(RUNTIME, dest / RUNTIME_PACKAGE)
    shutil.copy2(CONTRACT_FILE, dest / CONTRACT_FILE.name)


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
