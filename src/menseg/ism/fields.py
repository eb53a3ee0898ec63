"""Implicit mixing fields ``lambda(p, t; z)`` in [0, 1].

A field is one function of continuous physical coordinates ``p`` (mm) and time
``t`` (days); the latent ``z`` (its random parameters) is drawn once per mix, so
the same field is evaluated on an encoder level's coarse feature grid, on the
label grid, or at any point, and the values agree up to sampling.

Model: random Fourier features (a smooth stationary random field)::

    s(p, t) = sum_k  A_k cos(2 pi (f_k . p + g_k t) + phi_k)          unit variance: sum_k A_k^2 / 2 = 1
    lambda(p, t) = sigmoid(a (s(p, t) - theta))

- ``f_k`` (cycles/mm): uniform random direction, wavelength ``L 2^u`` with ``u ~ U[0, 1)``, so the
  field has no structure finer than the sampled smoothness ``L`` (mm) and none coarser than ``2L``;
  the amplitude ``A_k`` grows with the wavelength (smoother fields dominate).
- ``g_k`` (cycles/day): random sign, period ``T 2^u``; ``T`` is the sampled temporal scale. For a
  fixed point the field changes on the scale of ``T`` days (and not at all when ``g = 0``).
- ``a`` (the sharpness) is the sigmoid's slope per unit of ``s``: large values give a near-binary
  field (CutMix-like), small values a soft blend (MixUp-like). The transition between the two
  sources is about ``4.4 / (a |grad s|)`` mm wide (10 % -> 90 %), with ``|grad s| ~ 2 pi / L``.
- ``theta`` is calibrated once, on the label grid given to :func:`sample_field`, so that the mean of
  lambda there equals the sampled ``ratio`` (the share of the volume taken from source *a*,
  ``lambda = 1``) at ``t = 0``. From then on the field is fixed: nothing depends on the grid it is
  later evaluated on.

Grids. A grid of ``shape`` voxels with ``spacing_mm`` and ``origin_mm`` (the centre of voxel 0)
downsampled by an integer ``stride`` has its voxel ``i`` at the centre of the stride block it
covers: ``origin + (i * stride + (stride - 1) / 2) * spacing``, which is where trilinear
upsampling with ``align_corners=False`` puts it, and what a U-Net level of cumulative stride
``stride`` (:func:`menseg.nets.unet.level_strides`) covers.

Randomness: every draw comes from an explicit ``torch.Generator`` (CPU) in a fixed number per call,
so a field is replayable from a seed. Evaluation is pure and runs on the points' device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from menseg.config import FieldConfig
from menseg.draws import log_uniform, uniform
from menseg.errors import MensegError

log = logging.getLogger(__name__)

Tensor = torch.Tensor
Vec3 = Sequence[float]

#: Stop calibrating the threshold once the grid mean of lambda is this close to the ratio.
CALIBRATION_TOL = 1e-5


@dataclass(frozen=True, eq=False)
class MixField:
    """One sampled field ``lambda(p, t)``; parameter tensors live on the CPU (float32).

    ``freqs (K, 3)`` cycles/mm, ``freq_t (K,)`` cycles/day, ``phases (K,)`` rad, ``amps (K,)``;
    ``threshold`` and ``sharpness`` map the score to [0, 1]; ``ratio`` is the calibrated mean on
    the calibration grid; ``wavelength_mm`` and ``period_days`` record the sampled scales.
    """

    freqs: Tensor
    freq_t: Tensor
    phases: Tensor
    amps: Tensor
    threshold: float
    sharpness: float
    ratio: float
    wavelength_mm: float = math.nan
    period_days: float = math.nan

    def score(self, p_mm: Tensor, t_days: Tensor | float = 0.0) -> Tensor:
        """Raw field ``s(p, t)`` (zero mean, unit variance over space) at ``(..., 3)`` mm -> ``(...)``."""
        if p_mm.shape[-1] != 3:
            raise MensegError(f"points must have shape (..., 3), got {tuple(p_mm.shape)}")
        dt = torch.promote_types(p_mm.dtype, torch.float32)
        dev = p_mm.device
        arg = p_mm.to(dt) @ self.freqs.to(dev, dt).T  # (..., K) cycles
        t = torch.as_tensor(t_days, dtype=dt, device=dev)
        arg = arg + t[..., None] * self.freq_t.to(dev, dt)
        arg = 2 * math.pi * arg + self.phases.to(dev, dt)
        return torch.cos(arg) @ self.amps.to(dev, dt)

    def __call__(self, p_mm: Tensor, t_days: Tensor | float = 0.0) -> Tensor:
        """``lambda(p, t)`` in [0, 1] at points ``p_mm (..., 3)`` (mm) and times ``t_days`` (broadcast
        against ``p_mm.shape[:-1]``) -> ``(...)``, on ``p_mm``'s device."""
        return torch.sigmoid(self.sharpness * (self.score(p_mm, t_days) - self.threshold))


