"""Region-based Dice + BCE loss with deep supervision (as nnU-Net trains BraTS).

Channels follow :data:`menseg.constants.REGION_NAMES` (ET, TC, WT), each a
sigmoid output for the nested region of :data:`menseg.constants.REGIONS`.

At the networks' level so that every segmenter trains with it: the trainer's network
(:mod:`menseg.train.losses` adds the DDP pooling switch) and the translator's semantic segmenter
(:mod:`menseg.sim2real`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from menseg.constants import REGION_NAMES
from menseg.regions import labels_to_regions

Tensor = torch.Tensor


def soft_dice_loss(
    logits: Tensor, target: Tensor, batch_dice: bool = True, smooth: float = 1e-5, mask: Tensor | None = None,
    pool: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``1 - mean soft Dice`` over channels of sigmoid(logits) vs binary ``target``, both ``(B, C, ...)``.

    With ``batch_dice`` the batch is pooled into one volume per channel
    (nnU-Net's batch Dice), otherwise Dice is averaged over samples too.
    A channel empty in both prediction and target scores Dice 1. ``mask`` ``(B, 1, ...)`` in {0, 1}
    leaves voxels of unknown class out (prediction and target both count 0 there); ``(B, C, ...)``
    (or broadcastable to it) does so per channel. ``pool`` (batch Dice
    only) maps the batch's sums to the sums of the global batch (e.g.
    :func:`menseg.train.distributed.sum_across_ranks` under DDP).
    """
    p = torch.sigmoid(logits.float())
    if mask is not None:
        p, target = p * mask, target * mask
    axes = (0, *range(2, p.ndim)) if batch_dice else tuple(range(2, p.ndim))
    tp = (p * target).sum(axes)
    fp = (p * (1 - target)).sum(axes)
    fn = ((1 - p) * target).sum(axes)
    if batch_dice and pool is not None:
        tp, fp, fn = pool(torch.stack([tp, fp, fn])).unbind(0)
    dice = (2 * tp + smooth) / (2 * tp + fp + fn + smooth).clamp_min(1e-8)
    return 1 - dice.mean()


def deep_supervision_weights(n: int) -> list[float]:
    """Weights ``1, 1/2, 1/4, ...`` for ``n`` outputs (full resolution first), normalised to sum 1."""
    w = [0.5**i for i in range(n)]
    s = sum(w)
    return [x / s for x in w]


def _downsample_label(label: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(label.shape[1:]) == tuple(size):
        return label
    return F.interpolate(label[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


class RegionDiceBCELoss(nn.Module):
    """Dice + BCE-with-logits over the three regions, with deep supervision.

    ``forward(outputs, label)``:

    - ``outputs``: logits ``(B, 3, X, Y, Z)``; or stacked deep-supervision
      logits ``(B, K, 3, X, Y, Z)`` (MONAI DynUNet, all upsampled to full
      size); or a sequence of ``(B, 3, x_k, y_k, z_k)`` at decreasing
      resolution, whose targets are the label downsampled (nearest).
    - ``label``: integer ``(B, X, Y, Z)`` with values in {0,1,2,3}; or soft region targets,
      float ``(B, 3, X, Y, Z)`` in [0, 1] (ET, TC, WT; e.g. the mixed targets of ISM), which
      lower-resolution outputs see area-averaged.
    - ``mask`` (optional): ``(B, X, Y, Z)`` bool, False where the class is unknown (e.g. an
      unlabelled scan outside its injected lesion); those voxels add nothing to Dice or BCE.
      Lower-resolution outputs see it nearest-downsampled.
    - ``regions`` (optional): ``(B, 3)`` bool, False for a region a sample does not supervise (e.g.
      ET and TC of a sample trained without its contrast-enhanced T1); combined with ``mask``.

    Returns the weighted scalar loss (fp32); the k-th output's weight is
    ``2^-k`` normalised to sum 1.
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, batch_dice: bool = True,
                 pool: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.batch_dice = batch_dice
        #: maps the batch's batch-Dice and masked-BCE sums to those of the global batch (under DDP:
        #: :func:`menseg.train.distributed.sum_across_ranks` over the ranks' shards); None: this batch
        self._pool = pool

    def single(self, logits: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """Loss of one output ``(B, 3, ...)`` against region targets of the same shape
        (``mask`` ``(B, 1, ...)`` or per region ``(B, 3, ...)``, float in {0, 1}: voxels that count)."""
        logits = logits.float()
        pool = self._pool
        if mask is None:  # a mean over samples: DDP's average of the ranks' means is the global mean
            bce = F.binary_cross_entropy_with_logits(logits, target)
        else:
            per = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            # a voxel mask counts each voxel once per channel (as always, so weights replay bit for bit);
            # a per-region mask counts each channel's own voxels
            counted = mask.sum() * logits.shape[1] if mask.shape[1] == 1 else mask.expand_as(per).sum()
            num_den = torch.stack([(per * mask).sum(), counted])
            num, den = (pool(num_den) if pool is not None else num_den).unbind(0)
            bce = num / den.clamp_min(1.0)
        dice = soft_dice_loss(logits, target, self.batch_dice, mask=mask, pool=pool)
        return self.dice_weight * dice + self.bce_weight * bce

    def forward(
        self, outputs: Tensor | Sequence[Tensor], label: Tensor, mask: Tensor | None = None,
        regions: Tensor | None = None,
    ) -> Tensor:
        soft = label.is_floating_point()
        if soft and (label.ndim != 5 or label.shape[1] != len(REGION_NAMES)):
            raise ValueError(
                f"soft targets must be (B, {len(REGION_NAMES)}, X, Y, Z), got {tuple(label.shape)}")
        spatial_ndim = label.ndim - 1 if soft else label.ndim
        if isinstance(outputs, Tensor) and outputs.ndim == spatial_ndim + 2:
            outputs = list(outputs.unbind(dim=1))
        elif isinstance(outputs, Tensor):
            outputs = [outputs]
        weights = deep_supervision_weights(len(outputs))
        total = outputs[0].new_zeros((), dtype=torch.float32)
        cache: dict[tuple[int, ...], Tensor] = {}
        masks: dict[tuple[int, ...], Tensor | None] = {}
        for w, out in zip(weights, outputs, strict=True):
            size = tuple(out.shape[2:])
            if mask is not None and size not in masks:
                masks[size] = _downsample_label(mask.to(torch.uint8), size)[:, None].float()
            if size not in cache:
                if soft:
                    same = tuple(label.shape[2:]) == size
                    cache[size] = label if same else F.adaptive_avg_pool3d(label, size)
                else:
                    cache[size] = labels_to_regions(_downsample_label(label, size))
            m = masks.get(size)
            if regions is not None:
                per_region = regions.float().reshape(*regions.shape, *([1] * len(size)))
                m = per_region if m is None else m * per_region
            total = total + w * self.single(out, cache[size], m)
        return total


__all__ = ["RegionDiceBCELoss", "deep_supervision_weights", "soft_dice_loss"]
