"""Evaluate a folder of predicted label maps against reference labels.

Layouts:

- predictions: a flat folder of ``<case>.nii.gz`` (``<case>-seg.nii.gz`` and ``.nii``
  are accepted too), as written by ``menseg predict``;
- references: the BraTS layout (``<case>/<case>-seg.nii.gz``), or a flat folder of
  ``<case>.nii.gz`` / ``<case>-seg.nii.gz`` files (e.g. nnU-Net ``labelsTr``); a dataset
  root in the nnU-Net layout is read from its ``labelsTr`` folder.

Every reference case needs a prediction (MensegError naming the missing cases);
predictions without a reference are skipped with a warning. Each pair must agree in
shape and affine (1e-3 tolerance); spacing comes from the reference affine.

Outputs in ``out_dir`` (written atomically): ``metrics.csv`` (one row per case, columns
``case_id`` + :func:`~menseg.evaluate.metrics.metric_names`) and ``summary.json``
(``n_cases``, then ``mean`` / ``std`` (sample, ddof=1; 0 for one case) / ``median``,
each a dict metric name -> value).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from menseg.constants import SEG_SUFFIX
from menseg.data.io import is_nifti, nifti_stem, read_label
from menseg.errors import MensegError
from menseg.evaluate.metrics import evaluate_case, metric_names
from menseg.utils import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

#: Tolerance (mm / affine units) for prediction vs reference affine agreement.
AFFINE_ATOL: float = 1e-3

_SEG_END = f"-{SEG_SUFFIX}"


def _case_id(path: Path) -> str:
    stem = nifti_stem(path)
    return stem[: -len(_SEG_END)] if stem.endswith(_SEG_END) else stem


def _flat_labels(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if not (p.is_file() and is_nifti(p)):
            continue
        cid = _case_id(p)
        if cid in found:
            raise MensegError(f"duplicate case id {cid!r} ({found[cid].name} and {p.name})", p)
        found[cid] = p
    return found


def find_reference_labels(ref_dir: str | Path) -> dict[str, Path]:
    """Map case id -> reference label file (BraTS layout or flat folder), sorted by id."""
    ref_dir = Path(ref_dir)
    if not ref_dir.is_dir():
        raise MensegError("reference folder not found", ref_dir)
    found = _flat_labels(ref_dir)
    for d in sorted(p for p in ref_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if d.name in ("imagesTr", "imagesTs", "labelsTr", "labelsTs"):
            continue
        segs = [d / f"{d.name}{_SEG_END}{end}" for end in (".nii.gz", ".nii")]
        seg = next((s for s in segs if s.is_file()), None)
        if seg is None:
            if not any(is_nifti(f) for f in d.iterdir()):
                log.debug("skipping %s: no NIfTI files, not a case folder", d)
                continue  # e.g. preview/ or params/ written beside the cases
            raise MensegError(f"case folder has no {d.name}{_SEG_END}.nii.gz label file", d)
        if d.name in found:
            raise MensegError(f"duplicate case id {d.name!r} (folder and flat file)", d)
        found[d.name] = seg
    if not found and (ref_dir / "labelsTr").is_dir():
        found = _flat_labels(ref_dir / "labelsTr")
    if not found:
        raise MensegError("no reference label files found (.nii.gz)", ref_dir)
    return dict(sorted(found.items()))


def find_predictions(pred_dir: str | Path) -> dict[str, Path]:
    """Map case id -> predicted label file in a flat folder, sorted by id."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise MensegError("prediction folder not found", pred_dir)
    return _flat_labels(pred_dir)


def evaluate_pair(case_id: str, pred_path: Path, ref_path: Path) -> dict[str, float]:
    """Read one prediction/reference pair, check geometry, return its metrics."""
    pred, pred_aff = read_label(pred_path)
    ref, ref_aff = read_label(ref_path)
    if pred.shape != ref.shape:
        raise MensegError(
            f"case {case_id}: prediction shape {pred.shape} differs from reference shape "
            f"{ref.shape} ({ref_path})",
            pred_path,
        )
    if not np.allclose(pred_aff, ref_aff, rtol=0.0, atol=AFFINE_ATOL):
        diff = float(np.abs(pred_aff - ref_aff).max())
        raise MensegError(
            f"case {case_id}: prediction affine differs from reference affine by up to "
            f"{diff:.3g} ({ref_path})",
            pred_path,
        )
    spacing = tuple(float(s) for s in np.linalg.norm(ref_aff[:3, :3], axis=0))
    return evaluate_case(pred, ref, spacing)


