"""inference.bicep (for people who provision by hand) declares what the SDK plan sends.

No Azure involved: pycep-parser parses the Bicep file, a small evaluator resolves its
parameters (from the shipped inference.parameters.json), variables, interpolation and
the few functions it uses, and the result is compared with the SDK plan's wire bodies.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
from pycep import BicepParser

from loraship.infra import plan
from loraship.infra.params import PACKAGED_PARAMS, Params, load_params

BICEP = PACKAGED_PARAMS.parent / "inference.bicep"
UNRESOLVED = object()  # references to other resources' runtime properties


class Evaluator:
    def __init__(self, doc: dict, params: Params, api_key: str) -> None:
        self.doc = doc
        self.values = {**dataclasses.asdict(params), "apiKey": api_key}
        self.vars = doc["variables"]

    def name(self, ident: str):
        if ident in self.values:
            return self.values[ident]
        if ident in self.vars:
            return self(self.vars[ident]["value"])
        return UNRESOLVED if ident in self.doc["resources"] else None

    def string(self, text: str):
        known = self.name(text)
        if known is not None and known is not UNRESOLVED:
            return known
        if known is UNRESOLVED:
            return UNRESOLVED

        def sub(m: re.Match) -> str:
            value = self.name(m[2]) if not m[1] else None
            return m[0][1:] if m[1] else str(value) if value is not None else m[0]

        return re.sub(r"(\\?)\$\{([A-Za-z_]\w*)\}", sub, text)

    def __call__(self, node):
        if isinstance(node, str):
            return self.string(node)
        if isinstance(node, list):
            return [self(n) for n in node]
        if not isinstance(node, dict):
            return node
        if "operator" in node:
            op, a = node["operator"]["type"], node["operator"]["operands"]
            if op == "property_accessor":
                return UNRESOLVED
            if op == "index_accessor":
                return self(a["operand_1"])[self(a["operand_2"])]
            if op == "add":
                return self(a["operand_1"]) + self(a["operand_2"])
            if op == "divide":
                return self(a["operand_1"]) // self(a["operand_2"])
            if op == "not":
                return not self(a["bool_value"])
            if op == "conditional":
                return self(a["true_value"] if self(a["condition"]) else a["false_value"])
            raise AssertionError(f"evaluator lacks operator {op}")
        if "function" in node:
            fn, a = node["function"]["type"], node["function"]["parameters"]
            if fn == "join":
                return self(a["delimiter"]).join(self(a["input_array"]))
            if fn == "empty":
                return not self(a["item_to_test"])
            if fn == "starts_with":
                return self(a["string_to_search"]).startswith(self(a["string_to_find"]))
            if fn == "json":
                return json.loads(a["arg_1"])
            if fn == "string":
                return str(self(a["value_to_convert"]))
            return UNRESOLVED  # listKeys(), resourceGroup()...
        return {k.strip("'"): self(v) for k, v in node.items()}


def _strip(value):
    """Drop what only exists at deployment time (other resources' ids and keys)."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if v is not UNRESOLVED}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


@pytest.fixture(scope="module")
def doc():
    return BicepParser().parse(file_path=BICEP)


@pytest.mark.parametrize("profile", ["Consumption-GPU-NC8as-T4", "Consumption-GPU-NC24-A100", "NC24-A100"])
def test_bicep_matches_sdk_plan(doc, profile):
    """No Azure involved: the Bicep resources evaluate to the SDK plan's bodies."""
    params = load_params(PACKAGED_PARAMS)
    params.gpuProfileType = profile
    key = "k" * 32
    ev = Evaluator(doc, params, key)
    resources = doc["resources"]
    assert {r["type"] for r in resources.values()} == {
        "Microsoft.Storage/storageAccounts", "Microsoft.Storage/storageAccounts/fileServices",
        "Microsoft.Storage/storageAccounts/fileServices/shares", "Microsoft.OperationalInsights/workspaces",
        "Microsoft.App/managedEnvironments", "Microsoft.App/managedEnvironments/storages", "Microsoft.App/containerApps",
    }

    def body(name: str) -> dict:
        return _strip(ev(resources[name]["config"]))

    want_app = plan.container_app(params, "ENV", key).as_dict()
    got_app = body("app")
    assert got_app["properties"]["configuration"] == want_app["properties"]["configuration"]
    want_template = want_app["properties"]["template"]
    got_template = got_app["properties"]["template"]
    assert got_template["containers"] == want_template["containers"]  # image, command, env, resources, probes, mount
    assert got_template["scale"] == want_template["scale"]
    assert [{**v, "storageName": params.acaEnvironmentStorageName} for v in got_template["volumes"]] == want_template["volumes"]
    assert got_app["properties"]["workloadProfileName"] == want_app["properties"]["workloadProfileName"]
    assert got_app["tags"] == plan.TAGS

    env = body("environment")["properties"]
    assert env["workloadProfiles"] == plan.managed_environment(params, "c", "k").as_dict()["properties"]["workloadProfiles"]
    link = body("environmentStorage")["properties"]["azureFile"]
    assert link == {"accessMode": "ReadOnly"}  # account, key and share are references resolved at deployment
    account = body("storageAccount")
    want_account = plan.storage_account(params).as_dict()
    assert {k: account[k] for k in ("sku", "kind", "properties", "tags")} == {k: want_account[k] for k in ("sku", "kind", "properties", "tags")}
    assert body("fileShare")["properties"] == plan.file_share().as_dict()["properties"]
    assert body("fileService")["properties"] == plan.file_service().as_dict()["properties"]
    assert body("logAnalytics")["properties"] == plan.workspace(params).as_dict()["properties"]


def test_bicep_parameters_and_outputs_match_the_files(doc):
    """No Azure involved: every parameter in the shipped file is declared, plus the secure apiKey; outputs are the config keys."""
    shipped = json.loads(PACKAGED_PARAMS.read_text())["parameters"]
    declared = set(doc["parameters"])
    assert set(shipped) | {"apiKey"} == declared == {f.name for f in dataclasses.fields(Params)} | {"apiKey"}
    assert {"defaultCommands", "maximumInstanceCount", "location", "storageAccountName", "fileShareName", "acaEnvironmentName",
            "acaEnvironmentStorageName", "acaAppName", "acaLogAnalyticsName"} <= set(shipped)
    assert "apiKey" not in shipped  # the key is never written to disk
    assert any(d["type"] == "secure" for d in doc["parameters"]["apiKey"]["decorators"])
    assert list(doc["outputs"]) == ["SUBSCRIPTION_ID", "RESOURCE_GROUP_NAME", "STORAGE_ACCOUNT_NAME", "FILE_SHARE_NAME", "ACA_APP_NAME", "ACA_APP_ENDPOINT"]


def test_bicep_scale_limits_are_azures(doc):
    """No Azure involved: the Bicep file bounds the replica counts and the HTTP scale threshold as check_scale does."""
    from loraship.infra.params import MAX_REPLICAS

    def bounds(name: str) -> tuple:
        decorators = {d["type"]: d["argument"] for d in doc["parameters"][name]["decorators"] if d["type"] in ("min_value", "max_value")}
        return decorators.get("min_value"), decorators.get("max_value")

    assert bounds("minimumInstanceCount") == (0, MAX_REPLICAS)
    assert bounds("maximumInstanceCount") == (1, MAX_REPLICAS)
    assert bounds("scaleConcurrentRequests") == (1, None)
