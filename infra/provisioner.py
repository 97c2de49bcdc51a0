"""`loraship azure provision`: make Azure match the plan, creating only what is missing or different."""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraship.errors import LorashipError
from loraship.infra import plan
from loraship.infra.azerrors import azure_errors
from loraship.infra.clients import Clients, Settings, get_or_none, secret_value
from loraship.infra.params import DEFAULT_CONFIG, Params, write_config

API_KEY_RE = re.compile(r"^[A-Za-z0-9._~-]{16,256}$")
PLACEHOLDER_KEY = "placeholder-not-sent-to-azure"  # stands in for the key when only comparing


@dataclass
class Step:
    """One resource and what provisioning does (or would do) to it."""

    resource: str
    name: str
    action: str  # create | update | unchanged
    detail: str = ""


@dataclass
class ProvisionResult:
    steps: list[Step] = field(default_factory=list)
    endpoint: str | None = None
    generated_key: bool = False
    config: dict[str, str] | None = None

    @property
    def writes(self) -> int:
        return sum(s.action != "unchanged" for s in self.steps)


def check_api_key(api_key: str | None) -> None:
    if api_key is not None and not API_KEY_RE.match(api_key):
        raise LorashipError("the API key must be 16-256 characters of letters, digits, '.', '_', '~' or '-'", "pass another --api-key or omit it to generate one")


def resource_id(subscription_id: str, resource_group: str, provider_path: str) -> str:
    return f"/subscriptions/{subscription_id}/resourceGroups/{resource_group}/providers/{provider_path}"


def _app_changes(desired: Any, existing: Any) -> list[str]:
    """Differences of the app ignoring secret values, which GET never returns."""
    body = desired.as_dict()
    for secret in body["properties"]["configuration"].get("secrets", []):
        secret.pop("value", None)
    return plan.differences(body, existing.as_dict())


def _stamp(app: Any) -> str | None:
    """The deploy stamp of an existing app, kept so provisioning never forces a restart."""
    for container in app.properties.template.containers or []:
        for var in container.env or []:
            if var.name == plan.STAMP_ENV:
                return var.value
    return None


