"""Desired Azure resource bodies, built from the SDK models (``as_dict()`` is the wire body)."""

from __future__ import annotations

from typing import Any

from loraship_contract import API_KEY_ENV, RESTRICTED_APIS

from loraship.errors import LorashipError
from loraship.infra.params import Params, check_scale

TAGS = {"managed-by": "loraship"}
GPU_PROFILE_NAME = "GPU"
STAMP_ENV = "LORASHIP_DEPLOY_STAMP"
# vCPU and memory a replica gets on each GPU profile (the profile, not the container, carries the GPU)
PROFILE_RESOURCES = {
    "Consumption-GPU-NC8as-T4": (8.0, "56Gi"),
    "Consumption-GPU-NC24-A100": (24.0, "220Gi"),
    "NC24-A100": (24.0, "220Gi"),
    "NC48-A100": (48.0, "440Gi"),
    "NC96-A100": (96.0, "880Gi"),
}
# memory of each GPU a replica of the profile gets, as the device reports it (T4: 15360 MiB; A100: 80 GB each)
PROFILE_GPU_GIB = {
    "Consumption-GPU-NC8as-T4": 15.0,
    "Consumption-GPU-NC24-A100": 80.0,
    "NC24-A100": 80.0,
    "NC48-A100": 80.0,
    "NC96-A100": 80.0,
}
# Azure's probe limits (enforced by the service, not the SDK)
PROBE_LIMITS = {
    "failureThreshold": (1, 10),
    "successThreshold": (1, 10),
    "initialDelaySeconds": (0, 60),
    "periodSeconds": (1, 240),
    "timeoutSeconds": (1, 240),
}
STARTUP_FAILURES = 10
SCALE_RULE = "http-concurrency"


def storage_account(p: Params) -> Any:
    from azure.mgmt.storage import models as sm

    return sm.StorageAccountCreateParameters(
        sku=sm.Sku(name="Standard_LRS"),
        kind="StorageV2",
        location=p.location,
        tags=TAGS,
        properties=sm.StorageAccountPropertiesCreateParameters(
            large_file_shares_state="Enabled",
            minimum_tls_version="TLS1_2",
            allow_blob_public_access=False,
            enable_https_traffic_only=True,
        ),
    )


def file_service() -> Any:
    from azure.mgmt.storage import models as sm

    return sm.FileServiceProperties(
        file_service_properties=sm.FileServicePropertiesProperties(
            share_delete_retention_policy=sm.DeleteRetentionPolicy(enabled=True, days=7)
        )
    )


def file_share() -> Any:
    from azure.mgmt.storage import models as sm

    return sm.FileShare(file_share_properties=sm.FileShareProperties(share_quota=1024, enabled_protocols="SMB"))


def workspace(p: Params) -> Any:
    from azure.mgmt.loganalytics import models as lm

    return lm.Workspace(
        location=p.location,
        tags=TAGS,
        properties=lm.WorkspaceProperties(sku=lm.WorkspaceSku(name="PerGB2018"), retention_in_days=30),
    )


def gpu_profile(p: Params) -> Any:
    from azure.mgmt.appcontainers import models as am

    if p.dedicated:
        return am.WorkloadProfile(
            name=GPU_PROFILE_NAME,
            workload_profile_type=p.gpuProfileType,
            minimum_count=p.gpuProfileMinimumCount,
            maximum_count=p.maximumInstanceCount,
        )
    return am.WorkloadProfile(name=GPU_PROFILE_NAME, workload_profile_type=p.gpuProfileType)


def managed_environment(p: Params, customer_id: str, shared_key: str | None, extra_profiles: list[Any] = ()) -> Any:
    """The environment: Consumption plus the GPU profile, logs to the workspace."""
    from azure.mgmt.appcontainers import models as am

    profiles = [am.WorkloadProfile(name="Consumption", workload_profile_type="Consumption"), *extra_profiles, gpu_profile(p)]
    return am.ManagedEnvironment(
        location=p.location,
        tags=TAGS,
        properties=am.ManagedEnvironmentProperties(
            app_logs_configuration=am.AppLogsConfiguration(
                destination="log-analytics",
                log_analytics_configuration=am.LogAnalyticsConfiguration(customer_id=customer_id, shared_key=shared_key),
            ),
            workload_profiles=profiles,
        ),
    )


