"""A small random-init base model, a LoRA adapter that changes it, and a local BPE tokenizer.

No model hub is reachable where loraship is tested, so tests and the demo build their
models here: ``DIR/base`` (config + safetensors + tokenizer), ``DIR/adapter`` (peft LoRA
on the attention and MLP projections, nonzero ``lora_B``) and ``DIR/tokenizer``.
Everything is deterministic given the seed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from loraship.errors import LorashipError
from loraship.fsutil import atomic_dir

ARCHS = ("phi3", "llama")
SIZES = ("tiny", "mid")

TARGET_MODULES = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class Shape:
    """Model dimensions for one --size."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    max_positions: int
    rank: int


SHAPES = {
    "tiny": Shape(vocab=1024, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, max_positions=2048, rank=8),
    "mid": Shape(vocab=8192, hidden=640, intermediate=1792, layers=10, heads=10, kv_heads=5, max_positions=4096, rank=16),
}

# Random-init weights a bit larger than the usual 0.02, so logits have a clear argmax
# and greedy decoding is a meaningful parity check rather than a coin toss.
INIT_RANGE = 0.06

_TEXT = """\
LoRA adds small low-rank matrices to the attention and MLP projections of a large model.
After fine-tuning, the adapter can be merged into the base weights, exported to ONNX with a
key-value cache, and served by Triton Inference Server behind an HTTPS endpoint.
The quick brown fox jumps over the lazy dog. A model reads tokens, one after another, and
predicts the next one. Hello, how are you today? I am fine, thank you, and you?
Write a short poem about the sea. Explain what a transformer is in one sentence.
What is the capital of France? Paris is the capital of France. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100.
"""
_SYLLABLES = (
    "ka to ri mo na se lu vi pe da go ha ji ku ne ro sa ti wa yo be fa gi hu le mi no pa qu "
    "ra si te un ve wo xa ze an el in on ar er or al il ol st tr pr ch sh th"
).split()


def corpus(n_sentences: int = 6000) -> list[str]:
    """The built-in training text: fixed English lines plus seeded synthetic sentences."""
    rng = random.Random(1234)
    lines = _TEXT.splitlines() * 20
    for _ in range(n_sentences):
        words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(4, 12))]
        lines.append(" ".join(words).capitalize() + rng.choice(".?!"))
    return lines


def build_tokenizer(vocab_size: int):
    """Train a byte-level BPE on :func:`corpus`; return a transformers PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
        model_max_length=None,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_config(arch: str, shape: Shape, vocab_size: int):
    """A Phi3Config or LlamaConfig with the demo dimensions."""
    from transformers import LlamaConfig, Phi3Config

    common = dict(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.max_positions,
        initializer_range=INIT_RANGE,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    if arch == "phi3":
        return Phi3Config(original_max_position_embeddings=shape.max_positions, **common)
    return LlamaConfig(**common)


def demo_model(out: Path, arch: str = "phi3", size: str = "tiny", seed: int = 0, force: bool = False) -> Path:
    """Write ``out/base``, ``out/adapter`` and ``out/tokenizer``; return ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, GenerationConfig

    if arch not in ARCHS:
        raise LorashipError(f"unknown --arch {arch!r}", f"choose one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise LorashipError(f"unknown --size {size!r}", f"choose one of {', '.join(SIZES)}")
    out = Path(out)
    shape = SHAPES[size]
    with atomic_dir(out, force=force) as tmp:
        tokenizer = build_tokenizer(shape.vocab)
        config = build_config(arch, shape, len(tokenizer))
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
        model.save_pretrained(tmp / "base", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "base")
        tokenizer.save_pretrained(tmp / "tokenizer")

        lora = LoraConfig(
            r=shape.rank,
            lora_alpha=2 * shape.rank,
            lora_dropout=0.0,
            target_modules=TARGET_MODULES[arch],
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(model, lora)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:  # peft initialises lora_B to zero: make the adapter matter
                    param.copy_(torch.randn(param.shape, generator=gen) * INIT_RANGE)
        peft_model.peft_config["default"].base_model_name_or_path = str(tmp / "base")
        peft_model.save_pretrained(tmp / "adapter", safe_serialization=True)
        adapter_config = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
        adapter_config["base_model_name_or_path"] = str((out / "base").resolve())
        (tmp / "adapter" / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    return out
