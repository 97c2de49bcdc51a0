"""provision against loopback HTTPS fakes that stand in for Azure (ARM: Microsoft.App, Microsoft.Storage,
Microsoft.OperationalInsights, resource groups), driven by the real Azure SDK clients."""

from __future__ import annotations

import json
import re

import pytest

from loraship.errors import LorashipError
from loraship.infra import plan
from loraship.infra.params import Params
from loraship.infra.provisioner import provision

from azure_fakes.helpers import RG


def _app_body(arm) -> dict:
    return arm.bodies("PUT", "/containerApps/")[-1]


def test_first_run_creates_all_resources_with_expected_bodies(arm, files, settings, params, tmp_path):
    """The fake stands in for Azure; it answers with Azure's LRO codes (202+Location, 201+Azure-AsyncOperation)."""
    config = tmp_path / "infra" / "inference.config.json"
    result = provision(params, settings, RG, config_path=config)

    assert [(s.resource, s.action) for s in result.steps] == [
        ("storage account", "create"), ("file share", "create"), ("Log Analytics workspace", "create"),
        ("Container Apps environment", "create"), ("environment storage", "create"), ("container app", "create"),
    ]
    assert result.generated_key
    # LROs really went through their polling paths
    polls = [r.path for r in arm.requests if "/operationStatuses/" in r.path]
    assert any("Microsoft.Storage" in p for p in polls) and any("Microsoft.App" in p for p in polls)

    account = arm.bodies("PUT", "/storageAccounts/")[0]
    assert account["sku"] == {"name": "Standard_LRS"} and account["kind"] == "StorageV2"
    assert account["properties"]["largeFileSharesState"] == "Enabled" and account["tags"] == {"managed-by": "loraship"}
    assert arm.bodies("PUT", "/shares/")[0]["properties"]["shareQuota"] == 1024

    env = arm.bodies("PUT", "/managedEnvironments/")[0]
    assert env["properties"]["workloadProfiles"] == [
        {"name": "Consumption", "workloadProfileType": "Consumption"},
        {"name": "GPU", "workloadProfileType": "Consumption-GPU-NC8as-T4"},
    ]
    logs = env["properties"]["appLogsConfiguration"]["logAnalyticsConfiguration"]
    assert logs["sharedKey"] == "ws-primary-key" and logs["customerId"]

    link = arm.bodies("PUT", "/storages/")[0]["properties"]["azureFile"]
    assert link == {"accountName": files.account, "accountKey": files.key, "shareName": params.fileShareName, "accessMode": "ReadOnly"}

    app = _app_body(arm)["properties"]
    assert app["workloadProfileName"] == "GPU"
    assert app["environmentId"].endswith(f"/managedEnvironments/{params.acaEnvironmentName}")
    secrets = app["configuration"]["secrets"]
    assert [s["name"] for s in secrets] == ["triton-api-key"] and len(secrets[0]["value"]) >= 32
    key = secrets[0]["value"]
    ingress = app["configuration"]["ingress"]
    assert ingress["external"] is True and ingress["targetPort"] == 8080  # the frontend: /v1 (OpenAI) and /v2 (Triton)
    assert ingress["additionalPortMappings"] == [{"external": False, "targetPort": 8001, "exposedPort": 8001}]
    container = app["template"]["containers"][0]
    assert container["image"] == "nvcr.io/nvidia/tritonserver:24.12-py3"
    assert container["resources"] == {"cpu": 8.0, "memory": "56Gi"}
    command = container["command"]
    assert command[:2] == ["/bin/bash", "-c"]
    script = command[2]
    assert "--model-repository=/mount/model_repository --model-control-mode=none" in script
    assert "sh /mount/wheels/start.sh --frontend-port=8080 " in script and "--http-port=8000" in script
    assert "exec tritonserver --model-repository=/mount/model_repository --model-control-mode=none --http-port=8080" in script
    assert "--http-restricted-api=" in script and ":x-api-key=${LORASHIP_API_KEY}" in script
    assert key not in json.dumps(container)  # the key only travels in the secret
    assert container["env"] == [{"name": "LORASHIP_API_KEY", "secretRef": "triton-api-key"}]
    assert container["volumeMounts"] == [{"volumeName": "models", "mountPath": "/mount"}]
    assert app["template"]["volumes"] == [{"name": "models", "storageType": "AzureFile", "storageName": params.acaEnvironmentStorageName}]
    assert app["template"]["scale"] == {"minReplicas": 1, "maxReplicas": params.maximumInstanceCount, "rules": [
        {"name": "http-concurrency", "http": {"metadata": {"concurrentRequests": "8"}}}]}  # 1 instance x batch 8
    probes = {p["type"]: p for p in container["probes"]}
    assert probes["Startup"]["httpGet"]["path"] == "/v2/health/ready"
    assert probes["Liveness"]["httpGet"]["path"] == "/v2/health/live"
    assert probes["Readiness"]["httpGet"]["path"] == "/v2/health/ready"
    assert {p["httpGet"]["port"] for p in container["probes"]} == {8080}  # through the frontend, which must be up too
    startup = probes["Startup"]
    assert startup["initialDelaySeconds"] + startup["periodSeconds"] * startup["failureThreshold"] >= params.modelLoadSeconds
    for probe in container["probes"]:
        for attr, (low, high) in {"failureThreshold": (1, 10), "initialDelaySeconds": (0, 60), "periodSeconds": (1, 240), "timeoutSeconds": (1, 240)}.items():
            assert low <= probe.get(attr, low) <= high

    saved = json.loads(config.read_text())
    assert saved == {
        "SUBSCRIPTION_ID": settings.subscription_id, "RESOURCE_GROUP_NAME": RG, "STORAGE_ACCOUNT_NAME": files.account,
        "FILE_SHARE_NAME": params.fileShareName, "ACA_APP_NAME": params.acaAppName, "ACA_APP_ENDPOINT": result.endpoint,
    }
    assert result.endpoint == f"https://{params.acaAppName}.example.westus3.azurecontainerapps.io"
    assert key not in config.read_text() and files.key not in config.read_text()
    # every ARM call carried the bearer token for the management scope
    assert settings.credential.scopes and all(s == ("https://management.azure.com/.default",) for s in settings.credential.scopes)


