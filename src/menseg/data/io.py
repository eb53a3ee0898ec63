"""NIfTI reading and writing with one-line errors for bad files.

Every reader raises :class:`~menseg.errors.MensegError` naming the file and the
problem (missing, unreadable or truncated, wrong dimensionality, NaN/inf,
empty or constant image, invalid label values). Writers are atomic.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from menseg.constants import LABELS
from menseg.errors import MensegError
from menseg.utils import atomic_path

log = logging.getLogger(__name__)

#: File endings recognised as NIfTI.
NIFTI_ENDINGS: tuple[str, ...] = (".nii.gz", ".nii")
#: Largest image (voxels, all volumes of the file) read by default: 512^3, room for a 512x512x400 scan.
DEFAULT_MAX_VOXELS = 512**3
#: Environment variable that sets the voxel budget (``menseg --max-voxels N`` sets it too).
MAX_VOXELS_ENV = "MENSEG_MAX_VOXELS"


def max_voxels() -> int:
    """The voxel budget: ``$MENSEG_MAX_VOXELS`` or :data:`DEFAULT_MAX_VOXELS`."""
    raw = os.environ.get(MAX_VOXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_VOXELS
    try:
        value = int(raw)
    except ValueError:
        raise MensegError(f"{MAX_VOXELS_ENV} must be a whole number of voxels, got '{raw}'") from None
    if value < 1:
        raise MensegError(f"{MAX_VOXELS_ENV} must be at least 1, got {value}")
    return value


def nifti_stem(path: str | Path) -> str:
    """File name without its NIfTI ending (``a/b-t1c.nii.gz`` -> ``b-t1c``)."""
    name = Path(path).name
    for end in NIFTI_ENDINGS:
        if name.endswith(end):
            return name[: -len(end)]
    return name


def nifti_ending(path: str | Path) -> str:
    """The NIfTI ending of ``path`` (``.nii.gz`` or ``.nii``), or ``""``."""
    name = Path(path).name
    for end in NIFTI_ENDINGS:
        if name.endswith(end):
            return end
    return ""


def is_nifti(path: str | Path) -> bool:
    """True if the file name ends with ``.nii`` or ``.nii.gz`` (hidden files excluded)."""
    p = Path(path)
    return bool(nifti_ending(p)) and not p.name.startswith(".")


def load_nifti(path: str | Path) -> nib.Nifti1Image:
    """Open a NIfTI file (header only; data stays on disk), or raise a one-line error."""
    path = Path(path)
    if not path.exists():
        raise MensegError("file not found", path)
    if not path.is_file():
        raise MensegError("not a file", path)
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for bad files
        raise MensegError(f"unreadable NIfTI file ({_why(e, path)})", path) from None
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        raise MensegError(f"not a NIfTI image ({type(img).__name__})", path)
    n_vox, budget = math.prod(int(d) for d in img.shape), max_voxels()
    if n_vox > budget:  # checked on the header, before any voxel is read
        raise MensegError(
            f"image of shape {tuple(int(d) for d in img.shape)} has {n_vox:,} voxels, over the budget of "
            f"{budget:,} (raise it with menseg --max-voxels N or {MAX_VOXELS_ENV})", path)
    return img


def _why(e: BaseException, path: Path | None = None) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if path is not None:  # the path is already at the start of the message
        msg = msg.replace(f"File {path} ", "").replace(str(path), "<file>")
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _read_data(img: nib.Nifti1Image, path: Path) -> np.ndarray:
    """Read the voxel data (scaling applied), catching truncated/corrupt files."""
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:
        raise MensegError(f"unreadable or truncated NIfTI data ({_why(e, path)})", path) from None
    return np.asarray(data)


def _as_3d(data: np.ndarray, path: Path) -> np.ndarray:
    if data.size == 0:
        raise MensegError(f"empty image (shape {tuple(data.shape)}, no voxels)", path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise MensegError(
            f"expected a 3D image, got a {data.ndim}D image of shape {tuple(data.shape)}", path
        )
    return data


def _check_affine(affine: np.ndarray, path: Path) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        raise MensegError("affine contains NaN/inf", path)
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise MensegError("affine is singular (zero voxel size or degenerate axes)", path)
    return affine


def read_image(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D intensity image.

    Returns ``(data, affine)``: float32 ``(X, Y, Z)`` in the file's own voxel
    order (scl_slope/inter applied) and the 4x4 float64 voxel->world (mm) affine.
    A 4D image holding a single volume is squeezed to 3D.

    Raises MensegError naming the file for: missing, unreadable or truncated,
    not 3D, NaN/inf voxels, empty or constant image.
    """
    path = Path(path)
    img = load_nifti(path)
    data = _as_3d(_read_data(img, path), path)
    with np.errstate(over="ignore", invalid="ignore"):
        data = data.astype(np.float32, copy=False)
    finite = np.isfinite(data)
    if not finite.all():
        n_bad = int(data.size - np.count_nonzero(finite))
        raise MensegError(f"image contains {n_bad} NaN/inf voxel(s)", path)
    lo, hi = float(data.min()), float(data.max())
    if lo == hi:
        raise MensegError(f"constant image (every voxel is {lo:g})", path)
    return data, _check_affine(img.affine, path)


