"""Feature alignment between synthetic (source) and real (target) scans (training only).

The segmentation network is trained on labelled synthetic cases; unlabelled real scans enter only
through an alignment term on the encoder's features (:func:`menseg.nets.unet.encode`), which pulls
the two domains' feature distributions together at the configured levels (``AlignConfig.levels``,
0 = full resolution):

- ``adversarial``: a :class:`DomainClassifier` tells source from target features; it sits behind a
  gradient-reversal layer (Ganin & Lempitsky 2015), so the classifier learns at full rate while the
  encoder receives ``-weight`` times its gradient and learns to fool it. Classifying several encoder
  levels at once follows Kamnitsas et al. 2017 (multi-level adversarial adaptation for brain lesion
  segmentation).
- ``mmd``: multi-kernel Gaussian maximum mean discrepancy (Long et al. 2015) between feature vectors
  drawn at random voxels of each domain.
- ``coral``: distance between the two domains' feature covariances (Deep CORAL, Sun & Saenko 2016).
- ``none``: no term.

The weight follows a schedule over training (:func:`align_weight`). All randomness (the voxels drawn
for ``mmd`` / ``coral``) comes from an explicit CPU ``torch.Generator``; the drawn indices are moved
to the features' device, so the term runs on the training device without a round trip to numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from menseg.config import AlignConfig
from menseg.errors import MensegError

Tensor = torch.Tensor

#: hidden width of the domain classifier's per-level heads and of its joint head
HIDDEN = 32
#: MMD kernel bandwidths as multiples of the median pairwise distance (Long et al. 2015 use a family)
MMD_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)


# ---------------------------------------------------------------- gradient reversal


class GradReverse(torch.autograd.Function):
    """Gradient-reversal layer (Ganin & Lempitsky 2015): identity forward, ``-lambda * grad`` backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lam: float) -> Tensor:  # type: ignore[override]
        ctx.lam = float(lam)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * (-ctx.lam), None


def grad_reverse(x: Tensor, lam: float) -> Tensor:
    """``x`` unchanged; the gradient flowing back through it is multiplied by ``-lam``."""
    return GradReverse.apply(x, lam)


# ---------------------------------------------------------------- schedule


def align_weight(cfg: AlignConfig, step: int, total: int) -> float:
    """Weight of the alignment term at (0-based) optimiser step ``step`` of ``total``.

    ``constant``: ``cfg.weight``; ``linear``: ``weight * min(1, p / ramp)``; ``dann``:
    ``weight * (2 / (1 + exp(-10 p)) - 1)`` (Ganin & Lempitsky 2015), with training progress
    ``p = step / total`` clipped to [0, 1]. For ``adversarial`` this is the reversal factor.
    """
    if total < 1:
        raise MensegError(f"align_weight: total steps must be >= 1, got {total}")
    p = min(max(step / total, 0.0), 1.0)
    if cfg.schedule == "constant":
        return float(cfg.weight)
    if cfg.schedule == "linear":
        return float(cfg.weight) * min(1.0, p / cfg.ramp)
    if cfg.schedule == "dann":
        return float(cfg.weight) * (2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0)
    raise MensegError(f"align_weight: unknown schedule '{cfg.schedule}'")


# ---------------------------------------------------------------- distribution distances


