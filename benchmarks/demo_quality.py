"""What the demo fine-tune learned, and what each export keeps of it.

Trains the demo model (``loraship demo-model``, timed as a child process, so the figure includes
startup), merges it, exports it four ways and runs ``loraship verify`` on each: eval-set accuracy
through the engine (and of the merged PyTorch model), greedy token agreement and the largest
first-step logit difference.

    python -m benchmarks.demo_quality [--work DIR] [--size tiny|mid] [--arch phi3|llama] [--seed 0]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EXPORTS = {  # row -> (folder, export_onnx keyword arguments)
    "fp32, genai builder (default)": ("fp32", {}),
    "fp32, optimum": ("fp32-optimum", {"engine": "optimum"}),
    "fp16, optimum (the CPU default for fp16)": ("fp16", {"dtype": "fp16"}),
    "int4, genai builder": ("int4", {"int4": True}),
}


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{Path(__file__).stem}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="Folder for the model and its exports (emptied first).")
    parser.add_argument("--size", default="tiny", choices=["tiny", "mid"])
    parser.add_argument("--arch", default="phi3", choices=["phi3", "llama"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from loraship.export.demo_model import read_report
    from loraship.export.merge import merge
    from loraship.export.onnx_export import export_onnx
    from loraship.export.verify import verify

    work = args.work or Path(tempfile.mkdtemp(prefix="loraship-quality-"))
    demo = work / "demo"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "loraship.cli.main", "demo-model", "--out", str(demo), "--size", args.size,
                    "--arch", args.arch, "--seed", str(args.seed), "--force"], check=True)
    wall = time.perf_counter() - start
    trained = read_report(demo)
    merged = merge(demo / "base", demo / "adapter", work / "merged", force=True)

    rows = [(name, verify(merged, export_onnx(merged, work / folder, force=True, **kwargs)))
            for name, (folder, kwargs) in EXPORTS.items()]
    console = Console()
    n = trained["eval_cases"]
    console.print(f"demo-model --size {args.size} --arch {args.arch} --seed {args.seed}: {trained['parameters']:,} parameters, "
                  f"{wall:.1f} s wall for the command ({trained['seconds']:.1f} s building inside it); held-out accuracy "
                  f"base {trained['base_accuracy']:.1%} ({round(trained['base_accuracy'] * n)}/{n}), merged "
                  f"{trained['merged_accuracy']:.1%} ({round(trained['merged_accuracy'] * n)}/{n})")
    table = Table(title=f"eval set ({n} held-out questions) through the engine, {args.size} {args.arch}")
    for col in ("export", "engine accuracy", "PyTorch accuracy", "same replies", "greedy token agreement", "max |logit diff|"):
        table.add_column(col, justify="right")
    for name, report in rows:
        ev = report.eval
        table.add_row(name, f"{ev.engine.accuracy:.1%} ({sum(ev.engine.correct)}/{n})", f"{ev.torch.accuracy:.1%}",
                      f"{ev.same_replies:.0%}", f"{report.token_agreement:.1%}", f"{report.max_abs_logit_diff:.3g}")
    console.print(table)


if __name__ == "__main__":
    main()
