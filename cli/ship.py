"""`loraship ship`: base + adapter to an endpoint in one command (loraship.pipeline.ship)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from loraship.cli.azure import azure_options
from loraship.cli.serve import serve_options, serve_options_from


@click.command(epilog="""\b
Example:
  loraship ship --base work/base --adapter work/adapter --out ship --name phi3-lora
  loraship ship --base work/base --adapter work/adapter --out ship-int4 --name phi3-int4 --int4
  loraship ship --base microsoft/Phi-3-mini-4k-instruct --adapter qlora-out --out ship-phi3
  loraship ship --base work/base --adapter work/adapter --out ship-azure --target azure -g my-rg --what-if
  loraship ship --base work/base --adapter work/adapter --out ship-azure --target azure -g my-rg --instances 2
  loraship ship --base work/base --adapter words=work/adapter --adapter roman=work/adapter-roman --out ship-multi --name demo
""")
@click.option("--base", required=True, help="Base model folder or hub id (loaded in full precision, never 4-bit).")
@click.option("--adapter", "adapters", required=True, multiple=True, metavar="[NAME=]DIR",
              help="peft LoRA/QLoRA adapter folder, merged into the base (the fastest path for one fine-tune). "
                   "NAME=DIR, repeated: ONE endpoint serves every adapter on the base, each by its name (the OpenAI "
                   "`model`): the base is exported with LoRA slots and each adapter converted and verified.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Work folder: merged/, onnx/, repo/ (and wheels/); a re-run skips the steps whose inputs did not change.")
@click.option("--name", help="Model name in the repository and URL (default: the adapter folder's name; with NAME=DIR "
                             "adapters, the base folder's name, which is also the OpenAI `model` for the base alone).")
@click.option("--target", type=click.Choice(["local", "azure"]), default="local", show_default=True,
              help="local: serve with a local tritonserver until Ctrl-C. azure: provision and deploy to Container Apps.")
@click.option("--force", is_flag=True, help="Redo every step (and accept a non-empty --out that holds no earlier run).")
@click.option("--engine", type=click.Choice(["auto", "genai", "optimum"]), help="Export engine (default: `loraship export`'s).")
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), help="Export weight dtype (default: `loraship export`'s).")
@click.option("--int4", is_flag=True, help="int4 weights (MatMulNBits); needs the genai builder.")
@click.option("--export-target", type=click.Choice(["cpu", "cuda"]),
              help="`loraship export --target`: the provider the genai builder optimizes for (--target here is where to ship).")
@click.option("--atol", type=float, help="Verify: max abs logit difference (default: by dtype, as `loraship verify`).")
@click.option("--min-agreement", type=float, help="Verify: min greedy token agreement (default: by dtype).")
@click.option("--instances", default=1, show_default=True, help="Model instances per server (each runs its own engine).")
@click.option("--max-batch-size", default=8, show_default=True, help="In-flight decode batch of each instance.")
@click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]),
              help="ONNX Runtime provider in the server (default: cpu for local, cuda for azure).")
@click.option("--max-adapters", type=int, metavar="S",
              help="With NAME=DIR adapters: resident LoRA slots (default: one per adapter; more adapters than slots wait "
                   "for one, least recently used first).")
@click.option("--max-lora-rank", type=int, help="With NAME=DIR adapters: slot rank (default: the adapters' largest; more "
                                                 "leaves room for adapters loaded later).")
@serve_options
@azure_options
@click.option("--what-if", is_flag=True, help="With --target azure: print the provisioning plan and stop (nothing runs or changes).")
@click.option("--create-resource-group", is_flag=True, help="With --target azure: create the resource group if missing.")
@click.option("--wheels", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="With --target azure: wheels already staged by `loraship repo --stage-wheels` (default: stage them now).")
@click.pass_context
def ship(ctx: click.Context, base: str, adapters: tuple[str, ...], out: Path, name: str | None, target: str, force: bool,
         engine: str | None, dtype: str | None, int4: bool, export_target: str | None, atol: float | None,
         min_agreement: float | None, instances: int, max_batch_size: int, provider: str | None,
         max_adapters: int | None, max_lora_rank: int | None,
         params_path: Path | None, config_path: Path, subscription: str | None, resource_group: str | None,
         what_if: bool, create_resource_group: bool, wheels: Path | None, **options: Any) -> None:
    """Merge, export, verify and lay out a LoRA fine-tune, then serve it locally or deploy it to Azure.

    Every step shows its progress and a table sums them up. Verify past tolerance stops the ship with
    its figures. Locally the endpoint serves in the foreground like `loraship serve` (same options)
    until Ctrl-C; on Azure the endpoint and how to call it are printed.

    With --adapter NAME=DIR (repeated), one local endpoint serves every adapter on one base: export
    with LoRA slots, convert each adapter, merge each (verify's reference), verify each through the
    multi-adapter engine, repo with the adapters installed, serve, and a first chat to each by name.
    """
    from rich.console import Console

    from loraship.errors import LorashipError
    from loraship.pipeline.azure import resolve_target
    from loraship.pipeline.build import ExportOptions, Tolerances
    from loraship.pipeline.multi import SlotOptions, parse_adapters
    from loraship.pipeline.ship import ship as run

    serve = serve_options_from(options)
    azure = None
    if target == "azure":
        console = Console(highlight=False)
        azure = replace(resolve_target(params_path, config_path, subscription, resource_group), api_key=serve.api_key,
                        what_if=what_if, create_resource_group=create_resource_group, wheels=wheels,
                        log=lambda m: console.print(f"[dim]{m}[/]", soft_wrap=True))
    elif what_if or wheels or create_resource_group:
        raise LorashipError("--what-if, --wheels and --create-resource-group apply to --target azure", "add --target azure or drop them")
    run(base, parse_adapters(adapters), out, name=name, target=target,
        export=ExportOptions(engine=engine, dtype=dtype, int4=int4, target=export_target),
        tol=Tolerances(atol, min_agreement), instances=instances, max_batch_size=max_batch_size, provider=provider,
        serve=serve, azure=azure, force=force, console=Console(stderr=True), out=Console(highlight=False),
        debug=(ctx.obj or {}).get("debug", False), slots=SlotOptions(max_adapters, max_lora_rank))
