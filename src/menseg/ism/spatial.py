"""Spatial mixing in the U-Net's feature space (training only).

A training sample *a* is mixed, with probability ``p``, with a partner *b* (another case of the
batch, another location of the same case, a synthetic case, or an unlabelled scan whose target is
the network's own prediction on it) through one implicit field
``lambda`` (:mod:`menseg.ism.fields`; 1 = take *a*), sampled per mix:

1. encode *a* and *b* up to level ``D = max(cfg.levels)`` (:func:`menseg.nets.unet.encode`);
2. mix every level ``l <= D`` with ``lambda`` evaluated on that level's grid: levels in
   ``cfg.levels`` through a learned non-linear :class:`FeatureFusion`, the shallower skips by the
   plain blend ``lambda fa + (1 - lambda) fb``;
3. recompute the levels deeper than ``D`` by the encoder from the mixed level ``D``;
4. decode; the targets are mixed with the same field at full resolution (:func:`mix_targets`).

Why deeper levels are recomputed, not blended: the bottleneck then *is* what the encoder makes of
the mixed features, so the decoder sees one consistent mixture at every level (skips mixed by the
same function of ``p``, deep path derived from the mix), and *b* is encoded only up to ``D`` (for
the ``batch`` source not at all: its features are those of *a* rolled along the batch). Blending
the deeper levels too would need *b*'s full encoder pass and would hand the decoder deep features
no encoder input produces. Each mixed level ``l <= D`` combines *a*'s and *b*'s own level-``l``
features; the fused levels shallower than ``D`` serve as skips only.

At evaluation nothing here runs: the plain ``net(x)`` is the model, so ISM spatial mixing is
exactly the identity there. A sample that is not mixed (its ``lambda`` is 1 everywhere) passes
through untouched: its features are exactly *a*'s, whatever the fusion has learned.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from menseg.config import ISM_SOURCES as SOURCES
from menseg.config import SpatialMixConfig
from menseg.draws import draw_seed, uniforms
from menseg.errors import MensegError
from menseg.ism.fields import MixField, field_on_grid, sample_field
from menseg.nets.unet import decode, encode, encode_from, level_strides

log = logging.getLogger(__name__)

Tensor = torch.Tensor



# ---------------------------------------------------------------- per-batch fields


@dataclass(frozen=True, eq=False)
class FieldBatch:
    """The mixes of one training batch: per sample a field (``None`` = not mixed) and a source.

    ``spacing_mm`` is the patch grid's voxel spacing; ``origins_mm[b]`` the physical position of
    sample ``b``'s voxel 0 (mm; default all zeros: the fields are stationary, so only relative
    positions matter); ``t_days`` the time at which the fields are evaluated.
    """

    fields: tuple[MixField | None, ...]
    sources: tuple[str | None, ...]
    spacing_mm: tuple[float, float, float]
    origins_mm: tuple[tuple[float, float, float], ...] | None = None
    t_days: float = 0.0

    def __post_init__(self) -> None:
        if len(self.sources) != len(self.fields):
            raise MensegError("FieldBatch: one source per field is needed")
        if self.origins_mm is not None and len(self.origins_mm) != len(self.fields):
            raise MensegError("FieldBatch: one origin per field is needed")

    @property
    def batch_size(self) -> int:
        return len(self.fields)

    @property
    def any_mixed(self) -> bool:
        """Whether at least one sample is mixed (otherwise train on the plain ``net(x)``)."""
        return any(f is not None for f in self.fields)

    @property
    def needs_partner_input(self) -> bool:
        """Whether some mixed sample's partner is not in the batch (``location``, ``synthetic``,
        ``unlabelled``), so :meth:`SpatialMixer.mix_forward` needs an ``xb`` (see :func:`gather_partner`)."""
        return any(f is not None and s != "batch" for f, s in zip(self.fields, self.sources, strict=True))

    def on_grid(
        self,
        shape: Sequence[int],
        stride: Sequence[int] = (1, 1, 1),
        *,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """``lambda`` of every sample on the patch grid ``shape`` downsampled by ``stride``:
        float32 ``(B, 1, X/sx, Y/sy, Z/sz)``, exactly 1 for samples that are not mixed."""
        n = [int(v) // int(s) for v, s in zip(shape, stride, strict=True)]
        out = []
        for b, f in enumerate(self.fields):
            if f is None:
                out.append(torch.ones(n, device=device))
            else:
                o = self.origins_mm[b] if self.origins_mm is not None else (0.0, 0.0, 0.0)
                out.append(field_on_grid(f, shape, self.spacing_mm, o, stride, self.t_days, device=device))
        return torch.stack(out)[:, None]


def sample_field_batch(
    rng: torch.Generator,
    cfg: SpatialMixConfig,
    batch_size: int,
    patch_shape: Sequence[int],
    spacing_mm: Sequence[float],
    origins_mm: Sequence[Sequence[float]] | None = None,
    *,
    device: torch.device | str | None = None,
) -> FieldBatch:
    """Draw the mixes of one batch: for each sample, whether it is mixed (probability ``cfg.p``),
    its partner's source (uniform over ``cfg.sources``; ``batch`` needs ``batch_size >= 2``) and its
    field (:func:`~menseg.ism.fields.sample_field`, calibrated on the patch grid ``patch_shape`` with
    ``spacing_mm``).

    Exactly three numbers per sample are drawn from ``rng`` whatever the outcome (a field's own
    draws come from a generator seeded by the first), so a batch is replayable from a seed and one
    sample's coin flip does not shift the others' fields. ``device``: where calibration runs.
    Disabled configs give a batch with no mix.
    """
    sources = [s for s in cfg.sources if s != "batch" or batch_size >= 2]
    fields: list[MixField | None] = []
    srcs: list[str | None] = []
    for b in range(batch_size):
        seed = draw_seed(rng)
        coin, pick = uniforms(rng, 2)
        if not (cfg.enabled and sources and coin < cfg.p):
            fields.append(None)
            srcs.append(None)
            continue
        origin = tuple(origins_mm[b]) if origins_mm is not None else (0.0, 0.0, 0.0)
        g = torch.Generator().manual_seed(seed)
        fields.append(sample_field(g, cfg.field, patch_shape, spacing_mm, origin, device=device))
        srcs.append(sources[min(int(pick * len(sources)), len(sources) - 1)])
    sp = [float(v) for v in spacing_mm]
    origins = None
    if origins_mm is not None:
        origins = tuple((float(o[0]), float(o[1]), float(o[2])) for o in origins_mm)
    log.debug("spatial mix: %d of %d samples mixed (%s)", sum(f is not None for f in fields), batch_size,
              ", ".join(str(s) for s in srcs))
    return FieldBatch(tuple(fields), tuple(srcs), (sp[0], sp[1], sp[2]), origins)


def batch_partner(x: Tensor) -> Tensor:
    """The ``batch`` source: sample ``b``'s partner is sample ``b - 1`` (mod B), i.e. ``x.roll(1, 0)``."""
    return x.roll(1, 0)


