"""Bad input to `loraship merge` and `loraship export`: one `Error:` line, exit 1, nothing half-written."""

from __future__ import annotations

import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from loraship.export.demo_model import demo_model


@pytest.fixture(scope="module")
def demos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("errors")
    return {arch: demo_model(root / arch, arch=arch, size="tiny", seed=7, random=True) for arch in ("phi3", "llama")}


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("\u2713")]  # minus progress
    assert code == 1, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("Error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def _adapter_copy(demo: Path, tmp_path: Path) -> Path:
    adapter = tmp_path / "adapter"
    shutil.copytree(demo / "adapter", adapter)
    return adapter


def _merge(base: Path, adapter: Path, out: Path) -> list[str]:
    return ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)]


def test_missing_adapter_config(demos, tmp_path, run_cli):
    adapter = _adapter_copy(demos["phi3"], tmp_path)
    (adapter / "adapter_config.json").unlink()
    code, _, err = run_cli(_merge(demos["phi3"] / "base", adapter, tmp_path / "out"))
    assert_one_line_error(code, err, "adapter config not found", "save_pretrained")
    assert_nothing_written(tmp_path / "out")


def test_corrupt_adapter_config(demos, tmp_path, run_cli):
    adapter = _adapter_copy(demos["phi3"], tmp_path)
    (adapter / "adapter_config.json").write_text('{"r": 8, "target_modules": [')
    code, _, err = run_cli(_merge(demos["phi3"] / "base", adapter, tmp_path / "out"))
    assert_one_line_error(code, err, "is not valid JSON")
    assert_nothing_written(tmp_path / "out")


def test_corrupt_adapter_safetensors(demos, tmp_path, run_cli):
    adapter = _adapter_copy(demos["phi3"], tmp_path)
    data = (adapter / "adapter_model.safetensors").read_bytes()
    (adapter / "adapter_model.safetensors").write_bytes(data[: len(data) // 3])  # truncated download
    code, _, err = run_cli(_merge(demos["phi3"] / "base", adapter, tmp_path / "out"))
    assert_one_line_error(code, err, "not a readable safetensors file")
    assert_nothing_written(tmp_path / "out")


def test_missing_adapter_weights(demos, tmp_path, run_cli):
    adapter = _adapter_copy(demos["phi3"], tmp_path)
    (adapter / "adapter_model.safetensors").unlink()
    code, _, err = run_cli(_merge(demos["phi3"] / "base", adapter, tmp_path / "out"))
    assert_one_line_error(code, err, "no adapter_model.safetensors")


def test_adapter_for_other_architecture(demos, tmp_path, run_cli):
    code, _, err = run_cli(_merge(demos["phi3"] / "base", demos["llama"] / "adapter", tmp_path / "out"))
    assert_one_line_error(code, err, "which the base Phi3ForCausalLM does not have", "pass the base model")
    assert_nothing_written(tmp_path / "out")


def test_adapter_for_other_hidden_size(demos, tmp_path, run_cli):
    from transformers import LlamaConfig, LlamaForCausalLM

    base = tmp_path / "wide-llama"
    config = json.loads((demos["llama"] / "base" / "config.json").read_text())
    config.update(hidden_size=192, intermediate_size=384, num_attention_heads=6, num_key_value_heads=3)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(base)
    code, _, err = run_cli(_merge(base, demos["llama"] / "adapter", tmp_path / "out"))
    assert_one_line_error(code, err, "adapter does not fit the base", "another model size")
    assert_nothing_written(tmp_path / "out")


def test_architecture_transformers_cannot_load(demos, tmp_path, run_cli):
    """A base of a model type this transformers does not know (a newer release's) is one line, not its traceback."""
    base = tmp_path / "future"
    shutil.copytree(demos["llama"] / "base", base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "model_type": "llama9", "architectures": ["Llama9ForCausalLM"]}))
    code, _, err = run_cli(_merge(base, demos["llama"] / "adapter", tmp_path / "out"))
    assert_one_line_error(code, err, "cannot load the base model in", "ValueError", "Supported architectures")
    assert_nothing_written(tmp_path / "out")


def test_wrong_rank(demos, tmp_path, run_cli):
    adapter = _adapter_copy(demos["phi3"], tmp_path)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "r": 4}))
    code, _, err = run_cli(_merge(demos["phi3"] / "base", adapter, tmp_path / "out"))
    assert_one_line_error(code, err, "wrong rank: adapter_config.json says r=4 but", "has rank 8")
    assert_nothing_written(tmp_path / "out")


