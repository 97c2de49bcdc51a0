"""Demo models: a small base pre-trained on generated text, and a LoRA fine-tune that learned a chat task.

No model hub is reachable where loraship is tested, so tests and the demo build their models
here, in under a minute (tiny), from generated data (``demo_data``):

1. a byte-level BPE tokenizer trained on the corpus, with a Phi-3 style chat template;
2. the base (phi3 or llama), pre-trained on the corpus;
3. a peft LoRA adapter (attention and MLP projections and the output layer), fine-tuned through
   the chat template to write numbers in words;
4. ``eval.jsonl``: the held-out questions, scored with greedy decoding on the base and the merged
   model (``demo_model.json`` records both accuracies, the losses and the time taken).

``random=True`` skips all training: random-init weights and a random nonzero adapter, instantly,
for tests that need only shapes. Everything is deterministic given the seed.

Output: ``DIR/base`` (config, safetensors, tokenizer), ``DIR/adapter`` (with a copy of the eval
set, which ``merge`` carries on), ``DIR/tokenizer``, ``DIR/eval.jsonl``, ``DIR/train.jsonl`` (the
fine-tune's cases) and ``DIR/demo_model.json``.

``second_task="roman"`` also fine-tunes a second adapter on the same base for another task (numbers in
Roman numerals: ``demo_task``), into ``DIR/adapter-roman`` with its own held-out ``eval.jsonl``,
``train.jsonl`` and ``demo_task.json`` inside. Without it the output is byte for byte what it always was.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from loraship.errors import LorashipError
from loraship.export import demo_data
from loraship.export.demo_train import Schedule
from loraship.export.evalset import EVAL_FILE, EvalCase, write_eval
from loraship.fsutil import atomic_dir

ARCHS = ("phi3", "llama")
SIZES = ("tiny", "mid")
TARGET_MODULES = {
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
# The fine-tune also adapts the output layer: projections alone learn the task but with flat
# logits (argmax right, probability a few percent), which quantized exports would flip.
TRAINED_EXTRA_MODULES = ["lm_head"]

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID, END_ID = 0, 1, 2, 3, 7
STOP_IDS = [EOS_ID, END_ID]  # a reply ends at <|end|>, as Phi-3's does

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Random-init weights a bit larger than the usual 0.02, so logits have a clear argmax
# and greedy decoding is a meaningful parity check rather than a coin toss.
INIT_RANGE = 0.06
TRAINED_INIT_RANGE = 0.02


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


@dataclass(frozen=True)
class Recipe:
    """How one --size is trained."""

    pretrain: Schedule
    block: int
    finetune: Schedule
    rank: int
    threads: int


SHAPES = {
    "tiny": Shape(vocab=1024, hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, max_positions=2048, rank=8),
    "mid": Shape(vocab=8192, hidden=640, intermediate=1792, layers=10, heads=10, kv_heads=5, max_positions=4096, rank=16),
}
RECIPES = {
    "tiny": Recipe(Schedule(steps=500, batch=32, lr=3e-3), 64, Schedule(steps=200, batch=32, lr=5e-3), rank=16, threads=1),
    "mid": Recipe(Schedule(steps=100, batch=16, lr=1e-3), 32, Schedule(steps=200, batch=16, lr=1e-3), rank=16, threads=2),
}

@dataclass
class DemoReport:
    """What ``demo_model`` trained and how well (written to ``demo_model.json``)."""

    arch: str
    size: str
    seed: int
    random: bool
    parameters: int
    vocab: int
    eval_cases: int = 0
    train_cases: int = 0
    base_accuracy: float | None = None
    merged_accuracy: float | None = None
    pretrain_loss: float | None = None
    finetune_loss: float | None = None
    seconds: float = 0.0
    second_task: dict[str, Any] | None = None  # the second adapter's figures (demo_task.json), when trained

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["second_task"] is None:  # the one-adapter report stays what it always was
            del data["second_task"]
        return data


def build_tokenizer(vocab_size: int, random: bool = False):
    """A byte-level BPE trained on the corpus, digits one token each (``random``: the random models'
    corpus, digits merged as BPE finds them); a PreTrainedTokenizerFast with the chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if not random:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(demo_data.random_corpus() if random else demo_data.corpus(), trainer=trainer)
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


def build_config(arch: str, shape: Shape, vocab_size: int, init_range: float = INIT_RANGE):
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
        initializer_range=init_range,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        rope_theta=10000.0,
    )
    if arch == "phi3":
        return Phi3Config(original_max_position_embeddings=shape.max_positions, **common)
    return LlamaConfig(**common)


