"""`loraship ship`: base + adapter -> merge -> export -> verify -> repo -> a local endpoint or an Azure deployment;
base + named adapters -> one endpoint serving each by name (``multi``: export with slots -> convert -> verify ->
repo with the adapters)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from loraship.errors import LorashipError
from loraship.pipeline.azure import AzureTarget, ship_azure, what_if
from loraship.pipeline.build import ExportOptions, Tolerances, build
from loraship.pipeline.local import first_questions, serve_local
from loraship.pipeline.multi import SlotOptions, build_multi
from loraship.pipeline.runner import Pipeline

if TYPE_CHECKING:
    from rich.console import Console

    from loraship.triton_repo.serve import ServeOptions

TARGETS = ("local", "azure")


def default_name(adapter: Path) -> str:
    """A model name from the adapter folder's name: its ASCII letters, digits, '-' and '_' (others become
    '-'), as :func:`loraship.triton_repo.config.check_model_name` wants."""
    name = "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "-" for c in Path(adapter).resolve().name)
    return name.strip("-")[:128].rstrip("-") or "model"


def ship(base: str | Path, adapter: Path | dict[str, Path], work: Path, name: str | None = None, target: str = "local",
         export: ExportOptions = ExportOptions(), tol: Tolerances = Tolerances(), instances: int = 1,
         max_batch_size: int = 8, provider: str | None = None, serve: ServeOptions | None = None,
         azure: AzureTarget | None = None, force: bool = False, console: Console | None = None,
         out: Console | None = None, debug: bool = False, slots: SlotOptions = SlotOptions()) -> None:
    """base + adapter -> merge -> export -> verify -> repo -> a local endpoint (served until Ctrl-C) or an
    Azure Container Apps deployment. ``provider`` defaults to cpu locally and cuda on Azure (its GPU).

    ``adapter`` as a dict (name -> peft folder, ``--adapter NAME=DIR``): ONE endpoint serves every adapter
    by name (``pipeline.multi``: the base exported with ``slots``, each adapter converted and verified, the
    repository with the adapters installed); the model ``name`` (default: the base's folder name) is the
    base, and each first request goes to an adapter by name."""
    from rich.console import Console

    from loraship.triton_repo.config import ModelOptions
    from loraship.triton_repo.serve import ServeOptions

    if target not in TARGETS:
        raise LorashipError(f"unknown --target {target!r}", "choose local or azure")
    if target == "azure" and azure is None:
        raise LorashipError("--target azure needs the Azure subscription and resource group", "pass --subscription and -g")
    multi = isinstance(adapter, dict)
    if not multi and slots != SlotOptions():
        raise LorashipError("--max-adapters and --max-lora-rank size the slots of NAME=DIR adapters",
                            "name the adapters (--adapter NAME=DIR), or drop them")
    name = name or default_name(Path(str(base)) if multi else adapter)
    if multi and name in adapter:
        raise LorashipError(f"adapter {name!r} has the model's name, which requests use for the base",
                            "rename the adapter, or pass another --name")
    if multi and target == "azure":
        raise LorashipError("--target azure ships one merged adapter for now; several adapters serve locally",
                            "ship one --adapter DIR to Azure, or drop --target azure")
    model = ModelOptions(name=name, instances=instances, max_batch_size=max_batch_size,
                         provider=provider or ("cuda" if target == "azure" else "cpu"))
    if model.provider != "cpu" and export.engine != "optimum":  # a GPU serves the builder's CUDA graph, fp16 unless asked
        export = replace(export, dtype=export.dtype or "fp16", target=export.target or "cuda")
    model.validate()  # before any long step
    if target == "local":
        (serve or ServeOptions()).check_ports()  # a busy port is refused before the build, not after it
    if azure is not None:  # a replica takes as many requests as the model serves at once, then ACA adds one
        azure = replace(azure, params=replace(azure.params, scaleConcurrentRequests=instances * max_batch_size).validate())
    out = out or Console()
    if azure is not None and azure.what_if:  # the plan only: nothing local runs, nothing in Azure changes
        from loraship.infra.provisioner import steps_table

        out.print(steps_table(what_if(azure), "what-if: nothing was changed"))
        return
    p = Pipeline(work, console, force)
    gpu_gib = None
    if azure is not None:
        from loraship.infra.plan import PROFILE_GPU_GIB

        gpu_gib = PROFILE_GPU_GIB[azure.params.gpuProfileType]
    if multi:
        converted = build_multi(p, base, adapter, model, export, tol, slots, gpu_gib)
        serve_local(p, name, serve or ServeOptions(), out, debug, adapters=first_questions(converted))
        return
    build(p, base, adapter, model, export, tol, gpu_gib)
    if target == "local":
        serve_local(p, name, serve or ServeOptions(), out, debug)
    else:
        assert azure is not None
        ship_azure(p, azure, name, out)
