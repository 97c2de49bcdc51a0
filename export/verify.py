"""Parity of an exported ONNX decoder (run by the loraship engine) with the merged PyTorch model.

Both sides get the same token ids: each prompt alone, and the shortest and longest prompts as one
left-padded batch of 2 on the engine's side. The PyTorch side runs each prompt alone, in fp32 with
transformers' eager (reference) attention: sdpa silently drops Gemma-2's attention soft-capping and
gpt-oss's sinks, and a merged config no longer says ``_attn_implementation`` (transformers drops it on
save). Where the model computes differently past some position (a sliding window, longrope's original
context), one more prompt reaches past it (:func:`thresholds`). Reported: the max-abs-diff of the
first-step (last prompt position) logits, and greedy token agreement over ``max_new_tokens`` new tokens,
where a sequence's agreement is its common prefix with the PyTorch tokens divided by the longer of the
two (so 1.0 means identical, and a flip at step k of 32 gives k/32). The two sides run one after the
other, so only one copy of the model is in memory at a time.

Why one module of ~600 lines: export's parity probe, ``loraship verify`` and :func:`verify_adapters` (issue 19)
are three callers of one comparison (:func:`_compare`: the same prompts, thresholds, rules and judgement),
and splitting it would turn that comparison's private pieces into an interface between files.

Defaults by export dtype:

* fp32: atol 1e-4 on logits, tokens identical (agreement 1.0);
* fp16: atol 5e-2 on logits, mean agreement >= 0.9 (fp16 weights and KV cache round each
  step; a near-tie between the top-2 logits can flip a greedy token);
* int4: 4-bit weights change the model (greedy tokens of free-running text diverge within a few steps,
  a confident fine-tune's logits move by 1 or more), so the bound is relative to what a wrong model
  gets: the export's max |dlogit| must stay within half of the base model's distance from the merged
  one (the base that ``merge`` recorded, or ``base``; a correct int4 export of the demo fine-tune
  stays within a tenth, an int4 export of the base is as far as the base). Without a base, the eval
  set judges: the engine's accuracy may trail PyTorch's by at most 10 points. With neither, int4 fails.

With an eval set (``eval.jsonl`` in the export folder, carried there from the adapter by merge and
export, or ``eval_file``), verify also asks its questions through the chat template, greedily, on
both sides and reports each side's accuracy (see evalset.py): what the fine-tune still knows after
export and quantization. ``min_accuracy`` makes the engine's accuracy part of passing.

:func:`probe` is the short form ``export`` runs on every build before it keeps it. :func:`verify_adapters`
checks every adapter a base export with LoRA slots serves, through the multi-adapter engine, against its
own merged model.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraship.errors import LorashipError
from loraship.export import hfcompat
from loraship.export.evalset import (
    EVAL_FILE, NO_CHAT_TEMPLATE, EvalCase, EvalResult, max_reply_tokens, prompt_ids, read_eval, score,
)
from loraship.export.manifest import read_export, record_verify

TORCH_BATCH = 8  # prompts per PyTorch generate call (eval sets)
DEFAULT_PROMPTS = (
    "Hello, how are you today?",
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "LoRA adds small low-rank matrices to the attention and MLP projections of a large model, and after "
    "fine-tuning the adapter can be merged into the base weights.",
)
TOLERANCES: dict[str, tuple[float | None, float]] = {"fp32": (1e-4, 1.0), "fp16": (5e-2, 0.9), "int4": (None, 0.0)}
INT4_BASE_FRACTION = 0.5  # int4: max |dlogit| <= this x the base model's max |dlogit| from the merged model
INT4_EVAL_SLACK = 0.1  # int4 without a base: eval accuracy through the engine >= PyTorch's minus this
PAST_THRESHOLD = 16  # the long prompt's tokens past the last threshold
PROBE_NEW_TOKENS = 8


@dataclass
class Case:
    """One comparison: a batch of prompts run on both sides."""

    prompts: list[str]
    max_abs_logit_diff: float
    token_agreement: list[float]
    torch_tokens: list[list[int]]
    onnx_tokens: list[list[int]]


@dataclass
class EvalReport:
    """The eval set's questions answered by the merged model (PyTorch) and by the export (engine)."""

    file: str
    max_new_tokens: int
    torch: EvalResult
    engine: EvalResult

    @property
    def same_replies(self) -> float:
        """Fraction of questions both sides answer with the same text."""
        pairs = list(zip(self.torch.replies, self.engine.replies))
        return sum(a == b for a, b in pairs) / len(pairs)

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "max_new_tokens": self.max_new_tokens, "cases": len(self.engine.replies),
                "torch_accuracy": self.torch.accuracy, "engine_accuracy": self.engine.accuracy,
                "same_replies": self.same_replies, "torch": self.torch.to_dict(), "engine": self.engine.to_dict()}


