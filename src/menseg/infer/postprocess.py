"""From region probabilities to a BraTS-MEN label map, and removal of tiny components.

Regions are nested (ET within TC within WT, see ``menseg.constants.REGIONS``); the label is painted
by :func:`menseg.regions.regions_to_labels` (re-exported here): WT as SNFH (2), then TC as NETC (1),
then ET as ET (3), the convention of the region-based BraTS winners and nnU-Net.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

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


def remove_small_components(
    label: np.ndarray,
    spacing: Sequence[float],
    min_mm3: float | Sequence[float] | Mapping[str, float],
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
    for region, value in REGION_PAINT:
        cleaned, n_removed = _remove_small(masks[region], mins[region] / voxel_mm3)
        if n_removed:
            log.debug("removed %d %s components below %.1f mm^3", n_removed, region, mins[region])
        if outer is not None:
            cleaned &= outer  # keep the nesting even if an outer component was removed
        out[cleaned] = value
        outer = cleaned
    return out


__all__ = ["REGION_PAINT", "regions_to_labels", "remove_small_components"]