def demo_model(out: Path, arch: str = "phi3", size: str = "tiny", seed: int = 0, force: bool = False,
               random: bool = False, console: Console | None = None, second_task: str | None = None) -> Path:
    """Write the base, adapter, tokenizer and (trained models) eval set into ``out``; return ``out``.
    ``second_task``: also a second adapter on the same base, for that task, in ``out/adapter-TASK``."""
    if arch not in ARCHS:
        raise LorashipError(f"unknown --arch {arch!r}", f"choose one of {', '.join(ARCHS)}")
    if size not in SIZES:
        raise LorashipError(f"unknown --size {size!r}", f"choose one of {', '.join(SIZES)}")
    if second_task is not None:
        from loraship.export.demo_task import check_task

        check_task(second_task)
        if random:
            raise LorashipError("--second-task trains an adapter, and --random trains nothing", "drop one of them")
    out = Path(out)
    console = console or Console(stderr=True)
    with atomic_dir(out, force=force) as tmp:
        report = (_random if random else _trained)(tmp, arch, size, seed, console)
        point_adapter_at_base(tmp / "adapter", out / "base")
        if second_task is not None:
            from loraship.export.demo_task import task_adapter_dir, train_task_adapter

            adapter = tmp / task_adapter_dir(second_task)
            report.second_task = train_task_adapter(tmp / "base", adapter, second_task, seed, console)
            point_adapter_at_base(adapter, out / "base")
        (tmp / "demo_model.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return out


def read_report(folder: Path) -> dict[str, Any]:
    """``demo_model.json`` of a demo-model folder."""
    return json.loads((Path(folder) / "demo_model.json").read_text())


def _save_base(model, tokenizer, tmp: Path, stop_ids: int | list[int]) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=stop_ids, pad_token_id=PAD_ID)
    model.save_pretrained(tmp / "base", safe_serialization=True)
    tokenizer.save_pretrained(tmp / "base")
    tokenizer.save_pretrained(tmp / "tokenizer")


def _lora(arch: str, rank: int, extra: list[str]):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                      target_modules=TARGET_MODULES[arch] + extra, task_type="CAUSAL_LM")


def point_adapter_at_base(adapter: Path, base: Path) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config["base_model_name_or_path"] = str(base.resolve())
    path.write_text(json.dumps(config, indent=2, sort_keys=True))


def _random(tmp: Path, arch: str, size: str, seed: int, console: Console) -> DemoReport:
    """Random-init base and a random nonzero adapter: no training, no eval set."""
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    shape = SHAPES[size]
    with console.status(f"building a random-init {size} {arch} base and adapter"):
        tokenizer = build_tokenizer(shape.vocab, random=True)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(build_config(arch, shape, len(tokenizer)), dtype=torch.float32)
        _save_base(model, tokenizer, tmp, EOS_ID)  # never trained on chats: no <|end|> stop
        peft_model = randomize_adapter(get_peft_model(model, _lora(arch, shape.rank, [])), seed + 1)
        peft_model.save_pretrained(tmp / "adapter", safe_serialization=True)
    return DemoReport(arch, size, seed, True, sum(p.numel() for p in model.parameters()), len(tokenizer),
                      seconds=time.perf_counter() - start)


def randomize_adapter(peft_model, seed: int):
    """Fill every lora_B (peft initialises them to zero) with random values, so the adapter changes the
    model's outputs; return ``peft_model``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * INIT_RANGE)
    return peft_model


def random_adapter(base: Path, out: Path, targets: list[str], rank: int, seed: int = 1, **options: Any) -> Path:
    """A random nonzero peft LoRA adapter of ``rank`` on ``targets`` of the model folder ``base``, without
    training (tests and benchmarks of several adapters on one base); ``options`` go to peft's LoraConfig
    (``lora_alpha``, default 2 x rank; ``use_rslora``, ``rank_pattern``, ...). Return ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM",
                        **{"lora_alpha": 2 * rank, **options})
    randomize_adapter(get_peft_model(model, config), seed).save_pretrained(out, safe_serialization=True)
    return Path(out)


