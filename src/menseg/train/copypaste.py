"""Image-space copy-paste augmentations, the competitors a data-efficient method must beat.

CarveMix (Zhang X, Liu C, Ou N, et al. "CarveMix: A Simple Data Augmentation Method for Brain Lesion
Segmentation", MICCAI 2021, LNCS 12901, pp. 196-205): from a labelled image A a region of interest is
carved around its lesion and pasted over a second labelled image B at the same place, the label with
it. The region is a level set of A's signed distance map ``D`` (mm, negative inside the lesion):
``M = {D < lambda}`` with ``lambda ~ U(-r/2, r)`` and ``r = |min D|`` (the lesion's inner radius), so
the carved region ranges from an eroded lesion to the lesion with a margin as wide as its radius.

TumorCP (Yang J, Zhang Y, Liang Y, et al. "TumorCP: A Simple but Effective Object-Level Data
Augmentation for Tumor Segmentation", MICCAI 2021, LNCS 12901, pp. 579-588): a tumour of one case is
pasted at a random place of the organ of another, after object-level transforms (rigid: rotation and
flips; scaling) each with probability ``p_trans`` and an intensity jitter; the paper's best setting
copies with ``p_cp = 0.5``. For meningiomas "the organ" is the head: the tumour's centre lands on a
random voxel of the sample's head (non-zero image).

menseg trains on patches, so the carving works on patches: the sample of the step is B; A is a
tumour-centred patch of another case of the run's sampler (drawn, cut and augmented like the step's own
samples), pasted at the same patch coordinates. The original mixes whole co-registered images offline;
patches of the same size are what a patch trainer has, and the carved region lies inside one patch
for every meningioma that fits in the patch.

Randomness: ``(train.seed, NAME, step, sample)`` draws whether a sample is mixed, the partner case and
patch, and what the method draws itself (CarveMix's ``lambda``; TumorCP's place, jitter and, from
``(train.seed, "tumorcp-object", step, sample)``, the object transforms); ``(train.seed, "aug-carvemix",
step, sample)`` the CarveMix partner's augmentation. Sample indices are global (the DDP shard's), so a
run means the same for any world size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from menseg.config import AugConfig, Config
from menseg.data.sampling import PatchChoice, PatchSampler, choose_start
from menseg.train.augment import apply_augment, augment_batch, sample_augment
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


class _CopyPaste(Part):
    """Shared by the copy-paste parts: per sample, with probability ``p``, a tumour-centred patch of another
    case of the run's sampler is the partner; :meth:`paste` (the method) puts it into the sample."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.sampler: PatchSampler | None = None
        self.with_tumour: list[int] = []  #: the sampler's cases with tumour voxels (possible partners)
        self.shard = range(0)
        self.last_mixed = 0.0
        self.count_key = f"{self.name}_mixed"

    @property
    def p(self) -> float:
        return float(getattr(self.cfg, self.name).p)

    def setup(self, run: TrainSetup) -> None:
        self.sampler = run.sampler
        self.with_tumour = [i for i, fg in enumerate(self.sampler.fg) if len(fg)]
        self.shard = run.shard

    def draw(self, step: int, sample: int) -> tuple[PatchChoice | None, np.random.Generator]:
        """The partner patch of global ``sample`` of ``step`` (None: not mixed) and the generator the
        method goes on drawing from."""
        assert self.sampler is not None
        rng = np.random.default_rng(derive_seed(self.cfg.train.seed, self.name, step, sample))
        if rng.random() >= self.p or not self.with_tumour:
            return None, rng
        case = self.with_tumour[int(rng.integers(len(self.with_tumour)))]
        label = self.sampler.cases[case][1]
        start = choose_start(label.shape, self.sampler.patch_size, rng, self.sampler.fg[case])
        return PatchChoice(case, start, True), rng

    def partner(self, choice: PatchChoice) -> tuple[Tensor, Tensor]:
        """The partner patch ``(image (4, *patch) f32, label (*patch) uint8)``."""
        assert self.sampler is not None
        image, label = self.sampler.extract(choice)
        return torch.from_numpy(image), torch.from_numpy(label)

    def paste(self, step: int, rows: list[tuple[int, int, PatchChoice, np.random.Generator]], img: Tensor,
              lab: Tensor) -> None:
        """Paste the partners of ``rows`` (``(row, global sample, draw, rng)``) into ``img`` / ``lab``."""
        raise NotImplementedError

    def mix_batch(self, step: int, img: Tensor, lab: Tensor, meta: Tensor) -> tuple[Tensor, Tensor]:
        draws = [(b, g, *self.draw(step, g)) for b, g in enumerate(self.shard)]
        rows = [(b, g, d, rng) for b, g, d, rng in draws if d is not None]
        self.last_mixed = float(len(rows))
        if not rows:
            return img, lab
        img, lab = img.clone(), lab.clone()
        with full_precision(img):
            self.paste(step, rows, img, lab)
        return img, lab

    def batch_stats(self, meta: Tensor) -> dict[str, float]:
        return {self.count_key: self.last_mixed}


