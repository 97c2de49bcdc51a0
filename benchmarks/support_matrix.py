"""The support matrix: every architecture of ``loraship.export.zoo`` through merge, the default export and
a comparison with its unmerged PeftModel (eager fp32), printed and written into README's support table.

``tests/test_support_matrix.py`` runs the same :func:`loraship.export.matrix.run` and checks that README's
table says what it measures, so run this after a change that moves a row:

    python -m benchmarks.support_matrix [--work DIR] [--no-readme] [--only NAME ...]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{Path(__file__).stem}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, help="Folder for the tiny models and their exports.")
    parser.add_argument("--no-readme", action="store_true", help="Print the table only.")
    parser.add_argument("--only", nargs="*", help="Architectures (zoo names) to run; the README is then left alone.")
    args = parser.parse_args()

    from loraship.export import matrix

    start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="loraship-matrix-"))
    rows = matrix.run(work, args.only)
    print(matrix.table(rows))
    for row in rows:
        print(json.dumps(row.to_dict()))
    print(f"{len(rows)} architectures, {sum(r.passed for r in rows)} pass, in {time.perf_counter() - start:.0f} s ({work})")
    if not args.no_readme and not args.only:
        matrix.write_readme(README, rows)
        print(f"wrote the table into {README}")


if __name__ == "__main__":
    main()
