"""A demo model's second adapter: another task fine-tuned on the same trained base (issue 19's demo of several
fine-tunes on one base), numbers in Roman numerals (``demo_data.TASKS``).

``demo_model(second_task="roman")`` writes it into ``DIR/adapter-roman``; :func:`task_adapter` trains it on
the base of an earlier ``demo_model`` folder. The folder is a peft adapter with its held-out ``eval.jsonl``,
its ``train.jsonl`` and ``demo_task.json`` (both accuracies, the loss, the time) inside.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from loraship.errors import LorashipError
from loraship.export import demo_data
from loraship.export.demo_model import (
    RECIPES, SHAPES, TRAINED_INIT_RANGE, greedy_accuracy, fine_tune_adapter, point_adapter_at_base, progress_bars,
)
from loraship.export.demo_train import Schedule
from loraship.export.evalset import EVAL_FILE, write_eval
from loraship.fsutil import atomic_dir

SECOND_TASKS = ("roman",)  # what a second adapter on the same base can learn (demo_data.TASKS)
SECOND_SEED = 2  # the second adapter's seed offset from --seed (the first's fine-tune takes seed + 1)
TASK_REPORT = "demo_task.json"  # a task adapter's figures, inside its folder

# The second task's fine-tune (only the fine-tune: the base is the first one's). Roman numerals repeat letters
# (XXX, VIII), so the adapter must count what it wrote: rank 16 for 400 steps answered 10/24 held-out (and
# missed some of its training questions); rank 32 for 800 steps at a lower rate fits them all and answers 15/24.
SECOND_RECIPES = {
    "tiny": replace(RECIPES["tiny"], finetune=Schedule(steps=800, batch=32, lr=3e-3), rank=32),
    "mid": RECIPES["mid"],
}


def task_adapter_dir(task: str) -> str:
    """The folder of ``task``'s adapter in a demo-model output: ``adapter-roman``."""
    return f"adapter-{task}"


def task_adapter(base: Path, out: Path, task: str = "roman", seed: int = 0, force: bool = False,
                 console: Console | None = None) -> Path:
    """Fine-tune a LoRA adapter for ``task`` on the trained demo base ``base`` (``DIR/base`` of an earlier
    ``demo_model``) into ``out``: the peft adapter, its held-out ``eval.jsonl``, ``train.jsonl`` and
    ``demo_task.json``. Return ``out``."""
    base, out = Path(base), Path(out)
    check_task(task)
    if not (base / "config.json").is_file():
        raise LorashipError(f"no demo base model in {base}", "pass the base/ folder of `loraship demo-model --out DIR`")
    with atomic_dir(out, force=force) as tmp:
        train_task_adapter(base, tmp, task, seed, console or Console(stderr=True))
        point_adapter_at_base(tmp, base)
    return out


def read_task_report(adapter: Path) -> dict[str, Any]:
    """``demo_task.json`` of a task adapter folder."""
    return json.loads((Path(adapter) / TASK_REPORT).read_text())


def check_task(task: str) -> None:
    if task not in SECOND_TASKS:
        raise LorashipError(f"unknown second task {task!r}", f"choose one of {', '.join(SECOND_TASKS)}")


def _demo_shape(base: Path) -> tuple[str, str]:
    """(arch, size) of a trained demo base, from its config; a one-line error for any other model."""
    from loraship.export.hfcompat import read_json

    config = read_json(base / "config.json", "base config", "pass the base/ folder of `loraship demo-model --out DIR`")
    arch = "phi3" if config.get("model_type") == "phi3" else "llama" if config.get("model_type") == "llama" else None
    size = next((k for k, s in SHAPES.items() if (s.hidden, s.layers) == (config.get("hidden_size"),
                                                                          config.get("num_hidden_layers"))), None)
    if arch is None or size is None or config.get("initializer_range") != TRAINED_INIT_RANGE:
        raise LorashipError(f"{base} is not a trained demo-model base", "pass the base/ folder of `loraship demo-model --out DIR` "
                                                                        "(trained, not --random)")
    return arch, size


def train_task_adapter(base: Path, dst: Path, task: str, seed: int, console: Console) -> dict[str, Any]:
    """Score ``base`` on ``task``'s held-out questions, fine-tune its adapter into ``dst`` (with the eval and
    training sets and demo_task.json); the figures."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraship.export.demo_train import deterministic

    arch, size = _demo_shape(base)
    start = time.perf_counter()
    recipe = SECOND_RECIPES[size]
    train_cases, eval_cases = demo_data.task_split(seed, task)
    with progress_bars(console) as progress, deterministic(seed + SECOND_SEED, recipe.threads):
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        job = progress.add_task(f"scoring the base ({task}: held-out questions)", total=1, note="")
        base_accuracy = greedy_accuracy(model, tokenizer, eval_cases)
        progress.update(job, completed=1, note=f"{base_accuracy:.0%}")
        loss, merged = fine_tune_adapter(model, tokenizer, arch, recipe, train_cases, eval_cases, seed + SECOND_SEED + 1,
                                  progress, dst, f" for {task}")
    write_eval(dst / EVAL_FILE, eval_cases)
    write_eval(dst / "train.jsonl", train_cases)
    report = {"task": task, "seed": seed, "eval_cases": len(eval_cases), "train_cases": len(train_cases),
              "base_accuracy": base_accuracy, "merged_accuracy": merged, "finetune_loss": loss,
              "seconds": time.perf_counter() - start}
    (dst / TASK_REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return report