def provision(
    p: Params,
    settings: Settings,
    resource_group: str,
    *,
    what_if: bool = False,
    api_key: str | None = None,
    create_resource_group: bool = False,
    config_path: Path = DEFAULT_CONFIG,
    log: Callable[[str], None] = lambda _: None,
) -> ProvisionResult:
    """Create what is missing and update what differs; ``what_if`` only reports the plan."""
    p.validate()  # Azure's limits, before any request
    check_api_key(api_key)
    c = Clients(settings)
    result = ProvisionResult()
    ctx = {"resource_group": resource_group, "location": p.location}
    sub = settings.subscription_id

    def step(resource: str, name: str, action: str, detail: str = "") -> bool:
        result.steps.append(Step(resource, name, action, detail))
        write = action != "unchanged" and not what_if
        if write:
            log(f"{action} {resource} {name} {detail}".rstrip())
        return write

    # resource group
    from azure.core.exceptions import ResourceNotFoundError

    with azure_errors("reading the resource group", **ctx):
        try:
            missing = not c.resources.resource_groups.get(resource_group)
        except ResourceNotFoundError:
            missing = True
    if missing and not create_resource_group:
        raise LorashipError(
            f"resource group {resource_group} does not exist in subscription {sub}",
            f"create it with `az group create -n {resource_group} -l {p.location}` or pass --create-resource-group",
        )
    if missing and step("resource group", resource_group, "create"):
        from azure.mgmt.resource.resources import models as rm

        with azure_errors("creating the resource group", **ctx):
            c.resources.resource_groups.create_or_update(resource_group, rm.ResourceGroup(location=p.location, tags=plan.TAGS))

    def existing(what: str, fn: Any, *args: Any) -> Any:
        if missing:
            return None
        with azure_errors(f"reading the {what}", **ctx):
            return get_or_none(fn, resource_group, *args)

    # storage account, file share
    acct = p.storageAccountName
    if existing("storage account", c.storage.storage_accounts.get_properties, acct) is None:
        if step("storage account", acct, "create", "Standard_LRS StorageV2, large file shares"):
            with azure_errors(f"creating storage account {acct}", **ctx):
                c.storage.storage_accounts.begin_create(resource_group, acct, plan.storage_account(p)).result()
                c.storage.file_services.set_service_properties(resource_group, acct, plan.file_service())
    else:
        step("storage account", acct, "unchanged", "reused")
    share = None if missing else existing("file share", c.storage.file_shares.get, acct, p.fileShareName)
    if share is None:
        if step("file share", p.fileShareName, "create", "1024 GiB SMB"):
            with azure_errors(f"creating file share {p.fileShareName}", **ctx):
                c.storage.file_shares.create(resource_group, acct, p.fileShareName, plan.file_share())
    else:
        step("file share", p.fileShareName, "unchanged", "reused")

    # Log Analytics
    ws = existing("Log Analytics workspace", c.logs.workspaces.get, p.acaLogAnalyticsName)
    if ws is None:
        if step("Log Analytics workspace", p.acaLogAnalyticsName, "create", "PerGB2018"):
            with azure_errors(f"creating Log Analytics workspace {p.acaLogAnalyticsName}", **ctx):
                ws = c.logs.workspaces.begin_create_or_update(resource_group, p.acaLogAnalyticsName, plan.workspace(p)).result()
    else:
        step("Log Analytics workspace", p.acaLogAnalyticsName, "unchanged", "reused")

    def shared_key() -> str:
        with azure_errors("reading the Log Analytics shared key", **ctx):
            return c.logs.shared_keys.get_shared_keys(resource_group, p.acaLogAnalyticsName).primary_shared_key

    # managed environment with the GPU profile
    env_id = resource_id(sub, resource_group, f"Microsoft.App/managedEnvironments/{p.acaEnvironmentName}")
    env = existing("Container Apps environment", c.app.managed_environments.get, p.acaEnvironmentName)
    profile_name = plan.GPU_PROFILE_NAME
    env_body: Any = None
    if env is None:
        if step("Container Apps environment", p.acaEnvironmentName, "create", f"workload profile {p.gpuProfileType}"):
            env_body = plan.managed_environment(p, ws.properties.customer_id, shared_key())
    else:
        env_id = env.id or env_id
        profiles = env.properties.workload_profiles or []
        found = [wp.name for wp in profiles if wp.workload_profile_type == p.gpuProfileType]
        if found:
            profile_name = found[0]
            step("Container Apps environment", p.acaEnvironmentName, "unchanged", f"has {p.gpuProfileType} as {profile_name}")
        elif p.dedicated or not profiles:
            raise LorashipError(
                f"environment {p.acaEnvironmentName} has no {p.gpuProfileType} workload profile, and "
                + ("dedicated GPU profiles can only be added when an environment is created" if p.dedicated else "it was created without workload profiles"),
                "set acaEnvironmentName to a new environment (loraship creates it with the profile) or delete this one",
            )
        elif step("Container Apps environment", p.acaEnvironmentName, "update", f"add workload profile {p.gpuProfileType}"):
            others = [wp for wp in profiles if wp.workload_profile_type != "Consumption"]
            env_body = plan.managed_environment(p, ws.properties.customer_id, shared_key(), others)
    if env_body is not None:
        with azure_errors(f"creating environment {p.acaEnvironmentName} with {p.gpuProfileType}", **ctx):
            env_id = c.app.managed_environments.begin_create_or_update(resource_group, p.acaEnvironmentName, env_body).result().id or env_id

    # environment storage (AzureFile link)
    link = None if env is None else existing("environment storage", c.app.managed_environments_storages.get, p.acaEnvironmentName, p.acaEnvironmentStorageName)
    changes = [] if link is None else plan.differences(plan.environment_storage(p, None).as_dict(), link.as_dict())
    action = "create" if link is None else ("update" if changes else "unchanged")
    if step("environment storage", p.acaEnvironmentStorageName, action, f"AzureFile {acct}/{p.fileShareName} {' '.join(changes)}".rstrip()):
        with azure_errors(f"linking share {p.fileShareName} to the environment", **ctx):
            key = c.storage.storage_accounts.list_keys(resource_group, acct).keys_property[0].value
            c.app.managed_environments_storages.create_or_update(
                resource_group, p.acaEnvironmentName, p.acaEnvironmentStorageName, plan.environment_storage(p, key)
            )

    # container app
    app = None if env is None else existing("container app", c.app.container_apps.get, p.acaAppName)
    if app is None:
        key = api_key or secrets.token_urlsafe(32)
        result.generated_key = api_key is None
        desired = plan.container_app(p, env_id, key, profile_name)
        action, detail = "create", f"tritonserver:{p.tritonImageTag}-py3 on {profile_name}"
    else:
        has_secret = p.apiKeySecretName in [s.name for s in app.properties.configuration.secrets or []]
        stamp, threshold = _stamp(app), plan.concurrent_requests(app)  # both set by deploy, kept here
        changes = _app_changes(plan.container_app(p, env_id, PLACEHOLDER_KEY, profile_name, stamp, concurrent_requests=threshold), app)
        with azure_errors("reading the container app secrets", **ctx):
            current = secret_value(c, resource_group, p.acaAppName, p.apiKeySecretName) if has_secret and (api_key or (changes and not what_if)) else None
        if api_key and current != api_key:
            changes.append("API key secret")
        key = api_key or current or secrets.token_urlsafe(32)
        result.generated_key = not (api_key or has_secret)
        desired = plan.container_app(p, env_id, key, profile_name, stamp, concurrent_requests=threshold)
        action, detail = ("update", " ".join(changes)) if changes else ("unchanged", "")
    if step("container app", p.acaAppName, action, detail):
        with azure_errors(f"creating container app {p.acaAppName}", **ctx):
            app = c.app.container_apps.begin_create_or_update(resource_group, p.acaAppName, desired).result()
    if app is not None and app.properties.configuration.ingress and app.properties.configuration.ingress.fqdn:
        result.endpoint = f"https://{app.properties.configuration.ingress.fqdn}"
    if not what_if:
        result.config = write_config(config_path, sub, resource_group, p, result.endpoint or "")
    return result


def steps_table(result: ProvisionResult, title: str) -> Any:
    """A rich table of what provisioning did (or, with what-if, would do)."""
    from rich.table import Table

    table = Table(title=title)
    for col in ("resource", "name", "action", "detail"):
        table.add_column(col)
    colors = {"create": "green", "update": "yellow", "unchanged": "dim"}
    for s in result.steps:
        table.add_row(s.resource, s.name, f"[{colors[s.action]}]{s.action}[/]", s.detail)
    return table


def key_hint(p: Params, resource_group: str) -> str:
    """How to read the API key from the ACA secret (it is never printed or stored by loraship)."""
    return f"az containerapp secret show -n {p.acaAppName} -g {resource_group} --secret-name {p.apiKeySecretName} --query value -o tsv"
