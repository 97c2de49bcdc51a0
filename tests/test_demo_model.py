"""`loraship demo-model --random`: tiny random-init bases, LoRA adapters that matter, a local BPE tokenizer (no training)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraship.cli.main import main
from loraship.export.demo_model import TARGET_MODULES


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module", params=["phi3", "llama"])
def demo(request, tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp(f"demo-{request.param}") / "d"
    main(["demo-model", "--out", str(out), "--arch", request.param, "--seed", "3", "--random"])
    return request.param, out


def test_layout_sizes_and_tokenizer(demo):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    arch, out = demo
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "base", "demo_model.json", "tokenizer"]  # no eval set
    assert (out / "base" / "model.safetensors").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    config = json.loads((out / "base" / "config.json").read_text())
    assert config["model_type"] == arch and config["max_position_embeddings"] == 2048
    model = AutoModelForCausalLM.from_pretrained(out / "base")
    n_params = sum(p.numel() for p in model.parameters())
    assert 300_000 <= n_params <= 2_000_000, n_params
    tok = AutoTokenizer.from_pretrained(out / "tokenizer")
    assert 512 <= len(tok) <= 1024 and len(tok) == config["vocab_size"]
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
    ids = tok("Hello, how are you today?")["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.decode(ids, skip_special_tokens=True) == "Hello, how are you today?"
    chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|user|>\nHi<|end|>\n<|assistant|>\n"
    assert model.dtype == torch.float32


def test_adapter_targets_projections_and_changes_outputs(demo):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    arch, out = demo
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == sorted(TARGET_MODULES[arch]) and cfg["peft_type"] == "LORA"
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    targeted = {k.split(".lora_")[0].rsplit(".", 1)[1] for k in weights}
    assert targeted == set(TARGET_MODULES[arch])
    assert all(w.abs().max() > 0 for k, w in weights.items() if "lora_B" in k)
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, out / "adapter")(ids).logits
    assert (after - before).abs().max() > 1e-2


def test_deterministic_given_seed(demo, tmp_path):
    arch, out = demo
    again = tmp_path / "again"
    main(["demo-model", "--out", str(again), "--arch", arch, "--seed", "3", "--random"])
    for rel in ("base/model.safetensors", "adapter/adapter_model.safetensors", "tokenizer/tokenizer.json"):
        assert _sha(out / rel) == _sha(again / rel), rel
    other = tmp_path / "other"
    main(["demo-model", "--out", str(other), "--arch", arch, "--seed", "4", "--random"])
    assert _sha(out / "base/model.safetensors") != _sha(other / "base/model.safetensors")


def test_refuses_non_empty_out_and_help_has_example(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    proc = subprocess.run([sys.executable, "-m", "loraship.cli.main", "demo-model", "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"Error: output directory {tmp_path} exists and is not empty (pass --force to replace it, or choose another --out)"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    helptext = subprocess.run([sys.executable, "-m", "loraship.cli.main", "demo-model", "--help"],
                              capture_output=True, text=True).stdout
    assert "loraship demo-model --out work" in helptext