@dataclass
class Report:
    """What `loraship verify` (or the export's probe) measured and whether it passed."""

    dtype: str
    engine: str
    atol: float | None  # None: no bound on logits
    min_token_agreement: float
    max_new_tokens: int
    max_abs_logit_diff: float
    token_agreement: float
    tokens_identical: bool
    tokenizer_match: bool
    passed: bool
    providers: list[str]
    versions: dict[str, str]
    cases: list[Case] = field(default_factory=list)
    eval: EvalReport | None = None
    min_accuracy: float | None = None
    thresholds: dict[str, int] = field(default_factory=dict)  # what the long prompt reaches past, and where
    base: str | None = None  # int4: the base model the bound is relative to
    base_distance: float | None = None  # its max |dlogit| from the merged model
    failure: str | None = None  # why it did not pass, in one line
    judged: bool = True  # False: int4 with no reference (no base, no eval set), so not known right or wrong

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["eval"] = self.eval.to_dict() if self.eval else None
        return data


def read_prompts(path: Path | None) -> list[str]:
    """Prompts from a text file (one per line) or JSONL (``{"prompt": ...}``); defaults otherwise."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    path = Path(path)
    if not path.is_file():
        raise LorashipError(f"prompts file not found: {path}", "pass --prompts a text file with one prompt per line")
    prompts = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                line = str(json.loads(line)["prompt"])
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise LorashipError(f"bad JSONL line in {path}: {line[:60]}", 'write {"prompt": "..."} per line') from exc
        prompts.append(line)
    if not prompts:
        raise LorashipError(f"no prompts in {path}", "write one prompt per line")
    return prompts


def agreement(ref: list[int], got: list[int]) -> float:
    """Common prefix of two token sequences over the longer length (1.0 when identical)."""
    longest = max(len(ref), len(got))
    if longest == 0:
        return 1.0
    same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
    return same / longest


def thresholds(config: dict[str, Any]) -> dict[str, int]:
    """Positions past which ``config``'s model computes differently: a prompt shorter than these cannot
    tell a right export from a wrong one (a sliding window on the wrong layers, a missing rope switch)."""
    config = hfcompat.standard_config(config)
    found: dict[str, int] = {}
    window = config.get("sliding_window")
    if window is None and "local" in str(config.get("attention_layers") or config.get("attention_types") or ""):
        window = config.get("window_size")  # GPT-Neo's local layers
    layer_types = config.get("layer_types") or []
    sliding = not layer_types or any("sliding" in str(t) for t in layer_types)
    if isinstance(window, int) and window > 0 and config.get("use_sliding_window", True) is not False and sliding:
        found["sliding window"] = window
    rope = config.get("rope_scaling") or config.get("rope_parameters") or {}
    original = rope.get("original_max_position_embeddings", config.get("original_max_position_embeddings"))
    if rope.get("rope_type", rope.get("type")) in ("longrope", "su") and original and original < config["max_position_embeddings"]:
        found["longrope's original context"] = int(original)
    return found


class TorchSide:
    """A PyTorch causal LM in fp32 with eager attention: first-step logits and greedy tokens, each prompt alone."""

    def __init__(self, model, tokenizer, work: tempfile.TemporaryDirectory | None = None) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.tokenizer = tokenizer
        self._work = work

    @classmethod
    def load(cls, folder: Path) -> "TorchSide":
        """The model saved in ``folder`` (transformers 4.x or 5.x), fp32, eager attention."""
        import torch
        from transformers import AutoTokenizer

        from loraship.export.merge import strip_quantization

        work = tempfile.TemporaryDirectory(prefix="loraship-verify-")
        view = hfcompat.compat_view(folder, Path(work.name) / "model")
        strip_quantization(view / "config.json")  # a QLoRA base (int4's reference) in full precision, as merge loads it
        model = hfcompat.load_causal_lm(view, "model", dtype=torch.float32, attn_implementation="eager").eval()
        return cls(model, AutoTokenizer.from_pretrained(view), work)

    def close(self) -> None:
        if self._work is not None:
            self._work.cleanup()
        self.model = None

    def logits(self, ids: list[list[int]], pad_id: int):
        input_ids, mask = left_pad(ids, pad_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with self.torch.no_grad():
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions)
        return out.logits[:, -1, :].float().numpy()

    def generate(self, ids: list[list[int]], pad_id: int, eos_ids: list[int], max_new: int) -> list[list[int]]:
        return greedy_ids(self.model, ids, pad_id, eos_ids, max_new)

    def outputs(self, groups: list[list[list[int]]], pad_id: int, eos_ids: list[int], max_new: int) -> "Outputs":
        """Each prompt of each group alone: what an export should give, batched or not (no tokens
        where ``max_new`` is 0)."""
        import numpy as np

        logits = [np.concatenate([self.logits([ids], pad_id) for ids in group]) for group in groups]
        tokens = [[self.generate([ids], pad_id, eos_ids, max_new)[0] if max_new else [] for ids in group] for group in groups]
        return Outputs(logits, tokens)


@dataclass
class Outputs:
    """One side's first-step logits ``[B, V]`` and greedy tokens, per group of prompts."""

    logits: list[Any]
    tokens: list[list[list[int]]]


