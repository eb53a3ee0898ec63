"""Longitudinal series: one synthetic patient scanned at several visits.

Same anatomy and the same lesion sites at every visit; between visits the
lesions grow, the oedema changes, and each visit gets its own scanner
appearance and a small rigid head pose change.

Growth model (``docs/MENINGIOMA_FACTS.md`` §3, "FACTS §3" below): per lesion, a one-year
relative growth rate ``r`` (%/yr) drawn log-normally, median 5 %/yr, clipped to 0.5-70 %/yr
(Nakamura 2003: 0.48-72.8 %/yr; Zeidman 2008: 5.8 %/yr volumetric), and a
Gompertz curve (FACTS §3 suggests logistic/Gompertz; sigmoidal is the most
frequent observed pattern, 35 %, Neuro-Oncol Pract 2019)::

    V(t) = K * exp(ln(V0 / K) * exp(-b t)),   b = ln(1 + r) / ln(K / V0),   t in years

so the initial relative rate is ``ln(1 + r)`` per year and the volume saturates
at the capacity ``K = c * V0`` (c drawn log-uniformly). A fraction of lesions
regress (5 % shrank in the 5-year study of FACTS §3): exponential decay at a
small sampled rate. ``growth_model="exponential"`` gives ``V0 * (1 + r) ** t``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F

from menseg.draws import log_uniform, uniform
from menseg.geometry import rotation_matrix
from menseg.utils import derive_seed

if TYPE_CHECKING:
    from menseg.synth.engine import SynthCase, SynthConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LongitudinalConfig:
    """Visit schedule, growth and pose ranges of a longitudinal series."""

    #: Days between consecutive visits, uniform (typical follow-up 3-24 months).
    gap_days: tuple[int, int] = (90, 720)
    #: Median one-year relative growth (%/yr): FACTS §3 suggested model, median ~5 %/yr
    #: (Zeidman 2008 5.8 %/yr; Nakamura 2003 mean 14.6 %/yr, skewed).
    growth_median_pct: float = 5.0
    #: Log-normal sigma of the rate (ln units): ~ +-2.3 sigma spans 0.5-70 %/yr around 5 %/yr.
    growth_sigma: float = 1.0
    #: Clip range of the rate, %/yr (Nakamura 2003: 0.48-72.8 %/yr).
    growth_range_pct: tuple[float, float] = (0.5, 70.0)
    #: Probability that a lesion shrinks (5 % shrank, 5-year prospective study, FACTS §3).
    p_regress: float = 0.05
    #: Shrink rate range, %/yr, for regressing lesions.
    regress_range_pct: tuple[float, float] = (1.0, 10.0)
    #: "gompertz" (saturating; FACTS §3) or "exponential".
    growth_model: Literal["gompertz", "exponential"] = "gompertz"
    #: Gompertz capacity as a multiple of the first-visit volume, log-uniform.
    capacity_ratio: tuple[float, float] = (3.0, 30.0)
    #: Per-visit log-normal jitter (sigma) of the oedema extent on top of its growth with
    #: lesion size (oedema is volume-related, FACTS §1, but varies between scans).
    oedema_jitter: float = 0.2
    #: Rigid pose change per visit: rotation up to this many degrees about each axis ...
    pose_rotation_deg: float = 3.0
    #: ... and translation up to this many mm along each axis (uniform).
    pose_translation_mm: float = 3.0


@dataclass(frozen=True)
class Pose:
    """Rigid head pose relative to the first visit: rotations (deg, about X, Y, Z through the
    grid centre, applied in that order) and translation (mm, RAS)."""

    rotation_deg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    translation_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Growth:
    """Growth of one lesion: rate (%/yr, negative = regressing), model and Gompertz capacity ratio."""

    rate_pct: float
    model: str
    capacity_ratio: float


# ----------------------------------------------------------------------------- sampling


def sample_days(gen: torch.Generator, cfg: LongitudinalConfig, n_visits: int) -> list[int]:
    """Visit days: 0 for the first, then cumulative gaps drawn uniformly from ``cfg.gap_days``."""
    lo, hi = cfg.gap_days
    days = [0]
    for _ in range(n_visits - 1):
        days.append(days[-1] + int(torch.randint(int(lo), int(hi) + 1, (), generator=gen)))
    return days


def sample_growth(gen: torch.Generator, cfg: LongitudinalConfig) -> Growth:
    """One lesion's growth: log-normal rate (median ``growth_median_pct``), or a regression."""
    if uniform(gen) < cfg.p_regress:
        rate = -uniform(gen, *cfg.regress_range_pct)
        return Growth(rate, "exponential", 1.0)
    z = float(torch.randn((), generator=gen, dtype=torch.float64))
    rate = cfg.growth_median_pct * math.exp(cfg.growth_sigma * z)
    rate = min(max(rate, cfg.growth_range_pct[0]), cfg.growth_range_pct[1])
    lo, hi = cfg.capacity_ratio
    cap = log_uniform(gen, lo, hi)
    return Growth(rate, cfg.growth_model, cap)


