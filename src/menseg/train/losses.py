"""The trainer's losses: :mod:`menseg.nets.losses` (region Dice + BCE with deep supervision, shared with
the translator's segmenter) with the trainer's DDP switch.

Channels follow :data:`menseg.constants.REGION_NAMES` (ET, TC, WT), each a
sigmoid output for the nested region of :data:`menseg.constants.REGIONS`.
"""

from __future__ import annotations

from menseg.nets import losses as _nets
from menseg.nets.losses import deep_supervision_weights, soft_dice_loss
from menseg.regions import labels_to_regions  # re-exported for code written against menseg <= 0.1


class RegionDiceBCELoss(_nets.RegionDiceBCELoss):
    """:class:`menseg.nets.losses.RegionDiceBCELoss` as the trainer builds it: ``across_ranks`` (under
    DDP) pools the batch-Dice and masked-BCE sums over the ranks' shards of the global batch with
    :func:`menseg.train.distributed.sum_across_ranks`, so W ranks take the one-process step."""

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, batch_dice: bool = True,
                 across_ranks: bool = False) -> None:
        pool = None
        if across_ranks:
            from menseg.train.distributed import sum_across_ranks

            pool = sum_across_ranks
        super().__init__(dice_weight, bce_weight, batch_dice, pool=pool)
        self.across_ranks = across_ranks


__all__ = ["RegionDiceBCELoss", "deep_supervision_weights", "labels_to_regions", "soft_dice_loss"]
