"""Meningiomas as the disease looks: dural-based, growing inward, with tail, core, oedema, mass effect.

Stage of the synthesis chain (issue 4, point 2), split as everywhere in ``menseg.synth``:
:func:`sample_lesion_params` draws a JSON-serialisable :class:`LesionParams` from a
``torch.Generator``; :func:`apply_lesions` is a pure function of (tissue map, params).

Per lesion (all lengths in mm, volumes in cm3, voxel coordinates in index units):

* **site and seed**: a site drawn from the FACTS §1 priors among the anatomy's dural regions, a
  seed voxel on it; the inward normal from the (Gaussian-weighted) gradient of the brain mask
  around the seed, refined by the local plane of the dura (PCA); on sheet-like dura (falx,
  tentorium) where the gradient vanishes the tumour side is drawn at random.
* **shape**: an implicit star-shaped function around a centre near the seed, ``F = r_ellipsoid(x)
  * exp(-amp * n(direction))`` with ``n`` a smooth random function of direction (lobulation).
  The tumour is the ``V / voxel volume`` voxels with the smallest ``F`` among intracranial voxels
  (exact volume; the skull clips it, so it has a broad dural base and grows inward). Star-shaped
  sublevel sets keep it connected. Shapes: globular, lobulated, en plaque (thin sheet).
* **mass effect**: a radial, volume-compensating backward displacement around the tumour centre,
  ``r_src = r - w(r) * (r - cbrt(r^3 - s R^3))`` with a compact envelope ``w``; applied to the
  tissue map (nearest) before painting; the outer dural shell and the skull outline stay.
* **core** (NETC): cyst / necrosis / calcification blob(s) strictly inside the tumour.
* **dural tail**: DURAL_TAIL on and just inside the dura next to the base, tapering in thickness.
* **oedema** (SNFH): grown geodesically from the tumour (through a few mm of cortex, then in WM
  only) on a coarse (~3 mm) grid, thresholded with a spatially varying extent; labelled in WM only.

Everything is computed in each lesion's bounding box, so cost scales with the lesion, not the
volume. :mod:`menseg.synth.inject` runs the same machinery on a pseudo tissue map estimated from a
real scan (voxels of its own label marked :data:`EXISTING`, which no lesion overwrites or displaces).

FACTS §n: section n of ``docs/MENINGIOMA_FACTS.md`` (sourced meningioma and MR facts).
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from menseg.draws import draw_seed, log_uniform, uniform
from menseg.synth.tissues import (
    BACKGROUND,
    CALCIFICATION,
    CSF,
    CYST,
    DURA,
    DURAL_TAIL,
    GM,
    LESION,
    N_TISSUES,
    NECROSIS,
    OEDEMA,
    TUMOUR,
    WM,
    tissue_to_label,
)

log = logging.getLogger(__name__)

Vec3 = tuple[float, float, float]
Idx3 = tuple[int, int, int]

CORE_KINDS: tuple[str, ...] = ("none", "cyst", "necrosis", "calcification")
SHAPES: tuple[str, ...] = ("globular", "lobulated", "en_plaque")
_CORE_TISSUE = {"cyst": CYST, "necrosis": NECROSIS, "calcification": CALCIFICATION}
#: Pseudo-tissue marker for voxels of an existing label in injected scans (never overwritten).
EXISTING = N_TISSUES


# ----------------------------------------------------------------------------- config / params
@dataclass(frozen=True)
class LesionConfig:
    """Randomisation ranges of the lesion stage (mm, cm3); every default cites FACTS (§ numbers)."""

    #: Site priors (FACTS §1, brainsciencefoundation: falx/parasagittal 25%, convexity 20%, sphenoid
    #: wing 20%, olfactory groove 10% + suprasellar 10% = skull base, posterior fossa 10% of which
    #: tentorial ~2-5% (unverified), intraventricular 2%). Missing regions are dropped, the rest
    #: renormalised; with no region at all, any dura voxel is a seed.
    site_weights: tuple[tuple[str, float], ...] = (
        ("parasagittal_falx", 0.25), ("convexity", 0.20), ("sphenoid_wing", 0.20),
        ("skull_base", 0.20), ("posterior_fossa", 0.07), ("tentorium", 0.03),
        ("intraventricular", 0.02),
    )
    #: Log-normal volume: median 10 cm3 between incidental (mean 4.74 cm3) and symptomatic
    #: (37.33 cm3) tumours (FACTS §1, Acta Neurochir 2021; Nakamura 2003 9 cm3); sigma 1.2 makes the
    #: central 95% span ~1-100 cm3, clipped to [min, max] (spans <1 to >100 cm3 as issue 4 asks).
    volume_median_cm3: float = 10.0
    volume_log_sigma: float = 1.2
    volume_range_cm3: tuple[float, float] = (0.3, 150.0)
    #: Shapes: most are globular/hemispheric (Watts 2014), en plaque ~2-9% (FACTS §1, unverified),
    #: lobulation frequent in grade 2-3 (~20% of surgical series, FACTS §1 WHO grade).
    shape_probs: tuple[float, float, float] = (0.65, 0.28, 0.07)  # globular, lobulated, en_plaque
    #: Dural tail in 58.6% (Rokni-Yazdi 2006), 60-72% (FACTS §1); 5-30 mm long, 1-3 mm thick.
    tail_prob: float = 0.6
    tail_length_mm: tuple[float, float] = (5.0, 30.0)
    tail_thickness_mm: tuple[float, float] = (1.0, 3.0)
    #: Cores (NETC), independent draws, at most one kind per lesion (first hit in this order):
    #: calcification ~25% (FACTS §1, jbsr 2751), cyst 1.6-11.7% (Go 2018: 9.6%), necrosis
    #: uncommon, grade 2 criterion (FACTS §1, frequency unverified: 5%).
    calcification_prob: float = 0.25
    cyst_prob: float = 0.10
    necrosis_prob: float = 0.05
    core_fraction: tuple[float, float] = (0.05, 0.35)  # of the tumour volume (unverified)
    #: P(oedema) rises with volume: ~20% below 5 cm3 to >70% above 30 cm3 (FACTS §1 suggested
    #: model): logistic in log volume, p_min + (p_max - p_min) * sigmoid(ln(V / v50) / width).
    oedema_p_range: tuple[float, float] = (0.15, 0.80)
    oedema_v50_cm3: float = 12.0
    oedema_log_width: float = 0.5
    #: Geodesic extent from the tumour surface, log-uniform (none to large; unverified).
    oedema_extent_mm: tuple[float, float] = (3.0, 40.0)
    #: Cortex the oedema may cross before it must stay in WM (cortical thickness ~2.5-4 mm).
    oedema_cortex_mm: float = 4.0
    #: Multiple meningiomas in 1-10% of patients; simulator prior ~5% (FACTS §1).
    multiple_prob: float = 0.05
    max_lesions: int = 3
    #: Fraction of the tumour volume compensated by displacing brain (1 = all; unverified).
    mass_effect: tuple[float, float] = (0.3, 1.0)


@dataclass(frozen=True)
class Lesion:
    """One sampled meningioma. Shape lengths scale with ``volume_cm3`` (so growth is a volume change).

    seed_voxel: (3,) voxel index of the dural seed; normal: (3,) unit inward normal (toward brain);
    tangent: (3,) unit vector orthogonal to ``normal`` (first in-plane axis); axis_ratio: semi-axes
    (tangent, normal x tangent, normal) relative to the equivalent-sphere radius; centre_offset:
    centre = seed + offset * semi-axis_n * normal; noise_*: direction noise of the surface.
    """

    site: str
    seed_voxel: Idx3
    normal: Vec3
    tangent: Vec3
    shape: str
    volume_cm3: float
    axis_ratio: Vec3
    centre_offset: float
    noise_amp: float
    noise_cells: int
    noise_seed: int
    mass_effect: float
    tail: bool
    tail_length_mm: float
    tail_thickness_mm: float
    tail_angle: float  # direction of the longest tail in the dural plane (rad from tangent)
    core: str
    core_fraction: float
    core_offset: Vec3  # core centre offset from the tumour centroid, in equivalent radii
    core_seed: int
    oedema: bool
    oedema_extent_mm: float
    oedema_seed: int


@dataclass(frozen=True)
class LesionParams:
    """All lesions of a case, plus the grid they were sampled on (spacing mm, shape voxels)."""

    spacing: Vec3
    shape: Idx3
    lesions: tuple[Lesion, ...] = ()


@dataclass
class LesionResult:
    """Output of :func:`apply_lesions`.

    tissue: (X, Y, Z) int64 with lesion classes painted; label: (X, Y, Z) uint8 BraTS-MEN;
    boxes: per lesion ``(lo, hi)`` voxel box; sources: per lesion (3, bx, by, bz) float32
    backward-mapping source coordinates in global voxel units (mass effect, identity where
    untouched); moved: per lesion (bx, by, bz) bool, voxels whose content was displaced.
    """

    tissue: torch.Tensor
    label: torch.Tensor
    boxes: list[tuple[Idx3, Idx3]] = field(default_factory=list)
    sources: list[torch.Tensor] = field(default_factory=list)
    moved: list[torch.Tensor] = field(default_factory=list)

    def displacement(self) -> torch.Tensor:
        """(3, X, Y, Z) float32 backward displacement (voxels, source - x) of the mass effect.

        Lesions are applied in sequence; this sums their fields (an approximation where they overlap).
        """
        out = torch.zeros((3, *self.tissue.shape), dtype=torch.float32, device=self.tissue.device)
        for (lo, hi), src in zip(self.boxes, self.sources, strict=True):
            grid = _box_index_grid(lo, hi, src.device)
            out[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] += src - grid
        return out


class AnatomyLike(Protocol):
    """What the lesion stage reads from an anatomy (see :class:`menseg.synth.anatomy.Anatomy`)."""

    tissue: torch.Tensor
    regions: dict[str, torch.Tensor]
    brain_mask: torch.Tensor


# ----------------------------------------------------------------------------- small helpers
#: The lesion stage's uniform draw (also injection's): float32 ``u``, which its recorded parameters,
#: and so every synthetic lesion, come from (:func:`menseg.draws.uniform`).
u32 = functools.partial(uniform, dtype=torch.float32)


def dilate6(m: torch.Tensor) -> torch.Tensor:
    """Binary dilation of a bool (X, Y, Z) mask with the 6-neighbourhood (by slicing; fast on CPU)."""
    o = m.clone()
    o[1:] |= m[:-1]
    o[:-1] |= m[1:]
    o[:, 1:] |= m[:, :-1]
    o[:, :-1] |= m[:, 1:]
    o[:, :, 1:] |= m[:, :, :-1]
    o[:, :, :-1] |= m[:, :, 1:]
    return o


def _box_index_grid(lo: Idx3, hi: Idx3, device: torch.device) -> torch.Tensor:
    axes = [torch.arange(a, b, device=device, dtype=torch.float32) for a, b in zip(lo, hi, strict=True)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


def smooth_noise(shape: tuple[int, ...], cells: tuple[int, ...], seed: int,
                  device: torch.device) -> torch.Tensor:
    """Low-frequency N(0,1)-ish field of ``shape``: a coarse random grid upsampled trilinearly."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 1, *[max(2, c) for c in cells]), generator=g).to(device)
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0, 0]


