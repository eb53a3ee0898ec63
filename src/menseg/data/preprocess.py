"""Preprocessing, recorded and invertible.

:func:`preprocess` applies, in order:

1. reorientation of the voxel axes to RAS+ (exact: axis permutation + flips),
2. crop to the bounding box of the brain (voxels non-zero in any modality),
   in the reoriented input grid (exact, integer box),
3. resampling of the crop to the target spacing (images trilinear, labels by
   linear interpolation of one-hot maps + argmax; skipped when the spacing
   already matches so nothing is interpolated),
4. per-modality z-score inside the brain mask, background set to 0.

Missing sequences: a case discovered with ``allow_missing`` (see
:mod:`menseg.data.layouts`) is loaded with all-zero channels for its absent
sequences (:func:`load_case`); :func:`preprocess` with ``present`` builds the
brain mask / crop from the present channels only and keeps the absent ones
exactly 0 (props ``"present"`` names the present channels).

Everything needed to undo steps 1-3 is recorded in a JSON-serialisable
``props`` dict; :func:`invert` maps a (C, x, y, z) array in the preprocessed
grid back onto the input grid exactly (same shape and voxel order as the
file the case was read from).

Resampling uses ``align_corners=False`` geometry: the field of view (outer
voxel edges) of the crop is kept, so the effective spacing is
``crop_shape * spacing_in / new_shape`` (recorded as ``props["spacing"]``),
which differs from the target by at most half a voxel over the crop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from nibabel import orientations as nio

from menseg.constants import MODALITIES
from menseg.data.layouts import CaseFiles
from menseg.data.validate import orientation_of, read_case, spacing_of
from menseg.errors import MensegError

log = logging.getLogger(__name__)

#: Bump when preprocessing changes in a way that invalidates caches.
PREPROCESS_VERSION = 1
#: A channel whose volume border holds one value in at least this share of its voxels has a constant
#: background: the value outside the head (0 for raw scans; e.g. -4.8 for scans already z-scored).
BORDER_UNIFORM = 0.9
#: Inputs are expected skull-stripped: a foreground larger than this (cm3) is a head, not a brain.
#: Skull-stripped BraTS scans hold 1.5-1.7 l (the three real studies in ../shared), the engine's
#: synthetic cases (brain, extra-axial CSF and dura) about 2.0-2.2 l before their +-15 % size
#: jitter; a head with skull and scalp is 3.5-4.5 l (unverified round figure).
HEAD_CM3 = 3200.0
#: ... or one whose tissue covers more than this share of the volume's border voxels (a scan that is not
#: skull-stripped and keeps its noisy air background covers all of it; the engine's synthetic brain crops
#: reach up to 8 %, where the brain touches the box; real skull-stripped BraTS scans under 0.1 %).
BORDER_TISSUE = 0.25
#: Labels with more distinct values than this are resampled nearest-neighbour.
_MAX_ONEHOT = 16
_RAS = nio.axcodes2ornt(("R", "A", "S"))


def present_mask(case: CaseFiles) -> list[bool]:
    """Per channel of :func:`load_case`'s image (MODALITIES order): is that sequence present?"""
    return [m in case.images for m in MODALITIES]


