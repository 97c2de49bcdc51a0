"""The `loraship` Click group: lazy subcommands and one-line errors."""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from loraship import __version__
from loraship.errors import LorashipError

# name -> "module:attribute"; modules are imported only when the command runs,
# so `loraship --help` never pays for torch, transformers or the Azure SDK.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo-model": ("loraship.cli.demo_model:demo_model", "Train a small base and a LoRA fine-tune (or --random) with an eval set."),
    "merge": ("loraship.cli.merge:merge", "Merge a LoRA/QLoRA adapter into its full-precision base."),
    "export": ("loraship.cli.export:export", "Export a merged model to an ONNX decoder with KV cache."),
    "convert-adapter": ("loraship.cli.convert_adapter:convert_adapter",
                        "Convert a LoRA/QLoRA adapter for a base exported with --max-adapters slots."),
    "verify": ("loraship.cli.verify:verify", "Check ONNX Runtime parity against the merged PyTorch model."),
    "repo": ("loraship.cli.repo:repo", "Lay out a Triton model repository for an exported model."),
    "serve": ("loraship.cli.serve:serve", "Serve a model repository with a local tritonserver."),
    "generate": ("loraship.cli.generate:generate", "Stream a completion from a Triton endpoint."),
    "demo": ("loraship.cli.demo:demo", "Run the whole pipeline on a synthetic model, served locally."),
    "ship": ("loraship.cli.ship:ship", "Base + adapter to a local or Azure endpoint in one command (resumable)."),
    "bench": ("loraship.cli.bench:bench", "Benchmark latency and throughput of a Triton endpoint."),
    "ui": ("loraship.cli.ui:ui", "A Gradio chat UI for evaluating an endpoint."),
    "azure": ("loraship.cli.azure:azure", "Provision, upload and deploy to Azure Container Apps."),
}


DEBUG_HELP = "Show full tracebacks on errors."


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.ensure_object(dict)["debug"] = True


def with_debug(command: click.Command) -> click.Command:
    """``command`` (and, for a group, its subcommands) accepting ``--debug`` as the group does:
    `main` reads the flag from anywhere in the arguments, and commands read ``ctx.obj["debug"]``."""
    if not any(p.name == "debug" for p in command.params):
        command.params.append(click.Option(["--debug"], is_flag=True, expose_value=False, callback=_set_debug, help=DEBUG_HELP))
    for sub in getattr(command, "commands", {}).values():
        with_debug(sub)
    return command


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use; each accepts --debug after its name too."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name][0].split(":")
        return with_debug(getattr(importlib.import_module(module), attr))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="loraship")
@click.option("--debug", is_flag=True, help=DEBUG_HELP + " Also accepted after the command.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Take a LoRA fine-tune to a fast, secure Triton endpoint.

    \b
    Example, the whole path on a synthetic model, step by step, then in one command:
      loraship demo-model --out work
      loraship merge --base work/base --adapter work/adapter --out work/merged
      loraship export --model work/merged --out work/onnx
      loraship verify --merged work/merged --onnx work/onnx
      loraship repo --onnx work/onnx --out work/repo --name phi3-lora
      loraship serve --repo work/repo
      loraship ship --base work/base --adapter work/adapter --out shipped
    """
    ctx.obj = {"debug": debug}


def _friendly(exc: BaseException) -> str | None:
    """A one-line message for errors users cause, or None for real bugs."""
    if isinstance(exc, LorashipError):
        return str(exc)
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return f"{exc.strerror}: {exc.filename} (check the path and its permissions)"
    if isinstance(exc, OSError) and exc.errno == 28:
        return "no space left on device (free some disk space or choose another --out); nothing was written"
    try:  # Azure SDK errors, imported only if the SDK was already loaded
        from azure.core.exceptions import AzureError, ClientAuthenticationError
    except ImportError:  # pragma: no cover
        return None
    if isinstance(exc, ClientAuthenticationError):
        return f"Azure sign-in failed: {_first_line(exc)} (run `az login` or set AZURE_CLIENT_ID/SECRET/TENANT_ID)"
    if isinstance(exc, AzureError):
        return f"Azure error: {_first_line(exc)}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> Any:
    """Console entry point: run the group, turning known errors into one line."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        return cli.main(args=args, prog_name="loraship", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted; nothing half-written was kept.", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the CLI's single error boundary
        message = _friendly(exc)
        if debug or message is None:
            if debug and getattr(exc, "detail", None):
                click.echo(exc.detail, err=True)
            raise
        click.secho(f"Error: {message}", fg="red", err=True)
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    main()
