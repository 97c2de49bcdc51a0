"""`loraship merge`: peft merge_and_unload, QLoRA into full precision, transformers-5 saved inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from loraship.cli.main import main
from loraship.export.demo_model import demo_model
from loraship.export.merge import merge

IDS = [[1] + list(range(40, 100, 3))]  # 21 tokens: long enough for rope_theta to matter


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return demo_model(tmp_path_factory.mktemp("merge") / "demo", arch="phi3", size="tiny", seed=5, random=True)


def _logits(model_dir: Path, ids=IDS):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def _peft_logits(base: Path, adapter: Path, ids=IDS):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def _edit_json(path: Path, fn) -> None:
    path.write_text(json.dumps(fn(json.loads(path.read_text())), indent=2))


def test_merge_equals_adapter_forward(demo, tmp_path):
    out = tmp_path / "merged"
    main(["merge", "--base", str(demo / "base"), "--adapter", str(demo / "adapter"), "--out", str(out)])
    merged = _logits(out)
    assert (merged - _peft_logits(demo / "base", demo / "adapter")).abs().max() < 1e-5
    assert (merged - _logits(demo / "base")).abs().max() > 1e-2  # the adapter really changed the model
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["rope_theta"] == 10000.0 and config["rope_parameters"]["rope_theta"] == 10000.0
    assert config["rope_parameters"]["rope_type"] == "default"
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["eos_token_id"], gen["pad_token_id"]) == (2, 3)
    assert not any(k.startswith("base_model") for k in _safetensor_keys(out / "model.safetensors"))


def _safetensor_keys(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "np") as fh:
        return {k: fh.get_slice(k).get_dtype() for k in fh.keys()}


def test_dtype_fp16(demo, tmp_path):
    out = merge(demo / "base", demo / "adapter", tmp_path / "m16", dtype="fp16")
    dtypes = set(_safetensor_keys(out / "model.safetensors").values())
    assert dtypes == {"F16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


def _theta_base(demo: Path, dst: Path, theta: float) -> Path:
    shutil.copytree(demo / "base", dst)
    _edit_json(dst / "config.json", lambda c: {**c, "rope_theta": theta})
    return dst


def _transformers5_base(demo: Path, dst: Path, theta: float) -> Path:
    """A base as transformers 5 saves it: rope_theta only inside rope_parameters, 5.x tokenizer config."""
    shutil.copytree(demo / "base", dst)

    def config(c):
        c = {k: v for k, v in c.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
        return {**c, "rope_parameters": {"rope_type": "default", "rope_theta": theta}, "transformers_version": "5.0.0"}

    def tok_config(c):
        extra = c.pop("additional_special_tokens", [])
        return {**c, "tokenizer_class": "TokenizersBackend", "extra_special_tokens": extra}

    _edit_json(dst / "config.json", config)
    _edit_json(dst / "tokenizer_config.json", tok_config)
    return dst


def test_transformers5_base_uses_its_rope_theta(demo, tmp_path):
    """transformers 4.57 alone would read this base with rope_theta 10000; the merge must use 250000."""
    from transformers import AutoTokenizer

    adapter = tmp_path / "adapter5"
    shutil.copytree(demo / "adapter", adapter)
    _edit_json(adapter / "adapter_config.json", lambda c: {**c, "peft_version": "0.99.0", "future_field": {"x": 1}})
    v5 = merge(_transformers5_base(demo, tmp_path / "base5", 250000.0), adapter, tmp_path / "m5")
    v4 = merge(_theta_base(demo, tmp_path / "base4", 250000.0), demo / "adapter", tmp_path / "m4")
    default = merge(demo / "base", demo / "adapter", tmp_path / "m-default")
    assert (_logits(v5) - _logits(v4)).abs().max() < 1e-6
    assert (_logits(v5) - _logits(default)).abs().max() > 1e-3  # theta really changes the output
    config = json.loads((v5 / "config.json").read_text())
    assert config["rope_theta"] == 250000.0 and config["rope_parameters"]["rope_theta"] == 250000.0
    tok = AutoTokenizer.from_pretrained(v5)
    assert tok("Hello there")["input_ids"] == AutoTokenizer.from_pretrained(demo / "tokenizer")("Hello there")["input_ids"]
    assert "<|assistant|>" in tok.additional_special_tokens


def test_qlora_adapter_merges_into_full_precision_base(demo, tmp_path):
    """A QLoRA adapter: bf16 LoRA tensors, trained against a bitsandbytes 4-bit load of the base."""
    import torch
    from safetensors.torch import load_file, save_file

    adapter = tmp_path / "qlora"
    shutil.copytree(demo / "adapter", adapter)
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    save_file(tensors, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    _edit_json(adapter / "adapter_config.json", lambda c: {**c, "base_model_name_or_path": "someone/phi3-tiny-bnb-4bit"})
    base = tmp_path / "base-q"
    shutil.copytree(demo / "base", base)
    quant = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
             "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_use_double_quant": True}
    _edit_json(base / "config.json", lambda c: {**c, "quantization_config": quant})

    out = merge(base, adapter, tmp_path / "merged-q")
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert set(_safetensor_keys(out / "model.safetensors").values()) == {"F32"}
    expected = _peft_logits(demo / "base", adapter)
    assert (_logits(out) - expected).abs().max() < 1e-5


def test_adapter_that_added_tokens_merges_into_a_grown_base(demo, tmp_path):
    """A fine-tune that added tokens saves the resized embedding and output layers and a longer
    tokenizer with its adapter; merge grows the original base to match, and the merged model's
    logits (new token ids included) equal the adapter applied on the grown base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo / "tokenizer")
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>", "<|result|>"]})
    base = AutoModelForCausalLM.from_pretrained(demo / "base")
    base_vocab = base.get_input_embeddings().num_embeddings
    base.resize_token_embeddings(len(tok))
    grown = len(tok)
    assert grown > base_vocab
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "o_proj"], modules_to_save=["embed_tokens", "lm_head"])
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                param.add_(torch.randn_like(param) * 0.02)
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    ids = [[1, 40, 41, grown - 2, 42, grown - 1]]
    with torch.no_grad():
        expected = peft_model.eval()(torch.tensor(ids)).logits

    out = merge(demo / "base", adapter, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == grown
    assert len(AutoTokenizer.from_pretrained(out)) == grown
    got = _logits(out, ids)
    assert got.shape[-1] == grown and torch.allclose(got, expected, atol=1e-4)


def test_configs_the_builder_reads_right():
    """A longrope config saved by transformers 5 (rope_parameters with rope_type only) keeps the legacy ``type``
    the onnxruntime-genai builder reads (KeyError 'type' before), and 4.x's rope_scaling; LayerNorm epsilons
    under other names reach the builder as rms_norm_eps (Phi-2, Nemotron); GPT-2's names read as the standard ones."""
    from loraship.export.genai_builder import builder_config
    from loraship.export.hfcompat import standard_config, translate_config

    short, long = [1.0, 1.1], [1.0, 2.0]
    v5 = {"model_type": "phi3", "max_position_embeddings": 2048, "rope_parameters": {
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short, "long_factor": long,
        "original_max_position_embeddings": 64}}
    cfg = translate_config(v5)
    assert cfg["rope_parameters"]["type"] == cfg["rope_parameters"]["rope_type"] == "longrope"
    assert cfg["rope_scaling"] == {"type": "longrope", "short_factor": short, "long_factor": long}
    assert cfg["original_max_position_embeddings"] == 64 and cfg["rope_theta"] == 10000.0
    assert translate_config(cfg)["rope_parameters"] == cfg["rope_parameters"]  # idempotent
    v4 = {"model_type": "llama", "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", "factor": 32.0}}
    assert translate_config(v4)["rope_parameters"] == {"rope_type": "llama3", "type": "llama3", "rope_theta": 5e5, "factor": 32.0}
    assert "type" not in translate_config({"model_type": "llama", "rope_theta": 1e4})["rope_parameters"]

    assert builder_config({"model_type": "phi", "layer_norm_eps": 1e-5})["rms_norm_eps"] == 1e-5
    assert builder_config({"model_type": "nemotron", "norm_eps": 3e-5})["rms_norm_eps"] == 3e-5
    assert builder_config({"model_type": "llama", "rms_norm_eps": 1e-6, "norm_eps": 1.0})["rms_norm_eps"] == 1e-6
    gpt2 = standard_config({"model_type": "gpt2", "n_positions": 1024, "n_embd": 64, "n_head": 4, "n_layer": 2})
    assert (gpt2["max_position_embeddings"], gpt2["hidden_size"], gpt2["num_attention_heads"], gpt2["num_hidden_layers"]) == (
        1024, 64, 4, 2)
