"""Triton model repository layout: a new version N+1 per run, never touching a live one."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import loraship_contract

from loraship.errors import LorashipError
from loraship.triton_repo.config import ModelOptions, build_config, read_config, render

if TYPE_CHECKING:  # the engine's KV modules load onnxruntime: imported where a version is written
    from loraship.engine.kv_rows_cache import KVPlan
    from loraship.engine.manifest import Manifest

TEMPLATE = Path(__file__).parent / "model_template"  # model.py and the modules it imports, copied beside it
ENGINE_PACKAGE = "loraship_engine"
CONTRACT_FILE = Path(loraship_contract.__file__)  # copied beside model.py, as beside the container's runtime


@dataclass(frozen=True)
class RepoResult:
    """What `write_version` did."""

    model_dir: Path
    version: int
    version_dir: Path
    pruned: list[int]
    kv_plan: KVPlan | None  # the KV rows each instance allocates at load (exports that share their KV cache)
    max_batch_size: int  # in-flight batch written to config.pbtxt: --max-batch-size, or the rows a KV budget holds


def versions(model_dir: Path) -> list[int]:
    """Numbered version directories of a model, ascending."""
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def model_names(repo: Path) -> list[str]:
    """Models in a Triton repository: its folders that hold a config.pbtxt."""
    return sorted(d.name for d in Path(repo).iterdir() if (d / "config.pbtxt").is_file()) if Path(repo).is_dir() else []


def capacity(model_dir: Path) -> int | None:
    """Requests a model serves at once: its instances x in-flight batch, read from its config.pbtxt
    (None for a model `loraship repo` did not write)."""
    path = Path(model_dir) / "config.pbtxt"
    if not path.is_file():
        return None
    cfg = read_config(path)
    batch = cfg.parameters["max_batch"].string_value if "max_batch" in cfg.parameters else ""
    if not batch.isdigit():
        return None
    return (sum(group.count for group in cfg.instance_group) or 1) * int(batch)


def checked_export(onnx_dir: Path) -> Manifest:
    """The export's manifest, checked for what the model needs and against its checksums (every file's
    size and sha256), so a broken export never becomes a version."""
    from loraship.engine.integrity import IntegrityError, check_files
    from loraship.engine.manifest import Manifest, ManifestError

    try:
        manifest = Manifest.read(onnx_dir)
    except ManifestError as exc:
        raise LorashipError(str(exc), "pass the output folder of `loraship export` as --onnx") from None
    if not manifest.files:
        raise LorashipError(f"{onnx_dir} was exported without checksums, so a missing or damaged file would go unnoticed",
                            f"re-run `loraship export`, or record the files as they are with `loraship export --rehash {onnx_dir}`")
    try:
        check_files(onnx_dir, manifest.files)
    except IntegrityError as exc:
        raise LorashipError(str(exc), f"re-run `loraship export`, or if you changed it on purpose, record it with "
                                      f"`loraship export --rehash {onnx_dir}`; nothing was written") from None
    for name in (manifest.model_name, "tokenizer.json"):
        if not (onnx_dir / name).is_file():
            raise LorashipError(f"{onnx_dir} lacks {name}", "re-run `loraship export` into an empty folder")
    return manifest


def has_chat_template(onnx_dir: Path) -> bool:
    """Whether the export carries a chat template; one that does not compile is refused here, not at load."""
    from loraship.engine.chat import ChatTemplate
    from loraship.engine.errors import RequestError

    try:
        return ChatTemplate.load(onnx_dir) is not None
    except RequestError as exc:
        raise LorashipError(f"{onnx_dir}: {exc}", "fix chat_template.jinja (or chat_template in tokenizer_config.json)") from None


def engine_source() -> Path:
    """The directory of the installed ``loraship.engine`` package."""
    import loraship.engine

    return Path(loraship.engine.__file__).parent


def copy_package(source: Path, dest: Path) -> None:
    """A package's source folder copied to ``dest`` (under another name: its imports are relative), no bytecode."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def planned_kv(manifest: Manifest, opts: ModelOptions) -> KVPlan | None:
    """The KV plan each instance will make at load, from the manifest (None where the cache grows per step)."""
    from loraship.engine.errors import RequestError
    from loraship.engine.kv_rows_cache import GIB, KVPlan

    if not manifest.shares_kv or manifest.kv_dtype is None:
        return None
    capacity = min(opts.max_context or manifest.max_context, manifest.max_context)
    budget = int(opts.kv_budget_gb * GIB) if opts.kv_budget_gb else None
    try:
        return KVPlan.sized(2 * manifest.num_layers, manifest.kv_heads, manifest.head_dim,
                            manifest.kv_dtype, capacity, opts.max_batch_size, budget)
    except RequestError as exc:
        raise LorashipError(str(exc).split(";")[0], "raise --kv-budget-gb or lower --max-context") from None


