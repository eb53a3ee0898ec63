"""Image-space copy-paste augmentations, the competitors a data-efficient method must beat.

CarveMix (Zhang X, Liu C, Ou N, et al. "CarveMix: A Simple Data Augmentation Method for Brain Lesion
Segmentation", MICCAI 2021, LNCS 12901, pp. 196-205): from a labelled image A a region of interest is
carved around its lesion and pasted over a second labelled image B at the same place, the label with
it. The region is a level set of A's signed distance map ``D`` (mm, negative inside the lesion):
``M = {D < lambda}`` with ``lambda ~ U(-r/2, r)`` and ``r = |min D|`` (the lesion's inner radius), so
the carved region ranges from an eroded lesion to the lesion with a margin as wide as its radius.

menseg trains on patches, so the carving works on patches: the sample of the step is B; A is a
tumour-centred patch of another case of the run's sampler (drawn, cut and augmented like the step's own
samples), pasted at the same patch coordinates. The original mixes whole co-registered images offline;
patches of the same size are what a patch trainer has, and the carved region lies inside one patch
for every meningioma that fits in the patch.

Randomness: ``(train.seed, "carvemix", step, sample)`` draws whether a sample is mixed, the partner
case and patch, and ``lambda``; ``(train.seed, "aug-carvemix", step, sample)`` the partner's
augmentation. Sample indices are global (the DDP shard's), so a run means the same for any world size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from menseg.config import Config
from menseg.data.sampling import PatchSampler, choose_start, crop_pad
from menseg.train.augment import augment_batch
from menseg.train.parts import Part, TrainSetup, full_precision, register
from menseg.utils import derive_seed

Tensor = torch.Tensor


def signed_distance(mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Signed Euclidean distance (mm) to the boundary of bool ``mask``: negative inside, positive outside.
    Inside voxels are ``-(distance to the nearest outside voxel)``, outside ones ``+(distance to the
    nearest inside voxel)``; an empty mask gives ``+inf`` everywhere."""
    from scipy import ndimage

    sp = tuple(float(s) for s in spacing)
    if not mask.any():
        return np.full(mask.shape, np.inf)
    outside = ndimage.distance_transform_edt(~mask, sampling=sp)
    inside = ndimage.distance_transform_edt(mask, sampling=sp)
    return np.where(mask, -inside, outside)


def carve_region(label: np.ndarray, lam: float, spacing: Sequence[float]) -> np.ndarray:
    """CarveMix's region ``{D < lam}`` of the whole tumour (labels 1..3) of ``label``, ``lam`` in mm."""
    return signed_distance((label > 0) & (label < 4), spacing) < lam


def sample_lambda(rng: np.random.Generator, label: np.ndarray, spacing: Sequence[float]) -> float:
    """``lambda ~ U(-r/2, r)`` with ``r`` the lesion's inner radius (mm); 0 when there is no lesion."""
    d = signed_distance((label > 0) & (label < 4), spacing)
    r = float(-d.min()) if np.isfinite(d).any() else 0.0
    return float(rng.uniform(-r / 2, r)) if r > 0 else 0.0


@dataclass(frozen=True)
class CarveDraw:
    """What one sample of a step draws: whether it is mixed, the partner (case, patch start), lambda."""

    mixed: bool
    case: int = -1
    start: tuple[int, int, int] = (0, 0, 0)


@register
class CarveMixPart(Part):
    """CarveMix as a training part (``carvemix.enabled``): after augmentation each sample is, with
    probability ``carvemix.p``, overwritten by a carved lesion region of another case's tumour patch."""

    name = "carvemix"
    count_stats = frozenset({"carvemix_mixed"})

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.sampler: PatchSampler | None = None
        self.shard = range(0)
        self.last_mixed = 0.0

    @classmethod
    def enabled(cls, cfg: Config) -> bool:
        return cfg.carvemix.enabled

    def setup(self, run: TrainSetup) -> None:
        self.sampler = run.sampler
        self.shard = run.shard

    def draw(self, step: int, sample: int) -> tuple[CarveDraw, np.random.Generator]:
        """The draw of global ``sample`` of ``step`` and the generator that then draws lambda."""
        assert self.sampler is not None
        rng = np.random.default_rng(derive_seed(self.cfg.train.seed, "carvemix", step, sample))
        with_tumour = [i for i, fg in enumerate(self.sampler.fg) if len(fg)]
        if rng.random() >= self.cfg.carvemix.p or not with_tumour:
            return CarveDraw(False), rng
        case = with_tumour[int(rng.integers(len(with_tumour)))]
        label = self.sampler.cases[case][1]
        start = choose_start(label.shape, self.sampler.patch_size, rng, self.sampler.fg[case])
        return CarveDraw(True, case, tuple(int(v) for v in start)), rng  # type: ignore[arg-type]

    def mix_batch(self, step: int, img: Tensor, lab: Tensor, meta: Tensor) -> tuple[Tensor, Tensor]:
        assert self.sampler is not None
        draws = [(b, g, *self.draw(step, g)) for b, g in enumerate(self.shard)]
        mixed = [(b, g, d, rng) for b, g, d, rng in draws if d.mixed]
        self.last_mixed = float(len(mixed))
        if not mixed:
            return img, lab
        spacing = self.cfg.data.spacing
        ps = self.sampler.patch_size
        pimg = [crop_pad(self.sampler.cases[d.case][0], d.start, ps).astype(np.float32, copy=False)
                for _, _, d, _ in mixed]
        plab = [crop_pad(self.sampler.cases[d.case][1], d.start, ps).astype(np.uint8, copy=False)
                for _, _, d, _ in mixed]
        seeds = [derive_seed(self.cfg.train.seed, "aug-carvemix", step, g) for _, g, _, _ in mixed]
        with full_precision(img):
            ai, al = augment_batch(torch.from_numpy(np.stack(pimg)), torch.from_numpy(np.stack(plab)),
                                   self.cfg.aug, seeds, spacing)
        img, lab = img.clone(), lab.clone()
        for k, (b, _, _, rng) in enumerate(mixed):
            part_lab = al[k].numpy()
            region = torch.from_numpy(carve_region(part_lab, sample_lambda(rng, part_lab, spacing), spacing))
            region = region.to(img.device)
            img[b] = torch.where(region[None], ai[k].to(img.device, img.dtype), img[b])
            lab[b] = torch.where(region, al[k].to(lab.device, lab.dtype), lab[b])
        return img, lab

    def batch_stats(self, meta: Tensor) -> dict[str, float]:
        return {"carvemix_mixed": self.last_mixed}


__all__ = ["CarveMixPart", "carve_region", "sample_lambda", "signed_distance"]