def _direction_noise(u: torch.Tensor, cells: int, seed: int) -> torch.Tensor:
    """Smooth random function of a direction ``u`` (..., 3) in [-1, 1]^3, clamped to [-2, 2]."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn((1, 1, cells, cells, cells), generator=g).to(u.device)
    flat = u.reshape(1, -1, 1, 1, 3)
    out = F.grid_sample(coarse, flat, mode="bilinear", align_corners=True)
    return out.reshape(u.shape[:-1]).clamp(-2.0, 2.0)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(1e-8)


# ----------------------------------------------------------------------------- sampling
def _inward_normal(
    brain: torch.Tensor, dura: torch.Tensor, idx: Idx3, spacing: Vec3, flip: bool, sigma_mm: float = 4.0
) -> tuple[torch.Tensor, bool]:
    """Unit inward normal (3,) at voxel ``idx`` (in voxel-index axes, mm-weighted) and sheet flag.

    Gradient of the Gaussian-smoothed brain mask at the seed (points into the brain); direction
    refined by the smallest principal axis of the nearby dura voxels. Where the gradient is
    weak (falx, tentorium: brain on both sides) the side is ``flip``-chosen.
    """
    sp = torch.tensor(spacing, dtype=torch.float32)
    rad = [max(1, math.ceil(2.5 * sigma_mm / s)) for s in spacing]
    lo = [max(0, i - r) for i, r in zip(idx, rad, strict=True)]
    hi = [min(n, i + r + 1) for i, r, n in zip(idx, rad, brain.shape, strict=True)]
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    grid = _box_index_grid(tuple(lo), tuple(hi), torch.device("cpu"))  # type: ignore[arg-type]
    d = (grid - torch.tensor(idx, dtype=torch.float32)[:, None, None, None]) * sp[:, None, None, None]
    w = torch.exp(-(d ** 2).sum(0) / (2 * sigma_mm ** 2))
    b = brain[sl].cpu().float()
    grad = (w * b * d).sum((1, 2, 3)) / (w.sum() * sigma_mm)  # dimensionless, ~0.4 at a flat edge
    dm = dura[sl].cpu() & (w > math.exp(-2.0))
    e1 = None
    if int(dm.sum()) >= 6:
        pts = d[:, dm].T
        pts = pts - pts.mean(0)
        _, vecs = torch.linalg.eigh(pts.T @ pts)
        e1 = vecs[:, 0]
    gnorm = float(grad.norm())
    sheet = gnorm < 0.12
    if e1 is None:
        n = _unit(grad) if gnorm > 1e-6 else torch.tensor([0.0, 0.0, 1.0])
    elif sheet:
        n = e1 if not flip else -e1
    else:
        n = e1 * (1.0 if float(e1 @ grad) >= 0 else -1.0)
        if abs(float(_unit(grad) @ n)) < 0.5:  # PCA plane unreliable (corner): trust the gradient
            n = _unit(grad)
    # normal in voxel-index axes for mm-isotropic geometry: keep it in mm (physical) directions
    return _unit(n), sheet


def _lesion_volume(gen: torch.Generator, cfg: LesionConfig) -> float:
    v = cfg.volume_median_cm3 * math.exp(cfg.volume_log_sigma * float(torch.randn((), generator=gen)))
    return float(min(max(v, cfg.volume_range_cm3[0]), cfg.volume_range_cm3[1]))


def oedema_probability(volume_cm3: float, cfg: LesionConfig) -> float:
    """P(oedema | volume) (FACTS §1 suggested model: ~20% below 5 cm3, >70% above 30 cm3)."""
    lo, hi = cfg.oedema_p_range
    z = math.log(max(volume_cm3, 1e-6) / cfg.oedema_v50_cm3) / cfg.oedema_log_width
    return lo + (hi - lo) / (1.0 + math.exp(-z))


def _sample_one(gen: torch.Generator, cfg: LesionConfig, anatomy: AnatomyLike, spacing: Vec3,
                sites: list[tuple[str, float]], brain: torch.Tensor, dura: torch.Tensor) -> Lesion:
    w = torch.tensor([s[1] for s in sites], dtype=torch.float64)
    site = sites[int(torch.multinomial(w, 1, generator=gen))][0]
    mask = anatomy.regions[site] if site in anatomy.regions else dura
    pts = mask.nonzero()
    seed = tuple(int(v) for v in pts[int(torch.randint(0, pts.shape[0], (), generator=gen))].tolist())
    flip = bool(torch.rand((), generator=gen) < 0.5)
    n, _ = _inward_normal(brain, dura, seed, spacing, flip)  # type: ignore[arg-type]
    if site == "intraventricular":  # grows into the ventricle, away from the parenchyma
        n = -n
    a = torch.randn(3, generator=gen)
    t = _unit(a - (a @ n) * n)
    sp_w = torch.tensor(cfg.shape_probs, dtype=torch.float64)
    shape = SHAPES[int(torch.multinomial(sp_w, 1, generator=gen))]
    vol = _lesion_volume(gen, cfg)
    r_eq = (3 * vol * 1000 / (4 * math.pi)) ** (1 / 3)
    if shape == "en_plaque":
        thick = u32(gen, 2.0, 6.0)  # sheet half-thickness mm (en plaque: thin sheet along the dura)
        an = min(1.0, thick / r_eq)
        at = (1.0 / an) ** 0.5
        ratio = (at * u32(gen, 0.8, 1.25), at * u32(gen, 0.8, 1.25), an)
        offset = u32(gen, 0.0, 0.5)
        amp, cells = u32(gen, 0.05, 0.15), 3
    else:
        ratio = (u32(gen, 0.8, 1.25), u32(gen, 0.8, 1.25), u32(gen, 0.7, 1.1))
        offset = u32(gen, -0.25, 0.35)  # centre near the dura: broad dural base
        amp, cells = ((u32(gen, 0.03, 0.12), 3) if shape == "globular" else (u32(gen, 0.15, 0.3), 5))
    norm = (ratio[0] * ratio[1] * ratio[2]) ** (1 / 3)
    ratio = tuple(r / norm for r in ratio)
    tail = bool(torch.rand((), generator=gen) < cfg.tail_prob)
    tail_len = u32(gen, *cfg.tail_length_mm)
    tail_th = u32(gen, *cfg.tail_thickness_mm)
    tail_angle = u32(gen, 0.0, 2 * math.pi)
    core = "none"
    draws = [bool(torch.rand((), generator=gen) < p)
             for p in (cfg.calcification_prob, cfg.cyst_prob, cfg.necrosis_prob)]
    for kind, hit in zip(("calcification", "cyst", "necrosis"), draws, strict=True):
        if hit:
            core = kind
            break
    core_frac = u32(gen, *cfg.core_fraction)
    if core == "calcification":
        core_frac *= 0.5  # calcified parts are usually smaller clumps (unverified)
    core_off = tuple(float(v) for v in (torch.randn(3, generator=gen) * 0.25).tolist())
    oed = bool(torch.rand((), generator=gen) < oedema_probability(vol, cfg))
    oed_ext = log_uniform(gen, *cfg.oedema_extent_mm, dtype=torch.float32)
    return Lesion(
        site=site, seed_voxel=seed, normal=tuple(float(v) for v in n.tolist()),  # type: ignore[arg-type]
        tangent=tuple(float(v) for v in t.tolist()), shape=shape, volume_cm3=vol,  # type: ignore[arg-type]
        axis_ratio=ratio, centre_offset=offset, noise_amp=amp, noise_cells=cells,  # type: ignore[arg-type]
        noise_seed=draw_seed(gen), mass_effect=u32(gen, *cfg.mass_effect), tail=tail, tail_length_mm=tail_len,
        tail_thickness_mm=tail_th, tail_angle=tail_angle, core=core, core_fraction=core_frac,
        core_offset=core_off, core_seed=draw_seed(gen), oedema=oed, oedema_extent_mm=oed_ext,  # type: ignore[arg-type]
        oedema_seed=draw_seed(gen),
    )


def sample_lesion_params(
    gen: torch.Generator, cfg: LesionConfig, anatomy: AnatomyLike, spacing: Vec3 | None = None
) -> LesionParams:
    """Draw the lesions of one case on ``anatomy`` (tissue (X, Y, Z), regions, brain_mask).

    ``spacing`` (mm) defaults to ``anatomy.spacing`` when present, else 1 mm.
    """
    if spacing is None:
        spacing = tuple(getattr(anatomy, "spacing", (1.0, 1.0, 1.0)))  # type: ignore[assignment]
    spacing = tuple(float(s) for s in spacing)  # type: ignore[assignment]
    tissue = anatomy.tissue
    dura = tissue == DURA
    brain = anatomy.brain_mask if anatomy.brain_mask is not None else (tissue != BACKGROUND) & ~dura
    sites = [(name, float(w)) for name, w in cfg.site_weights
             if w > 0 and name in anatomy.regions and bool(anatomy.regions[name].any())]
    if not sites:
        if not bool(dura.any()):
            raise ValueError("anatomy has no dura voxels to seed a meningioma on")
        sites = [("dura", 1.0)]
    n = 1
    if torch.rand((), generator=gen) < cfg.multiple_prob:
        n = int(torch.randint(2, max(2, cfg.max_lesions) + 1, (), generator=gen))
    lesions = tuple(_sample_one(gen, cfg, anatomy, spacing, sites, brain, dura) for _ in range(n))  # type: ignore[arg-type]
    return LesionParams(spacing=spacing, shape=tuple(tissue.shape), lesions=lesions)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- geometry per lesion
def _geometry(les: Lesion, spacing: Vec3) -> dict[str, Any]:
    """Derived sizes (mm) and boxes of a lesion: pure function of its params."""
    r_eq = (3 * les.volume_cm3 * 1000 / (4 * math.pi)) ** (1 / 3)
    axes = [r_eq * a for a in les.axis_ratio]
    n = torch.tensor(les.normal)
    seed_mm = torch.tensor(les.seed_voxel, dtype=torch.float32) * torch.tensor(spacing)
    centre = seed_mm + n * les.centre_offset * axes[2]
    reach = 1.35 * max(axes) * math.exp(2.0 * les.noise_amp)  # star-shaped: r <= thr * a * e^(2 amp)
    mass_r = 2.5 * r_eq
    oed = 1.3 * les.oedema_extent_mm + 4.0 if les.oedema else 0.0
    tail = les.tail_length_mm + 2.0 if les.tail else 0.0
    half = max(reach + max(oed, tail), mass_r + 1.0)
    return {"r_eq": r_eq, "axes": axes, "centre": centre, "seed_mm": seed_mm, "reach": reach,
            "mass_r": mass_r, "half": half}


def _box(centre_mm: torch.Tensor, half_mm: float, spacing: Vec3, shape: Idx3) -> tuple[Idx3, Idx3]:
    lo, hi = [], []
    for c, s, n in zip(centre_mm.tolist(), spacing, shape, strict=True):
        lo.append(max(0, int(math.floor((c - half_mm) / s))))
        hi.append(min(n, int(math.ceil((c + half_mm) / s)) + 1))
    return tuple(lo), tuple(hi)  # type: ignore[return-value]


def _axis_mm(lo: Idx3, hi: Idx3, spacing: Vec3, centre: torch.Tensor,
             device: torch.device) -> list[torch.Tensor]:
    """Broadcastable per-axis mm offsets from ``centre``: shapes (bx,1,1), (1,by,1), (1,1,bz)."""
    out = []
    for k in range(3):
        v = torch.arange(lo[k], hi[k], device=device, dtype=torch.float32) * spacing[k] - float(centre[k])
        shp = [1, 1, 1]
        shp[k] = -1
        out.append(v.view(shp))
    return out


def _tumour_mask(les: Lesion, geo: dict[str, Any], sub: torch.Tensor, lo: Idx3,
                 spacing: Vec3) -> torch.Tensor:
    """Bool mask (box shape) of the tumour: the k voxels with the smallest implicit value."""
    dev = sub.device
    n = torch.tensor(les.normal, device=dev)
    t1 = torch.tensor(les.tangent, device=dev)
    t2 = torch.linalg.cross(n, t1)
    ax = _axis_mm(lo, tuple(a + b for a, b in zip(lo, sub.shape, strict=True)), spacing, geo["centre"], dev)  # type: ignore[arg-type]
    a1, a2, an = geo["axes"]
    q = [(ax[0] * v[0] + ax[1] * v[1] + ax[2] * v[2]) / a for v, a in ((t1, a1), (t2, a2), (n, an))]
    r = torch.sqrt(q[0] ** 2 + q[1] ** 2 + q[2] ** 2)
    u = torch.stack(q, -1) / r.clamp_min(1e-6)[..., None]
    noise = _direction_noise(u, les.noise_cells, les.noise_seed)
    f = r * torch.exp(-les.noise_amp * noise)
    # any class but background, lesion tissue and an injected scan's existing label (label-map
    # anatomies carry user classes >= 100, which the tumour may grow into like brain tissue)
    allowed = (sub != BACKGROUND) & (sub != EXISTING)
    for t in LESION:
        allowed &= sub != t
    f = torch.where(allowed, f, torch.full_like(f, float("inf")))
    sv = [s - o for s, o in zip(les.seed_voxel, lo, strict=True)]
    if all(0 <= s < m for s, m in zip(sv, sub.shape, strict=True)) and bool(allowed[tuple(sv)]):
        f[tuple(sv)] = -1.0  # the tumour always holds its dural seed
    voxvol = spacing[0] * spacing[1] * spacing[2] / 1000.0
    k = min(max(1, round(les.volume_cm3 / voxvol)), int(allowed.sum()))
    if k <= 0:
        return torch.zeros_like(allowed)
    thr = torch.kthvalue(f.flatten(), k).values
    return (f <= thr) & allowed


def _mass_effect(les: Lesion, geo: dict[str, Any], lo: Idx3, hi: Idx3, spacing: Vec3,
                 shape: Idx3, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward source coordinates (3, box) in global voxel units and the moved mask (box)."""
    ax = _axis_mm(lo, hi, spacing, geo["centre"], device)
    r = torch.sqrt(ax[0] ** 2 + ax[1] ** 2 + ax[2] ** 2)
    rs = geo["mass_r"]
    s_r3 = les.mass_effect * geo["r_eq"] ** 3
    w = (1 - (r / rs) ** 2).clamp_min(0) ** 2
    r_src = r - w * (r - (r ** 3 - s_r3).clamp_min(0) ** (1 / 3))
    scale = r_src / r.clamp_min(1e-6)
    moved = (w > 0) & ((r - r_src) * scale.new_tensor(1.0) > 0.05 * min(spacing))
    src = []
    for k in range(3):
        c = float(geo["centre"][k])
        pos = (ax[k] * scale + c) / spacing[k]
        pos = pos.expand(r.shape).clamp(0, shape[k] - 1)
        idx = torch.arange(lo[k], hi[k], device=device, dtype=torch.float32)
        idx = idx.view([-1 if j == k else 1 for j in range(3)])
        src.append(torch.where(moved, pos, idx.expand(r.shape)))
    return torch.stack(src), moved


