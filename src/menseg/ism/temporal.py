"""Temporal fusion: earlier visits of the same patient inform the current visit (ISM part 3).

Inference and training. The prior visit (rigidly registered and resampled onto the
current visit's grid, :mod:`menseg.ism.register`) goes through the *same* encoder;
at encoder level ``cfg.level`` its features are fused into the current visit's
features by :class:`TemporalFusion`, conditioned on the day gap through a smooth
Fourier encoding (:func:`encode_gap`); the deeper levels are recomputed from the
fused level and the decoder runs as usual (:func:`temporal_forward`). The fusion is
residual and gated, ``f_cur + gate * h(...)`` with ``gate = tanh(g alpha) * sigmoid(...)``
and ``alpha`` initialised to 0, so

- without a prior visit the module returns ``f_cur`` itself: the single-visit network, exactly;
- a fresh (or gate-closed, ``alpha = 0``) module is the identity bit for bit even with a prior.

Temporal mixing (training only). Two visits of one patient (times ``t0 < t1`` days,
registered onto one grid) define intermediate disease states: at a fraction ``s`` of
the way, the local progression is ``w(p) = s + s (1 - s) (2 lambda(p, t) - 1)``
(:func:`temporal_weight`) with ``lambda`` an implicit field (:mod:`menseg.ism.fields`)
evaluated at the intermediate time ``t = t0 + s (t1 - t0)``; features are blended
``(1 - w) f0 + w f1`` (:func:`temporal_mix`) and the targets are the visits' labels
interpolated through signed distance maps with the same ``w`` evaluated on the label
grid (:func:`interpolate_labels`, :func:`interpolate_regions`). Why this construction:

- ``w = 0`` at ``s = 0`` and ``w = 1`` at ``s = 1`` exactly, whatever lambda: the ends are the visits;
- ``w`` lies between ``s^2`` and ``2 s - s^2`` and is non-decreasing in ``s`` at every point, so each
  location moves monotonically from visit 0 to visit 1, some faster (lambda near 1), some slower
  (lambda near 0): disease evolves unevenly in space, and the pattern itself drifts with ``t``;
- ``w`` is one function of (p, t), so the feature-grid and label-grid weights agree (the field
  is the same function at both resolutions), and features and targets describe one state.

Signed distances (mm, negative inside) are computed per nested region (ET ⊆ TC ⊆ WT,
:data:`menseg.constants.REGIONS`). For nested masks the distance maps are ordered
pointwise (``d_ET >= d_TC >= d_WT``), and a convex blend with the same weights keeps that
order, so interpolated regions stay nested; an explicit re-nesting guards against ties.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from menseg.config import TemporalConfig
from menseg.constants import REGION_NAMES, REGIONS
from menseg.errors import MensegError
from menseg.regions import region_masks, regions_to_labels

if TYPE_CHECKING:
    from menseg.ism.fields import MixField

log = logging.getLogger(__name__)

Tensor = torch.Tensor
#: ``lambda(p_mm (..., 3), t_days) -> (...)`` in [0, 1], e.g. a :class:`menseg.ism.fields.MixField`.
FieldFn = Callable[[Tensor, float], Tensor]

#: Periods of the gap encoding relative to ``max_gap_days``: geometric from 4x (monotone over the
#: whole range) down to 1/64 (~29 days for 5 years: month-scale gaps stay distinguishable).
GAP_PERIODS_REL: tuple[float, float] = (4.0, 1.0 / 64.0)


#: Gain of the gate scalar: ``tanh(GATE_GAIN * alpha)``. With gain 1 the gate hardly opened within
#: the quick benchmark's budget (DESIGN.md, ISM, "Temporal" bullet); the gain scales the scalar's
#: gradient and its effect on the gate alike (~GATE_GAIN^2 faster opening) and keeps ``alpha = 0``
#: the exact identity.
GATE_GAIN = 10.0


# ----------------------------------------------------------------------------- gap encoding


def encode_gap(days: Tensor, n_features: int, max_gap_days: float) -> Tensor:
    """Smooth, bounded encoding of day gaps: ``(B,)`` days -> ``(B, n_features)``.

    ``u = days / max_gap_days``; ``K = n_features // 2`` angular frequencies
    ``w_k = 2 pi / P_k`` with periods ``P_k`` geometric in :data:`GAP_PERIODS_REL`;
    features ``[sin(w_k u)..., cos(w_k u)...]`` and, for odd ``n_features``, ``tanh(u)``.
    Every feature is in [-1, 1] and Lipschitz in ``days`` with constant at most
    ``2 pi * 64 / max_gap_days`` per day (0.22/day for 5 years), so close gaps get
    close codes, while gaps a month apart differ in the fast features.
    Negative gaps (a "prior" after the current visit) are encoded too.
    """
    if n_features < 1:
        raise MensegError(f"gap encoding needs at least 1 feature, got {n_features}")
    d = torch.as_tensor(days)
    if not d.is_floating_point():
        d = d.to(torch.float32)
    u = d.reshape(-1) / float(max_gap_days)
    k = n_features // 2
    feats = []
    if k:
        hi, lo = GAP_PERIODS_REL
        periods = torch.logspace(math.log10(hi), math.log10(lo), k, dtype=torch.float64)
        w = (2 * math.pi / periods).to(device=u.device, dtype=u.dtype)
        arg = u[:, None] * w[None]
        feats += [torch.sin(arg), torch.cos(arg)]
    if n_features % 2:
        feats.append(torch.tanh(u)[:, None])
    return torch.cat(feats, dim=1)


# ----------------------------------------------------------------------------- fusion module


def _conv_block_out(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(c_in, c_out, 3, padding=1, bias=False),
        nn.InstanceNorm3d(c_out, affine=True),
        nn.LeakyReLU(0.01),
        nn.Conv3d(c_out, c_out, 3, padding=1),
    )


class TemporalFusion(nn.Module):
    """Gated, time-conditioned fusion of a prior visit's features into the current visit's.

    ``out = f_cur + gate * h([f_cur, p])`` where

    - ``p = f_prior * (1 + gamma(gap)) + beta(gap)``: FiLM of the prior by an MLP of
      :func:`encode_gap` (how much and how to trust a prior depends on its age);
    - ``h``: conv3x3 -> InstanceNorm -> LeakyReLU -> conv3x3 (non-linear), ``2C -> C``;
    - ``gate = tanh(GATE_GAIN * alpha) * sigmoid(conv1x1([f_cur, p]))``: per-location in ``(-1, 1)``;
      the scalar ``alpha`` starts at 0, so a fresh module is exactly the identity
      (ReZero-style: training opens the gate only as far as the prior helps).

    Shapes: ``f_cur, f_prior (B, C, X, Y, Z)`` on one grid; ``gap_days (B,)`` (or a
    scalar) days from the prior visit to the current one.
    """

    def __init__(self, channels: int, cfg: TemporalConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or TemporalConfig()
        if channels < 1:
            raise MensegError(f"TemporalFusion needs channels >= 1, got {channels}")
        self.cfg = cfg
        self.channels = channels
        hidden = max(16, channels)
        self.time_mlp = nn.Sequential(
            nn.Linear(cfg.time_features, hidden), nn.SiLU(), nn.Linear(hidden, 2 * channels)
        )
        self.h = _conv_block_out(2 * channels, channels)
        self.gate_conv = nn.Conv3d(2 * channels, 1, 1)
        self.alpha = nn.Parameter(torch.zeros(()))

    def film(self, f_prior: Tensor, gap_days: Tensor | float) -> Tensor:
        """The prior's features modulated by the gap: ``(B, C, ...)``."""
        b = f_prior.shape[0]
        gap = torch.as_tensor(gap_days, dtype=f_prior.dtype, device=f_prior.device).reshape(-1)
        if gap.numel() == 1:
            gap = gap.expand(b)
        if gap.numel() != b:
            raise MensegError(f"gap_days needs one value per sample ({b}), got {gap.numel()}")
        emb = encode_gap(gap, self.cfg.time_features, self.cfg.max_gap_days)
        gamma, beta = self.time_mlp(emb).chunk(2, dim=1)
        view = (b, self.channels) + (1,) * (f_prior.ndim - 2)
        return f_prior * (1 + gamma.reshape(view)) + beta.reshape(view)

    def forward(
        self,
        f_cur: Tensor,
        f_prior: Tensor | None = None,
        gap_days: Tensor | float | None = None,
        has_prior: Tensor | None = None,
    ) -> Tensor:
        """Fuse; ``f_prior is None`` returns ``f_cur`` itself (the single-visit network).

        Args:
            f_cur: ``(B, C, X, Y, Z)`` current visit's features at ``cfg.level``.
            f_prior: ``(B, C, X, Y, Z)`` prior visit's features on the same grid, or None.
            gap_days: ``(B,)`` or scalar, days between the prior and the current visit.
            has_prior: optional ``(B,)`` bool; samples marked False come out as ``f_cur``
                exactly (for batches where only some samples have a prior visit; their
                ``f_prior`` entries are ignored, whatever they hold).

        Returns:
            ``(B, C, X, Y, Z)``.
        """
        if f_prior is None:
            return f_cur
        if gap_days is None:
            raise MensegError("temporal fusion with a prior visit needs gap_days")
        if f_prior.shape != f_cur.shape:
            raise MensegError(
                f"prior features {tuple(f_prior.shape)} do not match the current ones {tuple(f_cur.shape)}"
                " (register and resample the prior onto the current grid first)"
            )
        if f_cur.shape[1] != self.channels:
            raise MensegError(f"TemporalFusion built for {self.channels} channels, got {f_cur.shape[1]}")
        p = self.film(f_prior, gap_days)
        z = torch.cat([f_cur, p], dim=1)
        gate = torch.tanh(GATE_GAIN * self.alpha) * torch.sigmoid(self.gate_conv(z))
        out = f_cur + gate * self.h(z)
        if has_prior is not None:
            keep = has_prior.to(device=out.device, dtype=torch.bool).reshape(-1, *(1,) * (out.ndim - 1))
            out = torch.where(keep, out, f_cur)
        return out


