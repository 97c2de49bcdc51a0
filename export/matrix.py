"""The support matrix: every architecture of ``zoo`` through merge and the default export, compared with
its unmerged PeftModel in eager fp32.

Each row: the zoo's tiny model and its adapter are written, ``merge`` merges them, ``export`` (the default
engine, chosen by its probe) exports the merged folder, and :func:`loraship.export.verify.parity` compares
the export (through the loraship engine: each prompt alone and a left-padded batch, plus a prompt past the
model's sliding window or rope threshold) with the *unmerged* PeftModel: greedy tokens and the max
|dlogit| of the first step. A row passes when the tokens are identical and max |dlogit| < 1e-4, or when
export refused in one line. One process builds every model once (``run``); ``tests/test_support_matrix.py``
asserts the rows and that README's table (written by ``benchmarks/support_matrix.py``) says what they say.
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loraship.export import zoo
from loraship.export.verify import DEFAULT_PROMPTS

ATOL = 1e-4
MAX_NEW_TOKENS = 16
START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"


@dataclass
class Row:
    """One architecture's result."""

    name: str
    checkpoint: str
    features: str
    engine: str | None  # None: refused
    tokens_identical: bool
    max_abs_logit_diff: float | None
    past: str  # what the long prompt reached past ("" when the model has no threshold)
    notes: list[str]  # export's one-line notes (why it fell back)
    refusal: str | None  # export's one-line error
    seconds: float
    folder: str  # base/, adapter/, merged/ and onnx/ of this row

    @property
    def passed(self) -> bool:
        if self.refusal is not None:
            return "\n" not in self.refusal and self.engine is None
        return self.tokens_identical and self.max_abs_logit_diff is not None and self.max_abs_logit_diff < ATOL

    @property
    def limit(self) -> str:
        """The table's known-limit cell: why the other engine was not taken, or why export refused."""
        if self.refusal is not None:
            return f"refused: {self.refusal}"
        return "; ".join(self.notes)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed, "limit": self.limit}


def run_one(tiny: zoo.Tiny, root: Path, tokenizer) -> Row:
    """Build, merge, export and compare one architecture under ``root``."""
    from rich.console import Console

    from loraship.errors import LorashipError
    from loraship.export.manifest import read_export
    from loraship.export.merge import merge
    from loraship.export.onnx_export import export_onnx
    from loraship.export.verify import TorchSide, parity

    start = time.perf_counter()
    folder = root / re.sub(r"[^A-Za-z0-9.-]+", "_", tiny.name)
    built = zoo.build(tiny, folder, tokenizer)
    merged = merge(built.base, built.adapter, folder / "merged")
    notes = io.StringIO()
    console = Console(file=notes, width=1000, no_color=True)
    try:
        onnx = export_onnx(merged, folder / "onnx", console=console)
    except LorashipError as exc:
        refusal = str(exc).replace(str(folder / "merged"), "MERGED")  # the same text on every machine
        return Row(tiny.name, tiny.checkpoint, tiny.features, None, False, None, "", _notes(notes), refusal,
                   time.perf_counter() - start, str(folder))
    report = parity(onnx, TorchSide(built.reference, tokenizer), list(DEFAULT_PROMPTS), MAX_NEW_TOKENS, atol=ATOL, threads=1)
    past = ", ".join(f"{k} {v}" for k, v in report.thresholds.items())
    return Row(tiny.name, tiny.checkpoint, tiny.features, read_export(onnx).engine, report.tokens_identical,
               report.max_abs_logit_diff, past, _notes(notes), None, time.perf_counter() - start, str(folder))


def _notes(console_text: io.StringIO) -> list[str]:
    return [line.split("note:", 1)[1].strip() for line in console_text.getvalue().splitlines() if line.startswith("note:")]


def run(root: Path, names: list[str] | None = None) -> list[Row]:
    """Every zoo architecture (or those named), in one process, PyTorch on one thread (tiny models: more
    threads only contend, 3-6x slower on 2 busy cores)."""
    import torch

    from loraship.export.demo_model import build_tokenizer

    tokenizer = build_tokenizer(zoo.VOCAB, random=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return [run_one(t, Path(root), tokenizer) for t in zoo.TINIES if names is None or t.name in names]
    finally:
        torch.set_num_threads(threads)


ENGINE_LABELS = {"genai": "onnxruntime-genai", "optimum": "optimum", None: "refused"}


def table(rows: list[Row]) -> str:
    """The README's support table (markdown)."""
    lines = ["| architecture (config of) | features the tiny config keeps | default engine | greedy tokens "
             "| max \\|dlogit\\| | known limit |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        tokens = "—" if r.engine is None else ("identical" if r.tokens_identical else "DIFFER")
        diff = "—" if r.max_abs_logit_diff is None else f"{r.max_abs_logit_diff:.1e}"
        cells = [f"{r.name} (`{r.checkpoint}`)", r.features + (f"; probed past the {r.past}" if r.past else ""),
                 ENGINE_LABELS[r.engine], tokens, diff, r.limit.replace("|", "\\|")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme_rows(readme: str) -> dict[str, list[str]]:
    """The support table in ``readme``: architecture cell -> the other cells."""
    if START not in readme or END not in readme:
        return {}
    block = readme.split(START, 1)[1].split(END, 1)[0]
    rows = {}
    for line in block.strip().splitlines()[2:]:
        if line.startswith("| "):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            rows[cells[0]] = cells[1:]
    return rows


def write_readme(readme: Path, rows: list[Row]) -> None:
    """Replace the table between the markers in ``readme``."""
    text = Path(readme).read_text()
    if START not in text:
        raise ValueError(f"{readme} has no {START} marker")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    Path(readme).write_text(f"{head}{START}\n{table(rows)}\n{END}{tail}")
