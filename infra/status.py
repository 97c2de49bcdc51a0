"""`loraship azure status` and `loraship azure destroy`: what exists, and removing only what loraship created."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loraship.infra import plan
from loraship.infra.azerrors import azure_errors
from loraship.infra.clients import Clients, Settings, get_or_none
from loraship.infra.params import Params


@dataclass
class Row:
    resource: str
    name: str
    state: str  # provisioning state, "absent", or what destroy did
    managed: bool  # tagged managed-by: loraship
    detail: str = ""


def _resources(p: Params, c: Clients) -> list[tuple[str, str, Callable[..., Any], Callable[..., Any]]]:
    """(label, name, get, delete) in deletion order: app, environment, workspace, storage account."""
    return [
        ("container app", p.acaAppName, c.app.container_apps.get, lambda rg, n: c.app.container_apps.begin_delete(rg, n).result()),
        ("Container Apps environment", p.acaEnvironmentName, c.app.managed_environments.get, lambda rg, n: c.app.managed_environments.begin_delete(rg, n).result()),
        ("Log Analytics workspace", p.acaLogAnalyticsName, c.logs.workspaces.get, lambda rg, n: c.logs.workspaces.begin_delete(rg, n).result()),
        ("storage account", p.storageAccountName, c.storage.storage_accounts.get_properties, c.storage.storage_accounts.delete),
    ]


def _managed(resource: Any) -> bool:
    return (resource.tags or {}).get("managed-by") == plan.TAGS["managed-by"]


def status(p: Params, settings: Settings, resource_group: str) -> list[Row]:
    """Each resource's state; for the app also its revision, replicas and endpoint."""
    c = Clients(settings)
    rows = []
    for label, name, get, _ in _resources(p, c):
        with azure_errors(f"reading {label} {name}", resource_group=resource_group, location=p.location):
            res = get_or_none(get, resource_group, name)
            if res is None:
                rows.append(Row(label, name, "absent", False))
                continue
            state = getattr(res.properties, "provisioning_state", None) or "Succeeded"
            detail = ""
            if label == "container app":
                rev = res.properties.latest_revision_name
                replicas = c.app.container_apps_revision_replicas.list_replicas(resource_group, name, rev).value if rev else []
                running = sum((r.properties.running_state or "") == "Running" for r in replicas)
                fqdn = res.properties.configuration.ingress.fqdn if res.properties.configuration.ingress else None
                detail = f"revision {rev} (ready: {res.properties.latest_ready_revision_name}), {running}/{len(replicas)} replicas running, https://{fqdn}"
            rows.append(Row(label, name, str(state), _managed(res), detail))
    return rows


def status_table(rows: list[Row]) -> Any:
    """A rich table of `status`'s rows."""
    from rich.table import Table

    table = Table()
    for col in ("resource", "name", "state", "managed by loraship", "detail"):
        table.add_column(col)
    for row in rows:
        table.add_row(row.resource, row.name, row.state, "yes" if row.managed else "no", row.detail)
    return table


def destroy(p: Params, settings: Settings, resource_group: str, log: Callable[[str], None] = lambda _: None) -> list[Row]:
    """Delete the resources tagged ``managed-by: loraship``; keep everything else."""
    c = Clients(settings)
    rows = []
    for label, name, get, delete in _resources(p, c):
        with azure_errors(f"deleting {label} {name}", resource_group=resource_group, location=p.location):
            res = get_or_none(get, resource_group, name)
            if res is None:
                rows.append(Row(label, name, "absent", False))
            elif not _managed(res):
                rows.append(Row(label, name, "kept", False, "not created by loraship"))
            else:
                log(f"deleting {label} {name}")
                delete(resource_group, name)
                rows.append(Row(label, name, "deleted", True))
    return rows
