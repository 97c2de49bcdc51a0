"""What `loraship repo` does in one call: version N+1 of a model in a repository and, for a container,
the wheels it needs staged beside the repository (layout's ``write_version``, wheels' ``stage_wheels``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loraship.errors import LorashipError
from loraship.triton_repo.config import ModelOptions
from loraship.triton_repo.layout import RepoResult, write_version

if TYPE_CHECKING:
    from rich.console import Console


@dataclass(frozen=True)
class Release:
    """The version written, the adapters installed (name -> folder in the repository) and, with
    ``stage_wheels``, the staged wheels' folder."""

    version: RepoResult
    wheels: Path | None = None
    adapters: dict[str, Path] = field(default_factory=dict)


def release(onnx_dir: Path, repo: Path, opts: ModelOptions, stage_wheels: bool = False, image_tag: str | None = None,
            console: Console | None = None, adapters: dict[str, Path] | None = None) -> Release:
    """Write version N+1 of ``opts.name`` from the export ``onnx_dir`` into ``repo``, install ``adapters``
    (name -> converted folder; the export must have LoRA slots) beside it, then with ``stage_wheels``
    download the wheels ``tritonserver:<image_tag>-py3`` needs beside it. An image tag the wheels cannot
    serve, or an adapter the export cannot, is refused before anything is written. Progress and what was
    done go to ``console`` (stderr)."""
    from loraship.triton_repo.adapters import add_adapter, check_adapters

    from rich.console import Console

    console = console or Console(stderr=True)
    if image_tag and not stage_wheels:
        raise LorashipError("--image-tag only picks the staged wheels", "add --stage-wheels, or leave --image-tag out")
    from loraship.triton_repo.wheels import DEFAULT_IMAGE_TAG, image_cuda

    tag = image_tag or DEFAULT_IMAGE_TAG
    if stage_wheels:
        image_cuda(tag)  # a tag the wheels cannot serve fails before anything is written
    adapters = adapters or {}
    check_adapters(onnx_dir, adapters)
    with console.status(f"writing {repo}/{opts.name} ..."):
        result = write_version(onnx_dir, repo, opts)
    console.print(f"[green]wrote[/] {result.version_dir} (version {result.version})")
    if result.kv_plan:
        console.print(f"each instance allocates its {result.kv_plan.describe()} at load")
    if result.max_batch_size < opts.max_batch_size:
        console.print(f"in-flight batch {result.max_batch_size}: the rows --kv-budget-gb holds (--max-batch-size {opts.max_batch_size})")
    if result.pruned:
        console.print(f"pruned versions {', '.join(map(str, result.pruned))} (--keep {opts.keep})")
    installed = {name: add_adapter(repo, opts.name, name, folder) for name, folder in adapters.items()}
    if installed:
        console.print(f"[green]installed[/] adapters {', '.join(installed)} in {result.model_dir / 'adapters'}; "
                      f"OpenAI clients choose one by model name")
    if not stage_wheels:
        return Release(result, adapters=installed)
    from loraship.triton_repo.wheels import stage_wheels as stage

    with console.status(f"downloading wheels for tritonserver:{tag}-py3 ..."):
        wheels = stage(repo, tag)
    console.print(f"[green]staged[/] wheels in {wheels}; start the container with: sh {wheels.name}/start.sh "
                  f"--model-repository=<mount>/{Path(repo).resolve().name}")
    return Release(result, wheels, installed)
