"""The AI-Toolkit-compatible parameter file (inference.parameters.json) and config file (inference.config.json)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from loraship_contract import API_KEY_HEADER

from loraship.errors import LorashipError
from loraship.fsutil import write_json_atomic
from loraship.triton_repo.wheels import DEFAULT_IMAGE_TAG

PACKAGED_PARAMS = Path(__file__).parent / "provision" / "inference.parameters.json"
DEFAULT_PARAMS = Path("infra/provision/inference.parameters.json")
DEFAULT_CONFIG = Path("infra/inference.config.json")
SERVERLESS_GPU = ("Consumption-GPU-NC8as-T4", "Consumption-GPU-NC24-A100")
DEDICATED_GPU = ("NC24-A100", "NC48-A100", "NC96-A100")
CONFIG_KEYS = ("SUBSCRIPTION_ID", "RESOURCE_GROUP_NAME", "STORAGE_ACCOUNT_NAME", "FILE_SHARE_NAME", "ACA_APP_NAME", "ACA_APP_ENDPOINT")


MAX_REPLICAS = 1000  # Azure Container Apps' limit on minReplicas and maxReplicas


def check_scale(minimum: int, maximum: int, concurrent_requests: int) -> None:
    """Refuse replica counts and an HTTP scale threshold outside Azure's limits, before any request is sent."""
    if not (1 <= maximum <= MAX_REPLICAS) or not (0 <= minimum <= maximum):
        raise LorashipError(
            f"instance counts min={minimum} max={maximum} are invalid",
            f"set 0 <= minimumInstanceCount <= maximumInstanceCount <= {MAX_REPLICAS} and maximumInstanceCount >= 1",
        )
    if isinstance(concurrent_requests, bool) or not isinstance(concurrent_requests, int) or concurrent_requests < 1:
        raise LorashipError(f"scaleConcurrentRequests {concurrent_requests!r} is invalid",
                            "set a whole number of at least 1 (Azure's minimum): the requests one replica serves at once")


@dataclass
class Params:
    """Every parameter of inference.bicep; the first nine are the template's names."""

    defaultCommands: list[str] = field(default_factory=list)  # empty: loraship builds the Triton command
    maximumInstanceCount: int = 1
    location: str = "westus3"
    storageAccountName: str = ""
    fileShareName: str = "loraship"
    acaEnvironmentName: str = "loraship-env"
    acaEnvironmentStorageName: str = "loraship-files"
    acaAppName: str = "loraship-triton"
    acaLogAnalyticsName: str = "loraship-logs"
    # loraship's additions
    gpuProfileType: str = "Consumption-GPU-NC8as-T4"
    gpuProfileMinimumCount: int = 0  # dedicated profiles only
    minimumInstanceCount: int = 1
    # HTTP requests in flight per replica before ACA starts another: a fresh app's value; `deploy` sets
    # the deployed model's capacity (instances x in-flight batch), which provisioning then keeps.
    scaleConcurrentRequests: int = 8
    tritonImageTag: str = DEFAULT_IMAGE_TAG  # CUDA 12.6, Python 3.12: the staged wheels follow it (`repo --stage-wheels --image-tag`)
    apiKeyHeader: str = API_KEY_HEADER
    apiKeySecretName: str = "triton-api-key"
    httpPort: int = 8000  # Triton's HTTP API, on the replica's loopback behind the frontend
    frontendPort: int = 8080  # the public ingress port: OpenAI API (/v1) and Triton's HTTP API (/v2), one key
    grpcPort: int = 8001
    metricsPort: int = 8002
    mountPath: str = "/mount"
    modelRepositoryDir: str = "model_repository"
    wheelsDir: str = "wheels"
    modelLoadSeconds: int = 600

    @property
    def dedicated(self) -> bool:
        return self.gpuProfileType in DEDICATED_GPU

    def validate(self) -> "Params":
        """Refuse values Azure would reject later, naming the parameter."""
        if not self.storageAccountName or not (3 <= len(self.storageAccountName) <= 24) or not (
            self.storageAccountName.isalnum() and self.storageAccountName.islower()
        ):
            raise LorashipError(
                f"storageAccountName {self.storageAccountName!r} is invalid",
                "set 3-24 lowercase letters and digits in the parameters file (the name is global)",
            )
        if self.gpuProfileType not in SERVERLESS_GPU + DEDICATED_GPU:
            raise LorashipError(
                f"gpuProfileType {self.gpuProfileType!r} is not a Container Apps GPU profile",
                f"use one of {', '.join(SERVERLESS_GPU + DEDICATED_GPU)}",
            )
        check_scale(self.minimumInstanceCount, self.maximumInstanceCount, self.scaleConcurrentRequests)
        if len({self.httpPort, self.grpcPort, self.metricsPort, self.frontendPort}) != 4:
            raise LorashipError("httpPort, grpcPort, metricsPort and frontendPort must differ", "set four distinct ports")
        if not self.apiKeyHeader.replace("-", "").isalnum():
            raise LorashipError(f"apiKeyHeader {self.apiKeyHeader!r} is not a header name", "use letters, digits and '-'")
        return self


def load_params(path: Path) -> Params:
    """Read an ARM parameter file (``{"parameters": {name: {"value": v}}}``)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise LorashipError(f"parameters file {path} not found", "pass --params FILE or run from your project root") from None
    except json.JSONDecodeError as exc:
        raise LorashipError(f"parameters file {path} is not valid JSON: {exc}", "fix the JSON syntax") from None
    known = {f.name for f in fields(Params)}
    values: dict[str, Any] = {}
    for name, entry in (doc.get("parameters") or {}).items():
        if name not in known:
            raise LorashipError(f"unknown parameter {name!r} in {path}", f"known parameters: {', '.join(sorted(known))}")
        if not isinstance(entry, dict) or "value" not in entry:
            raise LorashipError(f"parameter {name!r} in {path} has no value", 'write it as {"value": ...}')
        values[name] = entry["value"]
    try:
        return Params(**values).validate()
    except TypeError as exc:
        raise LorashipError(f"bad parameter in {path}: {exc}", "compare with the shipped inference.parameters.json") from None


def default_params_path() -> Path:
    """The project's parameters file if present, else the one shipped with loraship."""
    return DEFAULT_PARAMS if DEFAULT_PARAMS.exists() else PACKAGED_PARAMS


def read_config(path: Path) -> dict[str, str]:
    """The template's output file, or {} if it does not exist yet."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


def write_config(path: Path, subscription_id: str, resource_group: str, params: Params, endpoint: str) -> dict[str, str]:
    """Write inference.config.json atomically with the template's keys (no secrets)."""
    config = dict(
        zip(
            CONFIG_KEYS,
            (subscription_id, resource_group, params.storageAccountName, params.fileShareName, params.acaAppName, endpoint),
        )
    )
    write_json_atomic(Path(path), config)
    return config
