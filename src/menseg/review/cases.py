"""The cases a review shows: each prediction with its images, reference and metrics.

:func:`collect_cases` pairs every predicted ``<case>.nii.gz`` of a ``menseg predict`` output folder
with the case's images (any layout ``menseg predict`` reads, incomplete cases included), its
reference label (``--ref``) and its row of an evaluation's ``metrics.csv`` (``--metrics``). Where a
reference exists but no evaluation was given, the lesion-wise metrics are computed here with the
BraTS-MEN evaluator. A case whose prediction and image disagree in shape or affine is kept, with
``problem`` saying why, so that the index marks it and the case page refuses to draw it wrongly.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from menseg.constants import LABEL_NAMES, MODALITIES, REGION_NAMES
from menseg.data.io import load_nifti, read_label
from menseg.data.layouts import CaseFiles, discover_inputs
from menseg.data.validate import spacing_of
from menseg.errors import MensegError
from menseg.evaluate.metrics import evaluate_case
from menseg.evaluate.runner import AFFINE_ATOL, find_predictions, find_reference_labels
from menseg.regions import region_masks

log = logging.getLogger(__name__)

#: The index's lesion-count columns: false-positive and missed lesions of whole tumour.
COUNT_REGION = "WT"


@dataclass
class ReviewCase:
    """One case of a review.

    ``images``: the sequences found (absent keys are missing sequences); ``volumes_ml``: predicted
    volume per region (ET, TC, WT) and label (NETC, SNFH, ET) in millilitres; ``metrics``: the
    evaluator's metrics (``<region>_lesion_dice``, ``<region>_n_fp``, ...) where a reference or an
    evaluation exists; ``problem``: why the case cannot be displayed (None when it can).
    """

    case_id: str
    prediction: Path
    images: dict[str, Path] = field(default_factory=dict)
    reference: Path | None = None
    metrics: dict[str, float] | None = None
    volumes_ml: dict[str, float] = field(default_factory=dict)
    problem: str | None = None

    @property
    def sequences(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.images)

    def sort_key(self) -> tuple[float, str]:
        """Worst first: mean lesion-wise Dice over regions (cases without metrics last), then id."""
        if self.metrics:
            vals = [self.metrics.get(f"{r}_lesion_dice", np.nan) for r in REGION_NAMES]
            vals = [v for v in vals if np.isfinite(v)]
            if vals:
                return (float(np.mean(vals)), self.case_id)
        return (np.inf, self.case_id)

    def row(self) -> dict[str, Any]:
        """The index row (JSON-ready; NaN becomes None)."""
        def num(v: Any) -> float | None:
            return None if v is None or not np.isfinite(v) else round(float(v), 4)

        m = self.metrics or {}
        return {
            "case": self.case_id,
            "sequences": list(self.sequences),
            "missing": [s for s in MODALITIES if s not in self.images],
            "volumes_ml": {k: num(v) for k, v in self.volumes_ml.items()},
            "lesion_dice": {r: num(m.get(f"{r}_lesion_dice")) for r in REGION_NAMES} if m else None,
            "false_positives": {r: num(m.get(f"{r}_n_fp")) for r in REGION_NAMES} if m else None,
            "missed": {r: num(m.get(f"{r}_n_fn")) for r in REGION_NAMES} if m else None,
            "has_reference": self.reference is not None,
            "problem": self.problem,
        }


def _geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    img = load_nifti(path)
    return tuple(int(s) for s in img.shape[:3]), np.asarray(img.affine, dtype=np.float64)


def geometry_problem(label: Path, others: dict[str, Path]) -> str | None:
    """Why ``label`` cannot be drawn over ``others`` (name -> file), or None when they agree."""
    shape, affine = _geometry(label)
    for name, path in others.items():
        s, a = _geometry(path)
        if s != shape:
            return f"prediction shape {shape} differs from {name} shape {s}"
        if not np.allclose(a, affine, rtol=0.0, atol=AFFINE_ATOL):
            return (f"prediction affine differs from the {name} affine by up to "
                    f"{float(np.abs(a - affine).max()):.3g} mm")
    return None


def _voxel_ml(affine: np.ndarray) -> float:
    """One voxel's volume in millilitres (|det| of the affine: right for oblique grids too)."""
    return abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0


