"""The checksums of an export folder: every file's size and sha256, recorded in its manifest (``files``).

Written by ``loraship export`` (and ``export --rehash``); checked by ``loraship repo`` and
``loraship azure upload`` (sizes and sha256) and by the Triton model at load (sizes only:
hashing gigabytes again would slow every start, and a missing or truncated file is what a
bad copy or an interrupted upload leaves behind). Needs neither numpy nor onnxruntime.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

from .manifest import MANIFEST, FileEntry, Manifest

SKIPPED_DIRS = ("trt_cache",)  # written beside the model at run time by the TensorRT provider
BLOCK = 1 << 20


class IntegrityError(ValueError):
    """A file of an export is missing, truncated or altered; the message is one line naming it."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def export_files(folder: Path) -> list[str]:
    """The files an export consists of: everything but the manifest, hidden files and run-time caches."""
    folder = Path(folder)
    names = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and rel.as_posix() != MANIFEST and rel.parts[0] not in SKIPPED_DIRS \
                and not any(part.startswith(".") for part in rel.parts):
            names.append(rel.as_posix())
    return names


def checksums(folder: Path) -> dict[str, FileEntry]:
    """``{name: {"size", "sha256"}}`` for every file of the export in ``folder``."""
    folder = Path(folder)
    return {name: {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)} for name in export_files(folder)}


def write_checksummed(folder: Path, manifest: Manifest) -> Manifest:
    """Write ``manifest`` into ``folder`` with the size and sha256 of every other file, last (atomically)."""
    manifest = manifest.replace(files=checksums(folder))
    manifest.write(folder)
    return manifest


def check_files(folder: Path, files: Mapping[str, FileEntry] | None, hashes: bool = True) -> None:
    """Raise :class:`IntegrityError` naming the first file that is missing, of another size or (with
    ``hashes``) of another sha256 than ``files`` recorded. No checksums (None) pass."""
    folder = Path(folder)
    for name, entry in sorted((files or {}).items()):
        path = folder / name
        if not path.is_file():
            raise IntegrityError(f"{path} is missing from the export")
        _check(path, path.stat().st_size, entry, (lambda p=path: sha256_file(p)) if hashes else None)


def check_bytes(path: Path, data: bytes, entry: FileEntry, hashes: bool = True) -> None:
    """:func:`check_files` for one file already read into ``data`` (what is checked is what was read)."""
    _check(path, len(data), entry, (lambda: hashlib.sha256(data).hexdigest()) if hashes else None)


def _check(path: Path, size: int, entry: FileEntry, sha256) -> None:
    if size != entry["size"]:
        raise IntegrityError(f"{path} is {size} bytes, but the export wrote {entry['size']} (truncated or replaced)")
    if sha256 is not None and sha256() != entry["sha256"]:
        raise IntegrityError(f"{path} differs from the export (its sha256 is not the one in {MANIFEST})")


def check_export(folder: Path, hashes: bool = True, fix: str | None = None) -> None:
    """:func:`check_files` against ``folder``'s own manifest; the message ends with ``fix`` if given."""
    try:
        check_files(folder, Manifest.read(folder).files, hashes)
    except (OSError, ValueError) as exc:  # IntegrityError and ManifestError included
        raise IntegrityError(f"{exc}; {fix}" if fix else str(exc)) from None