def temporal_forward(
    net: nn.Module,
    fusion: TemporalFusion,
    x: Tensor,
    x_prior: Tensor | None = None,
    gap_days: Tensor | float | None = None,
    *,
    stem: nn.Module | None = None,
    has_prior: Tensor | None = None,
    prior_grad: bool = True,
) -> Tensor:
    """The segmentation network's forward with a prior visit fused at ``fusion.cfg.level``.

    ``x, x_prior (B, C_in, X, Y, Z)`` on one grid (prior registered and resampled);
    both go through the same encoder (and ``stem``) up to the fusion level; the deeper
    levels are recomputed from the fused level and the decoder runs as usual.
    Without ``x_prior`` this is ``decode(net, encode(net, x, stem))``, i.e. ``net(x)``.
    ``prior_grad=False`` encodes the prior under ``torch.no_grad`` (less memory).
    Returns what :func:`menseg.nets.unet.decode` returns.
    """
    from menseg.nets.unet import decode, encode, encode_from, n_levels

    level = fusion.cfg.level
    if not 0 <= level < n_levels(net):
        raise MensegError(f"ism.temporal.level must be in 0..{n_levels(net) - 1}, got {level}")
    if x_prior is None:
        return decode(net, encode(net, x, stem))
    feats = encode(net, x, stem, stop=level)
    with torch.set_grad_enabled(prior_grad and torch.is_grad_enabled()):
        f_prior = encode(net, x_prior, stem, stop=level)[level]
    fused = fusion(feats[level], f_prior, gap_days, has_prior)
    return decode(net, [*feats[:level], fused, *encode_from(net, fused, level)])