def load_case(
    case: CaseFiles, atol: float = 1e-3
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Read and validate a case in the file's own grid.

    Returns ``(image, label, affine)``: float32 ``(4, X, Y, Z)`` in MODALITIES
    order, uint8 ``(X, Y, Z)`` or None, 4x4 voxel->mm affine.

    A case lacking sequences (``CaseFiles`` from discovery with ``allow_missing``)
    gets all-zero channels for them; the grid (shape, affine) is that of
    ``case.reference`` (t1c if present, else the first present sequence), and the
    present sequences and the label must agree with it within ``atol``. Which
    channels are present: ``case.present`` / :func:`present_mask`.
    """
    image, label, affine, _ = read_case(case, atol)
    return image, label, affine


# ---------------------------------------------------------------- geometry helpers


def _reorient(arr: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Apply a nibabel orientation transform to the last three axes of ``arr``."""
    if np.array_equal(ornt, _RAS):
        return arr
    lead = arr.ndim - 3
    moved = np.moveaxis(arr, tuple(range(lead)), tuple(range(3, 3 + lead)))
    out = nio.apply_orientation(moved, ornt)
    return np.ascontiguousarray(np.moveaxis(out, tuple(range(3, 3 + lead)), tuple(range(lead))))


def _border(a: np.ndarray) -> np.ndarray:
    """The voxels of the six faces of a 3D array (edges counted more than once: a share, not a count)."""
    return np.concatenate([a[0].ravel(), a[-1].ravel(), a[:, 0].ravel(), a[:, -1].ravel(),
                           a[:, :, 0].ravel(), a[:, :, -1].ravel()])


def background_value(channel: np.ndarray) -> float:
    """The value that fills a 3D channel's border when it is (nearly) uniform, else 0.

    Scans straight from the scanner or from BraTS preprocessing are 0 outside the head; scans
    that were already normalised have a constant such as -4.8 there, which would otherwise be
    taken for brain everywhere.
    """
    values, counts = np.unique(_border(channel), return_counts=True)
    i = int(counts.argmax())
    return float(values[i]) if counts[i] >= BORDER_UNIFORM * counts.sum() else 0.0


def check_skull_stripped(brain: np.ndarray, spacing: Sequence[float], name: str = "image") -> bool:
    """Warn (one line) when the foreground looks like a whole head rather than a brain; True if it does."""
    volume_cm3 = float(np.count_nonzero(brain)) * float(np.prod(spacing)) / 1000.0
    on_border = float(_border(brain).mean())
    if volume_cm3 <= HEAD_CM3 and on_border <= BORDER_TISSUE:
        return False
    why = (f"its foreground is head-sized ({volume_cm3:.0f} cm3)" if volume_cm3 > HEAD_CM3
           else f"tissue covers {on_border:.0%} of the volume's border")
    log.warning("%s: %s; menseg's models expect skull-stripped, co-registered sequences (as BraTS), so "
                "expect a poor segmentation", name, why)
    return True


def _bbox(mask: np.ndarray) -> list[tuple[int, int]]:
    """Bounding box ``[(lo, hi), ...]`` (hi exclusive) of the True voxels of a 3D mask."""
    box = []
    for ax in range(3):
        others = tuple(a for a in range(3) if a != ax)
        idx = np.flatnonzero(mask.any(axis=others))
        box.append((int(idx[0]), int(idx[-1]) + 1))
    return box


def _resize(x: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Trilinear resize of float ``(C, X, Y, Z)`` to ``(C, *size)`` (align_corners=False)."""
    if tuple(x.shape[1:]) == tuple(size):
        return x.astype(np.float32, copy=False)
    with torch.no_grad():
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
        out = F.interpolate(t, size=tuple(int(s) for s in size), mode="trilinear",
                            align_corners=False)
    return out[0].numpy()


def _resize_labels(lab: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Resize an integer map ``(X, Y, Z)`` to ``size``.

    Each value's one-hot mask is interpolated trilinearly and the arg-max taken
    (smooth boundaries, no label shift), as nnU-Net does for segmentations.
    """
    if tuple(lab.shape) == tuple(size):
        return lab
    if lab.dtype.kind in "bu" and lab.dtype.itemsize == 1:
        counts = np.bincount(lab.ravel().view(np.uint8))
        values = np.flatnonzero(counts).astype(lab.dtype)
    else:
        values = np.unique(lab)
    if len(values) == 1:
        return np.full(size, values[0], dtype=lab.dtype)
    size = tuple(int(s) for s in size)
    with torch.no_grad():
        if len(values) > _MAX_ONEHOT:
            t = torch.from_numpy(np.ascontiguousarray(lab).astype(np.float64))[None, None]
            out = F.interpolate(t, size=size, mode="nearest-exact")[0, 0].numpy()
            return out.astype(lab.dtype)
        onehot = np.stack([lab == v for v in values]).astype(np.float32)
        probs = F.interpolate(torch.from_numpy(onehot)[None], size=size, mode="trilinear",
                              align_corners=False)[0]
        idx = probs.argmax(0).numpy()
    return values[idx].astype(lab.dtype, copy=False)


def _resample_affine(affine: np.ndarray, in_shape: tuple[int, ...],
                     out_shape: tuple[int, ...]) -> np.ndarray:
    """Affine of a grid resized from ``in_shape`` to ``out_shape`` over the same field of view."""
    s = np.asarray(in_shape, float) / np.asarray(out_shape, float)
    m = np.eye(4)
    m[:3, :3] = np.diag(s)
    m[:3, 3] = 0.5 * s - 0.5  # voxel j's centre sits at input coordinate (j + 0.5) * s - 0.5
    return affine @ m


def _shift_affine(affine: np.ndarray, lo: list[int]) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = lo
    return affine @ m


def _listify(a: np.ndarray) -> list:
    return [[float(v) for v in row] for row in np.asarray(a, float)]


# ---------------------------------------------------------------- forward / inverse


def preprocess(
    image: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    spacing: tuple[float, float, float] | list[float] = (1.0, 1.0, 1.0),
    present: Sequence[bool] | None = None,
    name: str = "image",
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Reorient to RAS+, crop to the brain, resample to ``spacing`` (mm), z-score.

    The brain is where any present channel differs from its background: 0, or the constant
    that fills the channel's border (:func:`background_value`, logged; e.g. scans that were
    already z-scored). A foreground that looks like a whole head gets a one-line warning
    (:func:`check_skull_stripped`). ``name`` (the case id) is used in log lines.

    Args:
        image: float ``(C, X, Y, Z)`` in the file's grid (C = 4, MODALITIES order).
        label: integer ``(X, Y, Z)`` in the same grid, or None.
        affine: 4x4 voxel->mm affine of that grid.
        spacing: target voxel size in mm along the RAS axes.
        present: one bool per channel, False for an absent sequence (None: all
            present). The brain mask and crop come from the present channels
            only; absent channels come out exactly 0 (not normalised, whatever
            they held) and get no ``norm`` entry.

    Returns:
        ``(image_pp, label_pp, props)``: float32 ``(C, x, y, z)`` (zero outside
        the brain), uint8 ``(x, y, z)`` or None, and the JSON-serialisable record
        of every step (see :func:`invert`); ``props["present"]`` lists the names
        of the present channels.
    """
    image = np.asarray(image)
    affine = np.asarray(affine, np.float64)
    if image.ndim != 4:
        raise ValueError(f"image must be (C, X, Y, Z), got shape {image.shape}")
    shape0 = tuple(int(s) for s in image.shape[1:])
    if label is not None and tuple(label.shape) != shape0:
        raise ValueError(f"label shape {label.shape} differs from image shape {shape0}")
    target = np.asarray(spacing, float)
    if target.shape != (3,) or not (target > 0).all():
        raise MensegError(f"target spacing must be three positive numbers (mm), got {spacing}")
    n_ch = int(image.shape[0])
    names = list(MODALITIES) if n_ch == len(MODALITIES) else [f"ch{i}" for i in range(n_ch)]
    if present is None:
        keep = np.ones(n_ch, bool)
    else:
        keep = np.array([bool(v) for v in present], bool)
        if keep.shape != (n_ch,):
            raise ValueError(f"present has {keep.size} entries for {n_ch} image channels")
        if not keep.any():
            raise MensegError("no sequence present (present is all False)")

    # 1. reorient to RAS+
    ornt = nio.io_orientation(affine)
    img_r = _reorient(image.astype(np.float32, copy=False), ornt)
    lab_r = _reorient(np.asarray(label), ornt) if label is not None else None
    aff_r = affine @ nio.inv_ornt_aff(ornt, shape0)
    shape_r = tuple(int(s) for s in img_r.shape[1:])

    # 2. crop to the foreground box (union over the present modalities); a constant non-zero
    # background is set to 0 first, so everything after sees what raw scans give
    background = {names[c]: background_value(img_r[c]) for c in range(n_ch) if keep[c]}
    shifted = {k: v for k, v in background.items() if v != 0.0}
    if shifted:
        img_r = img_r.copy()  # never change the caller's array
        for c in range(n_ch):
            if names[c] in shifted:
                img_r[c][img_r[c] == shifted[names[c]]] = 0.0
        log.info("%s: constant background outside the head (%s) treated as outside the brain", name,
                 ", ".join(f"{k} {v:g}" for k, v in shifted.items()))
    brain = (img_r[keep] != 0).any(axis=0) if not keep.all() else (img_r != 0).any(axis=0)
    if not brain.any():
        raise MensegError("image is zero everywhere (no brain to crop to)")
    check_skull_stripped(brain, spacing_of(aff_r), name)
    box = _bbox(brain)
    sl = tuple(slice(lo, hi) for lo, hi in box)
    img_c = img_r[(slice(None), *sl)]
    brain_c = brain[sl]
    lost = 0
    lab_c = None
    if lab_r is not None:
        lab_c = lab_r[sl]
        lost = int(np.count_nonzero(lab_r)) - int(np.count_nonzero(lab_c))
        if lost:
            log.warning("%d labelled voxels lie outside the brain box and are cropped away", lost)
    aff_c = _shift_affine(aff_r, [lo for lo, _ in box])
    shape_c = tuple(int(s) for s in img_c.shape[1:])

    # 3. resample
    sp_in = np.asarray(spacing_of(aff_r))
    new_shape = tuple(max(1, int(round(n * s / t))) for n, s, t in
                      zip(shape_c, sp_in, target, strict=True))
    resampled = new_shape != shape_c
    if resampled:
        img_p = _resize(img_c, new_shape)
        brain_p = _resize(brain_c[None].astype(np.float32), new_shape)[0] >= 0.5
        lab_p = _resize_labels(lab_c, new_shape) if lab_c is not None else None
    else:
        img_p = np.array(img_c, dtype=np.float32)  # own copy: normalised in place below
        brain_p = brain_c
        lab_p = lab_c
    sp_eff = sp_in * np.asarray(shape_c) / np.asarray(new_shape)
    aff_p = _resample_affine(aff_c, shape_c, new_shape)

    # 4. z-score per modality inside the brain (absent modalities: exactly 0)
    norm: dict[str, dict[str, float]] = {}
    n_brain = int(np.count_nonzero(brain_p))
    for c, name in enumerate(names):
        ch = img_p[c]
        if not keep[c]:
            ch[...] = 0.0
            continue
        vals = ch[brain_p] if n_brain else ch.ravel()
        mean = float(vals.mean(dtype=np.float64))
        std = float(vals.std(dtype=np.float64))
        ch -= mean
        ch /= max(std, 1e-8)
        ch[~brain_p] = 0.0
        norm[name] = {"mean": mean, "std": std}

    props: dict[str, Any] = {
        "version": PREPROCESS_VERSION,
        "original_shape": list(shape0),
        "original_affine": _listify(affine),
        "original_orientation": orientation_of(affine),
        "original_spacing": list(spacing_of(affine)),
        "ornt": [[int(a), int(f)] for a, f in ornt],
        "reoriented_shape": list(shape_r),
        "crop_bbox": [[lo, hi] for lo, hi in box],
        "cropped_shape": list(shape_c),
        "target_spacing": [float(t) for t in target],
        "resampled": bool(resampled),
        "spacing": [float(s) for s in sp_eff],
        "shape": list(new_shape),
        "affine": _listify(aff_p),
        "norm": norm,
        "brain_voxels": n_brain,
        "present": [n for n, k in zip(names, keep, strict=True) if k],
    }
    if shifted:
        props["background"] = shifted
    if label is not None:
        props["label_voxels_outside_crop"] = lost
    label_pp = np.array(lab_p, dtype=np.uint8) if lab_p is not None else None
    return np.ascontiguousarray(img_p), label_pp, props


def invert(array_pp: np.ndarray, props: dict[str, Any], order: int = 1) -> np.ndarray:
    """Map an array in the preprocessed grid back onto the original input grid.

    Args:
        array_pp: ``(C, x, y, z)`` (or ``(x, y, z)``) with ``(x, y, z) == props["shape"]``.
        props: the record returned by :func:`preprocess`.
        order: 1 for probabilities / intensities (trilinear, float32 result),
            0 for label maps (one-hot interpolation + argmax, dtype kept).

    Returns:
        ``(C, X, Y, Z)`` (or ``(X, Y, Z)``) with ``(X, Y, Z) == props["original_shape"]``
        in the original voxel order; zero outside the brain box. When no
        resampling was needed, labels come back voxel for voxel.
    """
    if order not in (0, 1):
        raise ValueError(f"order must be 0 (labels) or 1 (linear), got {order}")
    arr = np.asarray(array_pp)
    squeeze = arr.ndim == 3
    if squeeze:
        arr = arr[None]
    if arr.ndim != 4 or list(arr.shape[1:]) != list(props["shape"]):
        raise ValueError(
            f"array shape {arr.shape} does not match the preprocessed shape {props['shape']}"
        )
    shape_c = tuple(props["cropped_shape"])
    if order == 1:
        res = _resize(arr.astype(np.float32, copy=False), shape_c)
    elif tuple(arr.shape[1:]) == shape_c:
        res = arr
    else:
        res = np.stack([_resize_labels(ch, shape_c) for ch in arr])
    out = np.zeros((res.shape[0], *props["reoriented_shape"]), dtype=res.dtype)
    sl = tuple(slice(lo, hi) for lo, hi in props["crop_bbox"])
    out[(slice(None), *sl)] = res
    ornt = np.asarray(props["ornt"], float)
    back = nio.ornt_transform(_RAS, ornt)
    out = _reorient(out, back)
    if list(out.shape[1:]) != list(props["original_shape"]):  # pragma: no cover - safety net
        raise RuntimeError(f"inverse produced {out.shape[1:]}, expected {props['original_shape']}")
    return out[0] if squeeze else out


def preprocess_case(
    case: CaseFiles, spacing: tuple[float, float, float] | list[float] = (1.0, 1.0, 1.0),
    atol: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """:func:`load_case` + :func:`preprocess`; props also get ``case_id`` and ``files``.

    Sequences the case lacks are zero channels (``props["present"]`` names the others).
    """
    image, label, affine = load_case(case, atol)
    image_pp, label_pp, props = preprocess(image, label, affine, spacing, present_mask(case), case.case_id)
    props["case_id"] = case.case_id
    props["files"] = [str(p) for p in case.files]
    return image_pp, label_pp, props