def engine_outputs(engine, groups: list[list[list[int]]], max_new: int) -> Outputs:
    """The export's logits and greedy tokens, each group as one batch."""
    from loraship.engine import SamplingParams

    logits = [engine.prefill_logits(ids) for ids in groups]
    tokens = [[c.token_ids for c in engine.generate(ids, SamplingParams(max_tokens=max_new))] for ids in groups]
    return Outputs(logits, tokens)


def left_pad(ids: list[list[int]], pad_id: int):
    """``input_ids`` and ``attention_mask`` tensors of a left-padded batch."""
    import torch

    width = max(map(len, ids))
    input_ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in ids])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids])
    return input_ids, mask


def greedy_ids(model, ids: list[list[int]], pad_id: int, eos_ids: list[int], max_new: int) -> list[list[int]]:
    """Greedy new tokens of a transformers model, ``TORCH_BATCH`` prompts at a time left-padded (an
    eval set of any size stays within memory), each cut after its first EOS."""
    import torch

    result = []
    for start in range(0, len(ids), TORCH_BATCH):
        input_ids, mask = left_pad(ids[start : start + TORCH_BATCH], pad_id)
        with torch.no_grad():
            out = model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=0,
                do_sample=False, pad_token_id=pad_id, eos_token_id=eos_ids or None,
                temperature=None, top_p=None, top_k=None,
            )
        for row in out[:, input_ids.shape[1]:].tolist():
            stop = next((i for i, t in enumerate(row) if t in eos_ids), None)
            result.append(row if stop is None else row[: stop + 1])
    return result


def torch_replies(model, tokenizer, cases: list[EvalCase], pad_id: int, eos_ids: list[int]) -> EvalResult:
    """A transformers model's greedy replies to ``cases`` through the tokenizer's chat template, scored."""
    out = greedy_ids(model, prompt_ids(tokenizer, cases), pad_id, eos_ids, max_reply_tokens(tokenizer, cases))
    return score(cases, [tokenizer.decode(r, skip_special_tokens=True) for r in out])


def long_prompt(encode, length: int) -> list[int]:
    """Token ids of a prompt exactly ``length`` tokens long (the last default prompt, repeated)."""
    ids: list[int] = []
    while len(ids) < length:
        ids += encode(" ".join([DEFAULT_PROMPTS[-1]] * 4))
    return ids[:length]