def _paint_core(les: Lesion, geo: dict[str, Any], sub: torch.Tensor, tum: torch.Tensor, lo: Idx3,
                spacing: Vec3) -> None:
    interior = tum & ~dilate6(~tum)
    n_int = int(interior.sum())
    if les.core == "none" or n_int < 2:
        return
    idx = interior.nonzero().float()
    sp = torch.tensor(spacing, device=sub.device)
    centroid = (tum.nonzero().float().mean(0) + torch.tensor(lo, device=sub.device)) * sp
    cc = centroid + torch.tensor(les.core_offset, device=sub.device) * geo["r_eq"]
    d = (idx + torch.tensor(lo, device=sub.device)) * sp - cc
    dist = d.norm(dim=1)
    u = d / dist.clamp_min(1e-6)[:, None]
    if les.core == "calcification":  # clumped / speckled: strong high-frequency noise
        noise = _direction_noise(u, 7, les.core_seed) * 0.6
        g = torch.Generator().manual_seed(les.core_seed + 1)
        noise = noise + 0.8 * torch.randn(dist.shape, generator=g).to(dist.device)
    else:  # cyst smooth and round, necrosis irregular
        amp = 0.05 if les.core == "cyst" else 0.3
        noise = _direction_noise(u, 5, les.core_seed) * amp
    f = dist * torch.exp(-noise)
    k = max(1, min(n_int, round(les.core_fraction * int(tum.sum()))))
    thr = torch.kthvalue(f, k).values
    pick = idx[f <= thr].long()
    sub[pick[:, 0], pick[:, 1], pick[:, 2]] = _CORE_TISSUE[les.core]


