"""ISM inside the training step: sequence dropout, spatial feature mixing and its partners.

Everything random in step ``t`` comes from generators seeded by ``(train.seed, name, t[, b])``,
like the rest of the trainer, so ISM runs replay bit for bit and resume exactly:

- ``"ism-modal"``: which sequences each sample keeps (:func:`menseg.ism.modal.sample_presence`);
- ``"ism-spatial"``: which samples are mixed, with which source and field
  (:func:`menseg.ism.spatial.sample_field_batch`);
- ``"ism-location"``, ``"ism-synthetic"`` (per sample): the partner patch of the ``location``
  source (another place of the same case) and of the ``synthetic`` source (a patch of a
  synthetic case from the run's synthetic pool), centred on tumour with probability
  ``ism.spatial.partner_fg``;
- ``"ism-unlabelled"`` (per sample): the partner patch of the ``unlabelled`` source (anywhere in a
  scan of ``data.unlabeled_root``). Its target is the network's own prediction on the augmented
  partner alone (sigmoid of the full-resolution output, computed without gradient in the same
  step): where the field takes the partner, the mixed sample must predict what the network
  predicts for that scan unmixed, a consistency term between a scan and its mixed self that uses
  unlabelled scans (ICT / MixMatch-style interpolation consistency, here in feature space);
- ``"aug-partner"`` (per sample): the partner patch's own augmentation;
- ``"ism-temporal"`` (per step): on visit pairs, which samples become an intermediate disease
  state, where on the way (``s``) and with which field.

On the longitudinal layout with ``ism.temporal`` on, a step draws visit pairs
(:class:`menseg.ism.visits.PairSampler`; current and registered prior patch at one place) and
:class:`VisitStep` replaces :class:`ISMStep`: the pair is augmented as one 8-channel image with
one spatial transform (the two labels packed as ``current + 4 * prior``, nearest-resampled
together), the prior is fused at ``ism.temporal.level``, and with probability ``ism.temporal.p_mix``
a sample with a prior becomes an intermediate state between its two visits (features blended with
the local progression ``w(p, t)``, labels interpolated through signed distances with the same
``w`` on the label grid; the prior is then fused with the gap ``s * gap``). Spatial mixing does not
run on visit steps.

Partners are cut and augmented only for the samples that use them; the pseudo-target of an
``unlabelled`` partner costs one forward pass without gradient of those samples. The synthetic pool is
``ism.n_synthetic`` cases from the synthetic engine's default (procedural) appearance model,
generated once per run folder at the run's spacing and preprocessed like the real cases; it is
not the user's scanner, so it adds lesion shapes and places, not a copy of the test domain.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from menseg.config import Config
from menseg.data.sampling import PatchChoice, PatchSampler, choose_start
from menseg.errors import MensegError
from menseg.ism.modal import sample_presence
from menseg.ism.model import ISMNet
from menseg.ism.spatial import FieldBatch, gather_partner, keep_own, mix_targets, sample_field_batch
from menseg.regions import labels_to_regions
from menseg.train.augment import augment_batch
from menseg.train.batches import StepBatches, split_cases
from menseg.train.parts import Part, TrainSetup, full_precision, register
from menseg.utils import derive_seed

log = logging.getLogger(__name__)

Tensor = torch.Tensor


def synthetic_pool(cfg: Config, out: Path, cache: Path) -> PatchSampler:
    """Patch sampler over the run's synthetic cases (generated on first use into ``out``)."""
    from menseg.synth.pool import synthetic_pool_cases

    pre = synthetic_pool_cases(out / "ism-synthetic", cfg.ism.n_synthetic,
                               derive_seed(cfg.train.seed, "ism-synthetic-pool"), cfg.data.spacing,
                               cache / "ism-synthetic", prefix="ISM-SYN", what="ISM mixing")
    return PatchSampler([(c.image, c.label) for c in pre], cfg.train.patch_size, cfg.train.fg_oversample)


_NO_UNLABELLED = ("ism.spatial.sources 'unlabelled' needs data.unlabeled_root (scans without labels); "
                  "set data.unlabeled_root=DIR or remove it from the sources")