@dataclass
class Prompts:
    """What both sides are asked: texts (for the report) and their ids, in groups (each alone, then a batch)."""

    texts: list[str]
    ids: list[list[int]]
    groups: list[list[int]]  # indices into texts/ids

    @classmethod
    def of(cls, texts: list[str], encode, config: dict[str, Any], max_context: int, max_new: int) -> "Prompts":
        ids = [encode(t) for t in texts]
        by_len = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        groups = [[i] for i in range(len(texts))]
        if len(texts) > 1:
            groups.append([by_len[0], by_len[-1]])  # batch 2 with left padding
        limits = thresholds(config)
        if limits:
            length = max(limits.values()) + PAST_THRESHOLD
            if length + max_new <= max_context:
                what = ", ".join(f"{k} {v}" for k, v in limits.items())
                texts.append(f"<{length}-token prompt past the {what}>")
                ids.append(long_prompt(encode, length))
                groups.append([len(texts) - 1])
        return cls(texts, ids, groups)

    def batches(self) -> list[list[list[int]]]:
        return [[self.ids[i] for i in g] for g in self.groups]


def _merged_base(merged: Path) -> Path | None:
    """The base that ``loraship merge`` recorded beside the merged model, if it is still there."""
    from loraship.export.merge import merge_record

    base = (merge_record(merged) or {}).get("base")
    return Path(base) if base and (Path(base) / "config.json").is_file() else None


def _judge(report: Report, base_logits=None, merged_logits=None) -> None:
    """Set ``passed`` and ``failure`` of ``report`` from its cases (and the base's logits, for int4)."""
    import numpy as np

    if report.dtype == "int4" and report.atol is None and base_logits is not None:
        report.base_distance = float(max(np.abs(b - m).max() for b, m in zip(base_logits, merged_logits)))
        report.atol = INT4_BASE_FRACTION * report.base_distance
    within = report.atol is None or report.max_abs_logit_diff <= report.atol
    agrees = report.token_agreement >= report.min_token_agreement and (
        report.tokens_identical or report.min_token_agreement < 1.0)
    report.passed = within and agrees
    worst = max(report.cases, key=lambda c: c.max_abs_logit_diff)
    label = worst.prompts[0] if worst.prompts[0].startswith("<") else worst.prompts[0][:48]  # "<40-token prompt past ...>"
    where = f", worst on {label!r}" if len(report.cases) > 1 else ""
    if not report.passed:
        bound = (f"half the base's {report.base_distance:.3g}" if report.base_distance is not None
                 else bound_text(report.atol))
        report.failure = (f"max logit diff {report.max_abs_logit_diff:.3g} (atol {bound}), greedy token agreement "
                          f"{report.token_agreement:.1%} (need {report.min_token_agreement:.0%}){where}")
    ev = report.eval
    if report.min_accuracy is not None and ev is not None and ev.engine.accuracy < report.min_accuracy:
        report.passed = False
        report.failure = (f"eval accuracy {ev.engine.accuracy:.1%} through the engine is below --min-accuracy "
                          f"{report.min_accuracy:.0%} (PyTorch: {ev.torch.accuracy:.1%})")
    elif report.dtype == "int4" and report.atol is None:  # no base: the eval set is the only reference
        if ev is None:
            report.passed, report.judged = False, False
            report.failure = "int4 has no reference to be judged by: no base model recorded and no eval set"
        elif ev.engine.accuracy < ev.torch.accuracy - INT4_EVAL_SLACK:
            report.passed = False
            report.failure = (f"int4 eval accuracy {ev.engine.accuracy:.1%} through the engine trails PyTorch's "
                              f"{ev.torch.accuracy:.1%} by more than {INT4_EVAL_SLACK:.0%}")


@dataclass
class _Rules:
    """What an export is judged by: its dtype's bounds (or the caller's), and its ids and config."""

    dtype: str
    engine: str
    atol: float | None
    min_agreement: float
    pad_id: int
    eos_ids: list[int]
    config: dict[str, Any]

    @classmethod
    def of(cls, onnx: Path, atol: float | None, min_agreement: float | None) -> "_Rules":
        manifest = read_export(onnx)
        dtype = manifest.dtype or "fp32"
        default_atol, default_agree = TOLERANCES.get(dtype, TOLERANCES["fp16"])
        config = hfcompat.read_json(onnx / "config.json", "export config", "re-run `loraship export`")
        return cls(dtype, manifest.engine or "optimum", default_atol if atol is None else atol,
                   default_agree if min_agreement is None else min_agreement, int(manifest.pad_token_id),
                   list(manifest.eos_token_ids), config)


