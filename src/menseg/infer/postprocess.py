"""From region probabilities to a BraTS-MEN label map, and removal of tiny components.

Regions are nested (ET within TC within WT, see ``menseg.constants.REGIONS``); the label is painted
by :func:`menseg.regions.regions_to_labels` (re-exported here): WT as SNFH (2), then TC as NETC (1),
then ET as ET (3), the convention of the region-based BraTS winners and nnU-Net.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from menseg.regions import REGION_PAINT, per_region, region_masks, regions_to_labels

log = logging.getLogger(__name__)

#: 26-connectivity in 3D.
STRUCTURE_26 = np.ones((3, 3, 3), dtype=bool)


def _remove_small(mask: np.ndarray, min_voxels: float) -> tuple[np.ndarray, int]:
    """Drop 26-connected components of ``mask`` with fewer than ``min_voxels`` voxels."""
    if min_voxels <= 1 or not mask.any():
        return mask, 0
    comps, n = ndimage.label(mask, structure=STRUCTURE_26)
    sizes = np.bincount(comps.ravel(), minlength=n + 1)
    small = sizes < min_voxels
    small[0] = False
    n_small = int(small.sum())
    if n_small == 0:
        return mask, 0
    return mask & ~small[comps], n_small


def _keep_largest(mask: np.ndarray) -> np.ndarray:
    """Only the largest 26-connected component of ``mask`` (ties: the first in scan order)."""
    if not mask.any():
        return mask
    comps, n = ndimage.label(mask, structure=STRUCTURE_26)
    if n <= 1:
        return mask
    sizes = np.bincount(comps.ravel(), minlength=n + 1)
    sizes[0] = 0
    return comps == int(np.argmax(sizes))


def clean_region(mask: np.ndarray, voxel_mm3: float, min_mm3: float, keep_largest: bool) -> np.ndarray:
    """One region's mask with components below ``min_mm3`` removed and, with ``keep_largest``, only its
    largest component kept."""
    cleaned, _ = _remove_small(mask, min_mm3 / voxel_mm3)
    return _keep_largest(cleaned) if keep_largest else cleaned


def remove_small_components(
    label: np.ndarray,
    spacing: Sequence[float],
    min_mm3: float | Sequence[float] | Mapping[str, float],
    keep_largest: Mapping[str, bool] | None = None,
) -> np.ndarray:
    """Remove connected components smaller than ``min_mm3`` from each region.

    Each region mask (WT, TC, ET) is cleaned on its own (26-connectivity; a component
    is removed when its volume ``n_voxels * prod(spacing)`` is strictly below the
    minimum), then the label is rebuilt from the nested masks. So a tiny isolated
    lesion disappears entirely, a tiny ET speck inside a larger core becomes NETC (1),
    and a tiny core inside larger oedema becomes SNFH (2).

    Args:
        label: ``(X, Y, Z)`` label map with values in {0, 1, 2, 3}.
        spacing: voxel size in mm, ``(sx, sy, sz)``.
        min_mm3: minimum component volume in mm^3; one value or one per region
            (sequence in ET, TC, WT order or mapping). ``<= 0`` disables.
        keep_largest: regions (by name) of which only the largest component is kept (after the size
            filter); none by default.

    Returns:
        New ``(X, Y, Z)`` uint8 label map (the input is not modified).
    """
    label = np.asarray(label)
    if label.ndim != len(spacing):
        raise ValueError(f"label has {label.ndim} dims but spacing has {len(spacing)} entries")
    voxel_mm3 = float(np.prod(np.asarray(spacing, dtype=np.float64)))
    if voxel_mm3 <= 0:
        raise ValueError(f"spacing must be positive, got {tuple(spacing)}")
    mins = per_region(min_mm3, "min_mm3")
    masks = region_masks(label)
    out = np.zeros(label.shape, dtype=np.uint8)
    outer: np.ndarray | None = None
    largest = dict(keep_largest or {})
    for region, value in REGION_PAINT:
        cleaned = clean_region(masks[region], voxel_mm3, mins[region], bool(largest.get(region, False)))
        if outer is not None:
            cleaned &= outer  # keep the nesting even if an outer component was removed
        out[cleaned] = value
        outer = cleaned
    return out


# ---------------------------------------------------------------- learned post-processing

#: Minimum component volumes (mm^3) tried by :func:`learn_postprocess`, each with and without keeping
#: only the largest component: 0 (nothing removed) to about a 1 cm sphere's volume.
MIN_MM3_CANDIDATES: tuple[float, ...] = (0.0, 10.0, 30.0, 100.0, 300.0, 1000.0)


def learn_postprocess(
    preds: Sequence[np.ndarray], refs: Sequence[np.ndarray], spacing: Sequence[float],
    candidates: Sequence[float] = MIN_MM3_CANDIDATES,
) -> dict[str, dict[str, float | bool]]:
    """Per region, the minimum component volume and keep-largest choice that maximise the mean BraTS
    lesion-wise Dice of ``preds`` against ``refs`` (label maps on one grid of ``spacing`` mm), as nnU-Net
    decides its post-processing from cross-validation. A rule must beat doing nothing (min 0, keep all) by
    more than 1e-6 to be chosen; among equals the gentler one (smaller volume, no keep-largest) wins.

    Returns ``{region: {"min_mm3", "keep_largest", "dice", "dice_without"}}``.
    """
    from menseg.evaluate.metrics import lesion_wise

    if len(preds) != len(refs) or not preds:
        raise ValueError("learn_postprocess needs as many predictions as references, at least one")
    voxel_mm3 = float(np.prod(np.asarray(spacing, dtype=np.float64)))
    pred_masks = [region_masks(p) for p in preds]
    ref_masks = [region_masks(r) for r in refs]
    out: dict[str, dict[str, float | bool]] = {}
    for region, _ in REGION_PAINT:
        def score(min_mm3: float, largest: bool, region: str = region) -> float:
            return float(np.mean([
                lesion_wise(clean_region(pm[region], voxel_mm3, min_mm3, largest), rm[region],
                            spacing)["lesion_dice"] for pm, rm in zip(pred_masks, ref_masks, strict=True)]))

        base = score(0.0, False)
        best = (base, 0.0, False)
        for largest in (False, True):
            for v in sorted(candidates):
                if v <= 0 and not largest:
                    continue  # doing nothing: scored above as the base
                d = score(v, largest)
                if d > best[0] + 1e-6:
                    best = (d, float(v), largest)
        out[region] = {"min_mm3": best[1], "keep_largest": best[2], "dice": best[0], "dice_without": base}
    return out


def apply_learned(label: np.ndarray, spacing: Sequence[float], rules: Mapping[str, Mapping[str, Any]]
                  ) -> np.ndarray:
    """``label`` post-processed with the rules :func:`learn_postprocess` chose."""
    return remove_small_components(label, spacing, {r: float(v["min_mm3"]) for r, v in rules.items()},
                                   {r: bool(v["keep_largest"]) for r, v in rules.items()})


__all__ = ["MIN_MM3_CANDIDATES", "REGION_PAINT", "apply_learned", "clean_region", "learn_postprocess",
           "regions_to_labels", "remove_small_components"]