def environment_storage(p: Params, account_key: str | None) -> Any:
    """The AzureFile link; the account key goes to Azure in this body and nowhere else."""
    from azure.mgmt.appcontainers import models as am

    return am.ManagedEnvironmentStorage(
        properties=am.ManagedEnvironmentStorageProperties(
            azure_file=am.AzureFileProperties(
                account_name=p.storageAccountName,
                account_key=account_key,
                share_name=p.fileShareName,
                access_mode="ReadOnly",
            )
        )
    )


def restricted(p: Params) -> str:
    """Triton's restricted-API value (all but health); the key is expanded from the secret-backed env var at start."""
    return f"{RESTRICTED_APIS}:{p.apiKeyHeader}=${{{API_KEY_ENV}}}"


def commands(p: Params) -> list[str]:
    """``defaultCommands``, or loraship's: the staged wheels' start.sh (offline pip install, then
    tritonserver with the key from $LORASHIP_API_KEY behind the OpenAI frontend on ``frontendPort``)
    when uploaded, else tritonserver directly, its HTTP API on ``frontendPort`` (no /v1 then)."""
    if p.defaultCommands:
        return list(p.defaultCommands)
    wheels = f"{p.mountPath}/{p.wheelsDir}"

    def args(http_port: int) -> str:
        return (f"--model-repository={p.mountPath}/{p.modelRepositoryDir} --model-control-mode=none"
                f" --http-port={http_port} --grpc-port={p.grpcPort} --metrics-port={p.metricsPort}")

    return [
        "set -e",
        f'test -n "${API_KEY_ENV}"',
        f"if [ -f {wheels}/start.sh ]; then exec sh {wheels}/start.sh --frontend-port={p.frontendPort} {args(p.httpPort)}; fi",
        f"exec tritonserver {args(p.frontendPort)} --http-restricted-api={restricted(p)} --grpc-restricted-protocol={restricted(p)}",
    ]


def check_probe(probe: Any) -> Any:
    """Raise if a probe is outside Azure's limits; return it unchanged."""
    body = probe.as_dict()
    for attr, (low, high) in PROBE_LIMITS.items():
        value = body.get(attr)
        if value is not None and not low <= value <= high:
            raise LorashipError(
                f"{body['type']} probe {attr}={value} is outside Azure's limit {low}..{high}",
                "lower modelLoadSeconds (the startup probe allows 240 s x 10) or fix the probe",
            )
    return probe


