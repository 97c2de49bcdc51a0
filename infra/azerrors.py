"""Turn the Azure errors users cause into specific one-line LorashipErrors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from loraship.errors import LorashipError

GPU_REGIONS = "westus3, westus, australiaeast, swedencentral (T4 also westeurope)"
SIGN_IN_FIX = ("sign in with `az login`, or set AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_CLIENT_SECRET, or run where a "
               "managed identity is assigned; --debug lists each credential tried")


def error_code(exc: BaseException) -> str:
    """The ARM/Storage error code of an HttpResponseError ('' if none)."""
    err = getattr(exc, "error", None)
    code = getattr(err, "code", None) or getattr(exc, "error_code", None)
    if not code and getattr(exc, "response", None) is not None:  # Azure Storage puts it in a header
        code = exc.response.headers.get("x-ms-error-code")
    return str(getattr(code, "value", code) or "")


def _message(exc: BaseException) -> str:
    err = getattr(exc, "error", None)
    text = str(getattr(err, "message", None) or getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def translate(exc: BaseException, what: str, *, resource_group: str = "", location: str = "") -> LorashipError | None:
    """A LorashipError for a known Azure failure while doing ``what``, else None."""
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError

    if error_code(exc) == "AuthenticationFailed":  # Azure Files refused the shared key
        return LorashipError(
            f"the storage account key was refused while {what}: {_message(exc)}",
            "the key may have been rotated or shared-key access disabled on the account (allowSharedKeyAccess); retry or re-enable it",
        )
    if isinstance(exc, ClientAuthenticationError):  # the credential chain's full report goes to --debug
        return LorashipError(f"Azure sign-in failed while {what}: {_message(exc)}", SIGN_IN_FIX, detail=str(exc))
    if isinstance(exc, ServiceRequestError):
        return LorashipError(f"cannot reach Azure while {what}: {_message(exc)}", "check the network and the endpoint settings")
    if not isinstance(exc, HttpResponseError):
        return None
    code = error_code(exc)
    status = exc.status_code
    if code in ("AuthorizationFailed", "AuthorizationPermissionMismatch", "LinkedAuthorizationFailed") or status == 403:
        return LorashipError(
            f"permission denied while {what} ({code or status}): {_message(exc)}",
            "ask for the Contributor role on the resource group (and Storage File Data Privileged Contributor for uploads)",
        )
    if code == "ResourceGroupNotFound":
        return LorashipError(
            f"resource group {resource_group or '?'} does not exist",
            f"create it with `az group create -n {resource_group or 'RG'} -l {location or 'westus3'}` or pass --create-resource-group",
        )
    if code in ("StorageAccountAlreadyTaken", "StorageAccountAlreadyExists", "StorageAccountNameInvalid"):
        return LorashipError(
            f"storage account name conflict while {what}: {_message(exc)}",
            "storage account names are global; choose another storageAccountName in the parameters file",
        )
    if "Quota" in code or "WorkloadProfile" in code or code in ("SubscriptionNotRegisteredForFeature", "RegionNotSupported"):
        return LorashipError(
            f"no GPU capacity while {what} ({code}): {_message(exc)}",
            f"request Container Apps GPU quota for this region (Azure portal > Quotas) or pick a GPU region: {GPU_REGIONS}",
        )
    if code in ("Conflict", "ResourceExists", "ContainerAppNameAlreadyInUse", "ManagedEnvironmentNameAlreadyInUse") or status == 409:
        return LorashipError(f"name conflict while {what} ({code or status}): {_message(exc)}", "choose other names in the parameters file")
    if status == 404:
        return LorashipError(f"not found while {what} ({code or status}): {_message(exc)}", "run `loraship azure provision` first")
    return LorashipError(f"Azure refused {what} ({code or status}): {_message(exc)}", "fix the named setting and retry; --debug shows the full response")


@contextmanager
def azure_errors(what: str, *, resource_group: str = "", location: str = "") -> Iterator[None]:
    """Re-raise known Azure failures inside the block as LorashipError."""
    try:
        yield
    except LorashipError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated or re-raised unchanged
        mapped = translate(exc, what, resource_group=resource_group, location=location)
        if mapped is None:
            raise
        raise mapped from exc
