"""`loraship azure upload`: sync a Triton model repository to Azure Files.

Every changed file is uploaded into a staging tree outside the model repository, in
parallel 4 MiB ranges, then published by renaming it (or its top-most new directory)
into place; `config.pbtxt` files are published last. Triton therefore never sees a
partial version. A staged file carries its MD5 in metadata, so an interrupted upload
resumes with only the ranges that are missing (Azure Files' List Ranges).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from loraship_contract import ADAPTERS_DIR

from loraship.errors import LorashipError
from loraship.triton_repo.config import check_model_name
from loraship.triton_repo.layout import model_names
from loraship.triton_repo.wheels import check_staged

CHUNK = 4 * 1024 * 1024  # the largest range one Put Range accepts
STAGING = ".loraship-staging"
COMMIT_NAMES = ("config.pbtxt",)
MD5_META = "loraship_md5"


@dataclass
class LocalFile:
    path: Path
    dest: str  # path on the share
    size: int
    md5: bytes


@dataclass
class UploadResult:
    uploaded: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    digest: str = ""


def _md5(path: Path) -> bytes:
    h = hashlib.md5()  # noqa: S324 - Azure's content MD5, not a security hash
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.digest()


def scan(trees: list[tuple[Path, str]]) -> list[LocalFile]:
    """Local files of each (directory, share folder) pair, hidden files and folders skipped.

    Azure Files has no symlinks, and nothing from outside a tree may reach the share: a link to a file
    inside its tree goes up as a copy of that file under the link's name; a link that leaves the tree,
    a dangling link and a link to a folder are refused, in one line, before anything is uploaded."""
    files = []
    for root, dest in trees:
        root = Path(root)
        inside = root.resolve()
        for dirpath, dirnames, filenames in os.walk(root):  # links to folders are listed, never entered
            here = Path(dirpath)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in dirnames:
                if (here / name).is_symlink():
                    _refuse_link(here / name, root, inside)
            for name in sorted(n for n in filenames if not n.startswith(".")):
                path = source = here / name
                if path.is_symlink():
                    source = _refuse_link(path, root, inside)
                rel = path.relative_to(root)
                files.append(LocalFile(source, f"{dest}/{rel.as_posix()}", source.stat().st_size, _md5(source)))
    return files


def _refuse_link(link: Path, root: Path, inside: Path) -> Path:
    """The file a symlink in ``root`` points to, when that is a file inside ``root``; else a LorashipError."""
    target = link.resolve()
    if not target.is_relative_to(inside):
        raise LorashipError(f"{link} is a symlink to {target}, outside {root}; nothing was uploaded",
                            "replace the link with a copy of the file it points to, or remove it")
    if not target.exists():
        raise LorashipError(f"{link} is a symlink to {target}, which does not exist; nothing was uploaded", "remove the link")
    if not target.is_file():
        raise LorashipError(f"{link} is a symlink to the folder {target}; nothing was uploaded",
                            "Azure Files has no symlinks: replace the link with the folder itself")
    return target


def check_exports(repo: Path) -> None:
    """Refuse a repository holding a version whose export lost, truncated or changed a file (sizes and sha256)."""
    from loraship.engine.integrity import IntegrityError, check_export
    from loraship.engine.manifest import MANIFEST

    for manifest in sorted(Path(repo).glob(f"*/*/onnx/{MANIFEST}")):
        if manifest.parent.parent.name.isdigit():
            try:
                check_export(manifest.parent)
            except IntegrityError as exc:
                raise LorashipError(
                    f"{exc}; nothing was uploaded",
                    f"re-run `loraship export` and `loraship repo`, and delete the damaged version {manifest.parent.parent}",
                ) from None


def _is_version_path(dest: str) -> bool:
    """Whether ``dest`` lies in a numbered version folder (an adapter named with digits, ``adapters/7/``, is none)."""
    parts = PurePosixPath(dest).parts[:-1]
    return any(part.isdigit() and parts[i - 1] != ADAPTERS_DIR for i, part in enumerate(parts) if i >= 1)


class _Share:
    """The few share operations the sync needs, with directory existence cached."""

    def __init__(self, share: Any) -> None:
        self.share = share
        self._dirs: dict[str, bool] = {"": True}

    def dir_exists(self, path: str) -> bool:
        if path not in self._dirs:
            self._dirs[path] = self.share.get_directory_client(path).exists()
        return self._dirs[path]

    def make_dirs(self, path: str) -> None:
        from azure.core.exceptions import ResourceExistsError

        parts = PurePosixPath(path).parts
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if not self.dir_exists(sub):
                try:
                    self.share.get_directory_client(sub).create_directory()
                except ResourceExistsError:
                    pass
                self._dirs[sub] = True

    def props(self, path: str) -> Any:
        from azure.core.exceptions import ResourceNotFoundError

        parent = str(PurePosixPath(path).parent)
        if not self.dir_exists("" if parent == "." else parent):
            return None
        try:
            return self.share.get_file_client(path).get_file_properties()
        except ResourceNotFoundError:
            return None


def _publish_root(share: _Share, dest: str) -> str:
    """The top-most folder of ``dest`` missing on the share, or ``dest`` itself."""
    parts = PurePosixPath(dest).parts
    for i in range(1, len(parts)):
        sub = "/".join(parts[:i])
        if not share.dir_exists(sub):
            return sub
    return dest


def _missing_chunks(file_client: Any, size: int, chunk: int) -> list[tuple[int, int]]:
    ranges = [(r.start, r.end) for r in file_client.list_ranges()]
    todo = []
    for offset in range(0, size, chunk):
        end = min(offset + chunk, size) - 1
        if not any(start <= offset and end <= stop for start, stop in ranges):
            todo.append((offset, end - offset + 1))
    return todo


def sync(
    share_client: Any,
    trees: list[tuple[Path, str]],
    *,
    workers: int = 8,
    chunk: int = CHUNK,
    progress: bool = True,
    log: Callable[[str], None] = lambda _: None,
    local: list[LocalFile] | None = None,
    force: frozenset[str] = frozenset(),
) -> UploadResult:
    """Make the share hold ``trees`` (``local``: their :func:`scan`, if already made); only changed files
    are sent (and those whose share path is in ``force``: a file whose new modification time is the news,
    such as a model's multi_lora.json), and each appears whole."""
    from azure.storage.fileshare import ContentSettings

    share = _Share(share_client)
    result = UploadResult()
    local = scan(trees) if local is None else local
    result.digest = hashlib.sha256("".join(f"{f.dest}:{f.md5.hex()}\n" for f in local).encode()).hexdigest()

    todo: list[LocalFile] = []
    for f in local:
        remote = share.props(f.dest)
        if remote is not None and remote.size == f.size and bytes(remote.content_settings.content_md5 or b"") == f.md5 \
                and f.dest not in force:
            result.unchanged.append(f.dest)
            continue
        if remote is not None and _is_version_path(f.dest):
            raise LorashipError(
                f"{f.dest} on the share differs from {f.path}, and a live model version is never overwritten",
                "write a new version with `loraship repo` (it adds version N+1) and upload again",
            )
        todo.append(f)

    # stage: create or resume each file in the staging tree, then list the ranges still to send
    jobs: list[tuple[LocalFile, Any, int, int]] = []
    staged_clients = {}
    for f in todo:
        staged = f"{STAGING}/{f.dest}"
        client = share_client.get_file_client(staged)
        props = share.props(staged)
        if props is not None and props.size == f.size and (props.metadata or {}).get(MD5_META) == f.md5.hex():
            ranges = _missing_chunks(client, f.size, chunk)
        else:
            share.make_dirs(str(PurePosixPath(staged).parent))
            client.create_file(f.size, metadata={MD5_META: f.md5.hex()})
            ranges = [(o, min(chunk, f.size - o)) for o in range(0, f.size, chunk)]
        staged_clients[f.dest] = client
        jobs += [(f, client, o, n) for o, n in ranges]

    def send(job: tuple[LocalFile, Any, int, int]) -> int:
        f, client, offset, length = job
        with f.path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read(length)
        client.upload_range(data, offset, length, validate_content=True)
        return length

    total = sum(j[3] for j in jobs)
    if jobs:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

        with Progress(TextColumn("upload"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), disable=not progress) as bar:
            task = bar.add_task("upload", total=total)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for sent in pool.map(send, jobs):
                    result.bytes_sent += sent
                    bar.advance(task, sent)
    for f in todo:
        staged_clients[f.dest].set_http_headers(ContentSettings(content_md5=bytearray(f.md5)))

    # publish: new folders first (whole versions or models at once), then files, config.pbtxt last
    roots = sorted({_publish_root(share, f.dest) for f in todo}, key=lambda r: (PurePosixPath(r).name in COMMIT_NAMES, r))
    for root in roots:
        parent = str(PurePosixPath(root).parent)
        if parent != ".":
            share.make_dirs(parent)
        if any(f.dest == root for f in todo):
            share_client.get_file_client(f"{STAGING}/{root}").rename_file(root, overwrite=True)
        else:
            share_client.get_directory_client(f"{STAGING}/{root}").rename_directory(root)
            share._dirs[root] = True
        log(f"published {root}")
    result.uploaded = [f.dest for f in todo]
    return result


def upload(
    p: Any,
    settings: Any,
    resource_group: str,
    repo: Path,
    *,
    wheels: Path | None = None,
    progress: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> UploadResult:
    """Upload ``repo`` to ``<share>/<modelRepositoryDir>`` and ``wheels`` (default: REPO/../wheels) to ``<share>/<wheelsDir>``."""
    from loraship.infra.azerrors import azure_errors

    repo = Path(repo)
    if not repo.is_dir() or not model_names(repo):
        raise LorashipError(f"{repo} is not a Triton model repository (no NAME/config.pbtxt)", "pass --repo the folder `loraship repo --out` wrote")
    for name in model_names(repo):  # a name the share or Triton would refuse (a dot-name is skipped below)
        check_model_name(name, f"{repo}: model")
    check_exports(repo)
    if wheels is None and (repo.parent / "wheels").is_dir():
        wheels = repo.parent / "wheels"
    if wheels:
        check_staged(Path(wheels), p.tritonImageTag)
    trees = [(repo, p.modelRepositoryDir)] + ([(Path(wheels), p.wheelsDir)] if wheels else [])
    local = scan(trees)  # a symlink out of the trees is refused before any request
    share = open_share(p, settings, resource_group)
    with azure_errors(f"uploading to share {p.fileShareName}", resource_group=resource_group, location=p.location):
        return sync(share, trees, progress=progress, log=log, local=local)


def open_share(p: Any, settings: Any, resource_group: str) -> Any:
    """A client of the parameters' Files share, with the storage account's key (read through ARM, kept in memory)."""
    from loraship.infra.azerrors import azure_errors
    from loraship.infra.clients import Clients

    c = Clients(settings)
    with azure_errors(f"reading the keys of storage account {p.storageAccountName}", resource_group=resource_group, location=p.location):
        key = c.storage.storage_accounts.list_keys(resource_group, p.storageAccountName).keys_property[0].value
    return c.share(p.storageAccountName, p.fileShareName, key)
