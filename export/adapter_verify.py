"""`loraship verify --adapter NAME=DIR`: each peft adapter through the multi-adapter engine against its own merged model.

The one check is :func:`loraship.export.verify.verify_adapters` (every adapter's prompts in one batch on the
base export with LoRA slots, each judged against its merged PyTorch model, greedy tokens, first-step logits
and its eval set). This module takes what a user has, the peft folders: each adapter is converted for the
slots and merged into its base in a temporary folder (both deleted afterwards), then checked.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from loraship.errors import LorashipError

if TYPE_CHECKING:
    from rich.console import Console

    from loraship.export.verify import Report


def adapter_base(adapter: Path, base: Path | None) -> str:
    """The base model ``adapter`` is merged into: ``base``, else the one its adapter_config.json names."""
    from loraship.export.hfcompat import read_json
    from loraship.export.merge import _ADAPTER_FIX

    if base is not None:
        return str(base)
    named = read_json(Path(adapter) / "adapter_config.json", "adapter config", _ADAPTER_FIX).get("base_model_name_or_path")
    if not named:
        raise LorashipError(f"adapter {adapter} does not name its base model", "pass --base the model it was trained on")
    return str(named)


def verify_peft_adapters(onnx: Path, adapters: dict[str, Path], base: Path | None = None, prompts_file: Path | None = None,
                         atol: float | None = None, min_agreement: float | None = None, max_new_tokens: int = 32,
                         min_accuracy: float | None = None, console: Console | None = None) -> dict[str, Report]:
    """Convert each peft adapter (name -> folder) for the slots of ``onnx`` and merge it into ``base`` (default:
    the base its adapter_config.json names), in a temporary folder, then check them all through the
    multi-adapter engine (:func:`~loraship.export.verify.verify_adapters`); name -> report. Nothing is written."""
    from loraship.engine.adapters import WEIGHTS_FILE
    from loraship.export.lora_convert import convert_adapter
    from loraship.export.manifest import read_export
    from loraship.export.merge import merge
    from loraship.export.progress import Stages
    from loraship.export.verify import AdapterCheck, verify_adapters

    onnx = Path(onnx)
    if not read_export(onnx).lora_slots:
        raise LorashipError(f"{onnx} has no LoRA slots", "pass --onnx the base exported with `loraship export --max-adapters`")
    for name, folder in adapters.items():
        if (Path(folder) / WEIGHTS_FILE).is_file() and not (Path(folder) / "adapter_config.json").is_file():
            raise LorashipError(f"adapter {name}: {folder} is a converted adapter, and its merged model needs the peft folder",
                                "pass --adapter NAME=PEFT_DIR, the folder convert-adapter read")
    bases = {name: adapter_base(folder, base) for name, folder in adapters.items()}
    stage = Stages(console)
    with tempfile.TemporaryDirectory(prefix="loraship-verify-adapters-") as work:
        checks = {}
        for i, (name, folder) in enumerate(adapters.items()):
            with stage(f"converting and merging adapter {name} ({folder})"):
                checks[name] = AdapterCheck(convert_adapter(folder, onnx, Path(work) / f"converted-{i}"),
                                            merge(bases[name], folder, Path(work) / f"merged-{i}"))
        with stage(f"checking {len(adapters)} adapter(s) through the multi-adapter engine against their merged models"):
            return verify_adapters(onnx, checks, prompts_file, atol, min_agreement, max_new_tokens,
                                   min_accuracy=min_accuracy, record=False)


def check_adapters(reports: dict[str, Report]) -> None:
    """A one-line LorashipError naming the first adapter that did not pass, with its figures."""
    from loraship.export.verify import check

    for name, report in reports.items():
        try:
            check(report)
        except LorashipError as exc:
            raise LorashipError(f"adapter {name}: {exc.message}", exc.fix) from None