def unlabelled_pool(cfg: Config, cache: Path, progress: bool = True) -> PatchSampler:
    """Patch sampler over the scans of ``data.unlabeled_root`` (for the ``unlabelled`` partner source)."""
    from menseg.data.dataset import unlabelled_scans

    if not cfg.data.unlabeled_root:
        raise MensegError(_NO_UNLABELLED)
    scans = unlabelled_scans(cfg.data.unlabeled_root, cache, cfg.data.spacing, progress)
    return PatchSampler([(img, np.zeros(img.shape[1:], np.uint8)) for _, img in scans],
                        cfg.train.patch_size, 0.0)


def _dilate(mask: Tensor, margin_mm: float, spacing: Sequence[float]) -> Tensor:
    """Binary ``(B, 1, X, Y, Z)`` mask dilated by a box of about ``margin_mm`` on each side."""
    r = [max(0, round(margin_mm / float(s))) for s in spacing]
    if not any(r):
        return mask
    k = tuple(2 * v + 1 for v in r)
    return torch.nn.functional.max_pool3d(mask, k, stride=1, padding=tuple(r))


@dataclass
class ISMStep:
    """The ISM part of one training step for an :class:`ISMNet`.

    Args:
        cfg: the run config.
        model: the network being trained.
        sampler: the real cases' patch sampler (for the ``location`` partner).
        synthetic: the synthetic pool's sampler (for the ``synthetic`` partner), or None.
        unlabelled: a sampler over the unlabelled scans (for the ``unlabelled`` partner), or None.
    """

    cfg: Config
    model: ISMNet
    sampler: PatchSampler
    synthetic: PatchSampler | None = None
    unlabelled: PatchSampler | None = None

    def _patch(
        self, sampler: PatchSampler, case: int, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        label = sampler.cases[case][1]
        fg = sampler.fg[case] if rng.random() < self.cfg.ism.spatial.partner_fg else None
        start = choose_start(label.shape, sampler.patch_size, rng, fg)
        return sampler.extract(PatchChoice(case, start, fg is not None))

    def _location(self, step: int, b: int, case: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(derive_seed(self.cfg.train.seed, "ism-location", step, b))
        return self._patch(self.sampler, case, rng)

    def _synthetic(self, step: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        if self.synthetic is None:
            raise MensegError("the 'synthetic' mixing source needs the synthetic pool")
        rng = np.random.default_rng(derive_seed(self.cfg.train.seed, "ism-synthetic", step, b))
        return self._patch(self.synthetic, int(rng.integers(len(self.synthetic.cases))), rng)

    def _unlabelled(self, step: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        if self.unlabelled is None:
            raise MensegError("the 'unlabelled' mixing source needs data.unlabeled_root")
        rng = np.random.default_rng(derive_seed(self.cfg.train.seed, "ism-unlabelled", step, b))
        case = int(rng.integers(len(self.unlabelled.cases)))
        start = choose_start(self.unlabelled.cases[case][1].shape, self.unlabelled.patch_size, rng, None)
        return self.unlabelled.extract(PatchChoice(case, start, False))

    def partners(
        self, step: int, fb: FieldBatch, cases: Sequence[int], like: Tensor
    ) -> tuple[Tensor, Tensor] | None:
        """Augmented partner images ``(B, 4, ...)`` and labels for rows whose source is not the batch
        (other rows, and the labels of ``unlabelled`` partners, hold zeros and are never read), or None
        when every partner is in the batch."""
        if not fb.needs_partner_input:
            return None
        rows = [(b, s) for b, (f, s) in enumerate(zip(fb.fields, fb.sources, strict=True))
                if f is not None and s != "batch"]
        imgs, labs = [], []
        for b, src in rows:
            if src == "location":
                img, lab = self._location(step, b, int(cases[b]))
            elif src == "unlabelled":
                img, lab = self._unlabelled(step, b)
            else:
                img, lab = self._synthetic(step, b)
            imgs.append(torch.from_numpy(np.ascontiguousarray(img)))
            labs.append(torch.from_numpy(np.ascontiguousarray(lab)))
        seeds = [derive_seed(self.cfg.train.seed, "aug-partner", step, b) for b, _ in rows]
        ai, al = augment_batch(torch.stack(imgs), torch.stack(labs), self.cfg.aug, seeds,
                               self.cfg.data.spacing)
        xb = torch.zeros_like(like)
        yb = torch.zeros(like.shape[0], *like.shape[2:], dtype=al.dtype, device=like.device)
        for k, (b, _) in enumerate(rows):
            xb[b] = ai[k].to(like.device)
            yb[b] = al[k].to(like.device)
        return xb, yb

    def pseudo_targets(
        self, fb: FieldBatch, xb: Tensor, present: Tensor | None
    ) -> tuple[Tensor, Tensor] | None:
        """``(rows, targets)`` of the ``unlabelled`` partners: their row indices and the network's own
        region probabilities ``(n, 3, X, Y, Z)`` (fp32) on each partner alone, without gradient (the
        full-resolution output; under the step's autocast), or None when no partner is unlabelled."""
        rows = [b for b, (f, s) in enumerate(zip(fb.fields, fb.sources, strict=True))
                if f is not None and s == "unlabelled"]
        if not rows:
            return None
        idx = torch.tensor(rows, device=xb.device)
        with torch.no_grad():
            out = self.model(xb[idx], present=None if present is None else present[idx])
            if out.ndim == xb.ndim + 1:  # deep-supervision stack (B, K, 3, ...): its full-resolution head
                out = out[:, 0]
            return idx, torch.sigmoid(out.float())

    def forward(
        self, step: int, img: Tensor, lab: Tensor, cases: Sequence[int]
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        """``(outputs, targets, stats)`` for the step: targets are integer labels when nothing is
        mixed, else soft region targets mixed with the same fields as the features."""
        ism, seed, bsz = self.cfg.ism, self.cfg.train.seed, img.shape[0]
        present = None
        stats: dict[str, float] = {}
        if ism.modal.enabled:
            g = torch.Generator().manual_seed(derive_seed(seed, "ism-modal", step))
            present = sample_presence(g, bsz, ism.modal).to(img.device)
            stats["ism_dropped"] = float((~present).sum())
        if not ism.spatial.enabled:
            return self.model(img, present=present), lab, stats
        g = torch.Generator().manual_seed(derive_seed(seed, "ism-spatial", step))
        fb = sample_field_batch(g, ism.spatial, bsz, img.shape[2:], self.cfg.data.spacing)
        stats["ism_mixed"] = float(sum(f is not None for f in fb.fields))
        if "unlabelled" in ism.spatial.sources:  # every rank logs the same keys (DDP reduces them)
            stats["ism_unlabelled"] = float(sum(f is not None and s == "unlabelled"
                                                for f, s in zip(fb.fields, fb.sources, strict=True)))
        if not fb.any_mixed:
            return self.model(img, present=present), lab, stats
        with full_precision(img):  # partners and targets in fp32 whatever the network's autocast
            part = self.partners(step, fb, cases, img)
        pseudo = self.pseudo_targets(fb, part[0], present) if part is not None else None
        with full_precision(img):
            ya = labels_to_regions(lab)
            if part is None:
                xb, yb = None, gather_partner(ya, fb)
            else:
                other_y = labels_to_regions(part[1])
                if pseudo is not None:
                    other_y[pseudo[0]] = pseudo[1]
                xb = gather_partner(img, fb, part[0])
                yb = gather_partner(ya, fb, other_y)
            keep = None
            if ism.spatial.keep_tumour:
                keep = _dilate(ya[:, 2:3], ism.spatial.keep_margin_mm, self.cfg.data.spacing)
            lam = keep_own(fb.on_grid(img.shape[2:], device=img.device), keep)
            target = mix_targets(ya, yb, lam)
        return self.model.mix_forward(img, xb, fb, present, keep), target, stats


def pack_pair(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A visit-pair batch as the trainer's ``(image, label, meta)``: image ``(B, 8, ...)`` =
    ``[current, prior]``, label ``current + 4 * prior`` (uint8), meta ``(B, 2)`` float64 =
    ``[has_prior, gap_days]``."""
    image = np.concatenate([batch["image"], batch["prior_image"]], axis=1)
    label = (batch["label"].astype(np.uint8) + 4 * batch["prior_label"].astype(np.uint8)).astype(np.uint8)
    meta = np.stack([batch["has_prior"].astype(np.float64), batch["gap_days"].astype(np.float64)], axis=1)
    return image, label, meta


@dataclass
class VisitStep:
    """The ISM part of one training step on visit pairs (:func:`pack_pair` batches)."""

    cfg: Config
    model: ISMNet

    def forward(
        self, step: int, img: Tensor, packed: Tensor, meta: Tensor
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        """``(outputs, integer targets, stats)`` for an augmented packed pair batch."""
        from menseg.ism.fields import grid_points, sample_field
        from menseg.ism.temporal import interpolate_labels, temporal_weight
        from menseg.nets.unet import level_strides

        ism, seed = self.cfg.ism, self.cfg.train.seed
        bsz, patch = img.shape[0], tuple(int(v) for v in img.shape[2:])
        cur, prior = img[:, :4], img[:, 4:]
        lab, prior_lab = packed % 4, packed // 4
        has_prior = meta[:, 0] > 0.5
        gap = meta[:, 1].to(torch.float32)
        present = None
        stats: dict[str, float] = {"ism_with_prior": float(has_prior.sum())}
        if ism.modal.enabled:
            g = torch.Generator().manual_seed(derive_seed(seed, "ism-modal", step))
            present = sample_presence(g, bsz, ism.modal).to(img.device)
        g = torch.Generator().manual_seed(derive_seed(seed, "ism-temporal", step))
        draws = torch.rand(bsz, 2, generator=g, dtype=torch.float64).tolist()
        field_seeds = [int(torch.randint(0, 2**62, (), generator=g)) for _ in range(bsz)]
        mixed = [bool(has_prior[b]) and draws[b][0] < ism.temporal.p_mix for b in range(bsz)]
        stats["ism_temporal_mixed"] = float(sum(mixed))
        if not any(mixed):
            return self.model.visit_forward(cur, prior, gap, has_prior, present), lab, stats
        spacing = self.cfg.data.spacing
        strides = level_strides(self.model.net)[: ism.temporal.level + 1]  # type: ignore[arg-type]
        maps = [[] for _ in strides]  # per level, per sample
        target = lab.clone()
        fusion_gap = gap.clone()
        with full_precision(img):  # fields and label interpolation in fp32 under any autocast
            for b in range(bsz):
                if not mixed[b]:
                    for lv, st in enumerate(strides):
                        maps[lv].append(torch.ones(1, *(p // s for p, s in zip(patch, st, strict=True))))
                    continue
                s = float(draws[b][1])
                fg = torch.Generator().manual_seed(field_seeds[b])
                fld = sample_field(fg, ism.spatial.field, patch, spacing)
                t0, t1 = -float(gap[b]), 0.0
                for lv, st in enumerate(strides):
                    pts = grid_points(patch, spacing, stride=st)
                    maps[lv].append(temporal_weight(fld, pts, t0, t1, s)[None])
                w_full = temporal_weight(fld, grid_points(patch, spacing), t0, t1, s)
                target[b] = interpolate_labels(prior_lab[b], lab[b], w_full, spacing)
                fusion_gap[b] = s * gap[b]
        progression = [torch.stack(m).to(img.device) for m in maps]
        out = self.model.visit_forward(cur, prior, fusion_gap, has_prior, present, progression)
        return out, target, stats


class PairBatches(StepBatches):
    """:class:`StepBatches` for visit pairs (``sampler``: a :class:`menseg.ism.visits.PairSampler`):
    item ``t`` is :func:`pack_pair` of the sampler's batch of step ``t``."""

    def __getitem__(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(derive_seed(self.seed, "batch", int(step)))
        sl = slice(self.part.start, self.part.stop)
        return tuple(a[sl] for a in pack_pair(self.sampler.batch(rng, self.batch_size)))  # type: ignore[return-value]


# ---------------------------------------------------------------- the part


def is_longitudinal(root: str) -> bool:
    """Whether ``root`` holds the longitudinal layout."""
    from menseg.data.layouts import detect_layout

    try:
        return detect_layout(root) == "longitudinal"
    except MensegError:
        return False


@dataclass(frozen=True)
class _Visit:
    """A visit as the trainer's validation reads it (single-visit validation)."""

    case_id: str
    image: np.ndarray
    label: np.ndarray


def load_visits(cfg: Config, cache: Path) -> tuple[list[Any], list[Any]]:
    """Longitudinal data for temporal fusion: ``(train visit pairs, validation visits)``.

    The validation split is drawn over *patients* (``data.val_cases`` may name patients), so no
    patient is both trained and validated on; validation runs on single visits.
    """
    from menseg.ism.visits import load_visit_pairs

    pairs = load_visit_pairs(cfg.data.root, cfg.data.spacing, cache, cases=cfg.data.cases,
                             seed=cfg.train.seed)  # type: ignore[arg-type]
    patients = sorted({p.patient for p in pairs})
    if len(patients) < 2 and not (cfg.data.val_fraction == 0 and not cfg.data.val_cases):
        raise MensegError(f"need at least 2 patients (training + validation), found {len(patients)}",
                          cfg.data.root)
    train_p, val_p = split_cases(patients, cfg.data.val_fraction, cfg.data.val_cases, cfg.train.seed)
    train = [p for p in pairs if p.patient in set(train_p)]
    val = [_Visit(p.case_id, p.image, p.label) for p in pairs if p.patient in set(val_p)]
    log.info("longitudinal data: %d training visits (%d with an earlier visit) of %d patients, "
             "%d validation visits of patients %s", len(train), sum(p.has_prior for p in train),
             len(train_p), len(val), ", ".join(val_p))
    return train, val


@register
class ISMPart(Part):
    """ISM as a training part: the :class:`ISMNet` network, and the step's forward with spatial mixing
    and sequence dropout (:class:`ISMStep`) or, on the longitudinal layout with ``ism.temporal``, visit
    pairs with temporal fusion and mixing (:class:`VisitStep`)."""

    name = "ism"
    count_stats = frozenset({"ism_mixed", "ism_unlabelled", "ism_dropped", "ism_with_prior",
                             "ism_temporal_mixed"})
    runs_on = frozenset({"cases", "visit pairs"})
    sample_hint = ("a longitudinal data.root with ism.temporal; use a BraTS / nnU-Net layout or switch one "
                   "of them off")

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.visits = bool(cfg.ism.temporal.enabled and cfg.data.root and is_longitudinal(cfg.data.root))
        self.step: ISMStep | VisitStep | None = None
        self.sample_kind = "visit pairs" if self.visits else None
        self.owns_forward = self.visits or cfg.ism.spatial.enabled or cfg.ism.modal.enabled
        #: the ``unlabelled`` partner source reads data.unlabeled_root (an instance's, not the class's)
        self.uses_unlabelled = bool(cfg.ism.spatial.enabled and "unlabelled" in cfg.ism.spatial.sources
                                    and not self.visits)
        if self.uses_unlabelled and not cfg.data.unlabeled_root:
            raise MensegError(_NO_UNLABELLED)
        self.unused_parameters = True  # the mixer runs on random steps, the temporal map only with a prior

    @classmethod
    def enabled(cls, cfg: Config) -> bool:
        return cfg.ism.any

    def load_data(self, run: TrainSetup) -> tuple[list[Any], list[Any]] | None:
        if not self.visits:
            return None
        from menseg.ism.visits import PairSampler

        train, val = load_visits(self.cfg, run.cache)
        tc = self.cfg.train
        run.sampler = PairSampler(train, tc.patch_size, tc.fg_oversample)
        run.batches = PairBatches
        return train, val

    def network(self) -> nn.Module:
        from menseg.ism.model import build_model

        return build_model(self.cfg)

    def setup(self, run: TrainSetup) -> None:
        cfg = self.cfg
        if self.visits:
            self.step = VisitStep(run.rank_cfg, run.model)  # type: ignore[arg-type]
        elif cfg.ism.spatial.enabled or cfg.ism.modal.enabled:
            syn = unl = None
            if cfg.ism.spatial.enabled and "synthetic" in cfg.ism.spatial.sources:
                syn = synthetic_pool(cfg, run.out, run.cache)
            if self.uses_unlabelled:
                unl = unlabelled_pool(cfg, run.cache, run.progress)
            self.step = ISMStep(run.rank_cfg, run.model, run.sampler, syn, unl)  # type: ignore[arg-type]

    def bind(self, model: nn.Module) -> None:
        if self.step is not None:
            self.step.model = model  # type: ignore[assignment]

    def forward(self, step: int, img: Tensor, lab: Tensor, meta: Tensor
                ) -> tuple[Any, Tensor, dict[str, float]] | None:
        if self.step is None:
            return None
        if self.visits:
            return self.step.forward(step, img, lab, meta.to(img.device))  # type: ignore[arg-type]
        return self.step.forward(step, img, lab, meta.tolist())  # type: ignore[arg-type]


__all__ = ["ISMPart", "ISMStep", "PairBatches", "VisitStep", "is_longitudinal", "load_visits", "pack_pair",
           "synthetic_pool", "unlabelled_pool"]
