"""Patch sampling from preprocessed cases, with foreground oversampling.

A share ``fg_share`` of the patches is centred on a random foreground voxel
(label > 0), the rest are placed uniformly. Volumes smaller than the patch are
zero padded (image 0 is the z-scored background; label 0). All randomness
comes from an explicit ``numpy.random.Generator``, so a batch is a pure
function of the generator's seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: At most this many foreground coordinates are kept per case (evenly strided,
#: deterministic), which keeps memory bounded for large lesions.
MAX_FG_POINTS = 100_000


@dataclass(frozen=True)
class PatchChoice:
    """Where one patch comes from: case index, patch start (voxels, may be negative = padding)."""

    case: int
    start: tuple[int, int, int]
    foreground: bool  #: True when the patch was forced to contain a foreground voxel


def foreground_coords(label: np.ndarray, max_points: int = MAX_FG_POINTS) -> np.ndarray:
    """Coordinates ``(N, 3)`` int64 of voxels with label > 0 (strided subsample if more than max)."""
    coords = np.argwhere(np.asarray(label) > 0)
    if len(coords) > max_points:
        coords = coords[:: int(np.ceil(len(coords) / max_points))]
    return coords.astype(np.int64)


def start_bounds(shape: Sequence[int], patch_size: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive range of patch starts per axis: ``[min(0, s-p), max(0, s-p)]``.

    When the volume is smaller than the patch the start is negative and the
    volume lands at a random place inside the padded patch.
    """
    diff = np.asarray(shape[-3:], np.int64) - np.asarray(patch_size, np.int64)
    return np.minimum(0, diff), np.maximum(0, diff)


def choose_start(
    shape: Sequence[int],
    patch_size: Sequence[int],
    rng: np.random.Generator,
    fg_coords: np.ndarray | None = None,
) -> tuple[int, int, int]:
    """Start of a patch: centred on a random row of ``fg_coords`` (clipped so that
    voxel stays inside the patch), or uniform when ``fg_coords`` is None/empty."""
    lo, hi = start_bounds(shape, patch_size)
    if fg_coords is not None and len(fg_coords) > 0:
        centre = fg_coords[rng.integers(len(fg_coords))]
        start = np.clip(centre - np.asarray(patch_size) // 2, lo, hi)
    else:
        start = rng.integers(lo, hi + 1)
    return (int(start[0]), int(start[1]), int(start[2]))


def crop_pad(array: np.ndarray, start: Sequence[int], patch_size: Sequence[int]) -> np.ndarray:
    """Crop ``array`` (``(..., X, Y, Z)``) to ``patch_size`` from ``start``, zero padding outside.

    Returns a new contiguous array of shape ``(..., *patch_size)`` with ``array``'s dtype.
    """
    shape = array.shape[-3:]
    out = np.zeros((*array.shape[:-3], *patch_size), dtype=array.dtype)
    src, dst = [], []
    for ax in range(3):
        a0 = max(start[ax], 0)
        a1 = min(start[ax] + patch_size[ax], shape[ax])
        if a1 <= a0:
            return out
        src.append(slice(a0, a1))
        dst.append(slice(a0 - start[ax], a1 - start[ax]))
    out[(..., *dst)] = array[(..., *src)]
    return out


def n_foreground(batch_size: int, fg_share: float, rng: np.random.Generator) -> int:
    """How many of ``batch_size`` patches are forced to foreground.

    ``floor(B * share)`` plus one more with probability equal to the remainder,
    so the expected share is exactly ``fg_share`` with the least variance.
    """
    x = batch_size * float(fg_share)
    n = int(np.floor(x))
    if rng.random() < x - n:
        n += 1
    return min(n, batch_size)


class PatchSampler:
    """Draws patches from a list of preprocessed ``(image (C,X,Y,Z), label (X,Y,Z))`` cases.

    ``sample(rng, batch_size)`` picks cases uniformly and patch places as
    described in the module docstring; ``extract(choice)`` returns numpy
    ``(image (C,*patch) f32, label (*patch) uint8)``.
    """

    def __init__(
        self,
        cases: Sequence[tuple[np.ndarray, np.ndarray]],
        patch_size: Sequence[int],
        fg_share: float,
    ) -> None:
        if not cases:
            raise ValueError("PatchSampler needs at least one case")
        self.cases = list(cases)
        self.patch_size = tuple(int(p) for p in patch_size)
        self.fg_share = float(fg_share)
        self.fg = [foreground_coords(lab) for _, lab in self.cases]

    def sample(self, rng: np.random.Generator, batch_size: int) -> list[PatchChoice]:
        """Patch choices for one batch; the forced-foreground ones come last (as nnU-Net)."""
        n_fg = n_foreground(batch_size, self.fg_share, rng)
        out = []
        for b in range(batch_size):
            ci = int(rng.integers(len(self.cases)))
            force = b >= batch_size - n_fg
            fg = self.fg[ci] if force else None
            start = choose_start(self.cases[ci][1].shape, self.patch_size, rng, fg)
            out.append(PatchChoice(ci, start, force and fg is not None and len(fg) > 0))
        return out

    def extract(self, choice: PatchChoice) -> tuple[np.ndarray, np.ndarray]:
        """The image and label patch of ``choice``."""
        image, label = self.cases[choice.case]
        img = crop_pad(image, choice.start, self.patch_size).astype(np.float32, copy=False)
        lab = crop_pad(label, choice.start, self.patch_size).astype(np.uint8, copy=False)
        return img, lab

    def batch(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Stacked ``(image (B,C,*patch), label (B,*patch))`` for one batch."""
        pairs = [self.extract(c) for c in self.sample(rng, batch_size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


__all__ = [
    "MAX_FG_POINTS",
    "PatchChoice",
    "PatchSampler",
    "choose_start",
    "crop_pad",
    "foreground_coords",
    "n_foreground",
    "start_bounds",
]
