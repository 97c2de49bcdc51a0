"""Azure clients built from settings, so the same code talks to Azure or to a loopback fake."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

ENV_ARM_ENDPOINT = "LORASHIP_ARM_ENDPOINT"
ENV_FILES_ENDPOINT = "LORASHIP_FILES_ENDPOINT"
PUBLIC_FILES_ENDPOINT = "https://{account}.file.core.windows.net"


@dataclass
class Settings:
    """Where Azure is and who we are.

    ``arm_endpoint`` None means the public cloud; ``files_endpoint`` is a template
    with ``{account}``. ``credential`` None means ``DefaultAzureCredential``.
    ``client_kwargs`` go to every SDK client (``connection_verify``,
    ``retry_total``, ``polling_interval``...).
    """

    subscription_id: str
    arm_endpoint: str | None = None
    files_endpoint: str = PUBLIC_FILES_ENDPOINT
    credential: Any = None
    client_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_env(cls, subscription_id: str) -> "Settings":
        """Settings for real Azure, with endpoint overrides from the environment."""
        return cls(
            subscription_id=subscription_id,
            arm_endpoint=os.environ.get(ENV_ARM_ENDPOINT) or None,
            files_endpoint=os.environ.get(ENV_FILES_ENDPOINT) or PUBLIC_FILES_ENDPOINT,
        )


class Clients:
    """Lazily built management clients for one subscription."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @cached_property
    def credential(self) -> Any:
        if self.settings.credential is not None:
            return self.settings.credential
        from azure.identity import DefaultAzureCredential

        quiet_identity_log()
        return DefaultAzureCredential()

    def _mgmt(self, cls: type) -> Any:
        s = self.settings
        kwargs = dict(s.client_kwargs)
        if s.arm_endpoint:
            kwargs["base_url"] = s.arm_endpoint
            kwargs.setdefault("credential_scopes", ["https://management.azure.com/.default"])
        return cls(self.credential, s.subscription_id, **kwargs)

    @cached_property
    def app(self) -> Any:
        from azure.mgmt.appcontainers import ContainerAppsAPIClient

        return self._mgmt(ContainerAppsAPIClient)

    @cached_property
    def storage(self) -> Any:
        from azure.mgmt.storage import StorageManagementClient

        return self._mgmt(StorageManagementClient)

    @cached_property
    def logs(self) -> Any:
        from azure.mgmt.loganalytics import LogAnalyticsManagementClient

        return self._mgmt(LogAnalyticsManagementClient)

    @cached_property
    def resources(self) -> Any:
        from azure.mgmt.resource.resources import ResourceManagementClient

        return self._mgmt(ResourceManagementClient)

    def share(self, account: str, share: str, account_key: str) -> Any:
        """An Azure Files share client authenticated with the account key (kept in memory only)."""
        from azure.storage.fileshare import ShareClient

        kwargs = {k: v for k, v in self.settings.client_kwargs.items() if k != "polling_interval"}
        return ShareClient(
            account_url=self.settings.files_endpoint.format(account=account),
            share_name=share,
            credential={"account_name": account, "account_key": account_key},
            **kwargs,
        )


def quiet_identity_log() -> None:
    """Keep azure-identity's warnings (a failed credential chain: 14 lines) off stderr when logging is
    not configured; the one-line error says what failed, and --debug prints the chain's report."""
    logger = logging.getLogger("azure.identity")
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())


def get_or_none(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, or None when Azure answers 404 for the resource itself."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        return fn(*args)
    except ResourceNotFoundError as exc:
        if getattr(getattr(exc, "error", None), "code", None) == "ResourceGroupNotFound":
            raise
        return None


def secret_value(clients: Clients, resource_group: str, app: str, name: str) -> str | None:
    """The value of one container app secret (listSecrets is a read action; nothing is stored)."""
    for secret in clients.app.container_apps.list_secrets(resource_group, app).value or []:
        if secret.name == name:
            return secret.value
    return None
