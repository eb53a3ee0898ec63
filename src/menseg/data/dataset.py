"""Preprocessed datasets with an on-disk cache.

Each case is preprocessed once (:func:`menseg.data.preprocess.preprocess_case`)
and stored under ``cache_dir`` as::

    <case_id>.npy        image float32 (4, x, y, z)
    <case_id>_seg.npy    label uint8 (x, y, z)   (labelled cases only)
    <case_id>.json       props + cache key (written last: marks the entry complete)

An entry is reused when its key matches: preprocessing version, target
spacing, and size + modification time of every source file. Arrays are
returned memory-mapped (read-only) so many cases fit in little RAM.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from menseg.data.layouts import CaseFiles
from menseg.data.preprocess import PREPROCESS_VERSION, preprocess_case
from menseg.errors import MensegError
from menseg.utils import atomic_path, write_json_atomic

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessedCase:
    """One preprocessed case.

    ``image`` float32 ``(4, x, y, z)`` (read-only memmap when loaded from the
    cache), ``label`` uint8 ``(x, y, z)`` or None, ``props`` the record of
    :func:`menseg.data.preprocess.preprocess` (plus ``case_id``, ``files``).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray | None
    props: dict[str, Any]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Effective voxel size of the preprocessed arrays, mm."""
        return tuple(self.props["spacing"])  # type: ignore[return-value]


def cache_key(case: CaseFiles, spacing: Sequence[float]) -> dict[str, Any]:
    """What a cache entry depends on: version, spacing, and size+mtime of each source file."""
    sources = {}
    for p in case.files:
        try:
            st = Path(p).stat()
        except OSError:
            raise MensegError("file not found", p) from None
        sources[str(Path(p).resolve())] = [int(st.st_size), int(st.st_mtime_ns)]
    return {
        "version": PREPROCESS_VERSION,
        "spacing": [float(s) for s in spacing],
        "sources": sources,
    }


def _paths(cache_dir: Path, case_id: str) -> tuple[Path, Path, Path]:
    return cache_dir / f"{case_id}.npy", cache_dir / f"{case_id}_seg.npy", cache_dir / f"{case_id}.json"


def _load_cached(case: CaseFiles, cache_dir: Path, key: dict[str, Any]) -> PreprocessedCase | None:
    img_p, seg_p, meta_p = _paths(cache_dir, case.case_id)
    if not meta_p.is_file() or not img_p.is_file():
        return None
    try:
        meta = json.loads(meta_p.read_text())
    except (OSError, ValueError):
        return None
    if meta.get("cache_key") != key:
        return None
    try:
        image = np.load(img_p, mmap_mode="r")
        label = np.load(seg_p, mmap_mode="r") if case.label is not None else None
    except (OSError, ValueError):
        return None
    props = meta["props"]
    if list(image.shape[1:]) != props["shape"] or (
        label is not None and list(label.shape) != props["shape"]
    ):
        return None
    return PreprocessedCase(case.case_id, image, label, props)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, arr)


def preprocess_dataset(
    cases: Sequence[CaseFiles],
    cache_dir: str | Path,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    progress: bool = True,
) -> list[PreprocessedCase]:
    """Preprocess ``cases`` (target ``spacing`` mm), reusing valid cache entries.

    Returns one :class:`PreprocessedCase` per case, in the given order, with
    arrays memory-mapped from ``cache_dir``.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[0]
        raise MensegError(f"duplicate case id '{dup}'")
    out: list[PreprocessedCase] = []
    n_reused = 0
    bar = tqdm(cases, desc="preprocessing", unit="case", disable=not progress)
    for case in bar:
        bar.set_postfix_str(case.case_id, refresh=False)
        key = cache_key(case, spacing)
        cached = _load_cached(case, cache_dir, key)
        if cached is not None:
            n_reused += 1
            out.append(cached)
            continue
        image, label, props = preprocess_case(case, tuple(spacing))  # type: ignore[arg-type]
        img_p, seg_p, meta_p = _paths(cache_dir, case.case_id)
        meta_p.unlink(missing_ok=True)  # the entry is incomplete until the JSON is back
        _save_npy(img_p, image)
        if label is not None:
            _save_npy(seg_p, label)
        else:
            seg_p.unlink(missing_ok=True)
        write_json_atomic(meta_p, {"cache_key": key, "props": props})
        loaded = _load_cached(case, cache_dir, key)
        assert loaded is not None
        out.append(loaded)
    log.info("preprocessed %d cases into %s (%d reused from cache)", len(out), cache_dir, n_reused)
    return out


def unlabelled_scans(
    root: str | Path, cache_dir: str | Path, spacing: Sequence[float], progress: bool = True
) -> list[tuple[str, np.ndarray]]:
    """``(case id, preprocessed image)`` of every scan under ``root`` (``data.unlabeled_root``: any
    layout; labels, if any, are ignored), cached like :func:`preprocess_dataset`."""
    from menseg.data.layouts import discover_cases

    cases = discover_cases(root)
    if not cases:
        raise MensegError("data.unlabeled_root holds no scans", root)
    return [(c.case_id, np.asarray(c.image)) for c in preprocess_dataset(cases, cache_dir, spacing, progress)]
