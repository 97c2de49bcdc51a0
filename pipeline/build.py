"""The build steps `ship` and `demo` share: merge -> export -> verify -> repo, each resumable.

Each step calls the same library function as its command, imported inside the step: ``merge``
(export.merge), ``export`` (export.onnx_export), ``verify`` (export.verify), ``repo``
(triton_repo.layout). On a GPU the served model is first fitted to it (:func:`fit_to_gpu`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import LorashipError
from loraship.pipeline.runner import Pipeline, Record, source_state, tree_state

if TYPE_CHECKING:
    from loraship.triton_repo.config import ModelOptions

GPU_HEADROOM_GIB = 1.5  # per instance, beside its weights and KV rows: the CUDA context and activations


@dataclass(frozen=True)
class ExportOptions:
    """`loraship export` options; None takes export_onnx's own default."""

    engine: str | None = None
    dtype: str | None = None
    int4: bool = False
    target: str | None = None

    def resolved(self) -> dict[str, Any]:
        """Every option with export_onnx's defaults filled in (so a changed default re-runs the export)."""
        import inspect

        from loraship.export.onnx_export import export_onnx

        defaults = inspect.signature(export_onnx).parameters
        return {k: defaults[k].default if v is None else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Tolerances:
    """`loraship verify` bounds; None takes the export dtype's default."""

    atol: float | None = None
    min_agreement: float | None = None


def export_state(onnx: Path) -> list[Any]:
    """An export's files and manifest, without the verify report that `verify` adds to the manifest."""
    from loraship.engine.manifest import MANIFEST, Manifest

    manifest = Manifest.read(onnx).replace(verify=None).to_dict() if (Path(onnx) / MANIFEST).is_file() else None
    return [tree_state(onnx, skip=(MANIFEST,)), manifest]


def merge_step(p: Pipeline, base: str | Path, adapter: Path) -> Record:
    def run() -> Record:
        from loraship.export.merge import merge

        merge(base, adapter, p.path("merged"), force=True)
        return {"detail": f"{adapter} into {base}"}

    return p.step("merge", f"merging {adapter} into {base} (merge)", ["merge", source_state(base), source_state(adapter)],
                  run, output=lambda r: tree_state(p.path("merged")))


def export_step(p: Pipeline, opts: ExportOptions) -> Record:
    options = opts.resolved()

    def run() -> Record:
        from loraship.engine.manifest import Manifest
        from loraship.export.onnx_export import export_onnx

        export_onnx(p.path("merged"), p.path("onnx"), force=True, console=p.console, **options)
        made = Manifest.read(p.path("onnx"))
        return {"detail": f"{made.engine} {made.dtype} for {options['target']}", **options}

    return p.step("export", "exporting to ONNX (export)", ["export", tree_state(p.path("merged")), options], run,
                  output=lambda r: export_state(p.path("onnx")), spinner=False)


def verify_step(p: Pipeline, tol: Tolerances = Tolerances()) -> Record:
    def run() -> Record:
        from loraship.export.verify import check, verify

        report = verify(p.path("merged"), p.path("onnx"), atol=tol.atol, min_agreement=tol.min_agreement)
        check(report)  # past tolerance: stops the pipeline with the figures
        detail = f"max |logit diff| {report.max_abs_logit_diff:.2e}, greedy tokens {report.token_agreement:.0%} identical"
        evaluated = {}
        if report.eval is not None:  # the export carries an eval set (eval.jsonl, from the adapter)
            evaluated = {"eval_correct": sum(report.eval.engine.correct), "eval_cases": len(report.eval.engine.correct)}
            detail += f", eval set {evaluated['eval_correct']}/{evaluated['eval_cases']} through the engine"
        return {"detail": detail, "max_abs_logit_diff": report.max_abs_logit_diff,
                "token_agreement": report.token_agreement, **evaluated}

    return p.step("verify", "checking ONNX Runtime against PyTorch (verify)",
                  ["verify", tree_state(p.path("merged")), export_state(p.path("onnx")), asdict(tol)], run)


def repo_step(p: Pipeline, model: ModelOptions) -> Record:
    """Version N+1 of ``model`` in WORK/repo; skipped while that version is unchanged."""
    def run() -> Record:
        from loraship.triton_repo.layout import write_version

        result = write_version(p.path("onnx"), p.path("repo"), model)
        version = result.version_dir.relative_to(p.work).as_posix()
        return {"detail": f"{version} ({model.provider}, {model.instances} x batch {model.max_batch_size})", "version": version}

    def output(record: Record) -> Any:
        version = p.path(record["version"])
        return [tree_state(version), tree_state(version.parent / "config.pbtxt")]

    return p.step("repo", f"laying out the Triton model repository (repo, model {model.name})",
                  ["repo", export_state(p.path("onnx")), asdict(model)], run, output=output)


def build(p: Pipeline, base: str | Path, adapter: Path, model: ModelOptions, export: ExportOptions = ExportOptions(),
          tol: Tolerances = Tolerances(), gpu_gib: float | None = None) -> Path:
    """merge -> export -> verify -> repo; the repository's path. On a GPU the model is fitted to it first
    (``fit_to_gpu``; ``gpu_gib``: the memory of the GPU it will run on, where known)."""
    merge_step(p, base, adapter)
    export_step(p, export)
    verify_step(p, tol)
    repo_step(p, fit_to_gpu(model, p.path("onnx"), gpu_gib))
    return p.path("repo")


def fit_to_gpu(model: ModelOptions, onnx: Path, gpu_gib: float | None) -> ModelOptions:
    """The served model's options for a GPU: CUDA graphs for an export that shares its KV cache (CUDA
    provider), and where the GPU's memory is known, a KV budget of what it holds beside each instance's
    weights (+10%) and ``GPU_HEADROOM_GIB``. Options the user set are kept."""
    from loraship.engine.kv_rows_cache import GIB
    from loraship.engine.manifest import Manifest

    if model.provider == "cpu":
        return model
    manifest = Manifest.read(onnx)
    changes: dict[str, Any] = {}
    if model.provider == "cuda" and manifest.shares_kv:
        changes["cuda_graph"] = True
    if gpu_gib and model.kv_budget_gb is None:
        weights = sum(e["size"] for name, e in (manifest.files or {}).items() if name.startswith(manifest.model_name)) / GIB
        budget = gpu_gib / model.instances - 1.1 * weights - GPU_HEADROOM_GIB
        if budget <= 0:
            raise LorashipError(f"a {gpu_gib:.0f} GiB GPU holds {model.instances} instance(s) of {weights:.1f} GiB of weights "
                                "but no KV cache beside them", "choose a larger gpuProfileType, fewer --instances, or --int4")
        changes["kv_budget_gb"] = round(budget, 2)
    return replace(model, **changes)