def _paint_tail(les: Lesion, geo: dict[str, Any], sub: torch.Tensor, tum: torch.Tensor, lo: Idx3,
                spacing: Vec3) -> None:
    dura = sub == DURA
    base = tum & dilate6(dura)
    if not bool(base.any()):
        return
    dev = sub.device
    hi = tuple(a + b for a, b in zip(lo, sub.shape, strict=True))
    ax = _axis_mm(lo, hi, spacing, geo["seed_mm"], dev)  # type: ignore[arg-type]
    n = torch.tensor(les.normal, device=dev)
    t1 = torch.tensor(les.tangent, device=dev)
    t2 = torch.linalg.cross(n, t1)
    dirv = math.cos(les.tail_angle) * t1 + math.sin(les.tail_angle) * t2
    dist = torch.sqrt(ax[0] ** 2 + ax[1] ** 2 + ax[2] ** 2)
    rb = float(dist.expand(sub.shape)[base].max())
    along = ax[0] * dirv[0] + ax[1] * dirv[1] + ax[2] * dirv[2]
    normal_c = ax[0] * n[0] + ax[1] * n[1] + ax[2] * n[2]
    tang = torch.sqrt((dist ** 2 - normal_c ** 2).clamp_min(0))
    cosang = along / tang.clamp_min(1e-6)
    length = les.tail_length_mm * (0.35 + 0.65 * cosang.clamp_min(0))  # longest along tail_angle
    d = dist - rb
    within = (d <= length) & ~tum
    thick = les.tail_thickness_mm * (1 - d.clamp_min(0) / length.clamp_min(1e-6))  # thickest at the base
    region = dura & within
    grow_ok = within & ((sub == CSF) | (sub == GM) | (sub == DURA))
    step = min(spacing)
    for i in range(1, math.ceil(les.tail_thickness_mm / step)):
        region = region | (dilate6(region) & grow_ok & (thick >= (i + 0.5) * step))
    sub[region] = DURAL_TAIL


