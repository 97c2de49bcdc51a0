"""`loraship azure`'s options resolved into a typed AzureTarget (pipeline/azure.py): the flags win, then the
environment, then the template's config file; a missing subscription or group is one line."""

from __future__ import annotations

import json

import pytest

from loraship.errors import LorashipError
from loraship.infra.params import PACKAGED_PARAMS, load_params
from loraship.pipeline.azure import AzureTarget, resolve_target


def test_flags_then_environment_then_config_file(tmp_path, monkeypatch):
    for name in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP", "LORASHIP_ARM_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "inference.config.json"
    config.write_text(json.dumps({"SUBSCRIPTION_ID": "sub-from-config", "RESOURCE_GROUP_NAME": "rg-from-config"}))
    target = resolve_target(None, config, None, None)
    assert isinstance(target, AzureTarget)
    assert (target.settings.subscription_id, target.resource_group, target.config_path) == ("sub-from-config", "rg-from-config", config)
    assert target.params == load_params(PACKAGED_PARAMS) and target.settings.arm_endpoint is None
    assert (target.api_key, target.what_if, target.create_resource_group, target.wheels) == (None, False, False, None)
    monkeypatch.setenv("AZURE_SUBSCRIPTION_ID", "sub-from-env")
    monkeypatch.setenv("AZURE_RESOURCE_GROUP", "rg-from-env")
    target = resolve_target(None, config, None, None)
    assert (target.settings.subscription_id, target.resource_group) == ("sub-from-env", "rg-from-env")
    target = resolve_target(PACKAGED_PARAMS, config, "sub-flag", "rg-flag")
    assert (target.settings.subscription_id, target.resource_group) == ("sub-flag", "rg-flag")


def test_a_missing_subscription_or_group_names_the_flag(tmp_path, monkeypatch):
    for name in ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP"):
        monkeypatch.delenv(name, raising=False)
    missing = tmp_path / "none.json"
    with pytest.raises(LorashipError, match=r"^no Azure subscription given \(pass --subscription ID or set AZURE_SUBSCRIPTION_ID\)$"):
        resolve_target(None, missing, None, "rg")
    with pytest.raises(LorashipError, match=r"^no resource group given \(pass --resource-group NAME or set AZURE_RESOURCE_GROUP\)$"):
        resolve_target(None, missing, "sub", None)