def sample_pose(gen: torch.Generator, cfg: LongitudinalConfig) -> Pose:
    """Small rigid pose: rotations uniform in +-pose_rotation_deg, shifts in +-pose_translation_mm."""
    r = tuple(uniform(gen, -cfg.pose_rotation_deg, cfg.pose_rotation_deg) for _ in range(3))
    t = tuple(uniform(gen, -cfg.pose_translation_mm, cfg.pose_translation_mm) for _ in range(3))
    return Pose(r, t)  # type: ignore[arg-type]


def volume_at(v0: float, growth: Growth, days: float) -> float:
    """Volume (same unit as ``v0``) after ``days`` under ``growth`` (see module docstring)."""
    t = days / 365.25
    k = math.log1p(growth.rate_pct / 100.0)  # continuous initial rate, 1/yr
    if growth.model == "exponential" or growth.capacity_ratio <= 1.0 or k <= 0:
        return v0 * math.exp(k * t)
    if growth.model != "gompertz":
        raise ValueError(f"unknown growth model {growth.model!r}")
    ln_ratio = math.log(growth.capacity_ratio)  # ln(K / V0)
    b = k / ln_ratio
    return v0 * growth.capacity_ratio * math.exp(-ln_ratio * math.exp(-b * t))


# ----------------------------------------------------------------------------- lesion params


def _volume_field(lesion: Any) -> str:
    names = [f.name for f in dataclasses.fields(lesion)]
    for n in names:
        if n.startswith("volume"):
            return n
    raise TypeError(f"{type(lesion).__name__} has no volume field (fields: {names})")


def lesion_volumes(lesion_params: Any) -> list[float]:
    """Sampled volume of each lesion in ``lesion_params`` (the lesion stage's unit, cm3)."""
    return [float(getattr(les, _volume_field(les))) for les in lesion_params.lesions]


def grow_lesions(lesion_params: Any, volume_factors: list[float], oedema_factors: list[float]) -> Any:
    """Lesion params with each lesion's volume scaled and its oedema extent scaled.

    Oedema fields are the lesion's numeric fields whose name starts with
    ``oedema`` and speaks of extent/size (``*_mm``, ``*extent*``, ``*_cm3``).
    """
    new = []
    for les, fv, fo in zip(lesion_params.lesions, volume_factors, oedema_factors, strict=True):
        changes: dict[str, Any] = {}
        vf = _volume_field(les)
        changes[vf] = float(getattr(les, vf)) * fv
        for f in dataclasses.fields(les):
            v = getattr(les, f.name)
            if (f.name.startswith("oedema") and isinstance(v, float)
                    and any(s in f.name for s in ("_mm", "extent", "_cm3", "depth", "reach"))):
                changes[f.name] = v * fo
        new.append(dataclasses.replace(les, **changes))
    seq = tuple(new) if isinstance(lesion_params.lesions, tuple) else new
    return dataclasses.replace(lesion_params, lesions=seq)


# ----------------------------------------------------------------------------- pose


