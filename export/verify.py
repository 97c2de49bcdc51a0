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
* int4: atol 2.0, no token agreement bound (4-bit weights change the model: on the random-init
  demo models greedy tokens diverge within a few steps; the figures say by how much).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraship.errors import LorashipError
from loraship.export import hfcompat
from loraship.export.manifest import read_manifest, update_manifest

DEFAULT_PROMPTS = (
    "Hello, how are you today?",
    "Write a short poem about the sea.",
    "What is the capital of France?",
    "LoRA adds small low-rank matrices to the attention and MLP projections of a large model, and after "
    "fine-tuning the adapter can be merged into the base weights.",
)
TOLERANCES: dict[str, tuple[float, float]] = {"fp32": (1e-4, 1.0), "fp16": (5e-2, 0.9), "int4": (2.0, 0.0)}


@dataclass
class Case:
    """One comparison: a batch of prompts run on both sides."""

    prompts: list[str]
    max_abs_logit_diff: float
    token_agreement: list[float]
    torch_tokens: list[list[int]]
    onnx_tokens: list[list[int]]


@dataclass
class Report:
    """What `loraship verify` measured and whether it passed."""

    dtype: str
    engine: str
    atol: float
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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

    def _batch(self, ids: list[list[int]], pad_id: int):
        width = max(map(len, ids))
        input_ids = self.torch.tensor([[pad_id] * (width - len(s)) + s for s in ids])
        mask = self.torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in ids])
        return input_ids, mask

    def logits(self, ids: list[list[int]], pad_id: int):
        input_ids, mask = self._batch(ids, pad_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        with self.torch.no_grad():
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions)
        return out.logits[:, -1, :].float().numpy()

    def generate(self, ids: list[list[int]], pad_id: int, eos_ids: list[int], max_new: int) -> list[list[int]]:
        input_ids, mask = self._batch(ids, pad_id)
        with self.torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=0,
                do_sample=False, pad_token_id=pad_id, eos_token_id=eos_ids or None,
                temperature=None, top_p=None, top_k=None,
            )
        result = []
        for row in out[:, input_ids.shape[1]:].tolist():
            stop = next((i for i, t in enumerate(row) if t in eos_ids), None)
            result.append(row if stop is None else row[: stop + 1])
        return result


def verify(
    merged: Path,
    onnx: Path,
    prompts_file: Path | None = None,
    atol: float | None = None,
    min_agreement: float | None = None,
    max_new_tokens: int = 32,
    provider: str = "cpu",
) -> Report:
    """Compare ``onnx`` (engine) with ``merged`` (PyTorch); write the report into loraship.json."""
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
    finally:
        side.close()

    all_agree = [a for c in cases for a in c.token_agreement]
    max_diff = max(c.max_abs_logit_diff for c in cases)
    mean_agree = float(sum(all_agree) / len(all_agree))
    identical = all(a == 1.0 for a in all_agree)
    passed = max_diff <= atol and mean_agree >= min_agreement and (identical or min_agreement < 1.0)
    report = Report(
        dtype=dtype, engine=manifest.get("engine", "optimum"), atol=atol, min_token_agreement=min_agreement,
        max_new_tokens=max_new_tokens, max_abs_logit_diff=max_diff, token_agreement=mean_agree,
        tokens_identical=identical, tokenizer_match=tokenizer_match, passed=passed, providers=engine.providers,
        versions={"torch": torch.__version__, "transformers": transformers.__version__, "onnxruntime": onnxruntime.__version__},
        cases=cases,
    )
    update_manifest(onnx, "verify", report.to_dict())
    return report


def check(report: Report) -> None:
    """Raise a one-line LorashipError if ``report`` is past tolerance."""
    if report.passed:
        return
    raise LorashipError(
        f"parity check failed: max logit diff {report.max_abs_logit_diff:.3g} (atol {report.atol:g}), "
        f"greedy token agreement {report.token_agreement:.1%} (need {report.min_token_agreement:.0%})",
        "re-export (fp32 for exact parity) or relax --atol/--min-agreement if the difference is expected",
    )
