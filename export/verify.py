"""Parity of an exported ONNX decoder (run by the loraship engine) with the merged PyTorch model.

Both sides get the same token ids: each prompt alone, and the shortest and longest prompts
as one left-padded batch of 2. Reported: the max-abs-diff of the first-step (last prompt
position) logits, and greedy token agreement over ``max_new_tokens`` new tokens, where a
sequence's agreement is its common prefix with the PyTorch tokens divided by the longer of
the two (so 1.0 means identical, and a flip at step k of 32 gives k/32).

Defaults by export dtype:

* fp32: atol 1e-4 on logits, tokens identical (agreement 1.0);
* fp16: atol 5e-2 on logits, mean agreement >= 0.9 (fp16 weights and KV cache round each
  step; a near-tie between the top-2 logits can flip a greedy token);
* int4: no bound on logits or token agreement (4-bit weights change the model: greedy tokens of
  free-running text diverge within a few steps, and a confident fine-tune's logits move by 2 or
  more); the figures say by how much, and an eval set (``min_accuracy``) says whether what the
  fine-tune learned survived.

With an eval set (``eval.jsonl`` in the export folder, carried there from the adapter by merge and
export, or ``eval_file``), verify also asks its questions through the chat template, greedily, on
both sides and reports each side's accuracy (see evalset.py): what the fine-tune still knows after
export and quantization. ``min_accuracy`` makes the engine's accuracy part of passing.
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
from loraship.export.manifest import read_manifest, update_manifest

TORCH_BATCH = 8  # prompts per PyTorch generate call
DEFAULT_PROMPTS = (
    "Hello, how are you today?",
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "LoRA adds small low-rank matrices to the attention and MLP projections of a large model, and after "
    "fine-tuning the adapter can be merged into the base weights.",
)
TOLERANCES: dict[str, tuple[float | None, float]] = {"fp32": (1e-4, 1.0), "fp16": (5e-2, 0.9), "int4": (None, 0.0)}


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
    """What `loraship verify` measured and whether it passed."""

    dtype: str
    engine: str
    atol: float | None  # None: no bound
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


class TorchSide:
    """The merged PyTorch model: first-step logits and greedy generate, left-padded."""

    def __init__(self, merged: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self._work = tempfile.TemporaryDirectory(prefix="loraship-verify-")
        view = hfcompat.compat_view(merged, Path(self._work.name) / "merged")
        self.model = AutoModelForCausalLM.from_pretrained(view).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(view)

    def close(self) -> None:
        self._work.cleanup()

    def logits(self, ids: list[list[int]], pad_id: int):
        input_ids, mask = left_pad(ids, pad_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with self.torch.no_grad():
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions)
        return out.logits[:, -1, :].float().numpy()

    def generate(self, ids: list[list[int]], pad_id: int, eos_ids: list[int], max_new: int) -> list[list[int]]:
        return greedy_ids(self.model, ids, pad_id, eos_ids, max_new)


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


def _eval(engine, side: TorchSide, cases: list[EvalCase], file: Path, pad_id: int, eos_ids: list[int]) -> EvalReport:
    """Both sides' greedy replies to the eval set, from the same prompt ids: the engine's own chat
    template rendering (what a served ``messages`` request gets)."""
    from loraship.engine import SamplingParams
    from loraship.engine.chat import ChatTemplate

    chat = ChatTemplate.load(engine.model_dir)
    if chat is None:
        raise LorashipError(*NO_CHAT_TEMPLATE)
    max_new = max_reply_tokens(side.tokenizer, cases)
    ids = [chat.encode(list(c.messages), engine.tokenizer) for c in cases]
    torch_out = [side.tokenizer.decode(r, skip_special_tokens=True) for r in side.generate(ids, pad_id, eos_ids, max_new)]
    engine_out = [c.text for c in engine.generate(ids, SamplingParams(max_tokens=max_new))]  # max_batch rows at a time
    return EvalReport(str(file), max_new, score(cases, torch_out), score(cases, engine_out))


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
) -> Report:
    """Compare ``onnx`` (engine) with ``merged`` (PyTorch); write the report into loraship.json.

    ``eval_file`` (default: ``onnx/eval.jsonl`` when there is one) adds the eval-set accuracies.
    """
    import numpy as np
    import onnxruntime
    import torch
    import transformers

    from loraship.engine import Engine, SamplingParams

    merged, onnx = Path(merged), Path(onnx)
    if not (merged / "config.json").is_file():
        raise LorashipError(f"no merged model in {merged}", "pass --merged the folder written by `loraship merge`")
    manifest = read_manifest(onnx)
    dtype = manifest.get("dtype", "fp32")
    default_atol, default_agree = TOLERANCES.get(dtype, TOLERANCES["fp16"])
    atol = default_atol if atol is None else atol
    min_agreement = default_agree if min_agreement is None else min_agreement
    prompts = read_prompts(prompts_file)
    if eval_file is None and (onnx / EVAL_FILE).is_file():
        eval_file = onnx / EVAL_FILE
    eval_cases = read_eval(eval_file) if eval_file is not None else None
    if min_accuracy is not None and eval_cases is None:
        raise LorashipError(f"--min-accuracy needs an eval set, and {onnx} has no {EVAL_FILE}", "pass --eval FILE")

    engine = Engine.load(onnx, provider=provider)
    side = TorchSide(merged)
    try:
        pad_id, eos_ids = int(manifest["pad_token_id"]), [int(i) for i in manifest["eos_token_ids"]]
        encoded = [engine.encode(p) for p in prompts]
        tokenizer_match = all(side.tokenizer(p)["input_ids"] == ids for p, ids in zip(prompts, encoded))
        by_len = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        groups = [[i] for i in range(len(prompts))]
        if len(prompts) > 1:
            groups.append([by_len[0], by_len[-1]])  # batch 2 with left padding
        cases = []
        for group in groups:
            ids = [encoded[i] for i in group]
            diff = float(np.abs(engine.prefill_logits(ids) - side.logits(ids, pad_id)).max())
            ref = side.generate(ids, pad_id, eos_ids, max_new_tokens)
            got = [c.token_ids for c in engine.generate(ids, SamplingParams(max_tokens=max_new_tokens))]
            cases.append(Case([prompts[i] for i in group], diff, [agreement(r, g) for r, g in zip(ref, got)], ref, got))
        evaluated = _eval(engine, side, eval_cases, eval_file, pad_id, eos_ids) if eval_cases else None
    finally:
        side.close()

    all_agree = [a for c in cases for a in c.token_agreement]
    max_diff = max(c.max_abs_logit_diff for c in cases)
    mean_agree = float(sum(all_agree) / len(all_agree))
    identical = all(a == 1.0 for a in all_agree)
    passed = (atol is None or max_diff <= atol) and mean_agree >= min_agreement and (identical or min_agreement < 1.0)
    if min_accuracy is not None:
        passed = passed and evaluated.engine.accuracy >= min_accuracy
    report = Report(
        dtype=dtype, engine=manifest.get("engine", "optimum"), atol=atol, min_token_agreement=min_agreement,
        max_new_tokens=max_new_tokens, max_abs_logit_diff=max_diff, token_agreement=mean_agree,
        tokens_identical=identical, tokenizer_match=tokenizer_match, passed=passed, providers=engine.providers,
        versions={"torch": torch.__version__, "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__},
        cases=cases, eval=evaluated, min_accuracy=min_accuracy,
    )
    update_manifest(onnx, "verify", report.to_dict())
    return report


def bound_text(atol: float | None) -> str:
    """An atol as printed: ``none`` when there is no bound."""
    return "none" if atol is None else f"{atol:g}"


def check(report: Report) -> None:
    """Raise a one-line LorashipError if ``report`` is past tolerance."""
    if report.passed:
        return
    if report.eval is not None and report.min_accuracy is not None and report.eval.engine.accuracy < report.min_accuracy:
        raise LorashipError(
            f"eval accuracy {report.eval.engine.accuracy:.1%} through the engine is below --min-accuracy "
            f"{report.min_accuracy:.0%} (PyTorch: {report.eval.torch.accuracy:.1%})",
            "export at a higher precision (fp16 or fp32), or lower --min-accuracy if the loss is expected",
        )
    raise LorashipError(
        f"parity check failed: max logit diff {report.max_abs_logit_diff:.3g} (atol {bound_text(report.atol)}), "
        f"greedy token agreement {report.token_agreement:.1%} (need {report.min_token_agreement:.0%})",
        "re-export (fp32 for exact parity) or relax --atol/--min-agreement if the difference is expected",
    )
