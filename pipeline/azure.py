"""Target ``azure``: where `loraship azure` and `ship --target azure` act (:class:`AzureTarget`), and ship's
Azure steps: the container's wheels (triton_repo.wheels), infra.provisioner's ``provision`` and
infra.deploy's ``deploy``."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from loraship.errors import LorashipError
from loraship.pipeline.runner import Pipeline, Record, tree_state

if TYPE_CHECKING:
    from rich.console import Console

    from loraship.infra.clients import Settings
    from loraship.infra.params import Params
    from loraship.infra.provisioner import ProvisionResult
    from loraship.infra.share_adapters import AdapterChange


@dataclass
class AzureTarget:
    """Where and how `loraship azure` and `ship --target azure` provision and deploy."""

    params: Params
    settings: Settings
    resource_group: str
    config_path: Path
    api_key: str | None = None
    what_if: bool = False
    create_resource_group: bool = False
    wheels: Path | None = None  # already staged; default: staged into WORK/wheels
    log: Callable[[str], None] = field(default=lambda _: None)


def resolve_target(params_path: Path | None, config_path: Path, subscription: str | None,
                   resource_group: str | None) -> AzureTarget:
    """The AzureTarget of `loraship azure`'s options: the parameters file (default: infra/provision/ here, else
    loraship's), the subscription and resource group (given, else $AZURE_SUBSCRIPTION_ID and
    $AZURE_RESOURCE_GROUP, else the config file ``config_path``); the other fields keep their defaults."""
    from loraship.infra.clients import Settings
    from loraship.infra.params import default_params_path, load_params, read_config

    config = read_config(config_path)
    subscription = subscription or os.environ.get("AZURE_SUBSCRIPTION_ID") or config.get("SUBSCRIPTION_ID")
    resource_group = resource_group or os.environ.get("AZURE_RESOURCE_GROUP") or config.get("RESOURCE_GROUP_NAME")
    if not subscription:
        raise LorashipError("no Azure subscription given", "pass --subscription ID or set AZURE_SUBSCRIPTION_ID")
    if not resource_group:
        raise LorashipError("no resource group given", "pass --resource-group NAME or set AZURE_RESOURCE_GROUP")
    return AzureTarget(params=load_params(params_path or default_params_path()), settings=Settings.from_env(subscription),
                       resource_group=resource_group, config_path=config_path)


def what_if(az: AzureTarget) -> ProvisionResult:
    """What provisioning would change; nothing is written."""
    from loraship.infra.provisioner import provision

    return provision(az.params, az.settings, az.resource_group, what_if=True, api_key=az.api_key,
                     create_resource_group=az.create_resource_group, config_path=az.config_path, log=az.log)


def add_adapter(az: AzureTarget, name: str, adapter: Path, base_export: Path | None = None, model: str | None = None,
                replace: bool = False, progress: bool = True) -> AdapterChange:
    """`loraship azure add-adapter`: serve ``adapter`` as ``name`` on every replica of the deployed model, without a
    new revision (infra.share_adapters). ``adapter`` is a converted folder, or a peft adapter that is first
    converted (export.lora_convert) for ``base_export``, the base export with LoRA slots the model was written from."""
    from loraship.infra.share_adapters import add_adapter as run
    from loraship.triton_repo.runtime.adapter_store import PEFT_CONFIG

    adapter = Path(adapter)
    kwargs = {"model": model, "replace": replace, "progress": progress, "log": az.log}
    if base_export is None:
        if (adapter / PEFT_CONFIG).is_file():
            raise LorashipError(f"{adapter} is a peft adapter, not a converted one",
                                "pass --base-export EXPORT (the base exported with `loraship export --max-adapters N`) to convert it first")
        return run(az.params, az.settings, az.resource_group, adapter, name, **kwargs)
    from loraship.export.lora_convert import convert_adapter

    with tempfile.TemporaryDirectory(prefix="loraship-adapter-") as tmp:
        az.log(f"converting {adapter} for the slots of {base_export}")
        converted = convert_adapter(adapter, Path(base_export), Path(tmp) / "converted")
        return run(az.params, az.settings, az.resource_group, converted, name, **kwargs)


def wheels_step(p: Pipeline, az: AzureTarget) -> Path:
    """The onnxruntime-gpu/tokenizers/numpy wheels for the NGC image: given, or staged beside WORK/repo."""
    if az.wheels is not None:
        p.note("wheels", f"{az.wheels} (given)")
        return Path(az.wheels)
    from loraship.triton_repo import wheels

    def run() -> Record:
        dest = wheels.stage_wheels(p.path("repo"), az.params.tritonImageTag)
        return {"detail": f"{len(list(dest.glob('*.whl')))} wheels for Python {wheels.PYTHON_VERSION} in {dest.name}/"}

    p.step("wheels", "downloading the container's wheels (repo --stage-wheels)",
           ["wheels", wheels.packages(az.params.tritonImageTag), wheels.PYTHON_VERSION, wheels.PLATFORMS], run,
           output=lambda r: tree_state(wheels.wheels_dir(p.path("repo"))))
    return wheels.wheels_dir(p.path("repo"))


def ship_azure(p: Pipeline, az: AzureTarget, model: str, out: Console) -> Record:
    """Stage the wheels, provision (idempotent), then deploy WORK/repo; the deploy step's record."""
    from loraship.infra.deploy import deploy, usage
    from loraship.infra.provisioner import key_hint, provision, steps_table

    staged = wheels_step(p, az)
    start = time.perf_counter()
    with p.console.status("provisioning Azure (azure provision)..."):
        result = provision(az.params, az.settings, az.resource_group, api_key=az.api_key,
                           create_resource_group=az.create_resource_group, config_path=az.config_path, log=az.log)
    out.print(steps_table(result, "provisioned"))
    app_changed = any(s.resource == "container app" and s.action != "unchanged" for s in result.steps)
    p.note("provision", f"{result.writes} created or updated, {len(result.steps) - result.writes} unchanged",
           time.perf_counter() - start)

    def run() -> Record:
        done = deploy(az.params, az.settings, az.resource_group, p.path("repo"), wheels=staged, model=model,
                      config_path=az.config_path, log=az.log)
        return {"detail": f"revision {done.revision}", "endpoint": done.endpoint, "reply": done.reply}

    repo_version = p.path(p.state["repo"]["version"])
    record = p.step("deploy", "uploading, rolling a revision and smoke-testing it (azure deploy)",
                    ["deploy", tree_state(repo_version), tree_state(staged), asdict(az.params), az.resource_group,
                     az.settings.subscription_id], run, spinner=False, rerun=app_changed)
    out.print(p.summary("loraship ship"))
    out.print(f"endpoint: {record['endpoint']}  (model {model}; first reply {record.get('reply', '')!r})", soft_wrap=True)
    out.print("Call it:")
    out.print(usage(record["endpoint"], model, key_hint(az.params, az.resource_group), az.params.apiKeyHeader), soft_wrap=True)
    return record