def apply_pose(tissue: torch.Tensor, pose: Pose, spacing: tuple[float, float, float]) -> torch.Tensor:
    """Move an integer map ``(X, Y, Z)`` rigidly by ``pose`` (nearest neighbour, zeros outside).

    Rotation about the grid centre in physical (mm) space, so anisotropic
    spacing is handled.
    """
    if all(r == 0 for r in pose.rotation_deg) and all(t == 0 for t in pose.translation_mm):
        return tissue
    dev = tissue.device
    shape = tissue.shape
    rot = rotation_matrix([math.radians(a) for a in pose.rotation_deg])
    # Output voxel (normalised n, align_corners=True) -> mm: p = S n, S = diag((N-1)/2 * spacing).
    half = torch.tensor([(n - 1) / 2 * s for n, s in zip(shape, spacing, strict=True)], dtype=torch.float64)
    s_mat, s_inv = torch.diag(half), torch.diag(1.0 / half)
    t = torch.tensor(pose.translation_mm, dtype=torch.float64)
    # Source of output point p: R^T (p - t)
    a = s_inv @ rot.T @ s_mat
    b = -(s_inv @ rot.T @ t)
    # affine_grid orders coordinates (W, H, D) = (Z, Y, X): reverse the axes.
    perm = torch.eye(3, dtype=torch.float64).flip(0)
    theta = torch.cat([perm @ a @ perm, (perm @ b)[:, None]], dim=1)[None].to(torch.float32).to(dev)
    grid = F.affine_grid(theta, [1, 1, *shape], align_corners=True)
    moved = F.grid_sample(tissue[None, None].to(torch.float32), grid, mode="nearest",
                          padding_mode="zeros", align_corners=True)
    return moved[0, 0].round().to(tissue.dtype)


# ----------------------------------------------------------------------------- series


def generate_series(
    cfg: SynthConfig,
    seed: int,
    patient_index: int,
    n_visits: int = 3,
    device: str | torch.device = "cpu",
) -> list[SynthCase]:
    """Visits of synthetic patient ``patient_index``: a list of ``n_visits`` SynthCase by day.

    Visit k's ``params`` add ``kind="visit"``, ``patient_index``, ``visit`` (k),
    ``day`` (days since the first visit, int), ``growth`` (per lesion) and
    ``lesion_volumes_cm3`` (sampled volume per lesion at that visit). The first
    visit defines the head frame (no pose change); later visits get their own
    small rigid pose. Anatomy, lesion sites and shapes come from the patient's
    seeds; appearance and render noise from the visit's.
    """
    from menseg.errors import MensegError
    from menseg.synth.engine import STAGES, resolve_device, run_chain

    if n_visits < 1:
        raise MensegError(f"visits must be >= 1, got {n_visits}")
    dev = resolve_device(device)
    lc = cfg.longitudinal
    pseed = derive_seed(seed, "patient", patient_index)
    days = sample_days(torch.Generator().manual_seed(derive_seed(pseed, "days")), lc, n_visits)
    out: list[SynthCase] = []
    growths: list[Growth] | None = None
    for k, day in enumerate(days):
        seeds = {s: derive_seed(pseed, s) for s in ("anatomy", "lesion")}
        seeds.update({s: derive_seed(pseed, "visit", k, s) for s in STAGES if s not in seeds})
        pose = None if k == 0 else sample_pose(
            torch.Generator().manual_seed(derive_seed(pseed, "visit", k, "pose")), lc)
        info: dict[str, Any] = {}

        def hook(lp: Any, k: int = k, day: int = day, info: dict[str, Any] = info) -> Any:
            nonlocal growths
            v0 = lesion_volumes(lp)
            if growths is None:
                growths = [
                    sample_growth(torch.Generator().manual_seed(derive_seed(pseed, "growth", j)), lc)
                    for j in range(len(v0))
                ]
            vol_f = [volume_at(1.0, g, day) for g in growths]
            jit = torch.Generator().manual_seed(derive_seed(pseed, "visit", k, "oedema"))
            oed_f = [
                f ** (1 / 3) * math.exp(lc.oedema_jitter * float(torch.randn((), generator=jit,
                                                                               dtype=torch.float64)))
                if k > 0 else 1.0
                for f in vol_f
            ]
            info["lesion_volumes_cm3"] = [v * f for v, f in zip(v0, vol_f, strict=True)]
            return grow_lesions(lp, vol_f, oed_f) if k > 0 else lp

        base = {"kind": "visit", "seed": int(seed), "patient_index": int(patient_index),
                "visit": k, "day": int(day)}
        case = run_chain(cfg, seeds, dev, lesion_hook=hook, pose=pose, base=base)
        assert growths is not None
        case.params["growth"] = [dataclasses.asdict(g) for g in growths]
        case.params["lesion_volumes_cm3"] = info["lesion_volumes_cm3"]
        out.append(case)
    return out


__all__ = [
    "Growth",
    "LongitudinalConfig",
    "Pose",
    "apply_pose",
    "generate_series",
    "grow_lesions",
    "lesion_volumes",
    "sample_days",
    "sample_growth",
    "sample_pose",
    "volume_at",
]
