"""Small shared helpers: atomic writes, seeding, JSON."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    The temporary file keeps ``path``'s suffixes (so writers that look at the
    extension, e.g. ``.nii.gz``, behave), and is removed if the body raises. A write the
    system refuses (full disk, read-only or missing folder, a file where a folder should be)
    becomes a one-line :class:`~menseg.errors.MensegError` naming ``path``; an existing file at
    ``path`` is then left exactly as it was.
    """
    from menseg.errors import MensegError

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        suffix = "".join(path.suffixes)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise MensegError(f"cannot write here ({e.strerror or e})", path) from None
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except OSError as e:
        raise MensegError(f"cannot write ({e.strerror or e}); any earlier file there is unchanged",
                          path) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def truncate_jsonl(path: str | Path, step: int) -> None:
    """Drop lines of a metrics file whose ``step`` is after ``step`` (written after the last checkpoint
    by a killed run), and lines cut short by the kill; atomically. A missing file is left missing."""
    path = Path(path)
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= step:
                keep.append(line)
        except (ValueError, TypeError, AttributeError):
            continue
    write_text_atomic(path, "".join(x + "\n" for x in keep))


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def json_digest(obj: Any) -> str:
    """Hex SHA-256 of ``obj`` as canonical JSON (sorted keys; non-JSON values as ``str``): a cache key."""
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def derive_seed(*parts: int | str) -> int:
    """Derive a 63-bit seed from a tuple of ints/strings, stable across runs and platforms."""
    import hashlib

    h = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)
