"""PNG mosaic of a synthetic (or any) case for a person to look at.

Rows: t1c, t1n, t2f, t2w, then t1c with the label overlaid (NETC red, SNFH
green, ET yellow, as BraTS viewers colour them); columns: axial, coronal and
sagittal slices through the lesion centre (centre of mass of the tumour core,
labels 1 and 3, else of any label), or through the volume centre when there is
no lesion. Slices are shown in neurological convention (patient's right on the
right), anterior / superior up, with the voxel aspect ratio of ``spacing``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from menseg.constants import MODALITIES
from menseg.data.validate import spacing_of
from menseg.utils import atomic_path

log = logging.getLogger(__name__)

#: RGBA of labels 1 (NETC), 2 (SNFH), 3 (ET) in the overlay.
LABEL_COLOURS: dict[int, tuple[float, float, float, float]] = {
    1: (0.95, 0.15, 0.15, 0.65),
    2: (0.15, 0.85, 0.25, 0.45),
    3: (1.00, 0.90, 0.10, 0.65),
}
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")


def _np(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def lesion_centre(label: np.ndarray) -> tuple[int, int, int]:
    """Voxel centre of the tumour core (labels 1, 3), else of any label, else of the volume."""
    for mask in (np.isin(label, (1, 3)), label > 0):
        if mask.any():
            return tuple(int(round(c)) for c in np.argwhere(mask).mean(0))  # type: ignore[return-value]
    return tuple(n // 2 for n in label.shape)  # type: ignore[return-value]


def _slice(vol: np.ndarray, plane: str, c: tuple[int, int, int]) -> np.ndarray:
    """2D slice for imshow (rows top->bottom = anterior/superior first, columns left->right = R)."""
    if plane == "axial":  # x (R) horizontal, y (A) up
        return vol[:, :, c[2]].T[::-1]
    if plane == "coronal":  # x horizontal, z (S) up
        return vol[:, c[1], :].T[::-1]
    return vol[c[0], :, :].T[::-1]  # sagittal: y (A) horizontal, z up


def _aspect(plane: str, spacing: tuple[float, float, float]) -> float:
    sx, sy, sz = spacing
    return {"axial": sy / sx, "coronal": sz / sx, "sagittal": sz / sy}[plane]


def _window(vol: np.ndarray) -> tuple[float, float]:
    fg = vol[vol != 0]
    if fg.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(fg, (0.5, 99.5))
    return float(min(lo, 0.0)), float(hi if hi > lo else lo + 1.0)


def write_preview(
    path: str | Path,
    image: torch.Tensor | np.ndarray,
    label: torch.Tensor | np.ndarray | None,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Write the mosaic of ``image`` ``(4, X, Y, Z)`` (MODALITIES order) and ``label`` ``(X, Y, Z)``.

    ``spacing`` in mm sets the aspect ratio. Written atomically; returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    img = _np(image).astype(np.float32)
    lab = np.zeros(img.shape[1:], np.uint8) if label is None else _np(label).astype(np.uint8)
    centre = lesion_centre(lab)
    rows = [*MODALITIES, "label"]
    fig = Figure(figsize=(3 * 2.4, len(rows) * 2.4), dpi=dpi)
    axes = fig.subplots(len(rows), len(PLANES), squeeze=False)
    windows = [_window(img[c]) for c in range(len(MODALITIES))]
    overlay_lut = np.zeros((4, 4), np.float32)
    for k, rgba in LABEL_COLOURS.items():
        overlay_lut[k] = rgba
    for r, name in enumerate(rows):
        for p, plane in enumerate(PLANES):
            ax = axes[r, p]
            ch = MODALITIES.index(name) if name in MODALITIES else 0
            lo, hi = windows[ch]
            asp = _aspect(plane, spacing)
            ax.imshow(_slice(img[ch], plane, centre), cmap="gray", vmin=lo, vmax=hi, aspect=asp,
                      interpolation="nearest")
            if name == "label":
                ax.imshow(overlay_lut[_slice(lab, plane, centre)], aspect=asp, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(plane, fontsize=9)
            if p == 0:
                ax.set_ylabel("t1c + label" if name == "label" else name, fontsize=9)
    if title:
        fig.suptitle(f"{title}  (centre voxel {centre})", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    log.debug("wrote preview %s", path)
    return path


__all__ = ["LABEL_COLOURS", "PLANES", "lesion_centre", "write_preview"]


def write_preview_ras(
    path: str | Path,
    image: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    title: str | None = None,
) -> Path:
    """:func:`write_preview` of arrays in a file's own voxel order, shown in RAS orientation.

    ``image`` ``(4, X, Y, Z)`` and ``label`` ``(X, Y, Z)`` are in the grid of ``affine`` (any
    orientation, e.g. LPS); they are reoriented for display and the spacing follows the axes.
    """
    from nibabel import orientations as nio

    ornt = nio.io_orientation(affine)
    img = np.stack([nio.apply_orientation(c, ornt) for c in image])
    lab = None if label is None else nio.apply_orientation(label, ornt)
    sp = spacing_of(affine)
    sp_ras = tuple(sp[int(a)] for a in np.argsort(ornt[:, 0]))
    return write_preview(path, img, lab, sp_ras, title=title)  # type: ignore[arg-type]