def read_label(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D label map.

    Returns ``(label, affine)``: uint8 ``(X, Y, Z)`` with values in {0, 1, 2, 3}
    and the 4x4 float64 affine. An all-zero label is allowed.

    Raises MensegError naming the file for: missing, unreadable or truncated,
    not 3D, NaN/inf, non-integer values or values outside {0, 1, 2, 3}.
    """
    path = Path(path)
    img = load_nifti(path)
    data = _as_3d(_read_data(img, path), path)
    if data.dtype.kind == "b":
        data = data.astype(np.uint8)
    if data.dtype.kind not in "iuf":
        raise MensegError(f"unsupported label data type {data.dtype}", path)
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            n_bad = int(data.size - np.count_nonzero(finite))
            raise MensegError(f"label contains {n_bad} NaN/inf voxel(s)", path)
        nonint = data != np.round(data)
        if nonint.any():
            ex = np.unique(data[nonint])[:3].tolist()
            raise MensegError(
                f"label has non-integer values (e.g. {', '.join(f'{v:g}' for v in ex)}); "
                "expected integers 0-3",
                path,
            )
    lo, hi = min(LABELS), max(LABELS)
    bad = (data < lo) | (data > hi)
    if bad.any():
        ex = np.unique(data[bad])[:5].tolist()
        raise MensegError(
            f"label values outside {{0,1,2,3}}: found {', '.join(f'{v:g}' for v in ex)}", path
        )
    return data.astype(np.uint8), _check_affine(img.affine, path)


def _header_from(like: Any) -> nib.Nifti1Header | None:
    if like is None:
        return None
    hdr = getattr(like, "header", like)
    if isinstance(hdr, nib.Nifti2Header):
        return nib.Nifti1Header.from_header(hdr)
    if isinstance(hdr, nib.Nifti1Header):
        return hdr.copy()
    raise TypeError(f"like must be a NIfTI image or header, got {type(like).__name__}")


def _write(path: Path, data: np.ndarray, affine: np.ndarray, like: Any, dtype: Any) -> None:
    hdr = _header_from(like)
    img = nib.Nifti1Image(data, np.asarray(affine, np.float64), header=hdr)
    img.set_data_dtype(dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if hdr is not None:
        # Keep the codes of the reference header so viewers treat both files alike.
        img.set_qform(affine, code=int(hdr["qform_code"]) or 1)
        img.set_sform(affine, code=int(hdr["sform_code"]) or 1)
    else:
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    if not nifti_ending(path):
        raise MensegError("output file name must end with .nii.gz or .nii", path)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def write_label(
    path: str | Path, label: np.ndarray, affine: np.ndarray, like: Any = None
) -> None:
    """Write a 3D uint8 label map atomically.

    ``label`` ``(X, Y, Z)`` integer values in {0..3}; ``affine`` 4x4 voxel->mm;
    ``like`` an optional NIfTI image or header whose metadata (descrip, units,
    xform codes) is kept.
    """
    label = np.asarray(label)
    if label.ndim != 3:
        raise ValueError(f"label must be 3D, got shape {label.shape}")
    if label.size and (label.min() < 0 or label.max() > max(LABELS)):
        raise ValueError("label values must be in {0,1,2,3}")
    _write(Path(path), label.astype(np.uint8), affine, like, np.uint8)


def write_image(
    path: str | Path, image: np.ndarray, affine: np.ndarray, like: Any = None
) -> None:
    """Write a 3D float32 image ``(X, Y, Z)`` atomically (see :func:`write_label`)."""
    image = np.asarray(image, np.float32)
    if image.ndim != 3:
        raise ValueError(f"image must be 3D, got shape {image.shape}")
    _write(Path(path), image, affine, like, np.float32)