# ----------------------------------------------------------------------------- signed distances


def _spacing3(spacing_mm: Sequence[float] | float) -> tuple[float, float, float]:
    if isinstance(spacing_mm, int | float):
        return (float(spacing_mm),) * 3  # type: ignore[return-value]
    sp = tuple(float(v) for v in spacing_mm)
    if len(sp) != 3 or min(sp) <= 0:
        raise MensegError(f"spacing_mm must be 3 positive values, got {list(sp)}")
    return sp  # type: ignore[return-value]


def signed_distance(mask: np.ndarray, spacing_mm: Sequence[float] | float = 1.0) -> np.ndarray:
    """Signed distance (mm, float32) of a binary mask ``(X, Y, Z)``: negative inside.

    Outside: distance from the voxel centre to the nearest inside voxel centre;
    inside: minus the distance to the nearest outside voxel centre (scipy's exact
    Euclidean transform with the spacing). Values are at least one voxel in magnitude,
    so the zero level lies midway between the last inside and the first outside voxel.
    An empty mask is ``+D`` and a full one ``-D`` everywhere, ``D`` the grid's diagonal
    (mm), which bounds every distance on the grid (keeps the nesting order).
    """
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    sp = _spacing3(spacing_mm)
    diag = float(np.linalg.norm(np.asarray(m.shape) * np.asarray(sp)))
    if not m.any():
        return np.full(m.shape, diag, dtype=np.float32)
    if m.all():
        return np.full(m.shape, -diag, dtype=np.float32)
    out = ndimage.distance_transform_edt(~m, sampling=sp)
    inside = ndimage.distance_transform_edt(m, sampling=sp)
    return (out - inside).astype(np.float32)


