"""deploy, status and destroy through the CLI; loopback HTTPS fakes stand in for Azure (ARM, Azure Files)
and for the app's public ingress in front of Triton."""

from __future__ import annotations

import json

import pytest
from azure_fakes.arm import SUB
from azure_fakes.helpers import RG, make_repo
from azure_fakes.triton import FakeTriton

KEY = "deploy-test-key-0123456789abcdef"


@pytest.fixture
def triton(ca):
    fake = FakeTriton(ca, "tiny", KEY)
    yield fake
    fake.close()


def test_deploy_uploads_rolls_revision_waits_and_smoke_tests(cli, arm, files, triton, tmp_path):
    """The fakes stand in for Azure; the real loraship Client calls the fake ingress with the API key."""
    arm.app_fqdn = triton.fqdn
    code, out, err = cli("azure", "provision", "--params", str(cli.params_path), "--subscription", SUB, "-g", RG, "--api-key", KEY)
    assert code == 0, err
    assert KEY not in out + err
    repo = make_repo(tmp_path / "work", size=5000)

    code, out, err = cli("azure", "deploy", "--repo", str(repo), "--params", str(cli.params_path))
    assert code == 0, err
    # the repository and wheels are on the share
    share = files.files["loraship"]
    assert bytes(share["model_repository/tiny/1/onnx/model.onnx"].data) == (repo / "tiny/1/onnx/model.onnx").read_bytes()
    assert "wheels/start.sh" in share
    # a new revision with a fresh suffix and the upload's digest as stamp, key still from the secret
    body = arm.bodies("PUT", "/containerApps/")[-1]["properties"]
    template = body["template"]
    assert template["revisionSuffix"].startswith("d")
    stamp = [e for e in template["containers"][0]["env"] if e["name"] == "LORASHIP_DEPLOY_STAMP"]
    assert len(stamp) == 1 and len(stamp[0]["value"]) == 16
    assert body["configuration"]["secrets"] == [{"name": "triton-api-key", "value": KEY}]
    app = arm.get(f"/containerapps/{'loraship-triton'}")
    assert app["properties"]["latestReadyRevisionName"] == f"loraship-triton--{template['revisionSuffix']}"
    # readiness was polled, then one generate on /v2 carried the key, and one chat on /v1 carried it as a Bearer token
    paths = [(r.method, r.path) for r in triton.requests]
    assert ("GET", "/v2/health/ready") in paths and ("POST", "/v2/models/tiny/generate") in paths
    generate = [r for r in triton.requests if r.path.endswith("/generate")][0]
    assert generate.headers["x-api-key"] == KEY and json.loads(generate.body)["text_input"] == "Hello"
    [chat] = [r for r in triton.requests if r.path == "/v1/chat/completions"]
    assert chat.headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(chat.body) == {"model": "tiny", "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": "Hello"}]}
    assert "smoke generate (/v2): 'echo Hello'" in out and "smoke /v1/chat/completions: 'echo Hello'" in out
    endpoint = f"https://{triton.fqdn}"
    assert endpoint in out and "curl" in out and "tritonclient" in out and f"loraship ui --url {endpoint}" in out
    assert f"openai.OpenAI(base_url='{endpoint}/v1'" in out and f"{endpoint}/v1/chat/completions" in out
    assert KEY not in out + err
    config = json.loads((tmp_path / "infra" / "inference.config.json").read_text())
    assert config["ACA_APP_ENDPOINT"] == endpoint

    # provisioning again keeps the deployed revision (no PUT, no restart)
    writes = len(arm.writes())
    code, out, err = cli("azure", "provision", "--params", str(cli.params_path))
    assert code == 0, err
    assert [(r.method, r.path) for r in arm.writes()[writes:]] == []  # provisioning again makes no writes

    code, out, err = cli("azure", "status", "--params", str(cli.params_path))
    assert code == 0, err
    assert "1/1 replicas running" in out and f"https://{triton.fqdn}" in out
    assert template["revisionSuffix"] in out


def test_deploy_wrong_key_and_missing_app_are_one_line_errors(cli, arm, triton, tmp_path):
    """The fakes stand in for Azure; the ingress refuses a key that is not Triton's."""
    repo = make_repo(tmp_path / "work", size=1000)
    code, out, err = cli("azure", "deploy", "--repo", str(repo), "--params", str(cli.params_path), "--subscription", SUB, "-g", RG)
    assert code == 1 and "container app loraship-triton does not exist" in err and "loraship azure provision" in err
    arm.app_fqdn = triton.fqdn
    triton.api_key = "another-key-the-server-expects"
    assert cli("azure", "provision", "--params", str(cli.params_path), "--subscription", SUB, "-g", RG, "--api-key", KEY)[0] == 0
    code, out, err = cli("azure", "deploy", "--repo", str(repo), "--params", str(cli.params_path))
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "refused the API key" in err


def test_deploy_smoke_tests_completions_for_a_model_without_chat_template(cli, arm, triton, tmp_path):
    """The fakes stand in for Azure; a model without a chat template is smoke-tested on /v1/completions."""
    arm.app_fqdn = triton.fqdn
    assert cli("azure", "provision", "--params", str(cli.params_path), "--subscription", SUB, "-g", RG, "--api-key", KEY)[0] == 0
    code, out, err = cli("azure", "deploy", "--repo", str(make_repo(tmp_path / "work", size=1000, chat=False)), "--params", str(cli.params_path))
    assert code == 0, err
    [completion] = [r for r in triton.requests if r.path.startswith("/v1/")]
    assert completion.path == "/v1/completions" and json.loads(completion.body)["prompt"] == "Hello"
    assert "smoke /v1/completions: 'echo Hello'" in out


def test_destroy_deletes_only_what_loraship_created(cli, arm, settings, params):
    """The fake stands in for Azure; an untagged workspace the user owned is kept."""
    ws_id = f"/subscriptions/{SUB}/resourcegroups/{RG}/providers/microsoft.operationalinsights/workspaces/{params.acaLogAnalyticsName}".lower()
    arm.resources[ws_id] = {"id": ws_id, "name": params.acaLogAnalyticsName, "location": "westus3", "tags": {"owner": "me"}, "properties": {"customerId": "c"}}
    assert cli("azure", "provision", "--params", str(cli.params_path), "--subscription", SUB, "-g", RG)[0] == 0
    code, out, err = cli("azure", "destroy", "--params", str(cli.params_path))
    assert code == 1 and "--yes" in err
    assert not [r for r in arm.requests if r.method == "DELETE"]
    code, out, err = cli("azure", "destroy", "--params", str(cli.params_path), "--yes")
    assert code == 0, err
    deleted = [r.path.rsplit("/", 2)[-2] for r in arm.requests if r.method == "DELETE"]
    assert deleted == ["containerApps", "managedEnvironments", "storageAccounts"]
    assert ws_id in arm.resources
    assert "kept     Log Analytics workspace" in out
    code, out, err = cli("azure", "status", "--params", str(cli.params_path))
    assert code == 0 and out.count("absent") == 3