def test_base_stored_4bit(demos, tmp_path, run_cli):
    import numpy as np
    from safetensors.numpy import save_file

    base = tmp_path / "bnb-base"
    shutil.copytree(demos["phi3"] / "base", base)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "quantization_config": {"quant_method": "bitsandbytes"}}))
    save_file({"model.layers.0.self_attn.qkv_proj.weight": np.zeros((8192, 1), np.uint8),
               "model.layers.0.self_attn.qkv_proj.weight.absmax": np.ones(256, np.float32)},
              str(base / "model.safetensors"))
    code, _, err = run_cli(["merge", "--base", str(base), "--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "o")])
    assert_one_line_error(code, err, "adapter folder not found")
    code, _, err = run_cli(_merge(base, demos["phi3"] / "adapter", tmp_path / "out"))
    assert_one_line_error(code, err, "stores bitsandbytes weights", "unquantized")


def test_existing_out_needs_force(demos, tmp_path, run_cli):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _, err = run_cli(_merge(demos["phi3"] / "base", demos["phi3"] / "adapter", out))
    assert_one_line_error(code, err, "exists and is not empty", "--force")
    assert (out / "precious.txt").read_text() == "keep me"
    code, _, err = run_cli(_merge(demos["phi3"] / "base", demos["phi3"] / "adapter", out) + ["--force"])
    assert code == 0 and (out / "model.safetensors").is_file() and not (out / "precious.txt").exists()


def _disk_full(path, *args, **kwargs):
    Path(path).write_bytes(b"\0" * 100)  # a partial write, then the disk is full
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def test_disk_full_during_merge(demos, tmp_path, run_cli, monkeypatch):
    import transformers.modeling_utils

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", lambda tensors, path, **kw: _disk_full(path))
    code, _, err = run_cli(_merge(demos["phi3"] / "base", demos["phi3"] / "adapter", tmp_path / "out"))
    assert_one_line_error(code, err, "no space left on device", "nothing was written")
    assert_nothing_written(tmp_path / "out")


@pytest.fixture(scope="module")
def merged(demos, tmp_path_factory) -> Path:
    from loraship.export.merge import merge

    return merge(demos["llama"] / "base", demos["llama"] / "adapter", tmp_path_factory.mktemp("m") / "merged")


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_disk_full_or_interrupted_export(merged, tmp_path, run_cli, monkeypatch, exc):
    """The export fails after model.onnx is written (while saving the generation config)."""
    from transformers import GenerationConfig

    def fail(self, save_directory, *args, **kwargs):
        assert (Path(save_directory) / "model.onnx").is_file()
        (Path(save_directory) / "generation_config.json").write_text('{"half": ')
        raise exc

    monkeypatch.setattr(GenerationConfig, "save_pretrained", fail)
    out = tmp_path / "onnx"
    code, _, err = run_cli(["export", "--model", str(merged), "--out", str(out)])
    if isinstance(exc, KeyboardInterrupt):
        assert code == 130 and err.splitlines()[-1] == "Aborted." and "Traceback" not in err
    else:
        assert_one_line_error(code, err, "no space left on device", "nothing was written")
    assert_nothing_written(out)


def test_export_bad_options(merged, tmp_path, run_cli):
    code, _, err = run_cli(["export", "--model", str(merged), "--out", str(tmp_path / "o"), "--engine", "optimum", "--int4"])
    assert_one_line_error(code, err, "--int4 needs the onnxruntime-genai builder", "--engine genai")
    code, _, err = run_cli(["export", "--model", str(merged), "--out", str(tmp_path / "o"), "--engine", "optimum",
                            "--target", "cuda"])
    assert_one_line_error(code, err, "--target applies to the onnxruntime-genai builder", "--engine genai")
    code, _, err = run_cli(["export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert_one_line_error(code, err, "model folder not found")
    assert_nothing_written(tmp_path / "o")


def test_real_process_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "loraship.cli.main", "merge", "--base", str(tmp_path),
                           "--adapter", str(tmp_path / "missing"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"Error: adapter folder not found: {tmp_path / 'missing'} (point --adapter at a folder written by peft's save_pretrained)"
    ]
