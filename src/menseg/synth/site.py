"""Physics-based MR appearance of a tissue map for a fixed scanner "site".

A second appearance model, independent of :mod:`menseg.synth.appearance` (it shares no
randomisation code with it): every tissue has literature relaxation parameters (T1, T2,
PD at 1.5 T and 3 T, FACTS §5), gadolinium shortens T1/T2 of the enhancing tissues
(1/T1post = 1/T1pre + r1 [Gd], FACTS §6), and each sequence's signal follows its signal
equation (FACTS §5) with the TR/TE/TI/flip of the site:

- t1n, t1c: spoiled gradient echo (``spgr``), MPRAGE (``mprage``: inversion-prepared
  SPGR echo train, simulated to steady state, signal at the k-space centre) or spin echo
  (``se``), same settings pre and post contrast;
- t2w: (turbo) spin echo (``se``) at the effective TE;
- t2f: FLAIR inversion recovery (``ir``) with TI near the CSF null.

A :class:`SiteProfile` fixes everything a scanner fixes (field strength, contrast agent,
sequence timings, acquisition voxel and slice direction, SNR, receive-coil geometry
and bias strength, intensity scaling in arbitrary units, skull-stripping behaviour).
Per case only biology and positioning vary (seeded): small log-normal jitter of the
relaxation times and PD, the gadolinium concentration in enhancing tissue, a smooth
PD texture, and a shift of the head in the coil.

Image formation: per-tissue noiseless signal (look-up table) x PD texture x receive
coil sensitivity -> area-average to the acquisition grid (thick slices) -> complex
Gaussian noise at the acquisition voxel, magnitude (Rician) -> linear interpolation back
to the synthesis grid -> scanner scale -> skull-strip mask (0 outside).

FACTS §n: section n of ``docs/MENINGIOMA_FACTS.md`` (sourced meningioma and MR facts).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from menseg.constants import MODALITIES
from menseg.draws import draw_seed
from menseg.errors import MensegError
from menseg.synth import tissues as T

log = logging.getLogger(__name__)

Tensor = torch.Tensor

# ------------------------------------------------------------------ tissue parameters
# (T1 ms, T2 ms, PD relative). FACTS §5 table: [a] Breger 1989 / Wansapura 1999 (WM, GM,
# 3 T), [b] BrainWeb, [c] liquisearch relaxation table (CSF 1.5 T), [d] Mostardeiro 2021
# MAGMA (meningioma MRF T1 at 3 T). Values marked (unverified) are not in a retrieved
# source; they are chosen to give the documented appearance (FACTS §1/§2).

#: 1.5 T relaxation parameters per tissue id.
RELAXATION_1P5T: dict[int, tuple[float, float, float]] = {
    T.WM: (650.0, 90.0, 0.77),  # [a]
    T.GM: (900.0, 110.0, 0.86),  # [a]
    T.CSF: (4200.0, 2100.0, 1.0),  # [c] ~4200-4500 / 2100-2300
    T.VENTRICLE: (4200.0, 2100.0, 1.0),  # as CSF
    T.DURA: (800.0, 40.0, 0.55),  # dense collagen: short T2, low PD (unverified)
    T.TUMOUR: (1100.0, 95.0, 0.90),  # ~1000-1200 / 80-110, PD 0.85-0.95 (FACTS §5, unverified)
    T.CYST: (3000.0, 800.0, 0.98),  # proteinaceous fluid, CSF-like (unverified)
    T.NECROSIS: (1400.0, 150.0, 0.92),  # (unverified)
    T.CALCIFICATION: (500.0, 20.0, 0.15),  # few mobile protons: dark everywhere (FACTS §1; values unverified)
    T.OEDEMA: (1200.0, 145.0, 0.93),  # ~1000-1300 / 110-150, PD 0.9-0.95 (FACTS §5, unverified)
    T.DURAL_TAIL: (1000.0, 80.0, 0.85),  # thickened, hypervascular dura (unverified)
}

#: 3 T relaxation parameters per tissue id (T1 14-30% longer, T2 12-19% shorter than
#: 1.5 T, Lu et al. JMRI 2005, FACTS §5, where no 3 T value is tabulated).
RELAXATION_3T: dict[int, tuple[float, float, float]] = {
    T.WM: (830.0, 80.0, 0.77),  # [a] Wansapura 1999
    T.GM: (1330.0, 90.0, 0.86),  # [a]
    T.CSF: (4300.0, 750.0, 1.0),  # [a] ASL calibration value
    T.VENTRICLE: (4300.0, 750.0, 1.0),
    T.DURA: (1000.0, 35.0, 0.55),  # (unverified)
    T.TUMOUR: (1429.0, 90.0, 0.90),  # [d] MRF T1 1429 +- 202; T2 ~80-100 (unverified)
    T.CYST: (3300.0, 500.0, 0.98),  # (unverified)
    T.NECROSIS: (1700.0, 130.0, 0.92),  # (unverified)
    T.CALCIFICATION: (600.0, 18.0, 0.15),  # (unverified)
    T.OEDEMA: (1500.0, 130.0, 0.93),  # ~1300-1600 / 100-150 (FACTS §5, unverified)
    T.DURAL_TAIL: (1300.0, 75.0, 0.85),  # (unverified)
}

#: Effective gadolinium concentration (mM) 5-10 min after 0.1 mmol/kg (FACTS §5/§6),
#: drawn uniformly per case. Tumour: FACTS §6 suggests 0.2-0.5 mM for a +80-200% T1w rise
#: (both unverified); with the weaker agents (gadoterate, gadoteridol) and SE T1 at 1.5 T,
#: 0.2 mM gives only ~+50%, so the range is 0.25-0.6 mM. Dural tail enhances at least as
#: much as the tumour (Goldsher criteria, FACTS §1) -> tumour x 1.0-1.3; normal dura
#: enhances strongly (no BBB, FACTS §6; values unverified); parenchyma < 5-10% rise
#: (FACTS §6) -> at most 0.01 mM; NETC and oedema do not enhance (FACTS §6).
GD_RANGE_MM: dict[int, tuple[float, float]] = {
    T.TUMOUR: (0.25, 0.6),
    T.DURA: (0.15, 0.35),
    T.WM: (0.0, 0.005),
    T.GM: (0.0, 0.01),
}
GD_TAIL_OVER_TUMOUR: tuple[float, float] = (1.0, 1.3)
#: r2 / r1 of macrocyclic agents (unverified, roughly 1.2-1.4).
R2_OVER_R1 = 1.3
#: T2* / T2 for the GRE echo (unverified; TE of 2-5 ms makes it a small effect).
T2STAR_OVER_T2 = 0.7
#: Per-case biological log-normal jitter (std of the log) of T1, T2, PD: a part shared by
#: all tissues of the case (age, hydration) and a smaller tissue-specific part, so the
#: relative contrast of healthy tissues varies less than their absolute values (unverified
#: magnitudes). The tumour's T2 varies more (hypo- to hyperintense on T2 vs cortex, FACTS §2,
#: J Comput Assist Tomogr 1992). CSF is nearly free water: no shared part, small T1 jitter.
BIO_JITTER_SHARED: tuple[float, float, float] = (0.05, 0.05, 0.02)
BIO_JITTER_TISSUE: tuple[float, float, float] = (0.02, 0.03, 0.01)
TUMOUR_T2_JITTER = 0.15
CSF_T1_JITTER = 0.02
#: PD texture: std of the smooth within-tissue PD field (healthy, lesion), control spacing mm.
TEXTURE_STD: tuple[float, float] = (0.02, 0.06)
TEXTURE_SCALE_MM = 8.0
#: Head position jitter inside the coil (mm, std per axis).
HEAD_SHIFT_MM = 8.0


# ------------------------------------------------------------------ signal equations


def spin_echo(pd: Tensor, t1: Tensor, t2: Tensor, tr: float, te: float) -> Tensor:
    """Spin-echo signal ``PD (1 - 2 e^{-(TR - TE/2)/T1} + e^{-TR/T1}) e^{-TE/T2}`` (FACTS §5).

    Times in ms; tensors broadcast.
    """
    return pd * (1.0 - 2.0 * torch.exp(-(tr - te / 2.0) / t1) + torch.exp(-tr / t1)) * torch.exp(-te / t2)


def inversion_recovery(pd: Tensor, t1: Tensor, t2: Tensor, tr: float, te: float, ti: float) -> Tensor:
    """Magnitude IR / FLAIR signal ``PD |1 - 2 e^{-TI/T1} + e^{-TR/T1}| e^{-TE/T2}`` (FACTS §5,
    ideal 180 degree inversion). Nulls a tissue at ``TI = T1 ln(2 / (1 + e^{-TR/T1}))``,
    i.e. ``T1 ln 2`` for long TR."""
    return pd * torch.abs(1.0 - 2.0 * torch.exp(-ti / t1) + torch.exp(-tr / t1)) * torch.exp(-te / t2)


def spoiled_gre(pd: Tensor, t1: Tensor, t2s: Tensor, tr: float, te: float, flip_deg: float) -> Tensor:
    """Steady-state spoiled GRE ``PD sin a (1 - E1) / (1 - cos a E1) e^{-TE/T2*}``, E1 = e^{-TR/T1}
    (FACTS §5)."""
    a = math.radians(flip_deg)
    e1 = torch.exp(-tr / t1)
    return pd * math.sin(a) * (1.0 - e1) / (1.0 - math.cos(a) * e1) * torch.exp(-te / t2s)


def mprage(pd: Tensor, t1: Tensor, t2s: Tensor, tr: float, te: float, ti: float, flip_deg: float,
           echo_spacing: float, n_readouts: int, shots: int = 10) -> Tensor:
    """MPRAGE signal at the k-space centre (linear phase order: centre echo at ``TI`` after the
    inversion), simulated shot by shot to steady state (FACTS §5: IR-SPGR approximation).

    ``tr`` is the time between inversions (ms), ``echo_spacing`` the readout TR (ms). Per
    shot: ideal inversion, free recovery to the first readout, ``n_readouts`` pulses of
    ``flip_deg`` separated by ``echo_spacing``, free recovery to the next inversion.
    """
    t0 = ti - (n_readouts / 2.0) * echo_spacing
    t_end = tr - t0 - n_readouts * echo_spacing
    if t0 < 0 or t_end < 0:
        raise MensegError(f"mprage: TI {ti} / TR {tr} ms too short for {n_readouts} readouts "
                          f"every {echo_spacing} ms")
    a = math.radians(flip_deg)
    ca, sa = math.cos(a), math.sin(a)
    t1 = t1.to(torch.float64)
    e_es = torch.exp(-echo_spacing / t1)
    e0, e_end = torch.exp(-t0 / t1), torch.exp(-t_end / t1)
    # each readout maps mz -> B + A mz (A = cos(a) e^{-ES/T1}, B = 1 - e^{-ES/T1}); k of them:
    # mz -> A^k mz + B (1 - A^k) / (1 - A)
    amap, bmap = ca * e_es, 1.0 - e_es

    def train(mz: Tensor, k: int) -> Tensor:
        ak = amap**k
        return ak * mz + bmap * (1.0 - ak) / (1.0 - amap)

    half = n_readouts // 2
    mz = torch.ones_like(t1)
    centre = torch.zeros_like(t1)
    for _ in range(shots):
        mz = 1.0 - (1.0 + mz) * e0  # inversion, then recovery to the first readout
        before = train(mz, half)
        centre = before * sa
        mz = train(before, n_readouts - half)
        mz = 1.0 - (1.0 - mz) * e_end
    return pd * torch.abs(centre).to(pd.dtype) * torch.exp(-te / t2s)


# ------------------------------------------------------------------ site profiles


@dataclass(frozen=True)
class SequenceProtocol:
    """Acquisition of one sequence at a site. Times in ms, voxel in mm along (x, y, z)."""

    kind: str  #: "spgr" | "mprage" | "se" | "ir"
    tr_ms: float
    te_ms: float
    ti_ms: float = 0.0
    flip_deg: float = 90.0
    echo_spacing_ms: float = 0.0  #: mprage readout TR
    n_readouts: int = 0  #: mprage echo-train length
    voxel_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    snr: float = 30.0  #: mean WM signal / noise sigma at the acquisition voxel
    scale: float = 1000.0  #: arbitrary units of the scanner


@dataclass(frozen=True)
class SiteProfile:
    """Everything a scanner fixes. Sequences are in MODALITIES order (t1c, t1n, t2f, t2w)."""

    name: str
    field_t: float  #: 1.5 or 3.0
    agent: str
    r1: float  #: L/mmol/s in plasma (FACTS §6, Szomolanyi 2019)
    t1c: SequenceProtocol
    t1n: SequenceProtocol
    t2f: SequenceProtocol
    t2w: SequenceProtocol
    bias_strength: float = 0.3  #: exponent of the normalised receive sensitivity
    n_coils: int = 8
    coil_radius_mm: float = 120.0
    coil_size_mm: float = 60.0
    strip_outer_dura: bool = False

    def protocol(self, modality: str) -> SequenceProtocol:
        """Protocol of one modality name (e.g. ``"t2f"``)."""
        return getattr(self, modality)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)


def _mprage_site_a() -> SequenceProtocol:
    # 3 T MPRAGE TR 2400 / TE 3.16 / TI 1000 / FA 8, 1 mm isotropic (FACTS §5, pubcompare protocol)
    return SequenceProtocol("mprage", 2400.0, 3.16, ti_ms=1000.0, flip_deg=8.0, echo_spacing_ms=7.0,
                            n_readouts=176, voxel_mm=(1.0, 1.0, 1.0), snr=30.0, scale=1000.0)


def _se_t1_site_b() -> SequenceProtocol:
    # SE T1 TR 400-600 / TE 10-20 (FACTS §5, unverified); 2D axial 5 mm
    return SequenceProtocol("se", 450.0, 12.0, voxel_mm=(0.9, 0.9, 5.0), snr=18.0, scale=600.0)


def _spgr_site_c() -> SequenceProtocol:
    # 3D spoiled GRE (FSPGR/VIBE-like); Ernst angle for WM ~8 deg, 15 deg for T1 weighting
    return SequenceProtocol("spgr", 8.0, 3.0, flip_deg=15.0, voxel_mm=(1.0, 1.0, 1.0), snr=25.0, scale=2000.0)


def _mprage_site_d() -> SequenceProtocol:
    # 1.5 T MPRAGE (ADNI-like TR 2300 / TI 900 / FA 9 at 3 T, FACTS §5, adapted to 1.5 T)
    return SequenceProtocol("mprage", 2000.0, 3.5, ti_ms=1100.0, flip_deg=8.0, echo_spacing_ms=8.0,
                            n_readouts=160, voxel_mm=(1.0, 1.0, 1.2), snr=20.0, scale=800.0)


# T2 TSE TR 3000-6000 / TE 80-120; FLAIR TR 8000-11000 / TE 90-140 / TI 2200-2800 (FACTS §5,
# unverified ranges); each FLAIR TI is near T1_csf ln(2 / (1 + e^{-TR/T1_csf})) at its field.
SITES: dict[str, SiteProfile] = {
    "site-a": SiteProfile(
        name="site-a", field_t=3.0, agent="gadobutrol", r1=4.97,  # FACTS §6
        t1c=_mprage_site_a(), t1n=_mprage_site_a(),
        t2f=SequenceProtocol("ir", 9000.0, 120.0, ti_ms=2500.0, voxel_mm=(1.0, 1.0, 1.0), snr=20.0,
                             scale=1000.0),
        t2w=SequenceProtocol("se", 5000.0, 100.0, voxel_mm=(0.9, 0.9, 3.0), snr=25.0, scale=1500.0),
        bias_strength=0.4, n_coils=20, coil_radius_mm=115.0, coil_size_mm=50.0, strip_outer_dura=False,
    ),
    "site-b": SiteProfile(
        name="site-b", field_t=1.5, agent="gadoterate", r1=3.32,  # FACTS §6
        t1c=_se_t1_site_b(), t1n=_se_t1_site_b(),
        t2f=SequenceProtocol("ir", 8000.0, 120.0, ti_ms=2300.0, voxel_mm=(0.9, 0.9, 5.0), snr=12.0,
                             scale=600.0),
        t2w=SequenceProtocol("se", 4000.0, 100.0, voxel_mm=(0.9, 0.9, 5.0), snr=15.0, scale=600.0),
        bias_strength=0.2, n_coils=8, coil_radius_mm=130.0, coil_size_mm=80.0, strip_outer_dura=True,
    ),
    "site-c": SiteProfile(
        name="site-c", field_t=3.0, agent="gadoteridol", r1=3.28,  # FACTS §6
        t1c=_spgr_site_c(), t1n=_spgr_site_c(),
        t2f=SequenceProtocol("ir", 10000.0, 140.0, ti_ms=2600.0, voxel_mm=(0.8, 4.0, 0.8), snr=15.0,
                             scale=2500.0),
        t2w=SequenceProtocol("se", 6000.0, 90.0, voxel_mm=(0.7, 4.0, 0.7), snr=20.0, scale=2500.0),
        bias_strength=0.5, n_coils=32, coil_radius_mm=110.0, coil_size_mm=40.0, strip_outer_dura=True,
    ),
    "site-d": SiteProfile(
        name="site-d", field_t=1.5, agent="gadobutrol", r1=4.78,  # FACTS §6
        t1c=_mprage_site_d(), t1n=_mprage_site_d(),
        t2f=SequenceProtocol("ir", 9000.0, 110.0, ti_ms=2450.0, voxel_mm=(1.0, 1.0, 5.0), snr=14.0,
                             scale=700.0),
        t2w=SequenceProtocol("se", 3500.0, 95.0, voxel_mm=(1.0, 1.0, 5.0), snr=18.0, scale=700.0),
        bias_strength=0.25, n_coils=12, coil_radius_mm=125.0, coil_size_mm=60.0, strip_outer_dura=False,
    ),
}


def list_sites() -> list[str]:
    """Names of the built-in sites."""
    return sorted(SITES)


def site_profile(name: str) -> SiteProfile:
    """The fixed profile of a named site (see :func:`list_sites`)."""
    try:
        return SITES[name]
    except KeyError:
        raise MensegError(f"unknown site {name!r}; known sites: {', '.join(list_sites())}") from None


# ------------------------------------------------------------------ per-case biology


@dataclass(frozen=True)
class SiteCaseParams:
    """Per-case draws of the site model (JSON-able); per-tissue lists are indexed by tissue id."""

    t1_ms: tuple[float, ...]  #: pre-contrast T1
    t2_ms: tuple[float, ...]
    pd: tuple[float, ...]
    gd_mm: tuple[float, ...]  #: effective [Gd] (mM) for the t1c acquisition
    head_shift_mm: tuple[float, float, float]
    noise_seed: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict."""
        return asdict(self)