def _paint_oedema(les: Lesion, geo: dict[str, Any], sub: torch.Tensor, tum: torch.Tensor,
                  spacing: Vec3) -> None:
    """Oedema grown geodesically from the tumour through <= cortex_mm of GM, then WM only."""
    f = [max(1, round(3.0 / s)) for s in spacing]
    cstep = max(fk * s for fk, s in zip(f, spacing, strict=True))
    wm = (sub == WM).float()[None, None]
    brain = ((sub == WM) | (sub == GM)).float()[None, None]
    pool = lambda x: F.avg_pool3d(x, f, f, ceil_mode=True)[0, 0]  # noqa: E731
    wm_c = pool(wm) > 0.2
    brain_c = pool(brain) > 0.2
    reached = F.max_pool3d(tum.float()[None, None], f, f, ceil_mode=True)[0, 0] > 0
    dist = torch.where(reached, 0.0, float("inf"))
    n_iter = math.ceil(1.5 * les.oedema_extent_mm / cstep)
    n_bridge = max(1, math.ceil(geo["cortex_mm"] / cstep))
    for i in range(1, n_iter + 1):
        ok = brain_c if i <= n_bridge else wm_c
        new = dilate6(reached) & ok & ~reached
        if not bool(new.any()):
            break
        dist[new] = i * cstep
        reached |= new
    for k in range(3):
        dist = dist.repeat_interleave(f[k], dim=k)
    dist = dist[: sub.shape[0], : sub.shape[1], : sub.shape[2]]
    cells = tuple(max(2, math.ceil(n * s / 20.0)) for n, s in zip(sub.shape, spacing, strict=True))
    noise = smooth_noise(tuple(sub.shape), cells, les.oedema_seed, sub.device)
    thr = les.oedema_extent_mm * torch.exp(0.35 * noise)
    sub[(sub == WM) & (dist <= thr) & ~tum] = OEDEMA