def summarise(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """Mean, sample std (ddof=1; 0 for one case) and median of every metric over cases.

    Returns ``{"n_cases": n, "mean": {key: v}, "std": {key: v}, "median": {key: v}}``.
    """
    table = np.array([[float(r[k]) for k in keys] for r in rows], dtype=np.float64)
    table = table.reshape(len(rows), len(keys))
    n = len(rows)
    mean = table.mean(axis=0) if n else np.full(len(keys), np.nan)
    std = table.std(axis=0, ddof=1) if n > 1 else np.zeros(len(keys))
    median = np.median(table, axis=0) if n else np.full(len(keys), np.nan)
    return {
        "n_cases": n,
        "mean": {k: float(v) for k, v in zip(keys, mean, strict=True)},
        "std": {k: float(v) for k, v in zip(keys, std, strict=True)},
        "median": {k: float(v) for k, v in zip(keys, median, strict=True)},
    }


def _csv_text(rows: list[dict[str, Any]], keys: list[str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case_id", *keys])
    for r in rows:
        w.writerow([r["case_id"], *(repr(float(r[k])) for k in keys)])
    return buf.getvalue()


def evaluate_folders(
    pred_dir: str | Path, ref_dir: str | Path, out_dir: str | Path
) -> dict[str, Any]:
    """Evaluate every reference case against its prediction; write CSV + summary.

    Args:
        pred_dir: flat folder of predicted label maps ``<case>.nii.gz``.
        ref_dir: BraTS-layout dataset or flat folder of reference label maps.
        out_dir: output folder (created); gets ``metrics.csv`` and ``summary.json``.

    Returns:
        The summary dict written to ``summary.json``: ``n_cases``, ``mean``, ``std``,
        ``median`` (each metric name -> value), ``pred_dir``, ``ref_dir``, ``metrics_csv``.

    Raises:
        MensegError: missing folder, no reference, missing predictions (named), or a
            prediction whose shape/affine disagrees with its reference (case named).
    """
    pred_dir, ref_dir, out_dir = Path(pred_dir), Path(ref_dir), Path(out_dir)
    refs = find_reference_labels(ref_dir)
    preds = find_predictions(pred_dir)
    missing = [c for c in refs if c not in preds]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MensegError(
            f"no prediction for {len(missing)} reference case(s): {shown} "
            f"(expected <case>.nii.gz)",
            pred_dir,
        )
    extra = sorted(set(preds) - set(refs))
    if extra:
        log.warning("%d prediction(s) without reference skipped: %s", len(extra), ", ".join(extra))

    pairs = {cid: (preds[cid], refs[cid]) for cid in refs}
    return evaluate_pairs(pairs, out_dir, {"pred_dir": str(pred_dir), "ref_dir": str(ref_dir)})


def evaluate_pairs(
    pairs: Mapping[str, tuple[Path, Path]], out_dir: str | Path, extra: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate ``{case_id: (prediction, reference)}`` label files; write CSV + summary.

    Returns the summary written to ``out_dir/summary.json`` (:func:`summarise` plus
    ``metrics_csv`` and the ``extra`` keys). Nothing is written unless every case succeeds.
    """
    out_dir = Path(out_dir)
    keys = metric_names()
    rows: list[dict[str, Any]] = []
    for cid in tqdm(list(pairs), desc="evaluate", unit="case", disable=None if progress else True):
        pred_path, ref_path = pairs[cid]
        m = evaluate_pair(cid, Path(pred_path), Path(ref_path))
        rows.append({"case_id": cid, **m})
        log.info(
            "%s: lesion Dice ET/TC/WT %.3f/%.3f/%.3f",
            cid,
            m["ET_lesion_dice"],
            m["TC_lesion_dice"],
            m["WT_lesion_dice"],
        )

    summary = summarise(rows, keys)
    csv_path = out_dir / "metrics.csv"
    summary.update({**(extra or {}), "metrics_csv": str(csv_path)})
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(csv_path, _csv_text(rows, keys))
    write_json_atomic(out_dir / "summary.json", summary)
    log.info("wrote %s and %s", csv_path, out_dir / "summary.json")
    return summary
