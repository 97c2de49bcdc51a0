"""onnxruntime-genai exports (fp32, the default, and int4) vs the optimum fp32 export, on the engine.

Same ``mid`` merged model, same prompts, batch 1: per-token decode latency and prefill time
through ``loraship.engine`` for each export, and greedy token agreement with the optimum fp32
export over ``--new-tokens`` tokens. Prints the speed ratio export/optimum-fp32 last.

    python benchmarks/genai_vs_fp32.py [--work DIR] [--arch phi3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from engine_vs_torch import prepare, timed_engine  # noqa: E402

PROMPTS = [
    "Explain what a LoRA adapter changes in a transformer.",
    "Write a haiku about inference servers.",
    "List three reasons to export a model to ONNX.",
    "The capital of Denmark is",
]
REFERENCE = "optimum fp32"


def agreement(reference: list[list[int]], other: list[list[int]]) -> float:
    """Share of positions where the greedy tokens are identical."""
    same = sum(a == b for ref, oth in zip(reference, other) for a, b in zip(ref, oth))
    return same / sum(len(ref) for ref in reference)


def greedy(onnx_dir: Path, new_tokens: int) -> list[list[int]]:
    from loraship.engine import Engine, SamplingParams

    engine = Engine.load(onnx_dir)
    engine.eos_ids = frozenset()
    return [c.token_ids for c in engine.generate(PROMPTS, SamplingParams(max_tokens=new_tokens))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="Folder for the mid model and its exports (reused if present).")
    parser.add_argument("--arch", default="phi3", choices=["phi3", "llama"])
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from loraship.export.onnx_export import export_onnx

    work = args.work or Path(tempfile.mkdtemp(prefix="loraship-genai-bench-"))
    merged, default, optimum = prepare(work, args.arch)
    int4 = work / f"genai-int4-{args.arch}"
    if not int4.exists():
        export_onnx(merged, int4, dtype="fp32", engine="genai", int4=True)
    exports = {REFERENCE: optimum, "genai fp32 (default)": default, "genai int4": int4}

    reference = greedy(optimum, args.new_tokens)
    rows = {}
    for name, folder in exports.items():
        timing = timed_engine(folder, 1, args.prompt_tokens, args.new_tokens, args.runs)
        rows[name] = (timing, agreement(reference, greedy(folder, args.new_tokens)))

    table = Table(title=f"engine on mid {args.arch}, batch 1, {args.prompt_tokens} prompt + {args.new_tokens} new tokens")
    for col in ("export", "prefill ms", "decode ms/token", "tokens/s", f"greedy agreement vs {REFERENCE}"):
        table.add_column(col, justify="right")
    for name, (timing, agree) in rows.items():
        per_token = timing["decode_s_per_token"]
        table.add_row(name, f"{timing['prefill_s'] * 1e3:.1f}", f"{per_token * 1e3:.2f}", f"{1 / per_token:.1f}", f"{agree:.1%}")
    console = Console()
    console.print(table)
    base = rows[REFERENCE][0]["decode_s_per_token"]
    for name, (timing, agree) in rows.items():
        if name != REFERENCE:
            console.print(f"decode ms/token ratio {name} / {REFERENCE}: {timing['decode_s_per_token'] / base:.2f} "
                          f"(greedy agreement {agree:.1%})")


if __name__ == "__main__":
    main()