def parity(
    onnx: Path,
    reference: Path | TorchSide,
    prompts: list[str],
    max_new_tokens: int,
    atol: float | None = None,
    min_agreement: float | None = None,
    provider: str = "cpu",
    eval_cases: list[EvalCase] | None = None,
    eval_file: Path | None = None,
    min_accuracy: float | None = None,
    base: Path | None = None,
    threads: int | None = None,
) -> Report:
    """Compare the export ``onnx`` with ``reference`` (a model folder, or a loaded :class:`TorchSide`).

    The engine runs first and is closed before the PyTorch model loads (a folder reference), so the two
    never hold memory together. ``base`` (int4) is loaded last, for the bound relative to it.
    """
    from loraship.engine import Engine

    rules = _Rules.of(onnx, atol, min_agreement)
    engine = Engine.load(onnx, provider=provider, threads=threads)
    try:
        asked = Prompts.of(list(prompts), engine.encode, rules.config, engine.max_context, max_new_tokens)
        got = engine_outputs(engine, asked.batches(), max_new_tokens)
        providers = engine.providers
        engine_eval = _engine_eval(engine, eval_cases) if eval_cases else None
    finally:
        del engine
    return _compare(rules, reference, prompts, asked, got, providers, max_new_tokens, engine_eval, eval_cases, eval_file,
                    min_accuracy, base)