def sample_site_params(profile: SiteProfile, seed: int) -> SiteCaseParams:
    """Per-case biology and positioning for ``profile`` from an integer seed (CPU generator)."""
    gen = torch.Generator().manual_seed(int(seed))
    table = RELAXATION_3T if profile.field_t >= 2.25 else RELAXATION_1P5T
    n = T.N_TISSUES
    z = torch.randn((3, n), generator=gen, dtype=torch.float64)
    zs = torch.randn(3, generator=gen, dtype=torch.float64).tolist()
    u = torch.rand(n + 1, generator=gen, dtype=torch.float64).tolist()
    shift = (torch.randn(3, generator=gen, dtype=torch.float64) * HEAD_SHIFT_MM).tolist()
    noise_seed = draw_seed(gen)
    t1, t2, pd, gd = [1.0] * n, [1.0] * n, [0.0] * n, [0.0] * n
    for tid in range(n):
        if tid == T.BACKGROUND:
            continue
        b1, b2, bpd = table[tid]
        fluid = tid in (T.CSF, T.VENTRICLE)
        shared = [0.0, 0.0, 0.0] if fluid else [a * b for a, b in zip(BIO_JITTER_SHARED, zs, strict=True)]
        s1 = CSF_T1_JITTER if fluid else BIO_JITTER_TISSUE[0]
        s2 = TUMOUR_T2_JITTER if tid == T.TUMOUR else BIO_JITTER_TISSUE[1]
        t1[tid] = b1 * math.exp(shared[0] + s1 * float(z[0, tid]))
        t2[tid] = b2 * math.exp(shared[1] + s2 * float(z[1, tid]))
        pd[tid] = bpd * math.exp(shared[2] + BIO_JITTER_TISSUE[2] * float(z[2, tid]))
        if tid in GD_RANGE_MM:
            lo, hi = GD_RANGE_MM[tid]
            gd[tid] = lo + (hi - lo) * u[tid]
    lo, hi = GD_TAIL_OVER_TUMOUR
    gd[T.DURAL_TAIL] = gd[T.TUMOUR] * (lo + (hi - lo) * u[n])
    return SiteCaseParams(tuple(t1), tuple(t2), tuple(pd), tuple(gd), tuple(shift), noise_seed)


