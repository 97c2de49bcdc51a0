"""`loraship ship --target azure` through the CLI: a real merge, export, verify and repo of the tiny demo pair,
then provision and deploy against loopback HTTPS fakes that stand in for Azure (ARM, Azure Files) and for the
app's public ingress in front of Triton, driven by the real Azure SDK clients."""

from __future__ import annotations

import json
import os

import pytest
from azure_fakes.arm import SUB
from azure_fakes.helpers import RG
from azure_fakes.triton import FakeTriton

KEY = "ship-test-key-0123456789abcdef"
MODEL = "tiny"


@pytest.fixture
def triton(ca):
    fake = FakeTriton(ca, MODEL, KEY)
    yield fake
    fake.close()


@pytest.fixture
def wheels(tmp_path):
    """Wheels as `loraship repo --stage-wheels` leaves them (staging itself is tested in tests/serving/test_wheels.py)."""
    folder = tmp_path / "staged-wheels"
    folder.mkdir()
    (folder / "start.sh").write_text("#!/bin/sh\nexec tritonserver \"$@\"\n")
    (folder / "tokenizers-0.20.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(os.urandom(2048))
    return folder


def ship_args(demo_pair, work, params_path, *extra: str) -> list[str]:
    base, adapter = demo_pair
    return ["ship", "--base", str(base), "--adapter", str(adapter), "--out", str(work), "--name", MODEL, "--target", "azure",
            "--params", str(params_path), "--subscription", SUB, "-g", RG, *extra]


def test_what_if_prints_the_plan_and_runs_nothing(cli, arm, demo_pair, tmp_path):
    """The fakes stand in for Azure; --what-if reads, never writes, and no local step runs."""
    code, out, err = cli(*ship_args(demo_pair, tmp_path / "work", cli.params_path, "--what-if"))
    assert code == 0, err
    assert "what-if: nothing was changed" in out and "container app" in out
    assert arm.writes() == [] and not (tmp_path / "work").exists()


def test_ship_azure_builds_provisions_deploys_and_prints_the_endpoint(cli, arm, files, triton, wheels, demo_pair, tmp_path):
    """The fakes stand in for Azure; the real loraship Client smoke-tests the fake ingress with the API key."""
    arm.app_fqdn = triton.fqdn
    work = tmp_path / "work"
    args = ship_args(demo_pair, work, cli.params_path, "--api-key", KEY, "--instances", "2", "--wheels", str(wheels))
    code, out, err = cli(*args)
    assert code == 0, err
    assert KEY not in out + err

    # the repository version (with its checksummed export) and the wheels are on the share, byte for byte
    share = files.files["loraship"]
    version = work / "repo" / MODEL / "1"
    for path in [p for p in version.rglob("*") if p.is_file()]:
        assert bytes(share[f"model_repository/{MODEL}/1/{path.relative_to(version).as_posix()}"].data) == path.read_bytes()
    assert "files" in json.loads(bytes(share[f"model_repository/{MODEL}/1/onnx/loraship.json"].data))
    config = bytes(share[f"model_repository/{MODEL}/config.pbtxt"].data).decode()
    assert config.encode() == (work / "repo" / MODEL / "config.pbtxt").read_bytes()
    assert "KIND_GPU" in config and 'string_value: "cuda"' in config and "count: 2" in config
    # fitted to the profile's GPU (a T4: 15 GiB): the builder's fp16 CUDA graph, CUDA graphs on, and a KV
    # budget per instance of the GPU's half (two instances) less the weights (+10%) and 1.5 GiB of headroom
    from loraship.triton_repo.config import read_config

    manifest = json.loads((work / "onnx" / "loraship.json").read_text())
    assert (manifest["engine"], manifest["dtype"], manifest["kv_cache"], manifest["kv_dtype"]) == (
        "genai", "fp16", "shared", "float16")
    weights = sum(e["size"] for name, e in manifest["files"].items() if name.startswith("model.onnx")) / 2**30
    served = {k: v.string_value for k, v in read_config(work / "repo" / MODEL / "config.pbtxt").parameters.items()}
    assert served["cuda_graph"] == "1" and served["max_batch"] == "8"
    assert float(served["kv_budget_gb"]) == round(15 / 2 - 1.1 * weights - 1.5, 2)
    staged = sorted(p for p in wheels.rglob("*") if p.is_file())  # every staged file, byte for byte
    assert sorted(k for k in share if k.startswith("wheels/")) == [f"wheels/{p.relative_to(wheels).as_posix()}" for p in staged]
    for path in staged:
        assert bytes(share[f"wheels/{path.relative_to(wheels).as_posix()}"].data) == path.read_bytes()

    # the app scales out past 2 instances x batch 8 requests per replica, between the parameters' counts
    body = arm.bodies("PUT", "/containerApps/")[-1]["properties"]
    assert body["template"]["scale"] == {"minReplicas": 1, "maxReplicas": 2, "rules": [
        {"name": "http-concurrency", "http": {"metadata": {"concurrentRequests": "16"}}}]}
    assert body["configuration"]["secrets"] == [{"name": "triton-api-key", "value": KEY}]
    generate = [r for r in triton.requests if r.path == f"/v2/models/{MODEL}/generate"]
    assert len(generate) == 1 and generate[0].headers["x-api-key"] == KEY

    endpoint = f"https://{triton.fqdn}"
    assert f"endpoint: {endpoint}" in out and f"curl -s {endpoint}/v2/models/{MODEL}/generate" in out
    assert "az containerapp secret show" in out and f"loraship generate --url {endpoint}" in out
    for step in ("merge", "export", "verify", "repo", "provision", "deploy"):
        assert f"│ {step}" in out, step
    assert "wheels" in out and str(wheels) in out

    # the same ship again: every step skipped, provisioning unchanged, no new revision
    puts = len(arm.bodies("PUT", "/containerApps/"))
    code, out, err = cli(*args)
    assert code == 0, err
    for step in ("merge", "export", "verify", "repo", "deploy"):
        assert f"│ {step}" in out and f"│ {step:<9} │ skipped" in out, step
    assert len(arm.bodies("PUT", "/containerApps/")) == puts and f"endpoint: {endpoint}" in out
