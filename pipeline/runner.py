"""The resumable step runner: fingerprints of inputs and outputs, the state file, the summary table.

A state file in the work folder records each finished step's input fingerprint (file sizes and
modification times of local inputs, the options) and output fingerprint. A re-run skips every
step whose inputs and output are unchanged, so an interrupted ship resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraship.errors import LorashipError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

STATE = ".loraship-state.json"
RUNTIME_DIRS = ("__pycache__", "trt_cache")

#: (relative name, size, mtime_ns) of each file of a tree; None where the tree is missing.
TreeState = list[tuple[str, int, int]] | None
#: What a step returns and the state file keeps: ``detail`` for the summary, plus what later steps read.
Record = dict[str, Any]


def fingerprint(value: Any) -> str:
    """A short stable hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def tree_state(path: Path, skip: tuple[str, ...] = ()) -> TreeState:
    """(relative name, size, mtime_ns) of every file under ``path`` (or of the file itself); None if missing.

    Hidden files and what Python and the TensorRT provider write while serving (``__pycache__``,
    ``trt_cache``) are left out, so serving a version does not change its fingerprint."""
    path = Path(path)
    if path.is_file():
        stat = path.stat()
        return [(path.name, stat.st_size, stat.st_mtime_ns)]
    if not path.is_dir():
        return None
    rows = []
    for item in sorted(path.rglob("*")):
        rel = item.relative_to(path)
        if item.is_file() and rel.as_posix() not in skip and not any(
                part.startswith(".") or part in RUNTIME_DIRS for part in rel.parts):
            stat = item.stat()
            rows.append((rel.as_posix(), stat.st_size, stat.st_mtime_ns))
    return rows


def source_state(source: str | Path) -> TreeState | str:
    """A local folder's files, or a hub id as given."""
    return tree_state(Path(source)) if Path(source).exists() else str(source)


@dataclass
class StepRecord:
    """One row of the summary table."""

    name: str
    result: str  # done | skipped | failed
    seconds: float
    detail: str


class Pipeline:
    """Runs steps in a work folder, skipping those a previous run finished with the same inputs."""

    def __init__(self, work: Path, console: Console | None = None, force: bool = False) -> None:
        from rich.console import Console

        self.work = Path(work)
        self.console = console or Console(stderr=True)
        self.records: list[StepRecord] = []
        if self.work.exists() and not self.work.is_dir():
            raise LorashipError(f"--out {self.work} is a file", "choose a directory path")
        if self.work.is_dir() and any(self.work.iterdir()) and not (self.work / STATE).is_file() and not force:
            raise LorashipError(f"output directory {self.work} exists, is not empty and holds no earlier run",
                                "pass --force to replace what is in it, or choose another --out")
        self.state: dict[str, Record] = {} if force else self._read_state()

    def _read_state(self) -> dict[str, Record]:
        try:
            return json.loads((self.work / STATE).read_text()).get("steps", {})
        except (OSError, ValueError, AttributeError):
            return {}

    def _save(self) -> None:
        from loraship.fsutil import write_json_atomic

        write_json_atomic(self.work / STATE, {"steps": self.state})

    def path(self, name: str) -> Path:
        return self.work / name

    def step(self, name: str, title: str, inputs: Any, run: Callable[[], Record],
             output: Callable[[Record], Any] = lambda r: None, spinner: bool = True, rerun: bool = False) -> Record:
        """Run ``run`` (it returns a record: ``detail`` for the summary, plus anything later steps need),
        unless the last run finished this step with the same ``inputs`` and an unchanged ``output(record)``."""
        key = fingerprint(inputs)
        done = self.state.get(name)
        if not rerun and done and done.get("inputs") == key and done.get("output") == fingerprint(output(done)):
            self.console.print(f"[cyan]\u21b7[/] {title} [dim](unchanged since the last run: skipped)[/]")
            self.records.append(StepRecord(name, "skipped", 0.0, done.get("detail", "")))
            return done
        self.state.pop(name, None)
        start = time.perf_counter()
        try:
            if spinner:
                with self.console.status(f"{title}..."):
                    record = run()
            else:
                self.console.print(f"[bold]\u2192[/] {title}")
                record = run()
        except BaseException:
            self.records.append(StepRecord(name, "failed", time.perf_counter() - start, ""))
            if self.work.is_dir():
                self._save()
            raise
        seconds = time.perf_counter() - start
        self.console.print(f"[green]\u2713[/] {title} [dim]({seconds:.1f}s)[/]")
        self.state[name] = {**record, "inputs": key, "output": fingerprint(output(record))}
        self.work.mkdir(parents=True, exist_ok=True)
        self._save()
        self.records.append(StepRecord(name, "done", seconds, record.get("detail", "")))
        return self.state[name]

    def note(self, name: str, detail: str, seconds: float = 0.0) -> None:
        """A summary row for work done outside ``step`` (provisioning, serving, a first request)."""
        self.records.append(StepRecord(name, "done", seconds, detail))

    def summary(self, title: str) -> Table:
        from rich.table import Table

        table = Table(title=title)
        for col in ("step", "result", "time", "detail"):
            table.add_column(col)
        colors = {"done": "green", "skipped": "cyan", "failed": "red"}
        for r in self.records:
            table.add_row(r.name, f"[{colors.get(r.result, 'white')}]{r.result}[/]",
                          f"{r.seconds:.1f}s" if r.result == "done" else "", r.detail)
        return table