def _signal(proto: SequenceProtocol, pd: Tensor, t1: Tensor, t2: Tensor) -> Tensor:
    if proto.kind == "se":
        return spin_echo(pd, t1, t2, proto.tr_ms, proto.te_ms)
    if proto.kind == "ir":
        return inversion_recovery(pd, t1, t2, proto.tr_ms, proto.te_ms, proto.ti_ms)
    if proto.kind == "spgr":
        return spoiled_gre(pd, t1, t2 * T2STAR_OVER_T2, proto.tr_ms, proto.te_ms, proto.flip_deg)
    if proto.kind == "mprage":
        return mprage(pd, t1, t2 * T2STAR_OVER_T2, proto.tr_ms, proto.te_ms, proto.ti_ms, proto.flip_deg,
                      proto.echo_spacing_ms, proto.n_readouts)
    raise MensegError(f"unknown sequence kind {proto.kind!r} (expected se, ir, spgr, mprage)")


def tissue_signals(profile: SiteProfile, case: SiteCaseParams) -> Tensor:
    """Noiseless signal per tissue, float64 (4, N_TISSUES) in MODALITIES order (PD units,
    before coil sensitivity and scanner scale); background 0. t1c uses the post-Gd
    relaxation ``1/T1 + r1 [Gd]`` and ``1/T2 + r2 [Gd]`` (FACTS §6)."""
    t1 = torch.tensor(case.t1_ms, dtype=torch.float64)
    t2 = torch.tensor(case.t2_ms, dtype=torch.float64)
    pd = torch.tensor(case.pd, dtype=torch.float64)
    gd = torch.tensor(case.gd_mm, dtype=torch.float64)
    r1 = profile.r1 / 1000.0  # per mM per ms
    t1_post = 1.0 / (1.0 / t1 + r1 * gd)
    t2_post = 1.0 / (1.0 / t2 + R2_OVER_R1 * r1 * gd)
    rows = []
    for m in MODALITIES:
        proto = profile.protocol(m)
        if m == "t1c":
            rows.append(_signal(proto, pd, t1_post, t2_post))
        else:
            rows.append(_signal(proto, pd, t1, t2))
    out = torch.stack(rows)
    out[:, T.BACKGROUND] = 0.0
    return out