def test_second_run_changes_nothing(arm, settings, params, tmp_path):
    """The fake stands in for Azure and returns resources the way Azure does (no secret values on GET)."""
    provision(params, settings, RG, config_path=tmp_path / "c.json")
    writes = len(arm.writes())
    again = provision(params, settings, RG, config_path=tmp_path / "c.json")
    assert {s.action for s in again.steps} == {"unchanged"}
    assert len(arm.writes()) == writes
    assert not again.generated_key


def test_what_if_sends_no_write(arm, settings, params, tmp_path):
    """The fake stands in for Azure; --what-if may read but must never PUT, PATCH or DELETE."""
    result = provision(params, settings, RG, what_if=True, config_path=tmp_path / "c.json")
    assert {s.action for s in result.steps} == {"create"}
    assert arm.writes() == []
    assert not any("listKeys" in r.path or "sharedKeys" in r.path for r in arm.requests)
    assert not (tmp_path / "c.json").exists()

    provision(params, settings, RG, config_path=tmp_path / "c.json")
    params.maximumInstanceCount = 3
    before = len(arm.writes())
    changed = provision(params, settings, RG, what_if=True, config_path=tmp_path / "c.json")
    app = [s for s in changed.steps if s.resource == "container app"][0]
    assert app.action == "update" and "maxReplicas" in app.detail
    assert len(arm.writes()) == before