def signed_distances(label: np.ndarray | Tensor, spacing_mm: Sequence[float] | float = 1.0) -> np.ndarray:
    """Signed distance maps ``(3, X, Y, Z)`` (mm, float32) of the regions ET, TC, WT of a label map.

    Meant to be computed once per visit (data loading, CPU) so that the per-step
    interpolation (:func:`interpolate_regions`) is pure torch on the training device.
    """
    lab = label.detach().cpu().numpy() if isinstance(label, Tensor) else np.asarray(label)
    if lab.ndim != 3:
        raise MensegError(f"label map must be (X, Y, Z), got shape {lab.shape}")
    return np.stack([signed_distance(m, spacing_mm) for m in region_masks(lab).values()])


def _as_weight(s: float | np.ndarray | Tensor, like: Tensor) -> Tensor | float:
    if isinstance(s, int | float):
        if not 0.0 <= float(s) <= 1.0:
            raise MensegError(f"interpolation fraction must be in [0, 1], got {s}")
        return float(s)
    # tensors are not range-checked: that would synchronise the device every training step
    w = torch.as_tensor(s, device=like.device)
    return w.to(like.dtype) if w.is_floating_point() else w.to(torch.float32)


def interpolate_regions(d0: Tensor, d1: Tensor, w: float | Tensor) -> Tensor:
    """Nested region masks of an intermediate state from two visits' signed distances.

    Args:
        d0, d1: ``(..., 3, X, Y, Z)`` signed distances (ET, TC, WT; :func:`signed_distances`).
        w: fraction of the way to visit 1: a float, or a tensor broadcastable to ``(..., 1, X, Y, Z)``
            (e.g. ``(B, 1, X, Y, Z)`` from :func:`temporal_weight`), values in [0, 1].

    Returns:
        float ``(..., 3, X, Y, Z)`` region targets in {0, 1} (ET ⊆ TC ⊆ WT), the format of
        :func:`menseg.regions.labels_to_regions`. ``w = 0`` gives visit 0's regions and
        ``w = 1`` visit 1's, exactly.
    """
    if d0.shape != d1.shape or d0.ndim < 4 or d0.shape[-4] != len(REGION_NAMES):
        raise MensegError(f"signed distances must both be (..., 3, X, Y, Z), got {tuple(d0.shape)}, "
                          f"{tuple(d1.shape)}")
    wt = _as_weight(w, d0)
    d = (1 - wt) * d0 + wt * d1
    et, tc, whole = d.unbind(dim=-4)
    tc = torch.maximum(tc, whole)  # re-nest: TC inside WT, ET inside TC (a no-op up to ties)
    et = torch.maximum(et, tc)
    return (torch.stack([et, tc, whole], dim=-4) < 0).to(d0.dtype)


def interpolate_labels(
    label0: np.ndarray | Tensor,
    label1: np.ndarray | Tensor,
    s: float | np.ndarray | Tensor,
    spacing_mm: Sequence[float] | float = 1.0,
) -> np.ndarray | Tensor:
    """BraTS labels (0..3) of an intermediate disease state between two registered visits.

    Signed distance maps (mm, with ``spacing_mm``) of each nested region (WT ⊇ TC ⊇ ET)
    of both visits are blended, ``(1 - s) d0 + s d1``, and the regions re-nested; ``s``
    is a fraction in [0, 1] or a per-voxel array ``(X, Y, Z)`` (a local progression such
    as :func:`temporal_weight` on the label grid). ``s = 0`` returns ``label0`` and
    ``s = 1`` returns ``label1`` exactly (as labels 0..3).

    Returns the type of ``label0`` (numpy array or tensor on its device) with its dtype.
    """
    is_tensor = isinstance(label0, Tensor)
    l0 = label0.detach().cpu().numpy() if isinstance(label0, Tensor) else np.asarray(label0)
    l1 = label1.detach().cpu().numpy() if isinstance(label1, Tensor) else np.asarray(label1)
    if l0.shape != l1.shape:
        raise MensegError(f"visit labels differ in shape: {l0.shape} vs {l1.shape} (register first)")
    bad = np.setdiff1d(np.union1d(np.unique(l0), np.unique(l1)), np.asarray(sorted(REGIONS["WT"]) + [0]))
    if bad.size:
        raise MensegError(f"labels must be 0..3, got values {bad.tolist()}")
    d0 = torch.from_numpy(signed_distances(l0, spacing_mm))
    d1 = torch.from_numpy(signed_distances(l1, spacing_mm))
    w = s.detach().cpu() if isinstance(s, Tensor) else s
    if not isinstance(w, int | float):
        w = torch.as_tensor(np.asarray(w), dtype=torch.float32)
        if w.numel() and (float(w.min()) < 0.0 or float(w.max()) > 1.0):
            raise MensegError("interpolation fractions must be in [0, 1]")
    lab = regions_to_labels(interpolate_regions(d0, d1, w), 0.5, axis=-4)
    if is_tensor:
        return lab.to(device=label0.device, dtype=label0.dtype)  # type: ignore[union-attr]
    return lab.numpy().astype(l0.dtype, copy=False)