# ------------------------------------------------------------------ image formation


def coil_sensitivity(shape: Sequence[int], spacing: Sequence[float], profile: SiteProfile,
                     shift_mm: Sequence[float], device: torch.device, step_mm: float = 8.0) -> Tensor:
    """Relative receive sensitivity (X, Y, Z), mean 1: root-sum-of-squares of ``n_coils``
    loop elements on a ring (radius ``coil_radius_mm``) around the head in the axial plane,
    each falling off as ``(1 + d^2 / size^2)^{-3/2}`` (on-axis loop field), raised to
    ``bias_strength``. Computed every ``step_mm`` and trilinearly upsampled."""
    ext = [n * s for n, s in zip(shape, spacing, strict=True)]
    g = [max(2, math.ceil(e / step_mm) + 1) for e in ext]
    axes = [torch.linspace(-e / 2.0, e / 2.0, k, dtype=torch.float64) - sh
            for e, k, sh in zip(ext, g, shift_mm, strict=True)]
    x, y, z = torch.meshgrid(*axes, indexing="ij")
    acc = torch.zeros_like(x)
    for i in range(profile.n_coils):
        phi = 2.0 * math.pi * i / profile.n_coils
        # ring in the axial (x, y) plane, two rows above and below the centre
        cz = 30.0 if i % 2 else -10.0
        cx, cy = profile.coil_radius_mm * math.cos(phi), profile.coil_radius_mm * math.sin(phi)
        d2 = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2
        acc += (1.0 + d2 / profile.coil_size_mm**2) ** -3.0
    sens = acc.sqrt()
    sens = (sens / sens.mean()) ** profile.bias_strength
    sens = sens / sens.mean()
    up = F.interpolate(sens[None, None].to(device=device, dtype=torch.float32), size=tuple(shape),
                       mode="trilinear", align_corners=True)
    return up[0, 0]