def test_api_key_given_is_stored_only_as_secret_and_rotation_is_an_update(arm, settings, params, tmp_path):
    """The fake stands in for Azure; secret values are only visible through listSecrets."""
    provision(params, settings, RG, api_key="first-key-0123456789", config_path=tmp_path / "c.json")
    assert _app_body(arm)["properties"]["configuration"]["secrets"][0]["value"] == "first-key-0123456789"
    same = provision(params, settings, RG, api_key="first-key-0123456789", config_path=tmp_path / "c.json")
    assert {s.action for s in same.steps} == {"unchanged"}
    rotated = provision(params, settings, RG, api_key="second-key-0123456789", config_path=tmp_path / "c.json")
    assert [s.detail for s in rotated.steps if s.resource == "container app"] == ["API key secret"]
    assert _app_body(arm)["properties"]["configuration"]["secrets"][0]["value"] == "second-key-0123456789"
    with pytest.raises(LorashipError, match="API key"):
        provision(params, settings, RG, api_key="short", config_path=tmp_path / "c.json")


def test_dedicated_profile_has_min_max_and_only_at_creation(arm, settings, params, tmp_path):
    """The fake stands in for Azure; an existing environment without the dedicated profile is refused."""
    params.gpuProfileType, params.gpuProfileMinimumCount, params.maximumInstanceCount = "NC24-A100", 0, 2
    provision(params, settings, RG, config_path=tmp_path / "c.json")
    env = arm.bodies("PUT", "/managedEnvironments/")[0]
    assert env["properties"]["workloadProfiles"][-1] == {"name": "GPU", "workloadProfileType": "NC24-A100", "minimumCount": 0, "maximumCount": 2}
    assert _app_body(arm)["properties"]["template"]["containers"][0]["resources"] == {"cpu": 24.0, "memory": "220Gi"}

    params.acaAppName = "other-app"
    params.gpuProfileType = "NC48-A100"
    with pytest.raises(LorashipError, match="dedicated GPU profiles can only be added when an environment is created"):
        provision(params, settings, RG, config_path=tmp_path / "c.json")


def test_serverless_profile_is_added_to_existing_environment(arm, settings, params, tmp_path):
    """The fake stands in for Azure; a workload-profile environment created elsewhere gets the GPU profile added."""
    provision(params, settings, RG, config_path=tmp_path / "c.json")
    params.gpuProfileType = "Consumption-GPU-NC24-A100"
    result = provision(params, settings, RG, config_path=tmp_path / "c.json")
    env_step = [s for s in result.steps if s.resource == "Container Apps environment"][0]
    assert env_step.action == "update"
    profiles = arm.bodies("PUT", "/managedEnvironments/")[-1]["properties"]["workloadProfiles"]
    assert [p["workloadProfileType"] for p in profiles] == ["Consumption", "Consumption-GPU-NC8as-T4", "Consumption-GPU-NC24-A100"]


def test_existing_untagged_resources_are_reused(arm, settings, params, tmp_path, files):
    """The fake stands in for Azure; resources named in the parameters that already exist are not re-created."""
    arm.resources[f"/subscriptions/{settings.subscription_id}/resourcegroups/{RG}/providers/microsoft.operationalinsights/workspaces/{params.acaLogAnalyticsName}".lower()] = {
        "id": "x", "name": params.acaLogAnalyticsName, "location": "westus3", "tags": {}, "properties": {"customerId": "cid-existing"}}
    result = provision(params, settings, RG, config_path=tmp_path / "c.json")
    assert [s.action for s in result.steps if s.resource == "Log Analytics workspace"] == ["unchanged"]
    assert not arm.bodies("PUT", "/workspaces/")
    env = arm.bodies("PUT", "/managedEnvironments/")[0]
    assert env["properties"]["appLogsConfiguration"]["logAnalyticsConfiguration"]["customerId"] == "cid-existing"


