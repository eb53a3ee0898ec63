"""Toy tissue maps for appearance-model tests: blocks of known tissue, means over their interiors."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def octant_map(tissues: Sequence[int], n: int = 32) -> torch.Tensor:
    """(n+4)^3 map: a 2-voxel background border around 8 octant blocks, one per tissue id."""
    assert len(tissues) == 8
    h = n // 2
    tissue = torch.zeros((n + 4,) * 3, dtype=torch.long)
    for k, tid in enumerate(tissues):
        i, j, q = (k >> 2) & 1, (k >> 1) & 1, k & 1
        tissue[2 + i * h:2 + (i + 1) * h, 2 + j * h:2 + (j + 1) * h, 2 + q * h:2 + (q + 1) * h] = tid
    return tissue


def interior_means(
    img: torch.Tensor, tissue: torch.Tensor, tissues: Sequence[int], margin: int
) -> dict[int, torch.Tensor]:
    """Per-tissue mean (C,) over each block's interior (``margin`` voxels away from its faces)."""
    out = {}
    for tid in tissues:
        idx = (tissue == tid).nonzero()
        lo, hi = idx.min(0).values + margin, idx.max(0).values - margin + 1
        out[tid] = img[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].mean(dim=(1, 2, 3))
    return out
