"""Sequence dropout as a training part (``seqdrop.enabled`` without a companion; docs/DESIGN.md, Decisions).

Real archives are incomplete (contrast-enhanced T1 only in radiotherapy cohorts, follow-ups without
FLAIR or T2, older studies with FLAIR and a non-contrast T1). After augmentation each training sample
loses, with probability ``seqdrop.p_drop``, a random non-empty subset of its sequences (at most
``seqdrop.max_drop``, never all of those it has): their channels become 0, exactly what preprocessing
gives a sequence a case lacks. The network's first block (:class:`menseg.nets.PresenceStem`) reads which
channels are present, so one model predicts from any non-empty subset and from all four. Labelled cases
that lack sequences train as they are: their missing channels are already 0.

The draw of a sample depends only on the run seed, the step and the sample's global index (replayable,
identical under DDP); it uses :func:`menseg.ism.modal.sample_presence`, the draw of ISM's modal fusion,
which takes this part's place when ``ism.modal`` is on. Schedule options (defaults: none of them):
``seqdrop.subsets`` (a dropping sample keeps one of these subsets, drawn uniformly: the subsets archives
hold), ``seqdrop.start_fraction`` (no dropout before that share of the steps: complete scans first) and
``seqdrop.mask_unseen`` (a sample without t1c supervises WT only: enhancement, hence ET and TC, cannot be
seen without contrast).
"""

from __future__ import annotations

import torch

from menseg.config import Config, presence_input, subset_mask
from menseg.constants import MODALITIES
from menseg.ism.modal import mask_absent, sample_presence
from menseg.nets import present_channels
from menseg.train.parts import Part, TrainSetup, register
from menseg.utils import derive_seed

Tensor = torch.Tensor
N_MOD = len(MODALITIES)


@register
class SeqDropPart(Part):
    """Drops random sequences of training samples (``seqdrop.enabled`` without ``ism.modal``)."""

    name = "seqdrop"
    count_stats = frozenset({"seqdrop_dropped"})
    runs_on = frozenset({"cases", "visit pairs"})

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.shard: range = range(0)
        self.last_dropped = 0.0
        self.seen: Tensor = torch.ones(0, N_MOD, dtype=torch.bool)  # (B, 4): what each sample shows

    @classmethod
    def enabled(cls, cfg: Config) -> bool:
        return presence_input(cfg)

    def setup(self, run: TrainSetup) -> None:
        self.shard = run.shard

    def draw(self, step: int, sample: int) -> Tensor:
        """``(4,)`` bool: the sequences sample ``sample`` (global index) of step ``step`` keeps."""
        sd = self.cfg.seqdrop
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.train.seed, self.name, step, sample))
        if not sd.subsets:
            return sample_presence(gen, 1, sd)[0]
        drop = bool(torch.rand(1, generator=gen)[0] < sd.p_drop)
        pick = int(torch.randint(len(sd.subsets), (1,), generator=gen)[0])
        return torch.tensor(subset_mask(sd.subsets[pick]) if drop else (True,) * N_MOD)

    def mix_batch(self, step: int, img: Tensor, lab: Tensor, meta: Tensor) -> tuple[Tensor, Tensor]:
        if img.shape[1] % N_MOD:
            raise ValueError(f"seqdrop: expected a multiple of {N_MOD} channels, got {img.shape[1]}")
        has = present_channels(img[:, :N_MOD])  # sequences a sample has before dropout
        if step < int(self.cfg.seqdrop.start_fraction * self.cfg.train.steps):
            self.last_dropped, self.seen = 0.0, has  # complete scans first
            return img, lab
        keep = torch.stack([self.draw(step, g) for g in self.shard]).to(img.device)  # (B, 4)
        # never all: a sample whose kept sequences would miss everything it has keeps them all
        empty = ~(keep & has).any(dim=1) & has.any(dim=1)
        keep[empty] = True
        self.last_dropped = float((~keep).any(dim=1).sum())
        self.seen = keep & has
        if bool(keep.all()):
            return img, lab
        groups = img.shape[1] // N_MOD  # visit pairs: the prior visit loses the same sequences
        return mask_absent(img, keep.repeat(1, groups)), lab

    def supervised_regions(self, lab: Tensor) -> Tensor | None:
        if not self.cfg.seqdrop.mask_unseen:
            return None
        t1c = self.seen[:, MODALITIES.index("t1c")]  # (B,) the sample shows its enhancement
        wt = torch.ones_like(t1c)
        return torch.stack([t1c, t1c, wt], dim=1)  # ET, TC, WT (REGION_NAMES order)

    def batch_stats(self, meta: Tensor) -> dict[str, float]:
        return {"seqdrop_dropped": self.last_dropped}


__all__ = ["SeqDropPart", "present_channels"]
