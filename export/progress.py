"""One rich status line per stage of a long command, with its duration when done."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console


class Stages:
    """``with stages("exporting"): ...`` shows a spinner, then a check mark and the time."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)

    @contextmanager
    def __call__(self, text: str) -> Iterator[None]:
        start = time.perf_counter()
        with self.console.status(f"{text}..."):
            yield
        self.console.print(f"[green]\u2713[/] {text} [dim]({time.perf_counter() - start:.1f}s)[/]")

    def note(self, text: str) -> None:
        """One line that is no stage: a choice made for the user."""
        self.console.print(f"[yellow]note:[/] {text}")
