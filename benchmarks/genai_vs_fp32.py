"""onnxruntime-genai exports (fp32, the default, and int4) vs the optimum fp32 export, on the engine.

Same ``mid`` merged model (random-init: speed depends only on the shapes), same prompts, batch 1:
per-token decode latency and prefill time through ``loraship.engine`` for each export. Prints the
speed ratio export/optimum-fp32 last. What each export keeps of a fine-tune is measured on the
trained demo model by ``python -m benchmarks.demo_quality`` (eval-set accuracy through the engine).

    python -m benchmarks.genai_vs_fp32 [--work DIR] [--arch phi3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from benchmarks.engine_vs_torch import prepare, timed_engine

REFERENCE = "optimum fp32"


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{Path(__file__).stem}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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

    rows = {name: timed_engine(folder, 1, args.prompt_tokens, args.new_tokens, args.runs) for name, folder in exports.items()}

    table = Table(title=f"engine on mid {args.arch}, batch 1, {args.prompt_tokens} prompt + {args.new_tokens} new tokens")
    for col in ("export", "prefill ms", "decode ms/token", "tokens/s"):
        table.add_column(col, justify="right")
    for name, timing in rows.items():
        per_token = timing["decode_s_per_token"]
        table.add_row(name, f"{timing['prefill_s'] * 1e3:.1f}", f"{per_token * 1e3:.2f}", f"{1 / per_token:.1f}")
    console = Console()
    console.print(table)
    base = rows[REFERENCE]["decode_s_per_token"]
    for name, timing in rows.items():
        if name != REFERENCE:
            console.print(f"decode ms/token ratio {name} / {REFERENCE}: {timing['decode_s_per_token'] / base:.2f}")


if __name__ == "__main__":
    main()
