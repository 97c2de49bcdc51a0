"""`loraship azure add-adapter` / `remove-adapter`: a deployed model's LoRA adapters on the Azure Files share,
loaded into every running replica without a new revision (issue 19).

Every replica mounts the share's model repository, and each instance of the model re-reads
``<repo>/<model>/multi_lora.json`` when it changes. So adding an adapter uploads only its converted folder
(MBs; no version file is sent) to ``<repo>/<model>/adapters/<folder>/`` through :func:`files_upload.sync`
(staged outside the repository, then published by one folder rename, or file by file over the adapter it
replaces), and ``multi_lora.json`` last: a replica never sees an entry whose files are not all there.

The decisions are :mod:`loraship.triton_repo.adapters`' own, as for a local repository: they run on a
*shadow* of the model's folder made from the few small files on the share they read (the newest version's
``onnx/loraship.json``, ``multi_lora.json``, the installed adapter's ``loraship.json``); the registry file
they write there is the one uploaded.

One writer at a time: two runs against one model at once may lose one's entry (Azure Files renames are
not conditional).
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from loraship_contract import ADAPTERS_DIR, REGISTRY_FILE

from loraship.errors import LorashipError
from loraship.infra.files_upload import STAGING, UploadResult, _Share, open_share, scan, sync

MANIFEST = "loraship.json"  # an export's and a converted adapter's manifest
DEPLOY_FIX = "deploy it first: `loraship azure deploy --repo REPO`"


@dataclass
class AdapterChange:
    """What add-adapter or remove-adapter did to a model on the share."""

    model: str
    name: str
    folder: str  # the adapter's folder on the share
    adapters: dict[str, str]  # multi_lora.json now: name -> folder, relative to the model's folder
    upload: UploadResult = field(default_factory=UploadResult)  # add: the adapter's files sent
    registry_written: bool = False  # False: the share already held this (add of the same adapter again)


class _Remote:
    """The few reads and deletes of one share the adapter commands need."""

    def __init__(self, share: Any, where: str) -> None:
        self.share, self.where = share, where

    def read(self, path: str) -> bytes | None:
        """A file's bytes; None if there is no such file (a missing share still raises)."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            return self.share.get_file_client(path).download_file().readall()
        except ResourceNotFoundError as exc:
            if "ShareNotFound" in str(exc):
                raise
            return None

    def listing(self, path: str) -> tuple[list[str], list[str]] | None:
        """(folders, files) right under ``path``; None if there is no such folder."""
        from azure.core.exceptions import ResourceNotFoundError

        try:
            items = list(self.share.get_directory_client(path).list_directories_and_files())
        except ResourceNotFoundError as exc:
            if "ShareNotFound" in str(exc):
                raise
            return None
        return sorted(i["name"] for i in items if i["is_directory"]), sorted(i["name"] for i in items if not i["is_directory"])

    def models(self, root: str) -> list[str]:
        """The models of the repository at ``root``: its folders holding a config.pbtxt."""
        folders, _ = self.listing(root) or ([], [])
        return [name for name in folders if "config.pbtxt" in (self.listing(f"{root}/{name}") or ([], []))[1]]

    def delete_tree(self, path: str) -> None:
        folders, files = self.listing(path) or ([], [])
        for name in files:
            self.share.get_file_client(f"{path}/{name}").delete_file()
        for name in folders:
            self.delete_tree(f"{path}/{name}")
        self.share.get_directory_client(path).delete_directory()


def _find_model(remote: _Remote, root: str, model: str | None) -> tuple[str, list[str]]:
    """The model to change (given, or the repository's only one) and its numbered versions on the share."""
    if model is None:
        models = remote.models(root)
        if len(models) != 1:
            raise LorashipError(f"share {remote.where} holds {len(models)} models in {root}/ ({', '.join(models) or 'none'})",
                                "pass --model NAME" if models else DEPLOY_FIX)
        model = models[0]
    folders, files = remote.listing(f"{root}/{model}") or ([], [])
    if "config.pbtxt" not in files:
        raise LorashipError(f"model {model!r} is not on share {remote.where} (models in {root}/: {', '.join(remote.models(root)) or 'none'})",
                            f"pass --model one of them, or {DEPLOY_FIX}")
    return model, sorted((f for f in folders if f.isdigit()), key=int)


