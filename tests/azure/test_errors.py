"""One-line CLI errors for Azure failures; loopback HTTPS fakes stand in for Azure (ARM and Files)."""

from __future__ import annotations

import pytest



def _one_line(code: int, err: str) -> str:
    assert code == 1
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    return lines[0]


def test_failing_credential(cli, monkeypatch, settings):
    """The fake ARM stands in for Azure; the real DefaultAzureCredential finds no identity here."""
    for name in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_FEDERATED_TOKEN_FILE", "IDENTITY_ENDPOINT", "MSI_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")  # no az, azd or pwsh to ask
    settings.credential = None
    line = _one_line(*cli("azure", "provision", "--params", str(cli.params_path), "--subscription", settings.subscription_id, "-g", "rg-loraship")[::2])
    assert "Azure sign-in failed" in line and "az login" in line


def test_forbidden(cli, arm, settings):
    """The fake stands in for Azure and answers 403 AuthorizationFailed as ARM does."""
    arm.fail("*", "/resourcegroups/rg-loraship", 403, "AuthorizationFailed",
             "The client 'u@x' does not have authorization to perform action 'Microsoft.Resources/subscriptions/resourcegroups/read'.")
    line = _one_line(*cli("azure", "provision", "--params", str(cli.params_path), "--subscription", settings.subscription_id, "-g", "rg-loraship")[::2])
    assert "permission denied" in line and "AuthorizationFailed" in line and "Contributor" in line


def test_storage_name_conflict(cli, arm, files, settings):
    """The fake stands in for Azure: a globally taken storage name gets 409 StorageAccountAlreadyTaken."""
    arm.taken_storage_names.add(files.account)
    line = _one_line(*cli("azure", "provision", "--params", str(cli.params_path), "--subscription", settings.subscription_id, "-g", "rg-loraship")[::2])
    assert "storage account name conflict" in line and "storageAccountName" in line


@pytest.mark.parametrize("code", ["WorkloadProfileNotAvailable", "QuotaExceeded"])
def test_gpu_profile_unavailable_or_quota(cli, arm, settings, code):
    """The fake stands in for Azure and refuses the GPU environment as a region without capacity would."""
    arm.fail("PUT", "/managedEnvironments/", 400, code, "The workload profile type Consumption-GPU-NC8as-T4 is not available in this region or subscription.")
    line = _one_line(*cli("azure", "provision", "--params", str(cli.params_path), "--subscription", settings.subscription_id, "-g", "rg-loraship")[::2])
    assert "no GPU capacity" in line and code in line and "quota" in line and "westus3" in line


def test_missing_resource_group(cli, settings):
    """The fake stands in for Azure and answers 404 ResourceGroupNotFound."""
    line = _one_line(*cli("azure", "provision", "--params", str(cli.params_path), "--subscription", settings.subscription_id, "-g", "rg-absent")[::2])
    assert "resource group rg-absent does not exist" in line and "az group create -n rg-absent" in line
    line = _one_line(*cli("azure", "status", "--params", str(cli.params_path), "--subscription", settings.subscription_id, "-g", "rg-absent")[::2])
    assert "resource group rg-absent does not exist" in line


def test_missing_subscription(cli, monkeypatch):
    """No Azure call is made: the subscription is required before any request."""
    monkeypatch.delenv("AZURE_SUBSCRIPTION_ID", raising=False)
    line = _one_line(*cli("azure", "status", "--params", str(cli.params_path), "-g", "rg-loraship")[::2])
    assert "no Azure subscription" in line and "AZURE_SUBSCRIPTION_ID" in line


def test_create_resource_group_flag(cli, arm, settings):
    """The fake stands in for Azure; --create-resource-group creates a tagged group, then provisions."""
    code, out, err = cli("azure", "provision", "--params", str(cli.params_path), "--subscription", settings.subscription_id, "-g", "rg-new", "--create-resource-group")
    assert code == 0, err
    assert arm.groups["rg-new"]["tags"] == {"managed-by": "loraship"}
    assert "az containerapp secret show -n loraship-triton -g rg-new --secret-name triton-api-key" in out


def test_no_credentials_is_one_line_with_the_fix_and_debug_shows_the_chain(tmp_path):
    """The real `loraship` process and the real azure-identity DefaultAzureCredential with nothing to
    sign in with (no environment credentials, no az/azd/pwsh on PATH, an empty HOME; the managed
    identity probe finds no endpoint): one line naming the three fixes, where azure-identity's own
    warning printed the chain's 14 lines before it; --debug shows the chain."""
    import os
    import subprocess
    import sys

    env = {"PATH": "/nonexistent", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    env.update({k: v for k, v in os.environ.items() if k in ("LD_LIBRARY_PATH", "SYSTEMROOT")})
    args = [sys.executable, "-m", "loraship.cli.main", "azure", "status", "--subscription", "00000000-0000-0000-0000-000000000000",
            "-g", "rg-loraship"]
    done = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: Azure sign-in failed while reading container app loraship-triton: "
                               "DefaultAzureCredential failed to retrieve a token from the included credentials.")
    assert "`az login`" in lines[0] and "AZURE_CLIENT_ID, AZURE_TENANT_ID and AZURE_CLIENT_SECRET" in lines[0]
    assert "managed identity" in lines[0] and "--debug" in lines[0]
    debug = subprocess.run([*args[:3], "--debug", *args[3:]], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1
    assert "EnvironmentCredential" in debug.stderr and "ManagedIdentityCredential" in debug.stderr and "Traceback" in debug.stderr