@register
class CarveMixPart(_CopyPaste):
    """CarveMix as a training part (``carvemix.enabled``): after augmentation each sample is, with
    probability ``carvemix.p``, overwritten by a carved lesion region of another case's tumour patch,
    augmented like the step's own samples."""

    name = "carvemix"
    count_stats = frozenset({"carvemix_mixed"})

    @classmethod
    def enabled(cls, cfg: Config) -> bool:
        return cfg.carvemix.enabled

    def paste(self, step: int, rows: list[tuple[int, int, PatchChoice, np.random.Generator]], img: Tensor,
              lab: Tensor) -> None:
        spacing = self.cfg.data.spacing
        parts = [self.partner(d) for _, _, d, _ in rows]
        seeds = [derive_seed(self.cfg.train.seed, "aug-carvemix", step, g) for _, g, _, _ in rows]
        ai, al = augment_batch(torch.stack([x for x, _ in parts]), torch.stack([y for _, y in parts]),
                               self.cfg.aug, seeds, spacing)
        for k, (b, _, _, rng) in enumerate(rows):
            part_lab = al[k].numpy()
            region = torch.from_numpy(carve_region(part_lab, sample_lambda(rng, part_lab, spacing), spacing))
            region = region.to(img.device)
            img[b] = torch.where(region[None], ai[k].to(img.device, img.dtype), img[b])
            lab[b] = torch.where(region, al[k].to(lab.device, lab.dtype), lab[b])


def shift_volume(x: Tensor, offset: Sequence[int]) -> Tensor:
    """``x`` (``(..., X, Y, Z)``) moved by ``offset`` voxels along the last three axes, zeros shifted in."""
    out = torch.zeros_like(x)
    src, dst = [], []
    for ax, o in enumerate(offset):
        n = x.shape[x.dim() - 3 + ax]
        o = int(o)
        if abs(o) >= n:
            return out
        src.append(slice(max(0, -o), n - max(0, o)))
        dst.append(slice(max(0, o), n - max(0, -o)))
    out[(..., *dst)] = x[(..., *src)]
    return out


@register
class TumorCPPart(_CopyPaste):
    """TumorCP as a training part (``tumorcp.enabled``): with probability ``tumorcp.p`` a sample receives
    another case's tumour, transformed as an object and jittered in intensity, centred on a random voxel
    of the sample's head."""

    name = "tumorcp"
    count_stats = frozenset({"tumorcp_mixed"})

    @classmethod
    def enabled(cls, cfg: Config) -> bool:
        return cfg.tumorcp.enabled

    def object_config(self) -> AugConfig:
        """The object-level transforms as an :class:`AugConfig` of rotation, scaling and flips only."""
        t = self.cfg.tumorcp
        off = {f.name: 0.0 for f in dataclasses.fields(AugConfig) if f.name.startswith("p_")}
        on = {"p_flip": t.p_transform, "p_rotate": t.p_transform, "p_scale": t.p_transform}  # flips: per axis
        return AugConfig(**{**off, **on}, rotate_deg=t.rotate_deg, scale_range=t.scale_range)  # type: ignore[arg-type]

    def paste(self, step: int, rows: list[tuple[int, int, PatchChoice, np.random.Generator]], img: Tensor,
              lab: Tensor) -> None:
        t, spacing = self.cfg.tumorcp, self.cfg.data.spacing
        ocfg = self.object_config()
        for b, g, d, rng in rows:
            x, y = self.partner(d)
            gen = torch.Generator().manual_seed(derive_seed(self.cfg.train.seed, "tumorcp-object", step, g))
            params = sample_augment(gen, x.shape, ocfg, spacing, names=("rotate", "scale", "flip"))
            x, y = apply_augment(x, y, params)
            tumour = (y > 0) & (y < 4)
            head = (img[b] != 0).any(0).cpu()
            if not tumour.any() or not head.any():
                continue
            centre = torch.nonzero(tumour).double().mean(0).round().long()
            places = torch.nonzero(head)
            to = places[int(rng.integers(len(places)))]
            offset = (to - centre).tolist()
            gain = torch.from_numpy(rng.uniform(*t.gain_range, size=(x.shape[0], 1, 1, 1))).float()
            bias = torch.from_numpy(rng.uniform(-t.shift, t.shift, size=(x.shape[0], 1, 1, 1))).float()
            x = x * gain + bias
            region = shift_volume(tumour, offset).to(img.device)
            img[b] = torch.where(region[None], shift_volume(x, offset).to(img.device, img.dtype), img[b])
            lab[b] = torch.where(region, shift_volume(y, offset).to(lab.device, lab.dtype), lab[b])


__all__ = ["CarveMixPart", "TumorCPPart", "carve_region", "sample_lambda", "shift_volume",
           "signed_distance"]
