"""Tiny random-init models shaped like public checkpoints, each with a LoRA adapter that changes its outputs.

The support matrix (``loraship.export.matrix``) runs every entry through merge, the default export and a
comparison with the unmerged PeftModel. Each config keeps the features of the checkpoint it is named for
(rope type and scaling, sliding windows, soft-capping, norm kinds and epsilons, q/k/v biases, q/k norms,
tied embeddings, partial rotary, MoE) at toy sizes: sliding windows and rope thresholds shrink to a few
tokens so that short prompts cross them. Everything is deterministic given the seed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraship.export.demo_model import BOS_ID, EOS_ID, INIT_RANGE, PAD_ID, randomize_adapter

VOCAB = 1024
WINDOW = 16  # every sliding window: a probe of 40+ tokens reaches past it
ORIGINAL_MAX = 64  # longrope's original context: the long probe crosses it
MAX_POSITIONS = 2048
RANK = 8


@dataclass(frozen=True)
class Tiny:
    """One architecture: the public checkpoint it mirrors and the config that keeps its features."""

    name: str  # the row of the support table
    model_type: str
    checkpoint: str  # the public checkpoint whose config features this one keeps
    features: str  # what the config exercises, as the table says it
    config: dict[str, Any]
    target_parameters: tuple[str, ...] = ()  # peft target_parameters (MoE expert weights)
    common: bool = True  # take the shared tiny dimensions

    def build_config(self, vocab: int):
        """The transformers config of this tiny model."""
        from transformers import AutoConfig

        values = dict(_COMMON if self.common else {}, vocab_size=vocab, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                      pad_token_id=PAD_ID, initializer_range=INIT_RANGE)
        values.update(self.config)
        return AutoConfig.for_model(self.model_type, **values)


_COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False)


def _longrope(rotary_dims: int) -> dict[str, Any]:
    half = rotary_dims // 2
    return {"type": "longrope", "short_factor": [1.0 + 0.05 * i for i in range(half)],
            "long_factor": [1.0 + 0.5 * i for i in range(half)]}


TINIES: tuple[Tiny, ...] = (
    Tiny("Llama-3.2", "llama", "meta-llama/Llama-3.2-1B", "llama3 rope scaling, tied embeddings",
         dict(rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
              rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 512})),
    Tiny("Mistral", "mistral", "mistralai/Mistral-7B-v0.1", f"sliding window ({WINDOW})",
         dict(sliding_window=WINDOW, rms_norm_eps=1e-5)),
    Tiny("Qwen2.5", "qwen2", "Qwen/Qwen2.5-0.5B", "q/k/v biases, tied embeddings, eps 1e-6",
         dict(rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)),
    Tiny("Qwen3", "qwen3", "Qwen/Qwen3-0.6B", "q/k norms, head_dim != hidden/heads, tied embeddings",
         dict(head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)),
    Tiny("Gemma", "gemma", "google/gemma-2b", "1+w RMSNorm, scaled embeddings, GeGLU, MQA, tied",
         dict(num_key_value_heads=1, head_dim=32, hidden_act="gelu_pytorch_tanh", tie_word_embeddings=True,
              rms_norm_eps=1e-6)),
    Tiny("Gemma-2", "gemma2", "google/gemma-2-2b",
         f"attention and final soft-capping (at 0.5 and 3: random-init scores reach them), alternating sliding window "
         f"({WINDOW}), sandwich norms, eager attention in config.json",
         dict(attn_logit_softcapping=0.5, final_logit_softcapping=3.0, sliding_window=WINDOW, query_pre_attn_scalar=16,
              tie_word_embeddings=True, rms_norm_eps=1e-6, num_hidden_layers=4, _attn_implementation="eager")),
    Tiny("Gemma-3", "gemma3_text", "google/gemma-3-1b-it", f"5:1 local/global sliding window ({WINDOW}), local rope base, q/k norms",
         dict(sliding_window=WINDOW, query_pre_attn_scalar=16, rope_local_base_freq=10000.0, rope_theta=1000000.0,
              tie_word_embeddings=True, rms_norm_eps=1e-6, num_hidden_layers=6)),
    Tiny("Phi-3-mini-4k", "phi3", "microsoft/Phi-3-mini-4k-instruct", "fused qkv and gate_up projections",
         dict(original_max_position_embeddings=MAX_POSITIONS, rms_norm_eps=1e-5)),
    Tiny("Phi-3.5-mini (longrope)", "phi3", "microsoft/Phi-3.5-mini-instruct",
         f"longrope (original context {ORIGINAL_MAX}), fused projections",
         dict(original_max_position_embeddings=ORIGINAL_MAX, rope_scaling=_longrope(16), rms_norm_eps=1e-5)),
    Tiny("Phi-4-mini", "phi3", "microsoft/Phi-4-mini-instruct", "longrope, partial rotary 0.75, tied embeddings",
         dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
              original_max_position_embeddings=ORIGINAL_MAX, rope_scaling=_longrope(48), partial_rotary_factor=0.75,
              tie_word_embeddings=True, rms_norm_eps=1e-5)),
    Tiny("Phi-2", "phi", "microsoft/phi-2", "LayerNorm eps 1e-5, partial rotary 0.4, parallel attention/MLP, biases",
         dict(hidden_size=160, intermediate_size=320, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
              partial_rotary_factor=0.4, layer_norm_eps=1e-5, hidden_act="gelu_new", max_position_embeddings=MAX_POSITIONS,
              tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0), common=False),
    Tiny("Granite-3", "granite", "ibm-granite/granite-3.0-2b-instruct", "embedding/attention/residual/logit multipliers",
         dict(embedding_multiplier=12.0, attention_multiplier=0.0625, residual_multiplier=0.22, logits_scaling=8.0,
              tie_word_embeddings=True, rms_norm_eps=1e-5)),
    Tiny("Nemotron", "nemotron", "nvidia/Minitron-4B-Base", "LayerNorm1P eps 1e-5, relu2 MLP, partial rotary 0.5",
         dict(head_dim=32, partial_rotary_factor=0.5, norm_eps=1e-5, hidden_act="relu2")),
    Tiny("OLMo", "olmo", "allenai/OLMo-1B-hf", "weightless LayerNorm, tied embeddings",
         dict(tie_word_embeddings=True)),
    Tiny("SmolLM3", "smollm3", "HuggingFaceTB/SmolLM3-3B", "no rope on every 4th layer, tied embeddings",
         dict(num_hidden_layers=4, rope_theta=5000000.0, tie_word_embeddings=True, rms_norm_eps=1e-6)),
    Tiny("ERNIE-4.5", "ernie4_5", "baidu/ERNIE-4.5-0.3B-PT", "interleaved rope, tied embeddings",
         dict(rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)),
    Tiny("HunYuan-dense", "hunyuan_v1_dense", "tencent/Hunyuan-0.5B-Instruct", "q/k norms, dynamic-alpha rope, tied",
         dict(rope_scaling={"type": "dynamic", "alpha": 1000.0, "factor": 1.0}, tie_word_embeddings=True, rms_norm_eps=1e-5)),
    Tiny("LFM2", "lfm2", "LiquidAI/LFM2-350M", "short convolutions beside attention layers, q/k norms",
         dict(num_hidden_layers=4, layer_types=["conv", "full_attention", "conv", "full_attention"], conv_L_cache=3,
              block_auto_adjust_ff_dim=False, block_ff_dim=128, norm_eps=1e-5, tie_word_embeddings=True)),
    Tiny("gpt-oss", "gpt_oss", "openai/gpt-oss-20b",
         f"MoE (4 experts, top 2) with LoRA on the experts, attention sinks, yarn rope, sliding window ({WINDOW})",
         dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, sliding_window=WINDOW,
              rope_scaling={"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                            "original_max_position_embeddings": 4096}),
         target_parameters=("mlp.experts.gate_up_proj", "mlp.experts.down_proj")),
    Tiny("GPT-2", "gpt2", "openai-community/gpt2", "learned positions, Conv1D, n_positions, tied embeddings",
         dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024, layer_norm_epsilon=1e-5, tie_word_embeddings=True,
              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0), common=False),
    # optimum-onnx's other text-generation architectures that transformers 4.57 has (the builder lists none of them)
    Tiny("GPT-NeoX (Pythia)", "gpt_neox", "EleutherAI/pythia-160m", "rotary on 25% of each head, parallel residual, biases",
         dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
              max_position_embeddings=MAX_POSITIONS, use_parallel_residual=True, tie_word_embeddings=False), common=False),
    Tiny("GPT-J", "gptj", "EleutherAI/gpt-j-6b", "interleaved partial rotary (rotary_dim), parallel attention/MLP",
         dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=MAX_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0,
              attn_pdrop=0.0, tie_word_embeddings=False), common=False),
    Tiny("CodeGen", "codegen", "Salesforce/codegen-350M-mono", "fused qkv in mp_num blocks, partial rotary, parallel",
         dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=MAX_POSITIONS, n_ctx=MAX_POSITIONS, resid_pdrop=0.0,
              embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False), common=False),
    Tiny("GPT-Neo", "gpt_neo", "EleutherAI/gpt-neo-125m", f"global/local attention alternating, local window {WINDOW}",
         dict(hidden_size=64, num_layers=2, num_heads=4, attention_types=[[["global", "local"], 1]], window_size=WINDOW,
              max_position_embeddings=MAX_POSITIONS, resid_dropout=0.0, embed_dropout=0.0, attention_dropout=0.0), common=False),
    Tiny("GPT-BigCode (StarCoder)", "gpt_bigcode", "bigcode/starcoderbase-1b", "multi-query attention, learned positions",
         dict(n_embd=64, n_layer=2, n_head=4, multi_query=True, n_positions=MAX_POSITIONS, resid_pdrop=0.0, embd_pdrop=0.0,
              attn_pdrop=0.0, tie_word_embeddings=True), common=False),
    Tiny("OPT", "opt", "facebook/opt-125m", "learned positions (offset 2), ReLU, pre-LayerNorm, tied",
         dict(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4, max_position_embeddings=MAX_POSITIONS,
              word_embed_proj_dim=64, dropout=0.0, tie_word_embeddings=True), common=False),
    Tiny("Bloom", "bloom", "bigscience/bloom-560m", "ALiBi positions, embedding LayerNorm, fused qkv, tied",
         dict(hidden_size=64, n_layer=2, n_head=4, tie_word_embeddings=True), common=False),
    Tiny("MPT", "mpt", "mosaicml/mpt-7b", "ALiBi, no biases, LayerNorm without bias, max_seq_len",
         dict(d_model=64, n_heads=4, n_layers=2, expansion_ratio=2, max_seq_len=MAX_POSITIONS, no_bias=True,
              tie_word_embeddings=True), common=False),
    Tiny("Falcon", "falcon", "tiiuae/falcon-7b", "multi-query, parallel attention/MLP, no biases",
         dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True, parallel_attn=True, bias=False,
              new_decoder_architecture=False, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True), common=False),
    Tiny("StableLM-2", "stablelm", "stabilityai/stablelm-2-1_6b", "LayerNorm, partial rotary 0.25, q/k/v biases",
         dict(num_key_value_heads=4, partial_rotary_factor=0.25, use_qkv_bias=True, layer_norm_eps=1e-5)),
    Tiny("Cohere (Command-R)", "cohere", "CohereForAI/c4ai-command-r-v01", "LayerNorm without bias, logit scale, interleaved rope, tied",
         dict(logit_scale=0.0625, layer_norm_eps=1e-5, tie_word_embeddings=True)),
    Tiny("OLMo-2", "olmo2", "allenai/OLMo-2-1124-7B", "norms after attention and MLP, q/k RMSNorm over all heads",
         dict(rms_norm_eps=1e-6, rope_theta=500000.0)),
    Tiny("Qwen3-MoE", "qwen3_moe", "Qwen/Qwen3-30B-A3B", "MoE (4 experts, top 2) with LoRA on every expert, q/k norms",
         dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, rms_norm_eps=1e-6,
              rope_theta=1000000.0)),
    Tiny("Helium", "helium", "kyutai/helium-1-preview-2b", "RMSNorm eps 1e-8", dict(rms_norm_eps=1e-8, rope_theta=100000.0)),
    Tiny("Arcee (AFM)", "arcee", "arcee-ai/AFM-4.5B", "relu2 MLP without gate", dict(hidden_act="relu2", rms_norm_eps=1e-5)),
    Tiny("GLM-4", "glm", "THUDM/glm-4-9b-chat-hf", "partial rotary 0.5 (interleaved), fused gate_up, q/k/v biases",
         dict(partial_rotary_factor=0.5, attention_bias=True, rms_norm_eps=1.5625e-7)),
    Tiny("DeepSeek-V3", "deepseek_v3", "deepseek-ai/DeepSeek-V3", "multi-head latent attention, MoE with a shared expert",
         dict(num_key_value_heads=4, head_dim=8, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
              n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1,
              n_group=1, topk_group=1, rope_interleave=True)),
)


def by_name(name: str) -> Tiny:
    """The zoo entry called ``name``."""
    return next(t for t in TINIES if t.name == name)


@dataclass
class Built:
    """A tiny model on disk (``base``, ``adapter``) and its unmerged PeftModel in eager fp32 (``reference``)."""

    tiny: Tiny
    base: Path
    adapter: Path
    reference: Any = field(repr=False)
    config: dict[str, Any] = field(default_factory=dict)


def build(tiny: Tiny, out: Path, tokenizer, seed: int = 0) -> Built:
    """Write ``out/base`` and ``out/adapter`` for ``tiny``; return them with the in-memory reference."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GenerationConfig

    out = Path(out)
    torch.manual_seed(seed)
    config = tiny.build_config(len(tokenizer))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager").eval()
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.save_pretrained(out / "base", safe_serialization=True)
    if "_attn_implementation" in tiny.config:  # the public config carries it (transformers drops it on save)
        path = out / "base" / "config.json"
        saved = json.loads(path.read_text())
        saved["_attn_implementation"] = tiny.config["_attn_implementation"]
        path.write_text(json.dumps(saved, indent=2))
    tokenizer.save_pretrained(out / "base")
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules="all-linear",
                      target_parameters=list(tiny.target_parameters) or None, task_type="CAUSAL_LM")
    peft_model = randomize_adapter(get_peft_model(model, lora), seed + 1)
    peft_model.save_pretrained(out / "adapter", safe_serialization=True)
    return Built(tiny, out / "base", out / "adapter", peft_model.eval(), json.loads((out / "base" / "config.json").read_text()))
