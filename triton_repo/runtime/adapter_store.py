"""A model's LoRA adapters on disk, in a Triton model repository (issue 19); stdlib only, so both loraship
(``loraship.triton_repo.adapters``, `loraship repo --adapter`) and the OpenAI frontend (``POST
/v1/load_lora_adapter``, here and in the container) install and remove adapters through this one module::

    <repo>/<model>/adapters/<folder>/    a converted adapter (`loraship convert-adapter`)
    <repo>/<model>/multi_lora.json       {"<name>": "adapters/<folder>", ...}

An install copies the folder under a hidden temporary name, checks the copy (``check``), renames it into
place, and only then rewrites ``multi_lora.json`` atomically (a temporary file, then a rename): a model
instance polling the file never sees a half-copied adapter or half a file. Writers on one machine take a
lock on the model folder, so two loads at once lose no entry. Every error is one line (:class:`StoreError`).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from loraship_contract import ADAPTER_NAME_PATTERN, ADAPTERS_DIR, REGISTRY_FILE

MANIFEST = "loraship.json"  # a converted adapter's manifest (kind lora_adapter, layout, files' sha256)
ADAPTER_KIND = "lora_adapter"
PEFT_CONFIG = "adapter_config.json"  # a peft adapter, before `loraship convert-adapter`
CONVERT_FIX = "convert it first: `loraship convert-adapter --adapter PEFT_DIR --base BASE_WITH_SLOTS --out DIR`"
_LOCK_FILE = ".multi_lora.lock"
_NAME = re.compile(ADAPTER_NAME_PATTERN)


class StoreError(ValueError):
    """An adapter that cannot be installed or removed; the message is one line naming why."""

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message, self.fix = message, fix

    def __str__(self) -> str:
        return f"{self.message} ({self.fix})" if self.fix else self.message


def folder_name(name: str) -> str:
    """The folder of adapter ``name`` under ``adapters/``: the name, with ``/`` and the other characters a
    path would read as structure percent-encoded (``org/sql`` -> ``org%2Fsql``)."""
    return quote(name, safe="._-")


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise StoreError(f"adapter name {name!r} is not valid: use 1 to 128 letters, digits and . _ : @ / + -, "
                         "starting with a letter or digit")
    return name


def read_entries(model_dir: Path) -> dict[str, str]:
    """``multi_lora.json`` of ``model_dir`` as written (name -> folder, relative to the model folder); {} if absent."""
    path = Path(model_dir) / REGISTRY_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path} is not readable JSON ({exc})", f"fix {path}, or remove it to serve no adapters") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) and v for k, v in data.items()):
        raise StoreError(f"{path} is not a JSON object of adapter name -> folder", f"fix {path}, or remove it to serve no adapters")
    return data


def entry_path(model_dir: Path, folder: str) -> Path:
    """An entry's folder as a path (a relative one is relative to the model folder)."""
    return Path(folder) if os.path.isabs(folder) else Path(model_dir) / folder


def identity(folder: Path) -> tuple[object, object] | None:
    """What makes two converted adapters the same: their layout and their files' sha256, as their manifests
    record them (None for a folder that is no converted adapter)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
        return manifest.get("layout"), {k: v["sha256"] for k, v in sorted(manifest["files"].items())}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def check_source(source: Path) -> None:
    """Refuse, in one line, what is not a converted adapter's folder (a peft folder names the conversion)."""
    source = Path(source)
    if not source.is_dir():
        raise StoreError(f"{source} is not a folder", "pass the output folder of `loraship convert-adapter`")
    if (source / PEFT_CONFIG).is_file():
        raise StoreError(f"{source} is a peft adapter, not a converted one", CONVERT_FIX)
    try:
        kind = json.loads((source / MANIFEST).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != ADAPTER_KIND:
        raise StoreError(f"{source} is not a converted adapter (no {MANIFEST} of kind {ADAPTER_KIND})", CONVERT_FIX)


def install(model_dir: Path, name: str, source: Path, check: Callable[[Path], None] | None = None,
            replace: bool = False) -> Path:
    """Install the converted adapter in ``source`` as ``name`` of the model in ``model_dir`` and name it in
    ``multi_lora.json``; return its folder. ``check(copy)`` raises on a copy that must not serve. The same
    adapter installed again changes nothing; another adapter of that name needs ``replace``."""
    model_dir, source = Path(model_dir), Path(source)
    check_name(name)
    check_source(source)
    home = model_dir / ADAPTERS_DIR
    dest = home / folder_name(name)
    with locked(model_dir):
        entries = read_entries(model_dir)
        home.mkdir(exist_ok=True)
        tmp: Path | None = Path(tempfile.mkdtemp(prefix=f".{dest.name}-tmp-", dir=home))
        try:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
            if check is not None:
                check(tmp)
            new = identity(tmp)
            if name in entries and identity(entry_path(model_dir, entries[name])) != new and not replace:
                raise StoreError(f"adapter {name!r} is already installed (from {entries[name]}) with other weights",
                                 "choose another name, or unload it first")
            if dest.exists():
                if identity(dest) == new:
                    shutil.rmtree(tmp)
                    tmp = None
                else:  # replaced, or left over from an adapter removed without its folder
                    discard(dest)
            if tmp is not None:
                tmp.rename(dest)
                tmp = None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        entries[name] = dest.relative_to(model_dir).as_posix()
        write_entries(model_dir, entries)
    return dest


def uninstall(model_dir: Path, name: str) -> None:
    """Drop ``name`` from ``multi_lora.json`` (each model instance refuses new requests on it once it re-reads
    the file; requests already running finish on the weights they hold), then delete its folder if it is one
    of ``adapters/`` (never a folder elsewhere that an entry names)."""
    model_dir = Path(model_dir)
    with locked(model_dir):
        entries = read_entries(model_dir)
        if name not in entries:
            raise StoreError(f"no adapter named {name!r} is installed (adapters: {', '.join(sorted(entries)) or 'none'})",
                             "name one of them")
        folder = entry_path(model_dir, entries.pop(name))
        write_entries(model_dir, entries)
        if folder.parent.resolve() == (model_dir / ADAPTERS_DIR).resolve() and folder.is_dir():
            discard(folder)


def write_entries(model_dir: Path, entries: dict[str, str]) -> None:
    """``multi_lora.json`` written atomically, names sorted."""
    path = Path(model_dir) / REGISTRY_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(dict(sorted(entries.items())), fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def discard(folder: Path) -> None:
    """Delete ``folder``, renaming it first so nothing reads it half-deleted."""
    doomed = folder.with_name(f".deleting-{folder.name}-{os.getpid()}")
    folder.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


@contextmanager
def locked(model_dir: Path) -> Iterator[None]:
    """One writer of a model's adapters at a time on this machine."""
    if not Path(model_dir).is_dir():
        raise StoreError(f"{model_dir} is not a model of the repository", "check the repository path and the model name")
    with open(Path(model_dir) / _LOCK_FILE, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some SMB mounts): one writer is then the caller's to ensure
            pass
        yield
