"""`loraship azure ...`: provision, upload, deploy, status and destroy on Azure Container Apps."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from loraship_contract import API_KEY_ENV

from loraship.errors import LorashipError

if TYPE_CHECKING:
    from loraship.pipeline.azure import AzureTarget


# --params, --config, --subscription and --resource-group, shared with `loraship ship --target azure`
AZURE_OPTIONS = (
    click.option("--params", "params_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
                 help="inference.parameters.json (default: infra/provision/ here, else loraship's)."),
    click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=Path("infra/inference.config.json"),
                 show_default=True, help="The template's output file (written by provision and deploy)."),
    click.option("--subscription", default=None, help="Subscription id (default: $AZURE_SUBSCRIPTION_ID, then --config)."),
    click.option("--resource-group", "-g", default=None, help="Resource group (default: $AZURE_RESOURCE_GROUP, then --config)."),
)


def azure_options(fn: Any) -> Any:
    """Add AZURE_OPTIONS to a command."""
    for option in reversed(AZURE_OPTIONS):
        fn = option(fn)
    return fn


def _common(fn: Any) -> Any:
    """AZURE_OPTIONS, resolved into an AzureTarget (the command's first argument)."""

    @azure_options
    @functools.wraps(fn)
    def wrapper(params_path: Path | None, config_path: Path, subscription: str | None, resource_group: str | None, **kwargs: Any) -> Any:
        from loraship.pipeline.azure import resolve_target

        return fn(resolve_target(params_path, config_path, subscription, resource_group), **kwargs)

    return wrapper


def _console() -> Any:
    from rich.console import Console

    return Console(highlight=False)


def _log(console: Any) -> Any:
    """Progress lines from infra, dimmed."""
    return lambda message: console.print(f"[dim]{message}[/]")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def azure() -> None:
    """Provision, upload and deploy a Triton endpoint on Azure Container Apps (GPU).

    Uses DefaultAzureCredential (`az login`, environment or managed identity).
    Names come from infra/provision/inference.parameters.json (the AI Toolkit's file).

    \b
    Example (after `az login`; the subscription comes from $AZURE_SUBSCRIPTION_ID or --subscription ID):
      loraship azure provision -g my-rg --create-resource-group --what-if
      loraship azure provision -g my-rg --create-resource-group
      loraship azure deploy --repo work/repo -g my-rg
    """


@azure.command(short_help="Create or update the Azure resources and the Triton app.")
@_common
@click.option("--what-if", is_flag=True, help="Print the plan (create/update/unchanged) and change nothing.")
@click.option("--api-key", envvar=API_KEY_ENV, default=None,
              help="API key for the endpoint (default: keep the app's, or generate one). Stored only as an ACA secret.")
@click.option("--create-resource-group", is_flag=True, help="Create the resource group if it does not exist.")
def provision(target: AzureTarget, what_if: bool, api_key: str | None, create_resource_group: bool) -> None:
    """Create or update storage, Log Analytics, the GPU environment and the Triton app.

    Idempotent: a second run changes nothing. Existing resources are reused.

    \b
    Example:
      loraship azure provision -g my-rg --subscription "$AZURE_SUBSCRIPTION_ID" --what-if
      loraship azure provision -g my-rg --create-resource-group
    """
    from loraship.infra.provisioner import key_hint, provision as run, steps_table

    console = _console()
    result = run(target.params, target.settings, target.resource_group, what_if=what_if, api_key=api_key,
                 create_resource_group=create_resource_group, config_path=target.config_path, log=_log(console))
    console.print(steps_table(result, "what-if: nothing was changed" if what_if else "provisioned"))
    if not what_if:
        console.print(f"endpoint: {result.endpoint}  (config: {target.config_path})", soft_wrap=True)
        if result.generated_key:
            console.print("A new API key was generated and stored only as an ACA secret. Read it with:")
        console.print(f"  {key_hint(target.params, target.resource_group)}", soft_wrap=True)


@azure.command(short_help="Sync a model repository to the Azure Files share.")
@_common
@click.option("--repo", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Triton model repository (from `loraship repo`).")
@click.option("--wheels", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="Staged wheels (default: REPO/../wheels if present).")
def upload(target: AzureTarget, repo: Path, wheels: Path | None) -> None:
    """Sync a model repository to the Azure Files share (incremental, resumable).

    New versions appear on the share only when complete; config.pbtxt goes last.

    \b
    Example:
      loraship azure upload --repo work/repo -g my-rg
    """
    from loraship.infra.files_upload import upload as run

    console = _console()
    result = run(target.params, target.settings, target.resource_group, repo, wheels=wheels, log=_log(console))
    console.print(f"uploaded {len(result.uploaded)} files ({result.bytes_sent} bytes), {len(result.unchanged)} unchanged")


@azure.command(short_help="Upload, roll a new revision, smoke-test it.")
@_common
@click.option("--repo", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help="Triton model repository (from `loraship repo`).")
@click.option("--wheels", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="Staged wheels (default: REPO/../wheels if present).")
@click.option("--model", default=None, help="Model to smoke-test (default: the repository's only model).")
@click.option("--timeout", default=1800, show_default=True, help="Seconds to wait for the new revision to serve.")
def deploy(target: AzureTarget, repo: Path, wheels: Path | None, model: str | None, timeout: int) -> None:
    """Upload, roll a new revision, wait until it serves, then smoke-test it with the API key.

    \b
    Example:
      loraship azure deploy --repo work/repo -g my-rg
    """
    from loraship.infra.deploy import deploy as run, usage
    from loraship.infra.provisioner import key_hint

    console = _console()
    result = run(target.params, target.settings, target.resource_group, repo, wheels=wheels, model=model,
                 config_path=target.config_path, timeout_s=timeout, log=_log(console))
    console.print(f"revision {result.revision} serves {result.model} at {result.endpoint}")
    console.print(f"smoke generate (/v2): {result.reply!r}")
    console.print(f"smoke {result.openai_route}: {result.openai_reply!r}")
    console.print("Call it:")
    console.print(usage(result.endpoint, result.model, key_hint(target.params, target.resource_group), target.params.apiKeyHeader),
                  soft_wrap=True)


@azure.command("add-adapter", short_help="Serve one more LoRA adapter; no new revision.")
@_common
@click.option("--name", required=True, help="The adapter's name: the OpenAI `model` (and Triton `lora_name`) that selects it.")
@click.option("--adapter", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A converted adapter (`loraship convert-adapter`), or a peft adapter with --base-export.")
@click.option("--base-export", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="The base export with LoRA slots (`loraship export --max-adapters`): convert the peft --adapter for it first.")
@click.option("--model", default=None, help="The model on the share (default: the share's only model).")
@click.option("--replace", is_flag=True, help="Serve new weights under a name already installed.")
def add_adapter(target: AzureTarget, name: str, adapter: Path, base_export: Path | None, model: str | None, replace: bool) -> None:
    """Upload only the adapter's files (MBs) to the share beside the model, then its multi_lora.json: every
    replica loads it when it sees the file change (within seconds), with no new revision and no restart. An
    adapter converted for another base, or a name already installed with other weights (without --replace),
    is refused.

    \b
    Example:
      loraship azure add-adapter --name roman --adapter work/adapters/roman -g my-rg
      loraship azure add-adapter --name sql --adapter work/sql-lora --base-export work/base-slots -g my-rg
    """
    from loraship.pipeline.azure import add_adapter as run

    console = _console()
    target.log = _log(console)
    change = run(target, name, adapter, base_export=base_export, model=model, replace=replace)
    if not change.registry_written:
        console.print(f"adapter {name} of {change.model} is already on the share with these weights: nothing changed")
        return
    console.print(f"uploaded {len(change.upload.uploaded)} files ({change.upload.bytes_sent} bytes) to {change.folder}, "
                  f"then {change.model}/multi_lora.json", soft_wrap=True)
    console.print(f"{change.model} serves adapters: {', '.join(change.adapters)} (OpenAI `model`: the adapter's name)", soft_wrap=True)


@azure.command("remove-adapter", short_help="Stop serving a LoRA adapter; no new revision.")
@_common
@click.option("--name", required=True, help="The adapter's name.")
@click.option("--model", default=None, help="The model on the share (default: the share's only model).")
def remove_adapter(target: AzureTarget, name: str, model: str | None) -> None:
    """Rewrite the model's multi_lora.json without the adapter (each replica refuses new requests on it; those
    running finish), then delete its files from the share.

    \b
    Example:
      loraship azure remove-adapter --name roman -g my-rg
    """
    from loraship.infra.share_adapters import remove_adapter as run

    console = _console()
    change = run(target.params, target.settings, target.resource_group, name, model=model, log=_log(console))
    console.print(f"removed adapter {name} of {change.model}; it serves adapters: {', '.join(change.adapters) or 'none'}", soft_wrap=True)


@azure.command(short_help="Show the resources, revision, replicas and endpoint.")
@_common
def status(target: AzureTarget) -> None:
    """Show the resources, the app's revision, replicas and endpoint.

    \b
    Example:
      loraship azure status -g my-rg
    """
    from loraship.infra.status import status as run, status_table

    _console().print(status_table(run(target.params, target.settings, target.resource_group)))


@azure.command(short_help="Delete what loraship created; keep the rest.")
@_common
@click.option("--yes", is_flag=True, help="Really delete (required).")
def destroy(target: AzureTarget, yes: bool) -> None:
    """Delete what loraship created (resources tagged managed-by: loraship); keep the rest.

    \b
    Example:
      loraship azure destroy -g my-rg --yes
    """
    from loraship.infra.status import destroy as run

    if not yes:
        raise LorashipError("destroy deletes the app, environment, workspace and storage account loraship created", "pass --yes to confirm")
    console = _console()
    for row in run(target.params, target.settings, target.resource_group, log=_log(console)):
        console.print(f"{row.state:8} {row.resource} {row.name} {row.detail}".rstrip())
    console.print(f"The resource group {target.resource_group} is kept (`az group delete -n {target.resource_group}` removes it).")
