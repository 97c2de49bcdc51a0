"""The build steps of a multi-adapter endpoint (issue 19), which `ship --adapter NAME=DIR ...` and `demo --multi` run.

One base serves every adapter, chosen per request by name:

1. ``export``: the base exported with LoRA slots (`loraship export --max-adapters`), the slot rank and
   targets sized from the adapters (the largest rank, the union of the modules they target);
2. ``convert NAME``: each adapter into the slot layout (`loraship convert-adapter`);
3. ``merge NAME``: each adapter merged into its own model (`loraship merge`), verify's reference;
4. ``verify``: each adapter through the multi-adapter engine against its own merged model, every adapter's
   prompts decoding in one batch (`loraship verify --adapter NAME=DIR`);
5. ``repo``: the base's version (`loraship repo`), then ``adapters``: each converted adapter installed
   beside it and named in ``multi_lora.json`` (`loraship repo --adapter NAME=DIR`); adapters no longer
   named are removed, so the endpoint serves exactly the set given.

Each step calls the same library function as its command and is skipped when its inputs and output are
unchanged (``runner``), so an interrupted ship resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import LorashipError
from loraship.pipeline.build import ExportOptions, Tolerances, export_state, fit_to_gpu, repo_step
from loraship.pipeline.runner import Pipeline, Record, source_state, tree_state

if TYPE_CHECKING:
    from loraship.triton_repo.config import ModelOptions

CONVERTED = "adapters"  # WORK/adapters/NAME: each adapter converted for the slots
MERGED = "merged-adapters"  # WORK/merged-adapters/NAME: each adapter merged into its own model (verify's reference)


@dataclass(frozen=True)
class SlotOptions:
    """The base's LoRA slots; None sizes them from the adapters."""

    max_adapters: int | None = None  # resident slots (default: one per adapter); more are hot-loaded into them
    max_rank: int | None = None  # slot rank (default: the adapters' largest); more leaves room for later adapters
    design: str = "gather"


def parse_adapters(values: Sequence[str | Path]) -> Path | dict[str, Path]:
    """`--adapter` values: one ``DIR`` (merged into the base, as always), or ``NAME=DIR`` each (one endpoint
    serving every adapter by name). A value naming an existing folder is a folder, even with a ``=``."""
    from loraship.engine.adapter_registry import RegistryError, check_name

    if not values:
        raise LorashipError("no --adapter given", "pass --adapter DIR, or --adapter NAME=DIR for each adapter")
    named: dict[str, Path] = {}
    plain: list[str] = []
    for value in map(str, values):
        name, sep, folder = value.partition("=")
        if not sep or Path(value).is_dir():
            plain.append(value)
            continue
        try:
            check_name(name)
        except RegistryError as exc:
            raise LorashipError(f"--adapter {value}: {exc}", "write --adapter NAME=DIR") from None
        if name in named:
            raise LorashipError(f"--adapter names {name!r} twice", "give each adapter its own name")
        named[name] = Path(folder)
    if plain and (named or len(plain) > 1):
        raise LorashipError(f"--adapter {plain[0]} has no name, beside other adapters",
                            "name each adapter of a multi-adapter endpoint: --adapter NAME=DIR")
    return Path(plain[0]) if plain else named


def folder(name: str) -> str:
    """The folder of adapter ``name`` under WORK/adapters and WORK/merged-adapters (as in the repository)."""
    from loraship.triton_repo.runtime.adapter_store import folder_name

    return folder_name(name)


def slots_step(p: Pipeline, base: str | Path, adapters: dict[str, Path], export: ExportOptions, slots: SlotOptions) -> Record:
    """The base with LoRA slots in WORK/onnx, sized from the adapters (their rank and targets are read first,
    so a bad adapter is refused before the export)."""
    from loraship.export.lora_convert import slot_fit

    if export.engine == "optimum":
        raise LorashipError("several adapters on one base need the onnxruntime-genai builder's graph (LoRA slots)",
                            "drop --engine optimum")
    options = {k: v for k, v in export.resolved().items() if k != "engine"}
    rank, targets = slot_fit(list(adapters.values()))
    if slots.max_rank is not None and slots.max_rank < rank:
        raise LorashipError(f"--max-lora-rank {slots.max_rank} is below the adapters' rank {rank}",
                            f"pass --max-lora-rank {rank} or more, or leave it out")
    if slots.max_adapters is not None and slots.max_adapters < 1:
        raise LorashipError(f"--max-adapters {slots.max_adapters} is below 1", "pass 1 or more, or leave it out")
    spec = {"max_adapters": slots.max_adapters or len(adapters), "max_rank": slots.max_rank or rank,
            "targets": targets, "design": slots.design}

    def run() -> Record:
        from loraship.export.lora_slots import export_base_with_slots
        from loraship.export.merge import resolve_base

        export_base_with_slots(resolve_base(str(base)), p.path("onnx"), spec["max_adapters"], spec["max_rank"], targets,
                               slots.design, force=True, console=p.console, **options)
        return {"detail": f"{spec['max_adapters']} slots of rank {spec['max_rank']} on {', '.join(targets)} "
                          f"({options['dtype']}{' int4' if options['int4'] else ''}, {slots.design})", **spec}

    return p.step("export", f"exporting the base with LoRA slots for {len(adapters)} adapters (export --max-adapters)",
                  ["export-slots", source_state(base), options, spec], run,
                  output=lambda r: export_state(p.path("onnx")), spinner=False)


