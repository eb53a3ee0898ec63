"""BraTS-MEN labels <-> nested regions, both directions in one place.

Labels (:data:`menseg.constants.LABELS`): 0 background, 1 NETC, 2 SNFH, 3 ET. Regions
(:data:`menseg.constants.REGIONS`) are nested, ET = {3} within TC = {1, 3} within WT = {1, 2, 3},
always in :data:`~menseg.constants.REGION_NAMES` order (ET, TC, WT): the network's output channels.

- :func:`region_masks`: numpy label map -> ``{region: bool mask}`` (evaluation, post-processing,
  signed distances);
- :func:`labels_to_regions`: torch labels ``(B, ...)`` -> float region targets ``(B, 3, ...)``
  (training losses);
- :func:`regions_to_labels`: region probabilities or masks (numpy or torch) -> labels, painting WT as
  SNFH (2), then TC as NETC (1), then ET as ET (3), so inner regions win (the convention of the
  region-based BraTS winners and nnU-Net).

Torch is imported only by the torch paths, so numpy users (``evaluate``, ``infer.postprocess``) stay
torch-free.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from menseg.constants import REGION_NAMES, REGIONS

if TYPE_CHECKING:
    from torch import Tensor

#: Label painted for each region, in painting order (outermost first).
REGION_PAINT: tuple[tuple[str, int], ...] = (("WT", 2), ("TC", 1), ("ET", 3))

A = TypeVar("A")


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def region_masks(label: np.ndarray) -> dict[str, np.ndarray]:
    """Nested region masks of a label map.

    ``label``: integer array (any shape, e.g. ``(X, Y, Z)``) with values in {0, 1, 2, 3}. Returns
    ``{"ET": label == 3, "TC": label in {1, 3}, "WT": label in {1, 2, 3}}`` as bool arrays of the
    label's shape, in :data:`~menseg.constants.REGION_NAMES` order.
    """
    label = np.asarray(label)
    return {name: np.isin(label, REGIONS[name]) for name in REGION_NAMES}


def labels_to_regions(label: Tensor) -> Tensor:
    """Integer labels ``(B, X, Y, Z)`` -> float region targets ``(B, 3, X, Y, Z)`` (ET, TC, WT) in {0, 1},
    on the labels' device."""
    import torch

    label = label.long()
    chans = [torch.zeros_like(label, dtype=torch.bool) for _ in REGION_NAMES]
    for i, name in enumerate(REGION_NAMES):
        for v in REGIONS[name]:
            chans[i] |= label == v
    return torch.stack(chans, dim=1).float()


def per_region(value: float | Sequence[float] | Mapping[str, float], what: str) -> dict[str, float]:
    """``{region: float}`` from one value, one per region (sequence in ET, TC, WT order) or a mapping;
    ``what`` names the setting in errors (ValueError)."""
    if isinstance(value, Mapping):
        missing = [r for r in REGION_NAMES if r not in value]
        if missing:
            raise ValueError(f"{what} mapping lacks regions {missing}")
        return {r: float(value[r]) for r in REGION_NAMES}
    if isinstance(value, int | float | np.floating | np.integer):
        return {r: float(value) for r in REGION_NAMES}
    vals = list(value)
    if len(vals) != len(REGION_NAMES):
        raise ValueError(f"{what} needs {len(REGION_NAMES)} values ({REGION_NAMES}), got {vals}")
    return dict(zip(REGION_NAMES, (float(v) for v in vals), strict=True))


def regions_to_labels(
    regions: A, threshold: float | Sequence[float] | Mapping[str, float] = 0.5, axis: int = 0
) -> A:
    """Nested region probabilities (or {0, 1} masks) -> BraTS-MEN label map.

    Args:
        regions: numpy array or torch tensor with the regions (ET, TC, WT) along ``axis``, e.g.
            ``(3, X, Y, Z)`` probabilities of one case (``axis=0``) or ``(B, 3, X, Y, Z)`` targets
            (``axis=-4`` or ``1``).
        threshold: one value, or one per region (sequence in ET, TC, WT order or mapping); a voxel
            belongs to a region when its value is strictly above it.
        axis: the region axis.

    Returns:
        uint8 labels, the input's shape without ``axis``, of the input's kind (numpy array, or tensor on
        the input's device): 0 background; WT -> 2; TC -> 1; ET -> 3, painted in that order.
    """
    t = per_region(threshold, "threshold")
    shape = tuple(regions.shape) if hasattr(regions, "shape") else np.shape(regions)
    if len(shape) < 1 or not -len(shape) <= axis < len(shape) or shape[axis] != len(REGION_NAMES):
        raise ValueError(f"regions must have {len(REGION_NAMES)} entries ({', '.join(REGION_NAMES)}) along "
                         f"axis {axis}, got shape {shape}")
    if _is_tensor(regions):
        import torch

        chans = dict(zip(REGION_NAMES, regions.unbind(axis), strict=True))  # type: ignore[attr-defined]
        label: Any = torch.zeros(chans["WT"].shape, dtype=torch.uint8, device=regions.device)  # type: ignore[attr-defined]
    else:
        arr = np.asarray(regions)
        chans = dict(zip(REGION_NAMES, np.moveaxis(arr, axis, 0), strict=True))
        label = np.zeros(chans["WT"].shape, dtype=np.uint8)
    for region, value in REGION_PAINT:
        label[chans[region] > t[region]] = value
    return label


__all__ = ["REGION_PAINT", "labels_to_regions", "per_region", "region_masks", "regions_to_labels"]
