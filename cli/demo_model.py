"""`loraship demo-model`: a small pre-trained base, a LoRA fine-tune that learned a chat task, and its eval set."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(epilog="""\b
Example:
  loraship demo-model --out work
  loraship demo-model --out work-llama --arch llama --seed 1
  loraship demo-model --out work-mid --size mid --random
  loraship demo-model --out work2 --second-task roman          # and work2/adapter-roman on the same base
  loraship demo-model --base work/base --second-task roman --out work/adapter-roman   # only that adapter
""")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for base/, adapter/, tokenizer/, eval.jsonl, train.jsonl and demo_model.json "
                   "(with --base: the second task's adapter folder).")
@click.option("--arch", type=click.Choice(["phi3", "llama"]), default="phi3", show_default=True, help="Model architecture.")
@click.option("--size", type=click.Choice(["tiny", "mid"]), default="tiny", show_default=True,
              help="tiny: 0.56M parameters, trained in about 1.5 minutes on 2 idle cores (3 to 5 when other work shares them); "
                   "mid: 57M parameters, the benchmarks' shapes (its training takes over 20 minutes and does not learn the task: "
                   "use it with --random).")
@click.option("--seed", default=0, show_default=True, help="Seed for data order, weights and held-out split (output is deterministic).")
@click.option("--random", "random_init", is_flag=True, help="Random-init weights, no training and no eval set (instant; shapes only).")
@click.option("--second-task", type=click.Choice(["roman"]),
              help="Also fine-tune a second adapter on the same base for another task (roman: numbers in Roman numerals), "
                   "with its own held-out eval set, into OUT/adapter-TASK (rank 32, 800 steps: about 1.5 minutes more).")
@click.option("--base", type=click.Path(path_type=Path),
              help="With --second-task: train only that adapter, on the base/ of an earlier demo-model output, into --out.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
def demo_model(out: Path, arch: str, size: str, seed: int, random_init: bool, second_task: str | None, base: Path | None,
               force: bool) -> None:
    """Pre-train a small base on generated text and fine-tune a LoRA adapter to write numbers in words.

    The base never learns the task; the adapter answers held-out numbers (DIR/eval.jsonl) it never
    saw in training. Prints both accuracies and the time taken; the folder path goes to stdout.
    """
    from rich.console import Console

    from loraship.errors import LorashipError
    from loraship.export.demo_model import demo_model as build, read_report
    from loraship.export.demo_task import read_task_report, task_adapter

    console = Console(stderr=True)
    if base is not None:
        if second_task is None:
            raise LorashipError("--base trains a second task's adapter and needs --second-task", "add --second-task roman")
        task_adapter(base, out, second_task, seed=seed, force=force, console=console)
        _say_task(console, read_task_report(out), out)
        click.echo(str(out))
        return
    build(out, arch=arch, size=size, seed=seed, force=force, random=random_init, console=console, second_task=second_task)
    report = read_report(out)
    if report["random"]:
        console.print(f"[green]\u2713[/] random-init {size} {arch}: {report['parameters']:,} parameters "
                      f"[dim]({report['seconds']:.1f}s)[/]")
    else:
        n = report["eval_cases"]
        console.print(f"[green]\u2713[/] {size} {arch}, {report['parameters']:,} parameters, trained in {report['seconds']:.1f}s: "
                      f"held-out questions answered {round(report['base_accuracy'] * n)}/{n} by the base, "
                      f"{round(report['merged_accuracy'] * n)}/{n} after the fine-tune ({out / 'eval.jsonl'})")
    if report.get("second_task"):
        _say_task(console, report["second_task"], out / f"adapter-{second_task}")
    click.echo(str(out))


def _say_task(console, report: dict, adapter: Path) -> None:
    n = report["eval_cases"]
    console.print(f"[green]\u2713[/] {report['task']} adapter fine-tuned in {report['seconds']:.1f}s: held-out questions answered "
                  f"{round(report['base_accuracy'] * n)}/{n} by the base, {round(report['merged_accuracy'] * n)}/{n} after "
                  f"the fine-tune ({adapter / 'eval.jsonl'})")
