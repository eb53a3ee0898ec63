"""Review verdicts: ``PRED/review.csv``, one row per case, rewritten atomically on every save.

Columns: ``case, verdict, note, time, menseg_version``. A save reads the file, replaces or adds the
one case's row and writes the whole file through a temporary file and a rename, under a lock held
by the process (threads) and by the file system (``fcntl``, so two servers on one folder too): two
tabs, or two reviewers, saving different cases never lose each other's verdicts; the later save of
the same case wins.
"""

from __future__ import annotations

import csv
import io
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from menseg import __version__
from menseg.errors import MensegError
from menseg.utils import write_text_atomic

REVIEW_CSV = "review.csv"
COLUMNS: tuple[str, ...] = ("case", "verdict", "note", "time", "menseg_version")
VERDICTS: tuple[str, ...] = ("accept", "needs correction", "reject")
#: Longest note kept (characters).
MAX_NOTE = 4000

_LOCK = threading.Lock()


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Hold the thread lock and an exclusive ``flock`` on the folder itself (no lock file is written)."""
    with _LOCK:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: the thread lock alone
            yield
            return
        try:
            fd = os.open(folder, os.O_RDONLY)
        except OSError as e:
            raise MensegError(f"cannot open the folder ({e.strerror or e})", folder) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


def read_verdicts(folder: str | Path) -> dict[str, dict[str, str]]:
    """``{case: row}`` from ``folder/review.csv`` (empty when there is none)."""
    path = Path(folder) / REVIEW_CSV
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "case" not in reader.fieldnames:
            raise MensegError("not a review.csv written by menseg review (no 'case' column)", path)
        return {row["case"]: {k: row.get(k) or "" for k in COLUMNS} for row in reader if row.get("case")}


def verdicts_csv(rows: dict[str, dict[str, str]]) -> str:
    """The CSV text of ``{case: row}``, sorted by case."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for case in sorted(rows):
        w.writerow(rows[case])
    return buf.getvalue()


def save_verdict(folder: str | Path, case: str, verdict: str, note: str = "") -> dict[str, str]:
    """Record ``verdict`` (one of :data:`VERDICTS`) and ``note`` for ``case``; returns the saved row."""
    folder = Path(folder)
    if verdict not in VERDICTS:
        raise MensegError(f"verdict must be one of {', '.join(VERDICTS)}, got {verdict!r}")
    if len(note) > MAX_NOTE:
        raise MensegError(f"note longer than {MAX_NOTE} characters")
    row = {"case": case, "verdict": verdict, "note": note,
           "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "menseg_version": __version__}
    with _locked(folder):
        rows = read_verdicts(folder)
        rows[case] = row
        write_text_atomic(folder / REVIEW_CSV, verdicts_csv(rows))
    return row