# ---------------------------------------------------------------- grids


def _triple(v: Sequence[float] | Sequence[int], name: str) -> tuple:
    t = tuple(v)
    if len(t) != 3:
        raise MensegError(f"{name} must have 3 values, got {list(t)}")
    return t


def _axis_coords(
    shape: Sequence[int], spacing_mm: Vec3, origin_mm: Vec3, stride: Sequence[int]
) -> list[Tensor]:
    """Per-axis voxel-centre coordinates (mm, float64, CPU) of the grid downsampled by ``stride``."""
    shape, spacing_mm = _triple(shape, "shape"), _triple(spacing_mm, "spacing_mm")
    origin_mm, stride = _triple(origin_mm, "origin_mm"), _triple(stride, "stride")
    axes = []
    for n, sp, o, s in zip(shape, spacing_mm, origin_mm, stride, strict=True):
        if s < 1 or n % s:
            raise MensegError(f"grid of shape {list(shape)} is not divisible by stride {list(stride)}")
        i = torch.arange(n // s, dtype=torch.float64)
        axes.append(o + (i * s + (s - 1) / 2) * sp)
    return axes


def grid_points(
    shape: Sequence[int],
    spacing_mm: Vec3,
    origin_mm: Vec3 = (0.0, 0.0, 0.0),
    stride: Sequence[int] = (1, 1, 1),
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Voxel centres (mm) of a grid downsampled by ``stride``: ``(X/sx, Y/sy, Z/sz, 3)``.

    ``shape`` (voxels), ``spacing_mm`` and ``origin_mm`` (centre of voxel 0, mm) describe the input
    grid; voxel ``i`` of the coarse grid is at ``origin + (i * stride + (stride - 1) / 2) * spacing``.
    """
    ax = _axis_coords(shape, spacing_mm, origin_mm, stride)
    pts = torch.stack(torch.meshgrid(*ax, indexing="ij"), dim=-1)
    return pts.to(device=device, dtype=dtype)


def _score_grid(
    field: MixField, axes: list[Tensor], t_days: float, device: torch.device | str | None
) -> Tensor:
    """``s`` on a regular grid, separably: ``Re sum_k c_k e^{i w_k x} e^{i w_k y} e^{i w_k z}``.

    Costs one complex ``(X*Y, K) @ (K, Z)`` product instead of ``X*Y*Z*K`` cosines; agrees with
    :meth:`MixField.score` up to float32 rounding. Phases are formed in float64.
    """
    f = field.freqs.to(torch.float64)
    k = f.shape[0]
    c = torch.polar(
        field.amps.to(torch.float64),
        field.phases.to(torch.float64) + 2 * math.pi * float(t_days) * field.freq_t.to(torch.float64),
    )
    e = [torch.polar(torch.ones(k, len(a), dtype=torch.float64), 2 * math.pi * f[:, j, None] * a[None])
         for j, a in enumerate(axes)]
    ex, ey, ez = (v.to(device=device, dtype=torch.complex64) for v in e)
    c = c.to(device=device, dtype=torch.complex64)
    kxy = (c[:, None, None] * ex[:, :, None]) * ey[:, None, :]  # (K, X, Y)
    nx, ny, nz = ex.shape[1], ey.shape[1], ez.shape[1]
    s = kxy.reshape(k, nx * ny).T @ ez  # (X*Y, Z)
    return s.real.reshape(nx, ny, nz).contiguous()


def field_on_grid(
    field: MixField,
    shape: Sequence[int],
    spacing_mm: Vec3,
    origin_mm: Vec3 = (0.0, 0.0, 0.0),
    stride: Sequence[int] = (1, 1, 1),
    t_days: float = 0.0,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """``lambda`` on the grid of :func:`grid_points` (same arguments) at time ``t_days``:
    float32 ``(X/sx, Y/sy, Z/sz)`` in [0, 1], on ``device`` (default CPU)."""
    s = _score_grid(field, _axis_coords(shape, spacing_mm, origin_mm, stride), t_days, device)
    return torch.sigmoid(field.sharpness * (s - field.threshold))


# ---------------------------------------------------------------- sampling


def calibrate_threshold(score: Tensor, sharpness: float, ratio: float, tol: float = CALIBRATION_TOL) -> float:
    """The ``theta`` with ``mean(sigmoid(sharpness * (score - theta))) = ratio`` (to ``tol``).

    Safeguarded Newton iteration on the bracket ``[min - 40/a, max + 40/a]`` (the mean decreases
    monotonically in ``theta``); ``score`` is any tensor of field values (e.g. on the label grid).
    """
    s = score.reshape(-1).float()
    a = float(sharpness)
    lo, hi = float(s.min()) - 40.0 / a, float(s.max()) + 40.0 / a
    th = float(s.mean())
    for _ in range(100):
        sig = torch.sigmoid(a * (s - th))
        err = float(sig.mean(dtype=torch.float64)) - ratio
        if abs(err) < tol:
            break
        if err > 0:  # too much of source a: raise the threshold
            lo = th
        else:
            hi = th
        slope = a * float((sig * (1 - sig)).mean(dtype=torch.float64))  # -d mean / d theta
        nxt = th + err / slope if slope > 1e-12 else math.nan
        th = nxt if lo < nxt < hi else 0.5 * (lo + hi)
    else:
        log.warning("field threshold calibration did not converge (mean off by %.2g)", err)
    return th


def sample_field(
    rng: torch.Generator,
    cfg: FieldConfig,
    calibrate_shape: Sequence[int],
    spacing_mm: Vec3,
    origin_mm: Vec3 = (0.0, 0.0, 0.0),
    *,
    device: torch.device | str | None = None,
) -> MixField:
    """Draw one field ``z ~ cfg`` and calibrate its threshold on the label grid.

    Args:
        rng: CPU generator; exactly ``4 + 8 K`` numbers are drawn, whatever their values.
        cfg: the field distribution.
        calibrate_shape: label-grid shape ``(X, Y, Z)`` (voxels) on which the mean of lambda at
            ``t = 0`` is made equal to the sampled ratio.
        spacing_mm, origin_mm: that grid's voxel spacing and the centre of its voxel 0 (mm).
        device: where the calibration grid is evaluated (the field's tensors stay on the CPU).

    Returns:
        the frozen :class:`MixField`; evaluate it anywhere with ``field(p_mm, t_days)`` or
        :func:`field_on_grid`.
    """
    k = cfg.n_features
    wavelength = log_uniform(rng, *cfg.wavelength_mm)
    period = log_uniform(rng, *cfg.period_days)
    ratio = uniform(rng, *cfg.ratio)
    sharpness = log_uniform(rng, *cfg.sharpness)
    dirs = torch.randn(k, 3, generator=rng, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)
    wl = wavelength * 2.0 ** torch.rand(k, generator=rng, dtype=torch.float64)  # [L, 2L)
    amps = wl * (0.5 + torch.rand(k, generator=rng, dtype=torch.float64))
    amps = amps * math.sqrt(2.0) / amps.norm()  # sum A^2 / 2 = 1: unit variance
    phases = 2 * math.pi * torch.rand(k, generator=rng, dtype=torch.float64)
    per = period * 2.0 ** torch.rand(k, generator=rng, dtype=torch.float64)  # [T, 2T)
    sign = torch.where(torch.rand(k, generator=rng, dtype=torch.float64) < 0.5, -1.0, 1.0)
    field = MixField(
        freqs=(dirs / wl[:, None]).float(),
        freq_t=(sign / per).float(),
        phases=phases.float(),
        amps=amps.float(),
        threshold=0.0,
        sharpness=sharpness,
        ratio=ratio,
        wavelength_mm=wavelength,
        period_days=period,
    )
    score = _score_grid(field, _axis_coords(calibrate_shape, spacing_mm, origin_mm, (1, 1, 1)), 0.0, device)
    th = calibrate_threshold(score, sharpness, ratio)
    log.debug("mix field: L=%.1f mm, T=%.0f d, ratio=%.2f, sharpness=%.2f, threshold=%.3f",
              wavelength, period, ratio, sharpness, th)
    return MixField(
        freqs=field.freqs, freq_t=field.freq_t, phases=field.phases, amps=field.amps, threshold=th,
        sharpness=sharpness, ratio=ratio, wavelength_mm=wavelength, period_days=period,
    )


__all__ = [
    "CALIBRATION_TOL", "FieldConfig", "MixField", "calibrate_threshold", "field_on_grid", "grid_points",
    "sample_field",
]
