"""The typed export manifest (``loraship.engine.manifest``): a read and a write change nothing but what
was changed, keys it does not know survive, and a bad file is refused in one line naming it."""

from __future__ import annotations

import json

import pytest

from loraship.engine.manifest import MANIFEST, Manifest, ManifestError

WRITTEN = {  # what an export made before `kv_cache` was recorded holds, plus a key from a later version
    "format": 1, "engine": "genai", "model_file": "model.onnx", "dtype": "fp16", "architecture": "phi3",
    "max_context": 4096, "eos_token_ids": [32000, 32007], "pad_token_id": 32000, "num_layers": 32, "kv_heads": 32,
    "head_dim": 96, "files": {"model.onnx": {"size": 10, "sha256": "ab" * 32}}, "later": {"kept": [1, 2]},
}


def test_a_manifest_reads_typed_and_writes_back_the_same_keys(tmp_path):
    (tmp_path / MANIFEST).write_text(json.dumps(WRITTEN))
    manifest = Manifest.read(tmp_path)
    assert (manifest.max_context, manifest.eos_ids, manifest.kv_cache, manifest.verify) == (4096, frozenset({32000, 32007}), None, None)
    assert manifest.shares_kv and manifest.model_name == "model.onnx" and manifest.extra == {"later": {"kept": [1, 2]}}
    manifest.replace(verify={"passed": True}).write(tmp_path)
    assert json.loads((tmp_path / MANIFEST).read_text()) == {**WRITTEN, "verify": {"passed": True}}
    assert (tmp_path / MANIFEST).read_text() == json.dumps({**WRITTEN, "verify": {"passed": True}}, indent=2, sort_keys=True) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [MANIFEST]  # the temporary file was renamed


def test_the_kv_strategy_is_recorded_or_follows_the_exporter():
    assert Manifest(engine="genai").shares_kv and not Manifest(engine="optimum").shares_kv
    assert not Manifest(engine="genai", kv_cache="grown").shares_kv  # the genai builder's CPU fp16 graph
    assert Manifest(engine="optimum", kv_cache="shared").shares_kv


@pytest.mark.parametrize("content,message", [
    (None, "export manifest not found: {folder} has no loraship.json"),
    ("{", "export manifest {folder}/loraship.json is not valid JSON (Expecting property name enclosed in double quotes)"),
    ("[1]", "export manifest {folder}/loraship.json is not a JSON object"),
    ('{"format": 2}', "{folder}/loraship.json has format 2, expected 1"),
    ('{"format": 1, "max_context": "long"}', "export manifest {folder}/loraship.json holds a value of the wrong type"),
])
def test_a_bad_manifest_is_refused_in_one_line(tmp_path, content, message):
    if content is not None:
        (tmp_path / MANIFEST).write_text(content)
    with pytest.raises(ManifestError) as refused:
        Manifest.read(tmp_path)
    assert str(refused.value).startswith(message.format(folder=tmp_path)) and "\n" not in str(refused.value)