def _compare(rules: _Rules, reference: Path | TorchSide, prompts: list[str], asked: Prompts, got: Outputs,
             providers: list[str], max_new_tokens: int, engine_eval: tuple | None, eval_cases: list[EvalCase] | None,
             eval_file: Path | None, min_accuracy: float | None, base: Path | None) -> Report:
    """The reference's side of :func:`parity` (loaded here, closed before ``base`` loads), and the judged report."""
    import numpy as np
    import onnxruntime
    import torch
    import transformers

    pad_id, eos_ids = rules.pad_id, rules.eos_ids
    side = reference if isinstance(reference, TorchSide) else TorchSide.load(reference)
    try:
        tokenizer_match = all(side.tokenizer(t)["input_ids"] == ids
                              for t, ids in zip(prompts, asked.ids))
        ref = side.outputs(asked.batches(), pad_id, eos_ids, max_new_tokens)
        evaluated = None
        if engine_eval is not None:
            ids, max_new, replies = engine_eval
            torch_out = [side.tokenizer.decode(r, skip_special_tokens=True) for r in side.generate(ids, pad_id, eos_ids, max_new)]
            evaluated = EvalReport(str(eval_file), max_new, score(eval_cases, torch_out), score(eval_cases, replies))
    finally:
        if not isinstance(reference, TorchSide):
            side.close()

    atol = rules.atol
    base_logits = None
    if rules.dtype == "int4" and atol is None and base is not None:
        base_side = TorchSide.load(base)
        try:
            base_logits = base_side.outputs(asked.batches(), pad_id, eos_ids, 0).logits
        finally:
            base_side.close()

    cases = []
    for group, eng_logits, ref_logits, eng_tokens, ref_tokens in zip(asked.groups, got.logits, ref.logits, got.tokens, ref.tokens):
        diff = float(np.abs(eng_logits - ref_logits).max())
        cases.append(Case([asked.texts[i] for i in group], diff, [agreement(r, g) for r, g in zip(ref_tokens, eng_tokens)],
                          ref_tokens, eng_tokens))
    all_agree = [a for c in cases for a in c.token_agreement]
    report = Report(
        dtype=rules.dtype, engine=rules.engine, atol=atol, min_token_agreement=rules.min_agreement,
        max_new_tokens=max_new_tokens, max_abs_logit_diff=max(c.max_abs_logit_diff for c in cases),
        token_agreement=float(sum(all_agree) / len(all_agree)), tokens_identical=all(a == 1.0 for a in all_agree),
        tokenizer_match=tokenizer_match, passed=False, providers=providers,
        versions={"torch": torch.__version__, "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__},
        cases=cases, eval=evaluated, min_accuracy=min_accuracy, thresholds=thresholds(rules.config),
        base=str(base) if base_logits is not None else None,
    )
    _judge(report, base_logits, ref.logits)
    return report


@dataclass(frozen=True)
class AdapterCheck:
    """One adapter for :func:`verify_adapters`: its converted folder (``loraship convert-adapter``) and its
    own merged model (``loraship merge`` of the same peft adapter), and an eval set (default: the converted
    folder's ``eval.jsonl``, which ``convert-adapter`` carries from the adapter)."""

    converted: Path
    merged: Path
    eval_file: Path | None = None


def verify_adapters(
    onnx: Path,
    adapters: dict[str, AdapterCheck],
    prompts_file: Path | None = None,
    atol: float | None = None,
    min_agreement: float | None = None,
    max_new_tokens: int = 32,
    provider: str = "cpu",
    min_accuracy: float | None = None,
    threads: int | None = None,
    record: bool = True,
) -> dict[str, Report]:
    """Check each adapter through the multi-adapter engine against its own merged model (PyTorch): the
    base export with LoRA slots ``onnx`` serves every adapter at once, registered by name, and each
    adapter's prompts decode in ONE batch with the others' (rows on different adapters in each step), as
    a server would run them; first-step logits per adapter come from its prompts prefilled alone. Judged
    as :func:`verify` judges an export of that merged model (fp32: logits within 1e-4, identical greedy
    tokens), with the eval set's accuracy on both sides where the adapter has one. With ``record``, each
    report is written into its converted folder's ``loraship.json`` (``verify``). Returns name -> report."""
    from loraship.engine import Engine, SamplingParams

    onnx = Path(onnx)
    if not read_export(onnx).lora_slots:
        raise LorashipError(f"{onnx} has no LoRA slots", "pass the base exported with `loraship export --max-adapters`")
    if not adapters:
        raise LorashipError("no adapters to verify", "name at least one adapter with its converted folder and merged model")
    for name, check in adapters.items():
        if not (Path(check.merged) / "config.json").is_file():
            raise LorashipError(f"no merged model for adapter {name} in {check.merged}",
                                "pass the folder `loraship merge` wrote for that adapter")
    prompts = read_prompts(prompts_file)
    evals = {}
    for name, check in adapters.items():
        path = check.eval_file or (Path(check.converted) / EVAL_FILE if (Path(check.converted) / EVAL_FILE).is_file() else None)
        evals[name] = (path, read_eval(path)) if path is not None else (None, None)
        if min_accuracy is not None and path is None:
            raise LorashipError(f"--min-accuracy needs an eval set, and adapter {name} has none", "pass its eval set")
    rules = _Rules.of(onnx, atol, min_agreement)
    engine = Engine.load(onnx, provider=provider, threads=threads)
    try:
        for name, check in adapters.items():
            try:
                engine.adapters.register(name, check.converted)
            except ValueError as exc:  # AdapterError, RegistryError: one line naming why
                raise LorashipError(f"adapter {name}: {exc}", "convert it for this base (`loraship convert-adapter`)") from None
        asked = {name: Prompts.of(list(prompts), engine.encode, rules.config, engine.max_context, max_new_tokens)
                 for name in adapters}
        order = [(name, g, i) for name in adapters for g, group in enumerate(asked[name].batches()) for i in range(len(group))]
        completions = engine.generate([asked[name].batches()[g][i] for name, g, i in order],
                                      SamplingParams(max_tokens=max_new_tokens), adapters=[name for name, _, _ in order])
        tokens = {name: [[[] for _ in group] for group in asked[name].batches()] for name in adapters}
        for (name, g, i), completion in zip(order, completions):
            tokens[name][g][i] = completion.token_ids
        got = {name: Outputs([engine.prefill_logits(ids, adapters=[name] * len(ids)) for ids in asked[name].batches()],
                             tokens[name]) for name in adapters}
        engine_evals = {name: _engine_eval(engine, evals[name][1], name) if evals[name][1] else None for name in adapters}
        providers = engine.providers
    finally:
        del engine
    reports = {}
    for name, check in adapters.items():
        eval_file, eval_cases = evals[name]
        reports[name] = _compare(rules, Path(check.merged), list(prompts), asked[name], got[name], providers, max_new_tokens,
                                 engine_evals[name], eval_cases, eval_file, min_accuracy, None)
        if record:
            record_verify(Path(check.converted), {**reports[name].to_dict(), "base": str(onnx), "merged": str(check.merged)})
    return reports


def _engine_eval(engine, cases: list[EvalCase], adapter: str | None = None) -> tuple[list[list[int]], int, list[str]]:
    """The eval questions through the engine's own chat template rendering (what a served ``messages``
    request gets), on ``adapter`` if given: their ids, the new tokens allowed, and the engine's replies."""
    from transformers import AutoTokenizer

    from loraship.engine import SamplingParams
    from loraship.engine.chat import ChatTemplate

    chat = ChatTemplate.load(engine.model_dir)
    if chat is None:
        raise LorashipError(*NO_CHAT_TEMPLATE)
    max_new = max_reply_tokens(AutoTokenizer.from_pretrained(engine.model_dir), cases)
    ids = [chat.encode(list(c.messages), engine.tokenizer) for c in cases]
    replies = [c.text for c in engine.generate(ids, SamplingParams(max_tokens=max_new), adapters=[adapter] * len(ids))]
    return ids, max_new, replies


def verify(
    merged: Path,
    onnx: Path,
    prompts_file: Path | None = None,
    atol: float | None = None,
    min_agreement: float | None = None,
    max_new_tokens: int = 32,
    provider: str = "cpu",
    eval_file: Path | None = None,
    min_accuracy: float | None = None,
    base: Path | None = None,
) -> Report:
    """Compare ``onnx`` (engine) with ``merged`` (PyTorch); write the report into its manifest.

    ``eval_file`` (default: ``onnx/eval.jsonl`` when there is one) adds the eval-set accuracies; ``base``
    (default: the base ``merge`` recorded) is int4's reference.
    """
    merged, onnx = Path(merged), Path(onnx)
    if not (merged / "config.json").is_file():
        raise LorashipError(f"no merged model in {merged}", "pass --merged the folder written by `loraship merge`")
    if base is not None and not (Path(base) / "config.json").is_file():
        raise LorashipError(f"no base model in {base}", "pass --base the model folder the adapter was merged into")
    read_export(onnx)
    prompts = read_prompts(prompts_file)
    if eval_file is None and (onnx / EVAL_FILE).is_file():
        eval_file = onnx / EVAL_FILE
    eval_cases = read_eval(eval_file) if eval_file is not None else None
    if min_accuracy is not None and eval_cases is None:
        raise LorashipError(f"--min-accuracy needs an eval set, and {onnx} has no {EVAL_FILE}", "pass --eval FILE")
    report = parity(onnx, merged, prompts, max_new_tokens, atol, min_agreement, provider, eval_cases, eval_file,
                    min_accuracy, base=Path(base) if base else _merged_base(merged))
    record_verify(onnx, report.to_dict())
    return report


def probe(onnx: Path, merged: Path) -> Report:
    """The parity probe ``export`` runs on a fresh build: one short prompt alone, and one past each
    threshold of the model (:func:`thresholds`), :data:`PROBE_NEW_TOKENS` greedy tokens each, judged
    as verify judges. Nothing is written."""
    return parity(onnx, merged, [DEFAULT_PROMPTS[0]], PROBE_NEW_TOKENS, base=_merged_base(merged))


def bound_text(atol: float | None) -> str:
    """An atol as printed: ``none`` when there is no bound."""
    return "none" if atol is None else f"{atol:g}"


def check(report: Report) -> None:
    """Raise a one-line LorashipError if ``report`` did not pass."""
    if report.passed:
        return
    failure = report.failure or "parity check failed"
    if failure.startswith("eval accuracy"):
        raise LorashipError(failure, "export at a higher precision (fp16 or fp32), or lower --min-accuracy if the loss is expected")
    if failure.startswith("int4 has no reference"):
        raise LorashipError(f"int4 parity cannot be judged: {failure.split(': ', 1)[1]}",
                            "pass --base with the model the adapter was merged into, or --eval with a held-out set")
    if failure.startswith("int4 eval"):
        raise LorashipError(failure, "export fp16 or fp32, or pass --base to judge int4 by the base model's distance")
    raise LorashipError(f"parity check failed: {failure}",
                        "re-export (fp32 for exact parity) or relax --atol/--min-agreement if the difference is expected")
