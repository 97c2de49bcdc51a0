"""Where tritonserver lives: the nvidia-pytriton wheel's (its python-backend stub set up for this Python) or
one on PATH, and the environment it runs in."""

from __future__ import annotations

import filecmp
import os
import shutil
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from loraship.errors import LorashipError


@dataclass(frozen=True)
class Installation:
    """Where the tritonserver binary and its backends live."""

    binary: Path
    backend_dir: Path | None  # None: the server's own default (an NGC-style install)
    cache_dir: Path | None


def _pytriton_root() -> Path | None:
    try:
        import importlib.util

        spec = importlib.util.find_spec("pytriton")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def find_tritonserver() -> Installation:
    """The nvidia-pytriton wheel's tritonserver, its python stub set up for this Python, or one on PATH."""
    root = _pytriton_root()
    if root is not None:
        return Installation(root / "bin" / "tritonserver", _python_backend(root), root / "caches")
    on_path = shutil.which("tritonserver")
    if on_path:
        return Installation(Path(on_path), None, None)
    raise LorashipError("no tritonserver found", "pip install nvidia-pytriton, or put a tritonserver on PATH")


def _python_backend(root: Path) -> Path:
    """A backends directory whose python backend has the stub for the running interpreter.

    The stub is copied into the wheel's own ``backends/python`` when that is writable;
    otherwise a private backends directory is assembled under ``~/.cache/loraship``.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise LorashipError(f"nvidia-pytriton ships no python-backend stub for Python {version}", "use Python 3.8 to 3.13")
    backends = root / "backends"
    target = backends / "python" / stub.name
    if target.is_file() and filecmp.cmp(stub, target, shallow=False):
        return backends
    if os.access(backends / "python", os.W_OK):
        _copy_atomic(stub, target)
        return backends
    private = Path.home() / ".cache" / "loraship" / "triton-backends" / version
    (private / "python").mkdir(parents=True, exist_ok=True)
    for item in (backends / "python").iterdir():
        if item.is_file() and item.name != stub.name and not (private / "python" / item.name).exists():
            (private / "python" / item.name).symlink_to(item)
    if not (private / "python" / stub.name).is_file():
        _copy_atomic(stub, private / "python" / stub.name)
    return private


def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}")
    shutil.copy2(src, tmp)
    os.replace(tmp, dst)


def server_env() -> dict[str, str]:
    """PATH with this venv's bin first (model.py imports its packages) and LD_LIBRARY_PATH = libpython's dir."""
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    return env