def probes(p: Params) -> list[Any]:
    """Startup probe sized for model load, then liveness and readiness on Triton's health endpoints,
    asked through the public port (the frontend), so a dead frontend fails them too."""
    from azure.mgmt.appcontainers import models as am

    def probe(kind: str, path: str, **timing: int) -> Any:
        return check_probe(
            am.ContainerAppProbe(type=kind, http_get=am.ContainerAppProbeHttpGet(path=path, port=p.frontendPort, scheme="HTTP"), **timing)
        )

    startup_period = -(-p.modelLoadSeconds // STARTUP_FAILURES)
    return [
        probe("Startup", "/v2/health/ready", initial_delay_seconds=10, period_seconds=startup_period, timeout_seconds=5, failure_threshold=STARTUP_FAILURES),
        probe("Liveness", "/v2/health/live", period_seconds=10, timeout_seconds=5, failure_threshold=3),
        probe("Readiness", "/v2/health/ready", period_seconds=10, timeout_seconds=5, failure_threshold=3),
    ]


def scale(p: Params, concurrent_requests: int | None = None) -> Any:
    """minimumInstanceCount..maximumInstanceCount replicas, one more each time the HTTP requests in flight per
    replica pass ``concurrent_requests`` (the model's instances x in-flight batch; default scaleConcurrentRequests)."""
    from azure.mgmt.appcontainers import models as am

    threshold = p.scaleConcurrentRequests if concurrent_requests is None else concurrent_requests
    check_scale(p.minimumInstanceCount, p.maximumInstanceCount, threshold)
    rule = am.ScaleRule(name=SCALE_RULE, http=am.HttpScaleRule(metadata={"concurrentRequests": str(threshold)}))
    return am.Scale(min_replicas=p.minimumInstanceCount, max_replicas=p.maximumInstanceCount, rules=[rule])


def concurrent_requests(app: Any) -> int | None:
    """The threshold of an existing app's HTTP scale rule, if it has loraship's."""
    for rule in (app.properties.template.scale.rules or []) if app.properties.template.scale else []:
        if rule.name == SCALE_RULE and rule.http and (rule.http.metadata or {}).get("concurrentRequests", "").isdigit():
            return int(rule.http.metadata["concurrentRequests"])
    return None


def container_app(
    p: Params, environment_id: str, api_key: str, profile_name: str = GPU_PROFILE_NAME, stamp: str | None = None,
    revision_suffix: str | None = None, concurrent_requests: int | None = None,
) -> Any:
    """The Triton app: NGC image, share mounted, restricted API key from an ACA secret, probes, ports, scale.
    The public ingress targets the frontend (OpenAI /v1 and Triton /v2); gRPC stays internal."""
    from azure.mgmt.appcontainers import models as am

    script = "; ".join(commands(p))
    if api_key and api_key in script:
        raise LorashipError("the API key appears literally in defaultCommands", f"reference it as ${{{API_KEY_ENV}}} instead")
    if "restricted" not in script:
        raise LorashipError(
            "defaultCommands start Triton without --http-restricted-api, so the public endpoint would have no API key",
            f"add --http-restricted-api={restricted(p)} or leave defaultCommands empty",
        )
    cpu, memory = PROFILE_RESOURCES[p.gpuProfileType]
    env = [am.EnvironmentVar(name=API_KEY_ENV, secret_ref=p.apiKeySecretName)]
    if stamp:
        env.append(am.EnvironmentVar(name=STAMP_ENV, value=stamp))
    return am.ContainerApp(
        location=p.location,
        tags=TAGS,
        properties=am.ContainerAppProperties(
            environment_id=environment_id,
            workload_profile_name=profile_name,
            configuration=am.Configuration(
                active_revisions_mode="Single",
                secrets=[am.Secret(name=p.apiKeySecretName, value=api_key)],
                ingress=am.Ingress(
                    external=True,
                    target_port=p.frontendPort,
                    transport="Auto",
                    allow_insecure=False,
                    traffic=[am.TrafficWeight(latest_revision=True, weight=100)],
                    additional_port_mappings=[am.IngressPortMapping(external=False, target_port=p.grpcPort, exposed_port=p.grpcPort)],
                ),
            ),
            template=am.Template(
                revision_suffix=revision_suffix,
                containers=[
                    am.Container(
                        name="triton",
                        image=f"nvcr.io/nvidia/tritonserver:{p.tritonImageTag}-py3",
                        command=["/bin/bash", "-c", script],
                        env=env,
                        resources=am.ContainerResources(cpu=cpu, memory=memory),
                        probes=probes(p),
                        volume_mounts=[am.VolumeMount(volume_name="models", mount_path=p.mountPath)],
                    )
                ],
                volumes=[am.Volume(name="models", storage_type="AzureFile", storage_name=p.acaEnvironmentStorageName)],
                scale=scale(p, concurrent_requests),
            ),
        ),
    )


def differences(desired: Any, existing: Any, path: str = "") -> list[str]:
    """Paths where ``desired`` is not contained in ``existing`` (extra server-side fields are ignored)."""
    if isinstance(desired, dict):
        if not isinstance(existing, dict):
            return [path or "."]
        out: list[str] = []
        for key, value in desired.items():
            if value is None:
                continue
            out += differences(value, existing.get(key), f"{path}.{key}" if path else key)
        return out
    if isinstance(desired, list):
        if not isinstance(existing, list) or len(existing) != len(desired):
            return [path]
        return [d for i, (a, b) in enumerate(zip(desired, existing)) for d in differences(a, b, f"{path}[{i}]")]
    if isinstance(desired, str) and isinstance(existing, str) and (path.endswith("location") or path.endswith("Id")):
        # Azure answers "West US 3" for "westus3" and may change the case of resource ids
        return [] if desired.replace(" ", "").lower() == existing.replace(" ", "").lower() else [path]
    return [] if desired == existing else [path]
