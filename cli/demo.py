"""`loraship demo`: the whole pipeline on a synthetic model, served by a local Triton."""

from __future__ import annotations

from pathlib import Path

import click


@click.command(epilog="""\b
Example:
  loraship demo --out demo-out
  loraship demo --out demo-llama --arch llama --protocol http
  loraship demo --out demo-out --force      # redo every step
  loraship demo --multi --out demo-out      # two adapters on one base, one endpoint, each asked by name
""")
@click.option("--out", default="demo-out", show_default=True, type=click.Path(path_type=Path),
              help="Folder for model/, merged/, onnx/ and repo/; a re-run skips the steps already done.")
@click.option("--force", is_flag=True, help="Redo every step (and accept a non-empty --out that holds no earlier run).")
@click.option("--arch", type=click.Choice(["phi3", "llama"]), default="phi3", show_default=True,
              help="Architecture of the demo model (as `demo-model --arch`).")
@click.option("--size", type=click.Choice(["tiny", "mid"]), default="tiny", show_default=True,
              help="tiny: trains in about 1.5 minutes on 2 idle cores (3 to 5 on busy ones) and answers the questions; mid: the benchmarks' "
                   "57M-parameter shapes, trained for over 20 minutes without learning the task (see `demo-model --help`).")
@click.option("--max-tokens", default=48, show_default=True, help="Most tokens per streamed reply.")
@click.option("--protocol", type=click.Choice(["grpc", "http"]), default="grpc", show_default=True,
              help="Triton protocol the demo asks its questions over.")
@click.option("--multi", is_flag=True,
              help="Two fine-tunes on one base (numbers in words, and in Roman numerals: `demo-model --second-task roman`), "
                   "shipped as ONE endpoint (in OUT/multi) that answers each task when the OpenAI `model` names its adapter; "
                   "reuses the model an earlier demo trained in --out. tiny phi3 only.")
def demo(out: Path, force: bool, arch: str, size: str, max_tokens: int, protocol: str, multi: bool) -> None:
    """demo-model (trained), merge, export, verify, repo, serve, then ask three held-out questions and print a summary."""
    from rich.console import Console

    console = Console()
    if multi:
        from loraship.pipeline.demo_multi import multi_summary, run_demo_multi

        result, pipeline = run_demo_multi(out, force=force, arch=arch, size=size, max_tokens=max_tokens, console=console)
        console.print(pipeline.summary("steps"))
        console.print(multi_summary(result))
        return
    from loraship.pipeline.demo import demo_summary, run_demo

    result, pipeline = run_demo(out, arch=arch, size=size, force=force, max_tokens=max_tokens, protocol=protocol, console=console)
    console.print(pipeline.summary("steps"))
    console.print(demo_summary(result))