def gather_partner(x: Tensor, fb: FieldBatch, other: Tensor | None = None) -> Tensor:
    """Per-sample partners of ``x`` (images ``(B, C, ...)`` or targets) according to ``fb.sources``:
    ``batch`` -> :func:`batch_partner`; any other source (``location``, ``synthetic``, ``unlabelled``)
    -> row ``b`` of ``other``, which holds each such sample's own partner; samples that are not mixed
    get their own row (ignored by the mix)."""
    rows = []
    rolled = batch_partner(x)
    for b, src in enumerate(fb.sources):
        if src is None:
            rows.append(x[b])
        elif src == "batch":
            rows.append(rolled[b])
        else:
            if other is None:
                raise MensegError(f"sample {b} is mixed with a '{src}' partner, but none was given")
            rows.append(other[b])
    return torch.stack(rows)


def mix_targets(ya: Tensor, yb: Tensor, lam_full: Tensor) -> Tensor:
    """Soft targets ``lambda ya + (1 - lambda) yb`` at full resolution.

    ``ya``, ``yb``: region targets ``(B, C, X, Y, Z)`` in [0, 1] (e.g.
    ``menseg.regions.labels_to_regions`` of the labels); ``lam_full``: ``(B, 1, X, Y, Z)``, the
    field on the label grid (``FieldBatch.on_grid(shape)``). With a binary field this is exactly
    cut-and-paste of the labels.
    """
    if ya.shape != yb.shape or lam_full.shape[0] != ya.shape[0] or lam_full.shape[2:] != ya.shape[2:]:
        raise MensegError(
            f"mix_targets: shapes do not fit: ya {tuple(ya.shape)}, yb {tuple(yb.shape)}, "
            f"lambda {tuple(lam_full.shape)}")
    lam = lam_full.to(ya.dtype)
    return lam * ya + (1 - lam) * yb