def test_probes_and_public_endpoint_rules_are_checked_in_code():
    """No Azure involved: limits Azure enforces server-side are checked before any request."""
    p = Params(storageAccountName="abc123", modelLoadSeconds=5000).validate()
    with pytest.raises(LorashipError, match="periodSeconds=500 is outside Azure's limit 1..240"):
        plan.container_app(p, "env", "k" * 32)
    p = Params(storageAccountName="abc123", defaultCommands=["tritonserver --model-repository=/mount/model_repository"])
    with pytest.raises(LorashipError, match="no API key"):
        plan.container_app(p, "env", "k" * 32)
    p = Params(storageAccountName="abc123", defaultCommands=["tritonserver --http-restricted-api=inference:x-api-key=" + "k" * 32])
    with pytest.raises(LorashipError, match="literally"):
        plan.container_app(p, "env", "k" * 32)
    with pytest.raises(LorashipError, match="gpuProfileType"):
        Params(storageAccountName="abc123", gpuProfileType="NC4-T4").validate()


def test_what_if_cli_prints_plan_for_shipped_parameters(cli, arm):
    """The fake stands in for Azure; `--what-if` with the shipped parameters prints the plan and writes nothing."""
    code, out, err = cli("azure", "provision", "--params", str(cli.params_path), "--subscription", "00000000-0000-0000-0000-00000000c0de", "-g", RG, "--what-if")
    assert code == 0, err
    assert "what-if: nothing was changed" in out
    for resource, name in [("storage account", "lorashiptest"), ("file share", "loraship"), ("Log Analytics workspace", "loraship-logs"),
                           ("Container Apps environment", "loraship-env"), ("environment storage", "loraship-files"), ("container app", "loraship-triton")]:
        assert re.search(rf"{resource}\s+│\s+{name}\s+│\s+create", out), resource
    assert "Consumption-GPU-NC8as-T4" in out and "tritonserver:24.12-py3" in out
    assert arm.writes() == []


def test_differences_ignore_server_side_fields_and_azure_spelling():
    """No Azure involved: the comparison tolerates what Azure adds or respells in its answers."""
    desired = {"location": "westus3", "properties": {"environmentId": "/subscriptions/S/resourceGroups/RG/x", "scale": {"maxReplicas": 2}, "gone": None}}
    existing = {"location": "West US 3", "id": "/x", "properties": {"environmentId": "/subscriptions/s/resourcegroups/rg/x", "scale": {"maxReplicas": 2, "cooldownPeriod": 300}, "provisioningState": "Succeeded"}}
    assert plan.differences(desired, existing) == []
    existing["properties"]["scale"]["maxReplicas"] = 3
    assert plan.differences(desired, existing) == ["properties.scale.maxReplicas"]


def test_scale_rule_limits_are_checked_before_any_request(arm, settings, params, tmp_path):
    """The fake stands in for Azure; replica counts and the HTTP threshold outside Azure's limits send nothing."""
    for field, value, message in [("maximumInstanceCount", 1001, "instance counts"), ("minimumInstanceCount", 3, "instance counts"),
                                  ("scaleConcurrentRequests", 0, "scaleConcurrentRequests 0 is invalid")]:
        bad = Params(**{**params.__dict__, field: value})
        with pytest.raises(LorashipError, match=message):
            provision(bad, settings, RG, config_path=tmp_path / "c.json")
    assert arm.requests == []
    with pytest.raises(LorashipError, match="at least 1"):
        plan.container_app(params, "env", "k" * 32, concurrent_requests=0)


def test_provision_keeps_the_threshold_deploy_set(arm, settings, params, tmp_path):
    """The fake stands in for Azure; the deployed model's capacity in the scale rule survives a later provision."""
    provision(params, settings, RG, config_path=tmp_path / "c.json")
    app = arm.get("/containerapps/loraship-triton")
    app["properties"]["template"]["scale"]["rules"][0]["http"]["metadata"]["concurrentRequests"] = "24"  # as deploy left it
    writes = len(arm.writes())
    again = provision(params, settings, RG, config_path=tmp_path / "c.json")
    assert {s.action for s in again.steps} == {"unchanged"} and len(arm.writes()) == writes