def _apply_one(tissue: torch.Tensor, les: Lesion, spacing: Vec3, cortex_mm: float
               ) -> tuple[tuple[Idx3, Idx3], torch.Tensor, torch.Tensor]:
    shape: Idx3 = tuple(tissue.shape)  # type: ignore[assignment]
    geo = _geometry(les, spacing)
    geo["cortex_mm"] = cortex_mm
    lo, hi = _box(geo["centre"], geo["half"], spacing, shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    sub = tissue[sl]  # view: painted in place
    orig = sub.clone()
    # tumour in its own (smaller) box, on the unwarped anatomy
    tlo, thi = _box(geo["centre"], geo["reach"], spacing, shape)
    tlo = tuple(max(a, b) for a, b in zip(tlo, lo, strict=True))
    thi = tuple(min(a, b) for a, b in zip(thi, hi, strict=True))
    tsl = tuple(slice(a - b, c - b) for a, b, c in zip(tlo, lo, thi, strict=True))
    tum = torch.zeros_like(sub, dtype=torch.bool)
    tum[tsl] = _tumour_mask(les, geo, sub[tsl], tlo, spacing)  # type: ignore[arg-type]
    # mass effect: backward nearest warp of the healthy tissue, skull outline and outer dura kept
    src, moved = _mass_effect(les, geo, lo, hi, spacing, shape, tissue.device)
    if bool(moved.any()):
        loc = [(src[k].round().long() - lo[k]).clamp(0, sub.shape[k] - 1) for k in range(3)]
        warped = orig[loc[0], loc[1], loc[2]]
        bg = orig == BACKGROUND
        outer_dura = (orig == DURA) & dilate6(bg)
        warped = torch.where(bg | outer_dura | (orig == EXISTING), orig, warped)
        warped = torch.where((warped == BACKGROUND) & ~bg, torch.full_like(warped, CSF), warped)
        sub.copy_(torch.where(moved, warped, orig))
    sub[tum] = TUMOUR
    _paint_core(les, geo, sub, tum, lo, spacing)
    if les.tail:
        _paint_tail(les, geo, sub, tum, lo, spacing)
    if les.oedema:
        _paint_oedema(les, geo, sub, tum | _is_core(sub), spacing)
    return (lo, hi), src, moved


def _is_core(sub: torch.Tensor) -> torch.Tensor:
    return (sub == CYST) | (sub == NECROSIS) | (sub == CALCIFICATION)


def apply_lesions(tissue: torch.Tensor, params: LesionParams, device: torch.device | str | None = None,
                  cortex_mm: float = LesionConfig.oedema_cortex_mm) -> LesionResult:
    """Paint ``params``' lesions on a copy of ``tissue`` (X, Y, Z) int64; pure and deterministic.

    Returns a :class:`LesionResult` with the painted tissue, its BraTS-MEN label (uint8) and the
    per-lesion mass-effect sources.
    """
    dev = torch.device(device) if device is not None else tissue.device
    if tuple(tissue.shape) != tuple(params.shape):
        raise ValueError(f"tissue shape {tuple(tissue.shape)} != params shape {tuple(params.shape)}")
    out = tissue.to(dev, torch.int64).clone()
    res = LesionResult(tissue=out, label=torch.empty(0))
    for les in params.lesions:
        box, src, moved = _apply_one(out, les, tuple(params.spacing), cortex_mm)  # type: ignore[arg-type]
        res.boxes.append(box)
        res.sources.append(src)
        res.moved.append(moved)
    res.label = tissue_to_label(torch.where(out >= N_TISSUES, torch.zeros_like(out), out))
    return res