def _shadow(remote: _Remote, root: str, model: str, versions: list[str], tmp: Path, name: str) -> Path:
    """``tmp/<model>``: the files of the model's folder on the share that the decisions on ``name`` read."""
    from loraship.triton_repo.runtime.adapter_store import StoreError, folder_name, read_entries

    model_dir = tmp / model
    model_dir.mkdir(parents=True)
    wanted = [f"{v}/onnx/{MANIFEST}" for v in versions[-1:]] + [REGISTRY_FILE]
    for rel in wanted:
        data = remote.read(f"{root}/{model}/{rel}")
        if data is not None:
            (model_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            (model_dir / rel).write_bytes(data)
    try:
        entry = read_entries(model_dir).get(name)
    except StoreError as exc:  # a registry file no replica can read either
        raise _on_share(LorashipError(exc.message, exc.fix), tmp, f"{remote.where}/{root}") from None
    for rel in {f"{ADAPTERS_DIR}/{folder_name(name)}", entry or ""} - {""}:  # the adapter's manifests, where installed
        if not os.path.isabs(rel) and ".." not in PurePosixPath(rel).parts:
            data = remote.read(f"{root}/{model}/{rel}/{MANIFEST}")
            if data is not None:
                (model_dir / rel).mkdir(parents=True, exist_ok=True)
                (model_dir / rel / MANIFEST).write_bytes(data)
    return model_dir


def _on_share(exc: LorashipError, tmp: Path, where: str) -> LorashipError:
    """``exc`` with the shadow's paths named as the share's."""
    return LorashipError(exc.message.replace(str(tmp), where), exc.fix and exc.fix.replace(str(tmp), where), exc.detail)


def _publish_registry(remote: _Remote, model_dir: Path, dest: str, log: Callable[[str], None]) -> None:
    """Upload the shadow's multi_lora.json to ``dest`` (the model's folder on the share), staged then renamed
    over the old one; sent even when its bytes are unchanged (after a replace), since each replica re-reads
    it when its (mtime, size) changes."""
    registry = [f for f in scan([(model_dir, dest)]) if f.dest == f"{dest}/{REGISTRY_FILE}"]
    sync(remote.share, [], local=registry, force=frozenset(f.dest for f in registry), progress=False, log=log)


def add_adapter(p: Any, settings: Any, resource_group: str, converted: Path, name: str, *, model: str | None = None,
                replace: bool = False, progress: bool = True, log: Callable[[str], None] = lambda _: None) -> AdapterChange:
    """Serve the converted adapter ``converted`` as ``name`` of ``model`` (default: the share's only model) on
    every replica: upload its files, then the new multi_lora.json. Refused in one line, before anything is
    written: an adapter converted for another base than the model's newest version, a name already installed
    with other weights (unless ``replace``), a missing share or model."""
    from loraship.infra.azerrors import azure_errors
    from loraship.triton_repo.adapters import add_adapter as install, slot_layout
    from loraship.triton_repo.runtime.adapter_store import StoreError, check_name, check_source, identity, read_entries

    converted = Path(converted)
    try:
        check_name(name)
        check_source(converted)
    except StoreError as exc:
        raise LorashipError(exc.message, exc.fix) from None
    scan([(converted, ".")])  # a symlink out of the folder is refused before any request
    root = p.modelRepositoryDir
    ctx = {"resource_group": resource_group, "location": p.location}
    remote = _Remote(open_share(p, settings, resource_group), f"{p.storageAccountName}/{p.fileShareName}")
    with azure_errors(f"reading share {p.fileShareName}", **ctx), tempfile.TemporaryDirectory(prefix="loraship-share-") as tmp_name:
        tmp = Path(tmp_name)
        model, versions = _find_model(remote, root, model)
        if not versions:
            raise LorashipError(f"model {model!r} on share {remote.where} holds no version", DEPLOY_FIX)
        model_dir = _shadow(remote, root, model, versions, tmp, name)
        try:
            layout, _ = slot_layout(tmp, model)
        except LorashipError as exc:
            raise _on_share(exc, tmp, f"{remote.where}/{root}") from None
        mine = json.loads((converted / MANIFEST).read_text()).get("layout")
        if mine != layout.fingerprint():
            raise LorashipError(
                f"adapter {converted} was converted for another base than version {versions[-1]} of {model!r} on share "
                f"{remote.where} (their LoRA slot layouts differ: {layout.describe()})",
                "convert the peft adapter for the deployed base: pass it with --base-export EXPORT, the base export with "
                "slots that version was written from")
        installed = read_entries(model_dir).get(name)
        if installed is not None and not replace and identity(model_dir / installed) != identity(converted):
            raise LorashipError(f"adapter {name!r} of {model!r} on share {remote.where} is already installed ({installed}) with other weights",
                                "pass --replace to serve the new weights under that name, or choose another name")
        before = (model_dir / REGISTRY_FILE).read_bytes() if (model_dir / REGISTRY_FILE).is_file() else None
        try:
            dest = install(tmp, model, name, converted, replace=True)  # checks every byte against the layout
        except LorashipError as exc:
            raise _on_share(exc, tmp, f"{remote.where}/{root}") from None
        folder = f"{root}/{model}/{dest.relative_to(model_dir).as_posix()}"
        files = scan([(converted, folder)])
        log(f"uploading {len(files)} files of adapter {name} to {folder}")
        change = AdapterChange(model, name, folder, read_entries(model_dir))
        with azure_errors(f"uploading adapter {name} to share {p.fileShareName}", **ctx):
            change.upload = sync(remote.share, [], local=files, progress=progress, log=log)
            for stale in set((remote.listing(folder) or ([], []))[1]) - {f.dest.rpartition("/")[2] for f in files}:
                remote.share.get_file_client(f"{folder}/{stale}").delete_file()  # the replaced adapter's, no longer named
                log(f"deleted {folder}/{stale}")
            if change.upload.uploaded or (model_dir / REGISTRY_FILE).read_bytes() != before:
                _publish_registry(remote, model_dir, f"{root}/{model}", log)
                change.registry_written = True
    return change


def remove_adapter(p: Any, settings: Any, resource_group: str, name: str, *, model: str | None = None,
                   log: Callable[[str], None] = lambda _: None) -> AdapterChange:
    """Stop serving adapter ``name`` of ``model`` on every replica: upload multi_lora.json without it (requests
    already running finish; new ones are refused), then delete its folder when it is one of ``adapters/``."""
    from loraship.infra.azerrors import azure_errors
    from loraship.triton_repo.adapters import remove_adapter as uninstall
    from loraship.triton_repo.runtime.adapter_store import read_entries

    root = p.modelRepositoryDir
    ctx = {"resource_group": resource_group, "location": p.location}
    remote = _Remote(open_share(p, settings, resource_group), f"{p.storageAccountName}/{p.fileShareName}")
    with azure_errors(f"changing the adapters on share {p.fileShareName}", **ctx), \
            tempfile.TemporaryDirectory(prefix="loraship-share-") as tmp_name:
        tmp = Path(tmp_name)
        model, versions = _find_model(remote, root, model)
        model_dir = _shadow(remote, root, model, versions, tmp, name)
        try:
            installed = read_entries(model_dir).get(name)
            uninstall(tmp, model, name)
        except LorashipError as exc:
            raise _on_share(LorashipError(exc.message.replace("is installed", f"is installed in {model!r} on share {remote.where}"),
                                          exc.fix), tmp, remote.where) from None
        _publish_registry(remote, model_dir, f"{root}/{model}", log)
        folder = f"{root}/{model}/{installed}"
        change = AdapterChange(model, name, folder, read_entries(model_dir), registry_written=True)
        if PurePosixPath(installed).parent == PurePosixPath(ADAPTERS_DIR) and remote.listing(folder) is not None:
            trash = f"{STAGING}/deleted-{uuid.uuid4().hex[:8]}"  # out of the repository at once, then deleted
            _Share(remote.share).make_dirs(STAGING)
            remote.share.get_directory_client(folder).rename_directory(trash)
            remote.delete_tree(trash)
            log(f"deleted {folder}")
    return change