def _trained(tmp: Path, arch: str, size: str, seed: int, console: Console) -> DemoReport:
    """Tokenizer, pre-trained base, fine-tuned adapter, held-out eval set and both accuracies."""
    import torch
    from transformers import AutoModelForCausalLM

    from loraship.export.demo_train import deterministic, pretrain

    start = time.perf_counter()
    shape, recipe = SHAPES[size], RECIPES[size]
    train_cases, eval_cases = demo_data.task_split(seed)
    with progress_bars(console) as progress, deterministic(seed, recipe.threads):
        task = progress.add_task("training the BPE tokenizer", total=1, note="")
        tokenizer = build_tokenizer(shape.vocab)
        stream = [t for ids in tokenizer(demo_data.corpus())["input_ids"] for t in [*ids, EOS_ID]]
        progress.update(task, completed=1, note=f"vocab {len(tokenizer)}, corpus {len(stream):,} tokens")

        # the embeddings keep the size's vocabulary even where the corpus yields fewer merges (mid)
        model = AutoModelForCausalLM.from_config(build_config(arch, shape, shape.vocab, TRAINED_INIT_RANGE),
                                                 dtype=torch.float32)
        n_params = sum(p.numel() for p in model.parameters())
        task = progress.add_task(f"pre-training the base ({n_params / 1e6:.1f}M)",
                                 total=recipe.pretrain.steps, note="")
        on_step = lambda step, loss: progress.update(task, completed=step, note=f"loss {loss:.3f}")  # noqa: E731
        pretrain_loss = pretrain(model, stream, recipe.block, recipe.pretrain, seed, on_step)
        _save_base(model, tokenizer, tmp, STOP_IDS)

        task = progress.add_task("scoring the base (held-out questions)", total=1, note="")
        base = greedy_accuracy(model, tokenizer, eval_cases)
        progress.update(task, completed=1, note=f"{base:.0%}")

        finetune_loss, merged = fine_tune_adapter(model, tokenizer, arch, recipe, train_cases, eval_cases, seed + 1, progress,
                                           tmp / "adapter")

    for path in (tmp / EVAL_FILE, tmp / "adapter" / EVAL_FILE):
        write_eval(path, eval_cases)
    write_eval(tmp / "train.jsonl", train_cases)
    return DemoReport(arch, size, seed, False, n_params, len(tokenizer), len(eval_cases), len(train_cases), base, merged,
                      pretrain_loss, finetune_loss, time.perf_counter() - start)


def progress_bars(console: Console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
                    TimeElapsedColumn(), console=console)


def fine_tune_adapter(model, tokenizer, arch: str, recipe: Recipe, train_cases: list[EvalCase], eval_cases: list[EvalCase],
               seed: int, progress, out: Path, what: str = "") -> tuple[float, float]:
    """Fine-tune a LoRA adapter of ``model`` (which it changes: merged to score it) on ``train_cases``, save it
    to ``out``; (last loss, the merged model's accuracy on ``eval_cases``)."""
    from peft import get_peft_model

    from loraship.export.demo_train import finetune

    peft_model = get_peft_model(model, _lora(arch, recipe.rank, TRAINED_EXTRA_MODULES))
    examples = _chat_examples(tokenizer, train_cases)
    task = progress.add_task(f"fine-tuning LoRA{what} ({len(train_cases)} chat turns)",
                             total=recipe.finetune.steps, note="")
    on_step = lambda step, loss: progress.update(task, completed=step, note=f"loss {loss:.4f}")  # noqa: E731
    finetune_loss = finetune(peft_model, examples, PAD_ID, recipe.finetune, seed, on_step)
    peft_model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False)

    task = progress.add_task(f"scoring the merged model{what}", total=1, note="")
    merged = greedy_accuracy(peft_model.merge_and_unload(), tokenizer, eval_cases)
    progress.update(task, completed=1, note=f"{merged:.0%}")
    return finetune_loss, merged


def _chat_examples(tokenizer, cases: list[EvalCase]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reply ids + <|end|>) per case, each prompt without and with a leading <s>.

    A chat through the template (``apply_chat_template``, a served ``messages`` request) has no
    ``<s>``; the rendered text through the tokenizer (a ``text_input`` request) gets one.
    """
    from loraship.export.evalset import prompt_ids

    examples = []
    for ids, case in zip(prompt_ids(tokenizer, cases), cases):
        reply = tokenizer(case.answer, add_special_tokens=False)["input_ids"] + [END_ID]
        examples += [(ids, reply), ([BOS_ID, *ids], reply)]
    return examples


def greedy_accuracy(model, tokenizer, cases: list[EvalCase]) -> float:
    from loraship.export.verify import torch_replies

    return torch_replies(model, tokenizer, cases, PAD_ID, STOP_IDS).accuracy