def convert_steps(p: Pipeline, adapters: dict[str, Path]) -> dict[str, Path]:
    """Each adapter converted for the slots into WORK/adapters/NAME; name -> folder."""
    from loraship.export.lora_convert import convert_adapter

    done = {}
    for name, adapter in adapters.items():
        out = p.path(CONVERTED) / folder(name)

        def run(adapter: Path = adapter, out: Path = out) -> Record:
            convert_adapter(adapter, p.path("onnx"), out, force=True)
            return {"detail": f"{adapter} -> {out.relative_to(p.work)}"}

        # the verify report that the verify step records in the converted manifest is not part of its output
        p.step(f"convert {name}", f"converting adapter {name} for the slots (convert-adapter)",
               ["convert", source_state(adapter), export_state(p.path("onnx"))], run, output=lambda r, out=out: export_state(out))
        done[name] = out
    return done


def merge_steps(p: Pipeline, base: str | Path, adapters: dict[str, Path]) -> dict[str, Path]:
    """Each adapter merged into its own model in WORK/merged-adapters/NAME (verify's reference); name -> folder."""
    from loraship.export.merge import merge

    done = {}
    for name, adapter in adapters.items():
        out = p.path(MERGED) / folder(name)

        def run(adapter: Path = adapter, out: Path = out) -> Record:
            merge(base, adapter, out, force=True)
            return {"detail": f"{adapter} into {base}"}

        p.step(f"merge {name}", f"merging adapter {name} into its own model, verify's reference (merge)",
               ["merge", source_state(base), source_state(adapter)], run, output=lambda r, out=out: tree_state(out))
        done[name] = out
    return done


def verify_step(p: Pipeline, converted: dict[str, Path], merged: dict[str, Path], tol: Tolerances = Tolerances()) -> Record:
    """Every adapter through the multi-adapter engine against its own merged model; past tolerance, the ship
    stops with the adapter's figures. Each report is also written into its converted manifest."""
    def run() -> Record:
        from loraship.export.adapter_verify import check_adapters
        from loraship.export.verify import AdapterCheck, verify_adapters

        reports = verify_adapters(p.path("onnx"), {n: AdapterCheck(converted[n], merged[n]) for n in converted},
                                  atol=tol.atol, min_agreement=tol.min_agreement)
        check_adapters(reports)  # past tolerance: stops the ship with the adapter's figures
        return {"detail": "; ".join(adapter_detail(n, r.max_abs_logit_diff, r.token_agreement, r.eval) for n, r in reports.items()),
                "adapters": {n: {"max_abs_logit_diff": r.max_abs_logit_diff, "token_agreement": r.token_agreement,
                                 **({"eval_correct": sum(r.eval.engine.correct), "eval_cases": len(r.eval.engine.correct)}
                                    if r.eval is not None else {})} for n, r in reports.items()}}

    return p.step("verify", "checking each adapter through the multi-adapter engine against its merged model (verify)",
                  ["verify-adapters", export_state(p.path("onnx")), {n: export_state(c) for n, c in converted.items()},
                   {n: tree_state(m) for n, m in merged.items()}, asdict(tol)], run)


def adapter_detail(name: str, diff: float, agreement: float, evaluated: Any) -> str:
    """One adapter's verify figures in a line."""
    text = f"{name}: max |logit diff| {diff:.2e}, greedy tokens {agreement:.0%} identical"
    if evaluated is not None:
        text += f", eval {sum(evaluated.engine.correct)}/{len(evaluated.engine.correct)}"
    return text


def install_step(p: Pipeline, model: str, converted: dict[str, Path], version: str) -> Record:
    """The converted adapters installed beside the model's versions in WORK/repo and named in its
    ``multi_lora.json`` (`loraship repo --adapter`); adapters it named before and not now are removed."""
    from loraship.engine.adapter_registry import REGISTRY_FILE

    repo = p.path("repo")

    def run() -> Record:
        from loraship.triton_repo.adapters import add_adapter, list_adapters, remove_adapter

        for name in set(list_adapters(repo, model)) - set(converted):
            remove_adapter(repo, model, name)
        for name, path in converted.items():
            add_adapter(repo, model, name, path, replace=True)
        return {"detail": f"{', '.join(converted)} in {(repo / model / REGISTRY_FILE).relative_to(p.work)}"}

    return p.step("adapters", f"installing {len(converted)} adapters beside model {model} (repo --adapter)",
                  ["install", version, {n: export_state(c) for n, c in converted.items()}], run,
                  output=lambda r: [tree_state(repo / model / "adapters"), tree_state(repo / model / REGISTRY_FILE)])


def build_multi(p: Pipeline, base: str | Path, adapters: dict[str, Path], model: ModelOptions,
                export: ExportOptions = ExportOptions(), tol: Tolerances = Tolerances(), slots: SlotOptions = SlotOptions(),
                gpu_gib: float | None = None) -> dict[str, Path]:
    """export (with slots) -> convert each -> merge each -> verify -> repo -> adapters; name -> converted folder."""
    if not adapters:
        raise LorashipError("no adapters to serve", "pass --adapter NAME=DIR for each adapter")
    slots_step(p, base, adapters, export, slots)
    converted = convert_steps(p, adapters)
    merged = merge_steps(p, base, adapters)
    verify_step(p, converted, merged, tol)
    version = repo_step(p, fit_to_gpu(model, p.path("onnx"), gpu_gib))["version"]
    install_step(p, model.name, converted, version)
    return converted
