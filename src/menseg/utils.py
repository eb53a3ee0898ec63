"""Small shared helpers: atomic writes, seeding, JSON, and where this process stands in a torchrun run."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
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


#: The lock file :func:`folder_lock` keeps in a run or benchmark folder.
LOCK_NAME = ".lock"


def atomic_leftovers(folder: str | Path) -> list[Path]:
    """Temporary files :func:`atomic_path` left in ``folder`` when its process was killed mid-write."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.startswith(".") and ".tmp" in p.name
                  and p.name.count(".") >= 3)


def remove_atomic_leftovers(folder: str | Path) -> int:
    """Delete :func:`atomic_leftovers` of ``folder`` (call only while no other process writes there);
    returns how many were removed."""
    gone = 0
    for p in atomic_leftovers(folder):
        with contextlib.suppress(OSError):
            p.unlink()
            gone += 1
    return gone


@contextlib.contextmanager
def folder_lock(folder: str | Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``folder/.lock``) or fail at once with a one-line error: two
    processes must not write one run or benchmark folder. The system drops the lock when the process
    dies, even by SIGKILL, so a killed run never leaves a stale lock."""
    from menseg.errors import MensegError

    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise MensegError(f"cannot use this {what} folder ({e.strerror or e})", folder) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise MensegError(f"another process is using this {what} folder (wait for it to end, or use "
                              "another folder)", folder) from None
        yield
    finally:
        os.close(fd)


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


@dataclass(frozen=True)
class Context:
    """Where this process stands in a (torchrun) run: ``rank`` of ``world`` (``local_rank`` on its node).

    Torch-free, so the command line can read it before any heavy import; the process group itself is
    :mod:`menseg.train.distributed`'s."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """More than one process."""
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes."""
        return self.rank == 0


SINGLE = Context()


def env_int(name: str, default: int) -> int:
    """Integer environment variable ``name`` (``default`` when unset or empty)."""
    from menseg.errors import MensegError

    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise MensegError(f"environment variable {name}={raw!r} is not an integer") from None


def context_from_env() -> Context:
    """The :class:`Context` torchrun describes in ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``."""
    from menseg.errors import MensegError

    world = env_int("WORLD_SIZE", 1)
    rank = env_int("RANK", 0)
    local = env_int("LOCAL_RANK", rank)
    if world < 1 or not 0 <= rank < world:
        raise MensegError(f"bad distributed environment: RANK={rank}, WORLD_SIZE={world}")
    return Context(rank, world, local)


def derive_seed(*parts: int | str) -> int:
    """Derive a 63-bit seed from a tuple of ints/strings, stable across runs and platforms."""
    import hashlib

    h = hashlib.blake2b(repr(tuple(parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)
