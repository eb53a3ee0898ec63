"""Validation of cases and datasets: contents, geometry agreement, label volumes."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm.auto import tqdm

from menseg.constants import LABELS, MODALITIES
from menseg.data.io import load_nifti, read_image, read_label
from menseg.data.layouts import CaseFiles, discover_cases
from menseg.errors import MensegError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaseReport:
    """Summary of one valid case, one row of ``menseg data check``.

    ``shape`` voxels (X, Y, Z) in the file's own order; ``spacing`` mm per
    voxel axis; ``orientation`` axis codes such as "RAS" or "LPS"; ``dtype``
    on-disk data type of the images (e.g. "int16", or "int16/float32" when they
    differ); ``label_volumes`` mm^3 per label 1 (NETC), 2 (SNFH), 3 (ET), or
    None for an unlabelled case; ``sequences`` the MRI sequences the case has
    (MODALITIES order; fewer than four for an incomplete case).
    """

    case_id: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: str
    dtype: str
    label_volumes: dict[int, float] | None
    files: tuple[str, ...] = ()
    sequences: tuple[str, ...] = MODALITIES

    @property
    def missing(self) -> tuple[str, ...]:
        """The sequences the case lacks (MODALITIES order)."""
        return tuple(m for m in MODALITIES if m not in self.sequences)

    @property
    def labelled(self) -> bool:
        """True if the case has a label map."""
        return self.label_volumes is not None

    @property
    def label_volumes_mm3(self) -> dict[int, float] | None:
        """Alias of ``label_volumes`` (mm^3 per label 1/2/3), the name the CLI table uses."""
        return self.label_volumes

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (label keys become strings)."""
        d = asdict(self)
        if self.label_volumes is not None:
            d["label_volumes"] = {str(k): v for k, v in self.label_volumes.items()}
        d["shape"], d["spacing"], d["files"] = list(self.shape), list(self.spacing), list(self.files)
        return d


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each voxel axis (column norms of the 3x3 part)."""
    sp = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(axis=0))
    return tuple(float(s) for s in sp)  # type: ignore[return-value]


def orientation_of(affine: np.ndarray) -> str:
    """Axis codes of an affine, e.g. "RAS" or "LPS"."""
    return "".join(str(c) for c in nib.aff2axcodes(np.asarray(affine, float)))


def _check_geometry(
    path: Path,
    what: str,
    shape: tuple[int, ...],
    affine: np.ndarray,
    ref_shape: tuple[int, ...],
    ref_affine: np.ndarray,
    ref_name: str,
    atol: float,
) -> None:
    if tuple(shape) != tuple(ref_shape):
        raise MensegError(f"{what} shape {tuple(shape)} differs from {ref_name} {tuple(ref_shape)}",
                          path)
    diff = float(np.abs(affine - ref_affine).max())
    if diff > atol:
        raise MensegError(
            f"{what} affine differs from {ref_name} by {diff:.4g} (tolerance {atol:g}); "
            f"orientation {orientation_of(affine)} vs {orientation_of(ref_affine)}, "
            f"spacing {_fmt(spacing_of(affine))} vs {_fmt(spacing_of(ref_affine))} mm",
            path,
        )


def _fmt(v: Any) -> str:
    return "x".join(f"{x:.4g}" for x in v)


def read_case(
    case: CaseFiles, atol: float = 1e-3
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, CaseReport]:
    """Read and validate one case.

    Returns ``(image, label, affine, report)``: image float32 ``(4, X, Y, Z)`` in
    MODALITIES order and the file's own voxel order, label uint8 ``(X, Y, Z)``
    or None, the 4x4 affine of the first present modality (t1c for a complete case).
    Raises MensegError naming the file for any bad file and for shape/affine
    disagreement beyond ``atol`` (mm, max absolute difference of affine entries).

    A case lacking sequences (``CaseFiles`` discovered with ``allow_missing``) gets
    all-zero channels for them; the present sequences and the label must agree with
    the first present one.
    """
    present = case.present
    if not present:
        raise MensegError(
            f"case '{case.case_id}' has no image (need at least one of {', '.join(MODALITIES)})")
    ref_mod = present[0]
    ref_name = f"{ref_mod} ({case.images[ref_mod].name})"
    image: np.ndarray | None = None
    ref_affine: np.ndarray | None = None
    dtypes: list[str] = []
    for mod in present:
        path = case.images[mod]
        data, affine = read_image(path)
        dtypes.append(str(load_nifti(path).get_data_dtype()))
        if image is None or ref_affine is None:
            ref_affine = affine
            image = np.zeros((len(MODALITIES), *data.shape), np.float32)
        else:
            _check_geometry(path, mod, data.shape, affine, image.shape[1:], ref_affine, ref_name, atol)
        image[MODALITIES.index(mod)] = data
    assert image is not None and ref_affine is not None
    label = None
    volumes = None
    if case.label is not None:
        label, laff = read_label(case.label)
        _check_geometry(case.label, "label", label.shape, laff, image.shape[1:], ref_affine, ref_name, atol)
        voxel_mm3 = float(abs(np.linalg.det(ref_affine[:3, :3])))
        counts = np.bincount(label.ravel(), minlength=max(LABELS) + 1)
        volumes = {k: float(counts[k]) * voxel_mm3 for k in LABELS if k != 0}
    unique_dtypes = list(dict.fromkeys(dtypes))
    report = CaseReport(
        case_id=case.case_id,
        shape=tuple(int(s) for s in image.shape[1:]),  # type: ignore[arg-type]
        spacing=spacing_of(ref_affine),
        orientation=orientation_of(ref_affine),
        dtype="/".join(unique_dtypes),
        label_volumes=volumes,
        files=tuple(str(p) for p in case.files),
        sequences=case.present,
    )
    return image, label, ref_affine, report


def check_case(case: CaseFiles, atol: float = 1e-3) -> CaseReport:
    """Validate one case fully (every voxel read); see :func:`read_case`."""
    return read_case(case, atol)[3]


def check_dataset(
    root: str | Path, atol: float = 1e-3, progress: bool = True
) -> list[CaseReport]:
    """Discover and validate every case of a dataset; stops at the first bad file.

    Cases lacking some sequences are valid (their report says which they have); a case
    with no image, or a label without any image, is an error.
    Returns one :class:`CaseReport` per case, sorted by case id.
    """
    cases = discover_cases(root, allow_missing=True)
    reports = []
    for case in tqdm(cases, desc="checking cases", unit="case", disable=not progress,
                     leave=False):
        reports.append(check_case(case, atol))
    n_lab = sum(r.labelled for r in reports)
    n_part = sum(bool(r.missing) for r in reports)
    log.info("%s: %d valid cases (%d labelled, %d incomplete)", root, len(reports), n_lab, n_part)
    return reports