# ----------------------------------------------------------------------------- temporal mixing


def temporal_weight(
    field: MixField | FieldFn, points_mm: Tensor, t0_days: float, t1_days: float, s: float
) -> Tensor:
    """Local progression ``w(p) = s + s (1 - s) (2 lambda(p, t) - 1)`` at ``t = t0 + s (t1 - t0)``.

    ``points_mm (..., 3)`` (e.g. :func:`menseg.ism.fields.grid_points` of a feature level or of the
    label grid) -> ``(...)`` in ``[s^2, 2 s - s^2]`` ⊆ [0, 1]; exactly 0 at ``s = 0`` and 1 at
    ``s = 1``; non-decreasing in ``s`` at every point (module docstring).
    """
    if not 0.0 <= s <= 1.0:
        raise MensegError(f"temporal mixing fraction s must be in [0, 1], got {s}")
    t = float(t0_days) + s * (float(t1_days) - float(t0_days))
    lam = field(points_mm, t)
    return s + (s * (1.0 - s)) * (2.0 * lam - 1.0)


def temporal_mix(
    f0: Tensor,
    f1: Tensor,
    field: MixField | FieldFn,
    points_mm: Tensor,
    t0_days: float,
    t1_days: float,
    s: float,
    fusion: Callable[[Tensor, Tensor, Tensor], Any] | None = None,
) -> Tensor:
    """Features of an intermediate state between visit 0 (``t0_days``) and visit 1 (``t1_days``).

    Args:
        f0, f1: ``(B, C, X, Y, Z)`` the two visits' features on one grid (registered).
        field: ``lambda(p, t)`` in [0, 1] (a :class:`menseg.ism.fields.MixField`).
        points_mm: ``(X, Y, Z, 3)`` (or ``(B, X, Y, Z, 3)``) physical centres of the feature voxels.
        t0_days, t1_days: the visits' days; the field is evaluated at ``t = t0 + s (t1 - t0)``.
        s: fraction of the way from visit 0 to visit 1, in [0, 1].
        fusion: optional learned fusion ``fusion(fa, fb, lam) -> f`` with ``lam`` the share of
            ``fa`` (e.g. :class:`menseg.ism.spatial.FeatureFusion`); called as
            ``fusion(f0, f1, 1 - w)``. Default: the blend ``(1 - w) f0 + w f1``.

    Returns:
        ``(B, C, X, Y, Z)``; ``f0`` at ``s = 0`` and ``f1`` at ``s = 1`` (exactly, for the blend).
        Targets: :func:`interpolate_regions` / :func:`interpolate_labels` with
        :func:`temporal_weight` evaluated on the label grid's points.
    """
    if f0.shape != f1.shape:
        raise MensegError(f"visit features differ in shape: {tuple(f0.shape)} vs {tuple(f1.shape)}")
    w = temporal_weight(field, points_mm.to(f0.device), t0_days, t1_days, s).to(f0.dtype)
    spatial = f0.shape[2:]
    if tuple(w.shape) == tuple(spatial):
        w = w[None, None]
    elif w.ndim == f0.ndim - 1 and tuple(w.shape[1:]) == tuple(spatial):
        w = w[:, None]
    else:
        raise MensegError(
            f"field on points {tuple(points_mm.shape)} does not match features {tuple(f0.shape)}"
        )
    if fusion is not None:
        return fusion(f0, f1, (1 - w).expand(f0.shape[0], 1, *spatial))
    return (1 - w) * f0 + w * f1


__all__ = [
    "GAP_PERIODS_REL",
    "TemporalConfig",
    "TemporalFusion",
    "encode_gap",
    "interpolate_labels",
    "interpolate_regions",
    "signed_distance",
    "signed_distances",
    "temporal_forward",
    "temporal_mix",
    "temporal_weight",
]
