"""How long the export checks take: sizes and sha256 (`loraship repo`, `azure upload`) vs sizes only
(the Triton model at load), on a synthetic export of --gib GiB, with the page cache warm.

The load check uses sizes only: this measures what hashing would add to every model start, on top of the
read ONNX Runtime does anyway (on an Azure Files mount the read itself is the slow part, and hashing
would read every byte twice).

    .venv/bin/python -m benchmarks.export_checksums --gib 2
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from loraship.engine.integrity import check_files, checksums

PHI3_MINI_GB = {"fp16": 7.6, "fp32": 15.3}  # Phi-3-mini-4k-instruct weights


def best_of(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(prog=f"python -m benchmarks.{Path(__file__).stem}", description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=1.0, help="Size of the synthetic model.onnx.data.")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="loraship-hash-") as work:
        folder = Path(work)
        with open(folder / "model.onnx.data", "wb") as fh:
            for _ in range(int(args.gib * 1024)):
                fh.write(os.urandom(1 << 20))
        (folder / "model.onnx").write_bytes(os.urandom(1 << 20))
        files = checksums(folder)  # also warms the page cache
        gib = sum(e["size"] for e in files.values()) / 2**30
        sizes = best_of(args.runs, lambda: check_files(folder, files, hashes=False))
        hashed = best_of(args.runs, lambda: check_files(folder, files, hashes=True))
    rate = gib / hashed
    print(f"# export checks on {gib:.2f} GiB ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, best of {args.runs}, warm page cache)")
    print(f"sizes only      {sizes * 1000:8.2f} ms")
    print(f"sizes + sha256  {hashed * 1000:8.0f} ms   ({rate:.2f} GiB/s)")
    for dtype, gb in PHI3_MINI_GB.items():
        print(f"Phi-3-mini {dtype} ({gb} GB): sha256 would add {gb * 1e9 / 2**30 / rate:.1f} s to each model load")


if __name__ == "__main__":
    main()
