"""The one error type the CLI turns into a one-line message."""

from __future__ import annotations


class LorashipError(Exception):
    """A problem the user can fix: ``message`` names it, ``fix`` says how; ``detail`` (say, a log's
    last lines) is shown only with ``--debug``."""

    def __init__(self, message: str, fix: str | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.message} ({self.fix})" if self.fix else self.message