def _check_pair(name: str, a: Tensor, b: Tensor, min_rows: int) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise MensegError(f"{name}: expected (n, C) and (m, C), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < min_rows or b.shape[0] < min_rows:
        raise MensegError(f"{name}: need >= {min_rows} vectors per domain, got {a.shape[0]} and {b.shape[0]}")


def _sq_dists(x: Tensor) -> Tensor:
    """Squared Euclidean distances ``(N, N)`` between the rows of ``x``, clamped at 0.

    Computed by the Gram expansion, not ``cdist``: no square root, so the gradient is finite at
    zero distance (a sample compared with itself)."""
    sq = (x * x).sum(1)
    return (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp_min(0.0)


def mmd_loss(a: Tensor, b: Tensor) -> Tensor:
    """Multi-kernel Gaussian MMD^2 (biased estimator) between samples ``a`` (n, C) and ``b`` (m, C).

    ``k(x, y) = mean_s exp(-|x - y|^2 / (2 s^2))`` over bandwidths ``s = median * MMD_SCALES``, where
    the median pairwise distance of the pooled sample is detached (a bandwidth heuristic, not a
    learnable quantity). ``MMD^2 = mean k(a, a) + mean k(b, b) - 2 mean k(a, b)`` (Long et al. 2015),
    symmetric in ``a`` and ``b``. Computed in float32; returns a scalar.
    """
    _check_pair("mmd_loss", a, b, 1)
    n = a.shape[0]
    z = torch.cat([a, b]).float()
    d2 = _sq_dists(z)
    with torch.no_grad():
        iu = torch.triu_indices(z.shape[0], z.shape[0], 1, device=z.device)
        off = d2[iu[0], iu[1]]
        med = off.sqrt().median() if off.numel() else d2.new_ones(())
        med = med.clamp_min(1e-6)
    k = sum(torch.exp(-d2 / (2.0 * (med * s) ** 2)) for s in MMD_SCALES) / len(MMD_SCALES)
    return k[:n, :n].mean() + k[n:, n:].mean() - 2.0 * k[:n, n:].mean()


def coral_loss(a: Tensor, b: Tensor) -> Tensor:
    """Deep CORAL (Sun & Saenko 2016): ``|cov(a) - cov(b)|_F^2 / (4 C^2)`` for ``a`` (n, C), ``b`` (m, C).

    Covariances are unbiased (``n - 1``); computed in float32; returns a scalar.
    """
    _check_pair("coral_loss", a, b, 2)
    c = a.shape[1]

    def cov(x: Tensor) -> Tensor:
        xc = x.float() - x.float().mean(0, keepdim=True)
        return xc.T @ xc / (x.shape[0] - 1)

    return (cov(a) - cov(b)).pow(2).sum() / (4.0 * c * c)


def sample_vectors(feat: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """Feature vectors at ``min(n, B*X*Y*Z)`` distinct random voxels of ``feat`` (B, C, X, Y, Z).

    Returns ``(k, C)`` rows of ``feat`` (gradients flow back to the drawn voxels). The indices are
    drawn from the CPU generator ``gen`` (a permutation of all voxels of the batch) and moved to
    ``feat``'s device.
    """
    if feat.ndim != 5:
        raise MensegError(f"sample_vectors: expected features (B, C, X, Y, Z), got {tuple(feat.shape)}")
    if n < 1:
        raise MensegError(f"sample_vectors: n must be >= 1, got {n}")
    c = feat.shape[1]
    flat = feat.movedim(1, -1).reshape(-1, c)
    idx = torch.randperm(flat.shape[0], generator=gen)[:n]
    return flat[idx.to(feat.device)]


# ---------------------------------------------------------------- modules


def _check_levels(levels: Sequence[int], n: int, who: str) -> None:
    bad = [int(lv) for lv in levels if not 0 <= int(lv) < n]
    if not levels or bad:
        raise MensegError(
            f"{who}: sim2real.align.levels must be encoder levels in 0..{n - 1} (the network has {n}), "
            f"got {list(levels)}")


class DomainClassifier(nn.Module):
    """Tells source (logit < 0) from target (logit > 0) by encoder features of several levels
    (Kamnitsas et al. 2017).

    Per level ``l``: ``Conv3d(C_l, 32, 1) -> LeakyReLU -> Conv3d(32, 32, 3, stride 2) -> LeakyReLU ->
    global average pool``; the pooled vectors of all levels are concatenated and go through
    ``Linear(32 L, 32) -> LeakyReLU -> Linear(32, 1)``. Global pooling makes it independent of the
    patch size.
    """

    def __init__(self, channels: Sequence[int], levels: Sequence[int]) -> None:
        super().__init__()
        _check_levels(levels, len(channels), "DomainClassifier")
        self.levels = tuple(int(lv) for lv in levels)
        self.heads = nn.ModuleList(
            nn.Sequential(
                nn.Conv3d(int(channels[lv]), HIDDEN, 1),
                nn.LeakyReLU(),
                nn.Conv3d(HIDDEN, HIDDEN, 3, stride=2, padding=1),
                nn.LeakyReLU(),
                nn.AdaptiveAvgPool3d(1),
                nn.Flatten(),
            )
            for lv in self.levels
        )
        self.joint = nn.Sequential(
            nn.Linear(HIDDEN * len(self.levels), HIDDEN), nn.LeakyReLU(), nn.Linear(HIDDEN, 1))

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """``feats``: all levels as :func:`~menseg.nets.unet.encode` returns them (level ``l`` is
        ``(B, C_l, ...)``); only the configured levels are read. Returns logits ``(B,)``."""
        if len(feats) <= max(self.levels):
            raise MensegError(
                f"DomainClassifier: got {len(feats)} feature levels, needs level {max(self.levels)}")
        pooled = [head(feats[lv]) for head, lv in zip(self.heads, self.levels, strict=True)]
        return self.joint(torch.cat(pooled, 1)).squeeze(1)


class FeatureAligner(nn.Module):
    """Alignment term between source (synthetic) and target (real) encoder features.

    ``channels``: channel count of every encoder level (:func:`menseg.nets.unet.level_channels`).
    Holds a :class:`DomainClassifier` (its parameters must be in an optimiser) for ``adversarial``;
    has no parameters otherwise. ``cfg.levels`` must be levels of the network (checked unless the
    method is ``none``).
    """

    def __init__(self, cfg: AlignConfig, channels: Sequence[int]) -> None:
        super().__init__()
        if cfg.method != "none":  # unused levels of a disabled term are no error
            _check_levels(cfg.levels, len(channels), "FeatureAligner")
        self.cfg = cfg
        self.channels = tuple(int(c) for c in channels)
        self.classifier = DomainClassifier(channels, cfg.levels) if cfg.method == "adversarial" else None

    def _check_feats(self, src: Sequence[Tensor], tgt: Sequence[Tensor]) -> None:
        for name, feats in (("source", src), ("target", tgt)):
            if len(feats) != len(self.channels):
                raise MensegError(f"FeatureAligner: {name} has {len(feats)} feature levels, "
                                  f"expected {len(self.channels)}")
            for lv in self.cfg.levels:
                if feats[lv].ndim != 5 or feats[lv].shape[1] != self.channels[lv]:
                    raise MensegError(
                        f"FeatureAligner: {name} level {lv} has shape {tuple(feats[lv].shape)}, "
                        f"expected (B, {self.channels[lv]}, X, Y, Z)")

    def forward(
        self, src: Sequence[Tensor], tgt: Sequence[Tensor], weight: float, gen: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        """The alignment loss (scalar) to add to the segmentation loss, and its stats.

        Args:
            src, tgt: all encoder levels (as :func:`~menseg.nets.unet.encode` returns them) of the
                source (synthetic) and the target (real) batch.
            weight: the scheduled weight (:func:`align_weight`).
            gen: CPU generator for the voxels drawn by ``mmd`` / ``coral``.

        ``adversarial``: BCE of the classifier (source label 0, target 1) on gradient-reversed
        features; the loss is *not* multiplied by ``weight``: the classifier learns at full rate and
        the encoder gets ``-weight`` times its gradient. Stats ``align_loss``, ``domain_acc``.
        ``mmd`` / ``coral``: the distance summed over levels between ``cfg.max_voxels`` vectors per
        domain, times ``weight``. Stats ``align_loss`` (unweighted), ``align_weight``.
        ``none``: a zero loss.
        """
        method = self.cfg.method
        if method == "none":
            return src[0].new_zeros((), dtype=torch.float32), {"align_loss": 0.0}
        self._check_feats(src, tgt)
        if method == "adversarial":
            assert self.classifier is not None
            levels = set(self.cfg.levels)

            def reverse(feats: Sequence[Tensor]) -> list[Tensor]:
                return [grad_reverse(f, weight) if lv in levels else f for lv, f in enumerate(feats)]

            logits = torch.cat([self.classifier(reverse(src)), self.classifier(reverse(tgt))]).float()
            n_src = src[self.cfg.levels[0]].shape[0]
            labels = torch.zeros_like(logits)
            labels[n_src:] = 1.0
            loss = F.binary_cross_entropy_with_logits(logits, labels)
            with torch.no_grad():
                acc = ((logits > 0).float() == labels).float().mean()
            return loss, {"align_loss": float(loss.detach()), "domain_acc": float(acc)}
        dist = mmd_loss if method == "mmd" else coral_loss
        total = None
        for lv in self.cfg.levels:
            a = sample_vectors(src[lv], self.cfg.max_voxels, gen)
            b = sample_vectors(tgt[lv], self.cfg.max_voxels, gen)
            d = dist(a, b)
            total = d if total is None else total + d
        assert total is not None
        return total * weight, {"align_loss": float(total.detach()), "align_weight": float(weight)}