def _pd_texture(gen: torch.Generator, tissue: Tensor, spacing: Sequence[float]) -> Tensor:
    """Smooth multiplicative PD texture (X, Y, Z) around 1, larger in lesion tissue."""
    shape = tuple(tissue.shape)
    g = [max(2, math.ceil(n * s / TEXTURE_SCALE_MM) + 1) for n, s in zip(shape, spacing, strict=True)]
    coarse = torch.randn(g, generator=gen, device=tissue.device)
    fine = F.interpolate(coarse[None, None], size=shape, mode="trilinear", align_corners=False)[0, 0]
    lut = torch.full((T.N_TISSUES,), TEXTURE_STD[0], device=tissue.device)
    lut[list(T.LESION)] = TEXTURE_STD[1]
    return (1.0 + lut[tissue] * fine).clamp_(min=0.0)


def _acquire(x: Tensor, voxel_mm: Sequence[float], spacing: Sequence[float], sigma: float,
             gen: torch.Generator) -> Tensor:
    """Acquire ``x`` (X, Y, Z) on the acquisition grid: area-average to the acquisition voxel,
    add complex Gaussian noise of std ``sigma`` there, take the magnitude, interpolate back."""
    shape = tuple(x.shape)
    acq = tuple(max(1, round(n * s / v)) if v > 1.2 * s else n
                for n, s, v in zip(shape, spacing, voxel_mm, strict=True))
    y = F.interpolate(x[None, None], size=acq, mode="area")[0, 0] if acq != shape else x
    if sigma > 0:
        noise = torch.randn((2, *y.shape), generator=gen, device=x.device) * sigma
        y = torch.sqrt((y + noise[0]) ** 2 + noise[1] ** 2)
    if acq != shape:
        y = F.interpolate(y[None, None], size=shape, mode="trilinear", align_corners=False)[0, 0]
    return y