def keep_own(lam_full: Tensor, keep: Tensor | None) -> Tensor:
    """``max(lambda, keep)``: the field with sample *a* kept wherever ``keep`` is 1 (e.g. its own
    tumour, so a mix adds the partner's content around the lesion instead of cutting it away)."""
    return lam_full if keep is None else torch.maximum(lam_full, keep.to(lam_full.dtype))


# ---------------------------------------------------------------- modules


class FeatureFusion(nn.Module):
    """Learned non-linear fusion of two feature maps given the field.

    ``f = lambda fa + (1 - lambda) fb + g([fa, fb, lambda])`` with ``g`` = conv 3x3x3 -> InstanceNorm
    -> LeakyReLU -> conv 1x1x1, the last conv zero-initialised: it starts as the linear blend and
    learns beyond it. ``fa``, ``fb``: ``(B, C, X, Y, Z)``; ``lam``: ``(B, 1, X, Y, Z)``.
    """

    def __init__(self, channels: int, hidden: int | None = None) -> None:
        super().__init__()
        h = hidden or channels
        self.channels = channels
        self.g = nn.Sequential(
            nn.Conv3d(2 * channels + 1, h, kernel_size=3, padding=1),
            nn.InstanceNorm3d(h, affine=True),
            nn.LeakyReLU(0.01),
            nn.Conv3d(h, channels, kernel_size=1),
        )
        nn.init.zeros_(self.g[-1].weight)
        nn.init.zeros_(self.g[-1].bias)

    def forward(self, fa: Tensor, fb: Tensor, lam: Tensor) -> Tensor:
        lam = lam.to(fa.dtype)
        # lam * fa + (1 - lam) * fb is exactly fa where lam == 1 (fb + lam * (fa - fb) is not)
        blend = lam * fa + (1 - lam) * fb
        return blend + self.g(torch.cat([fa, fb, lam], dim=1))


def _blend(fa: Tensor, fb: Tensor, lam: Tensor) -> Tensor:
    lam = lam.to(fa.dtype)
    return lam * fa + (1 - lam) * fb