def write_version(onnx_dir: Path, repo: Path, opts: ModelOptions) -> RepoResult:
    """Add version N+1 of ``opts.name`` to ``repo``; replace config.pbtxt atomically; prune to ``opts.keep``.

    The version is assembled in a hidden temporary directory (Triton ignores non-numeric
    names) and renamed into place, so a polling server never sees half a version.
    """
    onnx_dir, repo = Path(onnx_dir), Path(repo)
    opts.validate()
    manifest = checked_export(onnx_dir)
    model_context = manifest.max_context or 0
    if opts.max_context and model_context and opts.max_context > model_context:
        raise LorashipError(
            f"--max-context {opts.max_context} exceeds the model's context of {model_context}",
            f"pass at most {model_context}",
        )
    if opts.cuda_graph and not manifest.shares_kv:
        raise LorashipError(f"--cuda-graph needs a decoder that updates its KV cache in place (GroupQueryAttention), "
                            f"and {onnx_dir} is an {manifest.engine} export that grows it",
                            "export with `loraship export --dtype fp16 --target cuda`")
    if repo.exists() and not repo.is_dir():
        raise LorashipError(f"--out {repo} is a file", "choose a directory for the model repository")
    served = min(c for c in (opts.max_context, model_context) if c) if opts.max_context or model_context else None
    opts = dataclasses.replace(opts, chat_template=has_chat_template(onnx_dir), context=served)
    kv_plan = planned_kv(manifest, opts)
    if kv_plan is not None and kv_plan.rows < opts.max_batch_size:  # the budget holds fewer rows: that is the batch
        opts = dataclasses.replace(opts, max_batch_size=kv_plan.rows)
    config_text = render(build_config(opts))
    model_dir = repo / opts.name
    model_dir.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=".version-tmp-", dir=model_dir))
    try:
        for source in (*sorted(TEMPLATE.glob("*.py")), CONTRACT_FILE):
            shutil.copy2(source, tmp / source.name)
        copy_package(engine_source(), tmp / ENGINE_PACKAGE)
        shutil.copytree(onnx_dir, tmp / "onnx", ignore=shutil.ignore_patterns("trt_cache"))
        existing = versions(model_dir)
        version = (existing[-1] if existing else 0) + 1
        version_dir = model_dir / str(version)
        tmp.rename(version_dir)  # fails rather than overwrite if another run raced us
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _write_text_atomic(model_dir / "config.pbtxt", config_text)
    return RepoResult(model_dir, version, version_dir, prune(model_dir, opts.keep), kv_plan, opts.max_batch_size)


def prune(model_dir: Path, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` versions; return the deleted numbers."""
    old = versions(model_dir)[:-keep] if keep > 0 else []
    for version in old:
        # Rename first so a polling server never sees a half-deleted version.
        doomed = model_dir / f".deleting-{version}-{os.getpid()}"
        (model_dir / str(version)).rename(doomed)
        shutil.rmtree(doomed)
    return old


def _write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
