"""The adapters a model of a Triton repository serves (issue 19): converted adapters kept at the model's
level, beside its numbered versions, and the registry file that names them.

    <repo>/<model>/1/...               the base export with LoRA slots (`loraship export --max-adapters N`)
    <repo>/<model>/adapters/<name>/    a converted adapter (`loraship convert-adapter`)
    <repo>/<model>/multi_lora.json     {"<name>": "adapters/<name>", ...}

Triton ignores the non-numeric entries of a model folder, so adding an adapter never touches a live version
and a new version keeps the set. Every model instance re-reads ``multi_lora.json`` when it changes (the
generate model polls it off its decode loop), so installing or removing an adapter here is what loads or
unloads it on every running replica, and a replica that starts later serves the same set.

The files are written by ``runtime.adapter_store`` (the OpenAI frontend's hot-load writes through it too);
here an adapter is also checked, before it is named, against the newest version's slot layout (every
file's sha256, the shapes), and errors are LorashipErrors.
"""

from __future__ import annotations

from pathlib import Path

from loraship.engine.adapters import AdapterError, SlotLayout, read_adapter
from loraship.engine.manifest import Manifest, ManifestError
from loraship.errors import LorashipError
from loraship.triton_repo.layout import versions
from loraship.triton_repo.runtime.adapter_store import (StoreError, check_name, check_source, entry_path, install, read_entries,
                                                     uninstall)


def slot_layout(repo: Path, model: str) -> tuple[SlotLayout, Path]:
    """The LoRA slot layout of the newest version of ``model``, and that version's export folder; a one-line
    LorashipError if it has none."""
    model_dir = Path(repo) / model
    numbered = versions(model_dir)
    if not numbered:
        raise LorashipError(f"{model_dir} holds no model version", f"write one first: `loraship repo --onnx EXPORT --out {repo} --name {model}`")
    onnx_dir = model_dir / str(numbered[-1]) / "onnx"
    try:
        manifest = Manifest.read(onnx_dir)
    except ManifestError as exc:
        raise LorashipError(f"{onnx_dir}: {exc}", "write the version again with `loraship repo`") from None
    if not manifest.lora_slots:
        raise LorashipError(f"version {numbered[-1]} of {model} was exported without LoRA slots, so it serves no adapters",
                            "export the base with `loraship export --max-adapters N`, then `loraship repo` it")
    return SlotLayout.from_manifest(manifest), onnx_dir


def list_adapters(repo: Path, model: str) -> dict[str, Path]:
    """The adapters ``model`` serves, as its ``multi_lora.json`` names them: name -> converted folder
    (empty when the file is absent)."""
    model_dir = Path(repo) / model
    try:
        return {name: entry_path(model_dir, folder) for name, folder in read_entries(model_dir).items()}
    except StoreError as exc:
        raise LorashipError(exc.message, exc.fix) from None


def add_adapter(repo: Path, model: str, name: str, converted: Path, replace: bool = False) -> Path:
    """Install the converted adapter ``converted`` as ``name`` of ``model`` in ``repo`` and name it in
    ``multi_lora.json``; return its folder in the repository. The same adapter installed again changes
    nothing; another adapter of that name is refused unless ``replace``. One-line LorashipError on bad input."""
    repo, converted = Path(repo), Path(converted)
    layout, onnx_dir = slot_layout(repo, model)

    def check(copy: Path) -> None:  # the copy is what serves: every byte of it is checked
        try:
            read_adapter(copy, layout, name)
        except AdapterError as exc:
            raise StoreError(str(exc).replace(str(copy), str(converted)),
                             f"convert it for this base: `loraship convert-adapter --adapter PEFT_DIR --base {onnx_dir} --out DIR`") from None

    try:
        return install(repo / model, name, converted, check, replace)
    except StoreError as exc:
        raise LorashipError(exc.message, exc.fix) from None


def remove_adapter(repo: Path, model: str, name: str) -> None:
    """Stop serving adapter ``name`` of ``model``: drop it from ``multi_lora.json`` (each replica refuses new
    requests on it once it re-reads the file; requests already running finish), then delete its folder."""
    try:
        uninstall(Path(repo) / model, name)
    except StoreError as exc:
        raise LorashipError(exc.message, exc.fix) from None


def parse_adapters(values: list[str] | tuple[str, ...]) -> dict[str, Path]:
    """``--adapter NAME=DIR`` options as name -> converted folder; a one-line LorashipError for a value without
    a name or a name given twice."""
    adapters: dict[str, Path] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name or not folder:
            raise LorashipError(f"--adapter {value!r} is not NAME=DIR", "name each converted adapter: --adapter sql=work/adapters/sql")
        if name in adapters:
            raise LorashipError(f"--adapter names {name!r} twice", "give each adapter its own name")
        adapters[name] = Path(folder)
    return adapters


def check_adapters(onnx_dir: Path, adapters: dict[str, Path]) -> None:
    """Refuse, before anything is written, adapters that the export ``onnx_dir`` cannot serve (one line each)."""
    if not adapters:
        return
    try:
        manifest = Manifest.read(onnx_dir)
    except ManifestError as exc:
        raise LorashipError(str(exc), "pass the output folder of `loraship export` as --onnx") from None
    if not manifest.lora_slots:
        raise LorashipError(f"{onnx_dir} was exported without LoRA slots, so it serves no adapters",
                            "export the base with `loraship export --max-adapters N`")
    layout = SlotLayout.from_manifest(manifest)
    for name, folder in adapters.items():
        try:
            check_name(name)
            check_source(folder)
            read_adapter(folder, layout, name)
        except StoreError as exc:
            raise LorashipError(exc.message, exc.fix) from None
        except AdapterError as exc:
            raise LorashipError(str(exc), f"convert it for this base: `loraship convert-adapter --adapter PEFT_DIR "
                                          f"--base {onnx_dir} --out DIR`") from None