def _strip_mask(tissue: Tensor, strip_outer_dura: bool) -> Tensor:
    """Skull-strip mask (X, Y, Z) bool: every non-background tissue; optionally without the
    outer dura shell (dura voxels with a background 6-neighbour or on the volume border)."""
    mask = tissue != T.BACKGROUND
    if strip_outer_dura:
        bg = F.pad(tissue == T.BACKGROUND, (1,) * 6, value=True)
        n0, n1, n2 = tissue.shape
        centre = (slice(1, n0 + 1), slice(1, n1 + 1), slice(1, n2 + 1))
        touches = torch.zeros_like(mask)
        for dim in range(3):
            for step in (-1, 1):
                sl = list(centre)
                sl[dim] = slice(1 + step, tissue.shape[dim] + 1 + step)
                touches |= bg[tuple(sl)]
        mask &= ~(touches & (tissue == T.DURA))
    return mask


def render_site_params(tissue: Tensor, profile: SiteProfile, case: SiteCaseParams,
                       spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Tensor:
    """Render ``tissue`` (int64 (X, Y, Z)) at ``profile`` with fixed per-case params.

    Returns float32 (4, X, Y, Z) in MODALITIES order (scanner units), 0 outside the mask;
    deterministic given the inputs (on one device type).
    """
    if tissue.dim() != 3:
        raise MensegError(f"render_site: tissue map must be 3D, got shape {tuple(tissue.shape)}")
    tissue = tissue.long()
    if int(tissue.min()) < 0 or int(tissue.max()) >= T.N_TISSUES:
        raise MensegError(f"render_site: tissue ids must lie in [0, {T.N_TISSUES - 1}]")
    dev = tissue.device
    sp = [float(s) for s in spacing]
    gen = torch.Generator(device=dev)
    gen.manual_seed(case.noise_seed)
    signals = tissue_signals(profile, case).to(torch.float32).to(dev)  # (4, K)
    pd_tex = _pd_texture(gen, tissue, sp)
    sens = coil_sensitivity(tissue.shape, sp, profile, case.head_shift_mm, dev)
    common = pd_tex.mul_(sens)
    mask = _strip_mask(tissue, profile.strip_outer_dura)
    out = torch.empty((len(MODALITIES), *tissue.shape), dtype=torch.float32, device=dev)
    for c, m in enumerate(MODALITIES):
        proto = profile.protocol(m)
        sigma = float(signals[c, T.WM]) / proto.snr if proto.snr > 0 else 0.0
        clean = signals[c][tissue] * common
        img = _acquire(clean, proto.voxel_mm, sp, sigma, gen)
        out[c] = img * mask * proto.scale
    return out


def render_site(tissue: Tensor, profile: SiteProfile | str, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                seed: int = 0) -> Tensor:
    """Physics-based four-sequence image of a tissue map at a fixed site.

    Args:
        tissue: int64 (X, Y, Z) tissue ids (:mod:`menseg.synth.tissues`).
        profile: a :class:`SiteProfile` or a site name (:func:`list_sites`).
        spacing: synthesis voxel size (mm).
        seed: per-case seed (biological jitter, gadolinium uptake, head position, noise).

    Returns:
        float32 (4, X, Y, Z), MODALITIES order, scanner units, 0 outside the brain mask.
    """
    prof = site_profile(profile) if isinstance(profile, str) else profile
    case = sample_site_params(prof, seed)
    log.debug("render_site %s seed %d: tumour [Gd] %.2f mM, head shift %s mm", prof.name, seed,
              case.gd_mm[T.TUMOUR], [round(v, 1) for v in case.head_shift_mm])
    return render_site_params(tissue, prof, case, spacing)