class SpatialMixer(nn.Module):
    """Mixes encoder levels ``0 .. max(cfg.levels)`` of two sources (training only).

    Args:
        cfg: the spatial mixing config.
        channels: channels of every encoder level (``menseg.nets.unet.level_channels(net)``).
    """

    def __init__(self, cfg: SpatialMixConfig, channels: Sequence[int]) -> None:
        super().__init__()
        self.cfg = cfg
        self.depth = max(cfg.levels)
        if self.depth >= len(channels):
            raise MensegError(
                f"ism.spatial.levels: level {self.depth} does not exist (the net has {len(channels)} levels)")
        self.fusions = nn.ModuleDict(
            {str(lv): FeatureFusion(int(channels[lv])) for lv in sorted(set(cfg.levels))})

    def forward(
        self, feats_a: Sequence[Tensor], feats_b: Sequence[Tensor], lams: Sequence[Tensor | None]
    ) -> list[Tensor]:
        """Mixed levels ``0 .. D`` (``D = max(cfg.levels)``), a list of ``D + 1`` tensors.

        ``feats_a``, ``feats_b``: at least levels ``0 .. D`` of the two sources (as
        :func:`~menseg.nets.unet.encode` returns them); ``lams[l]``: ``(B, 1, X_l, Y_l, Z_l)``, the
        field on level ``l``'s grid, 1 for samples that are not mixed. Level ``l`` is fused
        (:class:`FeatureFusion`) when in ``cfg.levels``, else blended. A sample whose field is 1 at
        every level gets *a*'s features exactly. The caller recomputes the deeper levels from level
        ``D`` (:meth:`mix_forward` does all of it).
        """
        d = self.depth
        if len(feats_a) <= d or len(feats_b) <= d or len(lams) <= d:
            raise MensegError(f"SpatialMixer needs features and fields of levels 0..{d}")
        lv = list(lams[: d + 1])
        if any(lam is None for lam in lv):
            raise MensegError(f"SpatialMixer needs a field on every level 0..{d}")
        bsz = feats_a[0].shape[0]
        mixed = torch.zeros(bsz, dtype=torch.bool, device=feats_a[0].device)
        for lam in lv:
            mixed |= (lam < 1).reshape(bsz, -1).any(dim=1)
        keep = mixed.view(bsz, 1, 1, 1, 1)
        out = []
        for i in range(d + 1):
            fa, fb, lam = feats_a[i], feats_b[i], lv[i]
            if lam.shape[0] != bsz or lam.shape[2:] != fa.shape[2:] or fb.shape != fa.shape:
                raise MensegError(
                    f"level {i}: features {tuple(fa.shape)} / {tuple(fb.shape)} and field {tuple(lam.shape)} "
                    "do not fit")
            key = str(i)
            f = self.fusions[key](fa, fb, lam) if key in self.fusions else _blend(fa, fb, lam)
            out.append(torch.where(keep, f, fa))
        return out

    def level_fields(
        self, net: nn.Module, shape: Sequence[int], fb: FieldBatch, device: torch.device | str,
        keep: Tensor | None = None,
    ) -> list[Tensor]:
        """The batch's fields on the grids of levels ``0 .. D`` of ``net`` for inputs of ``shape``.

        ``keep`` (``(B, 1, X, Y, Z)`` in [0, 1] on the input grid, optional): where *a* must be kept
        (:func:`keep_own`); on a level it is max-pooled over each voxel's stride block.
        """
        strides = level_strides(net)
        out = []
        for i in range(self.depth + 1):
            lam = fb.on_grid(shape, strides[i], device=device)
            if keep is not None:  # a 1x1x1 pool at level 0 is the mask itself
                lam = torch.maximum(lam, nn.functional.max_pool3d(keep.to(lam.dtype), strides[i], strides[i]))
            out.append(lam)
        return out

    def mix_forward(
        self,
        net: nn.Module,
        xa: Tensor,
        xb: Tensor | None,
        field_batch: FieldBatch,
        stem: nn.Module | None = None,
        keep: Tensor | None = None,
    ) -> Tensor:
        """Training forward of ``net`` on ``xa`` mixed with ``xb``: encode -> mix -> re-encode -> decode.

        Args:
            net: the DynUNet (training mode).
            xa: inputs ``(B, C, X, Y, Z)``.
            xb: partners of the same shape (:func:`gather_partner`), encoded without gradient
                (they are a source of features, not samples to learn from; this keeps the cost of
                a mix to one forward of the shallow levels), or ``None`` when every mixed
                sample's partner is in the batch (:func:`batch_partner`): *b*'s features are then
                *a*'s rolled along the batch, with no second encoder pass.
            field_batch: the batch's mixes (:func:`sample_field_batch`).
            stem: optional replacement of ``net.input_block`` (see :func:`~menseg.nets.unet.encode`).
            keep: optional ``(B, 1, X, Y, Z)`` mask where *a* is kept whatever the field
                (:func:`keep_own`); the targets must then be mixed with :func:`keep_own` too.

        Returns:
            what ``net(x)`` returns (deep-supervision stack in training); train it against
            ``mix_targets(ya, yb, field_batch.on_grid(xa.shape[2:]))``.
        """
        d = self.depth
        if xb is None and field_batch.needs_partner_input:
            raise MensegError("mix_forward: some partners are not in the batch; pass xb (gather_partner)")
        if field_batch.batch_size != xa.shape[0]:
            raise MensegError(f"mix_forward: {field_batch.batch_size} fields for a batch of {xa.shape[0]}")
        fa = encode(net, xa, stem, stop=d)
        if xb is None:
            fb = [batch_partner(f) for f in fa]
        else:  # the partner is a source of features, not a sample to learn from: no backward through it
            with torch.no_grad():
                fb = encode(net, xb, stem, stop=d)
        lams = self.level_fields(net, xa.shape[2:], field_batch, xa.device, keep)
        mixed = self(fa, fb, lams)
        return decode(net, [*mixed, *encode_from(net, mixed[-1], d)])


__all__ = [
    "SOURCES", "FeatureFusion", "FieldBatch", "SpatialMixConfig", "SpatialMixer", "batch_partner",
    "gather_partner", "keep_own", "mix_targets", "sample_field_batch",
]
