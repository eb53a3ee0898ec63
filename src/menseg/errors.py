"""User-facing errors: the CLI prints them as one line (no traceback unless --debug)."""

from __future__ import annotations

from pathlib import Path


class MensegError(Exception):
    """An error caused by the user's input or environment, with a one-line message."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)