def label_volumes_ml(label: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """Volume (mL) of each region (ET, TC, WT) and label (NETC, SNFH) of a label map."""
    voxel_ml = _voxel_ml(affine)
    out = {r: float(m.sum()) * voxel_ml for r, m in region_masks(label).items()}
    for value in (1, 2):
        out[LABEL_NAMES[value]] = float((label == value).sum()) * voxel_ml
    return out


def lesions(label: np.ndarray, affine: np.ndarray, limit: int = 50) -> list[dict[str, Any]]:
    """Connected whole-tumour components (26-connectivity), largest first.

    Each: ``volume_ml``, ``mm`` (world position of the voxel nearest the component's centre of mass
    that lies inside it, so a jump lands on the lesion even when it is curved) and ``labels`` (the
    BraTS labels it holds). At most ``limit`` components.
    """
    wt = label > 0
    box = []  # the labelled voxels' bounding box: a 512^3 scan is labelled in a small part of it
    for axis in range(3):
        hit = np.flatnonzero(wt.any(axis=tuple(a for a in range(3) if a != axis)))
        if hit.size == 0:
            return []
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    offset = np.array([s.start for s in box])
    label = label[tuple(box)]
    comps, n = ndimage.label(wt[tuple(box)], structure=np.ones((3, 3, 3), bool))
    sizes = np.bincount(comps.ravel())[1:]
    voxel_ml = _voxel_ml(affine)
    order = np.argsort(-sizes, kind="stable")[:limit]
    out = []
    objects = ndimage.find_objects(comps)
    for i in order:
        sl = objects[i]
        inside = comps[sl] == i + 1
        vox = np.argwhere(inside)
        centre = vox.mean(axis=0)
        nearest = vox[np.argmin(((vox - centre) ** 2).sum(axis=1))] + [s.start for s in sl] + offset
        mm = affine @ np.append(nearest.astype(np.float64), 1.0)
        held = np.unique(label[sl][inside])
        out.append({"volume_ml": round(float(sizes[i]) * voxel_ml, 4),
                    "mm": [round(float(v), 2) for v in mm[:3]],
                    "voxel": [int(v) for v in nearest],
                    "labels": [LABEL_NAMES[int(v)] for v in held]})
    return out


def read_metrics_csv(eval_dir: Path) -> dict[str, dict[str, float]]:
    """``{case_id: {metric: value}}`` from an evaluation folder's ``metrics.csv`` (or the CSV itself)."""
    path = eval_dir / "metrics.csv" if eval_dir.is_dir() else eval_dir
    if not path.is_file():
        raise MensegError("no metrics.csv here (the --out folder of 'menseg evaluate')", eval_dir)
    out: dict[str, dict[str, float]] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "case_id" not in reader.fieldnames:
            raise MensegError("not a metrics.csv of 'menseg evaluate' (no case_id column)", path)
        for row in reader:
            vals = {}
            for k, v in row.items():
                if k == "case_id":
                    continue
                try:
                    vals[k] = float(v)
                except (TypeError, ValueError):
                    continue
            out[row["case_id"]] = vals
    return out


def collect_cases(
    pred_dir: str | Path,
    images: str | Path,
    ref: str | Path | None = None,
    metrics: str | Path | None = None,
    progress: bool = True,
) -> list[ReviewCase]:
    """The cases of a review, worst first (mean lesion-wise Dice when known, else by id).

    Args:
        pred_dir: flat folder of predicted ``<case>.nii.gz`` (``menseg predict``'s output).
        images: the images the predictions were made from (any layout ``menseg predict`` reads).
        ref: reference labels (BraTS layout or flat folder), optional.
        metrics: an evaluation folder (``menseg evaluate --out``) or its ``metrics.csv``, optional.

    Raises:
        MensegError: a folder is missing, or no prediction has images.
    """
    pred_dir, images = Path(pred_dir), Path(images)
    preds = find_predictions(pred_dir)
    if not preds:
        raise MensegError("no predicted labels here (<case>.nii.gz, as 'menseg predict' writes)", pred_dir)
    bad: list[tuple[str, str]] = []
    found: dict[str, CaseFiles] = {c.case_id: c
                                   for c in discover_inputs(images, allow_missing=True, errors=bad)}
    for name, why in bad:
        log.warning("images of %s cannot be read: %s", name, why)
    refs = find_reference_labels(ref) if ref is not None else {}
    table = read_metrics_csv(Path(metrics)) if metrics is not None else {}
    if not any(cid in found for cid in preds):
        raise MensegError(f"none of the {len(preds)} predicted cases has images in {images}", pred_dir)

    cases: list[ReviewCase] = []
    for cid in tqdm(list(preds), desc="review", unit="case", disable=None if progress else True):
        case = ReviewCase(cid, preds[cid], dict(found[cid].images) if cid in found else {},
                          refs.get(cid), table.get(cid))
        cases.append(case)
        if not case.images:
            case.problem = "no images found for this case"
            continue
        others = {**case.images, **({"reference": case.reference} if case.reference else {})}
        try:
            case.problem = geometry_problem(case.prediction, others)
            label, affine = read_label(case.prediction)
        except MensegError as e:
            case.problem = " ".join(str(e).split())
            continue
        case.volumes_ml = label_volumes_ml(label, affine)
        if case.problem is None and case.reference is not None and case.metrics is None:
            ref_label, _ = read_label(case.reference)
            case.metrics = evaluate_case(label, ref_label, spacing_of(affine))
    missing = sorted(set(preds) - set(found))
    if missing:
        log.warning("%d predicted case(s) without images: %s", len(missing), ", ".join(missing[:5]))
    cases.sort(key=ReviewCase.sort_key)
    return cases

