"""Randomised ("domain-randomisation") MR appearance of a tissue map.

A tissue map (int64 ``(X, Y, Z)``, ids of :mod:`menseg.synth.tissues`) becomes a
four-sequence image (float32 ``(4, X, Y, Z)``, :data:`~menseg.constants.MODALITIES`
order t1c, t1n, t2f, t2w), skull-stripped like BraTS (0 outside the mask).

The model is deliberately *not* physical (that is :mod:`menseg.synth.site`): each
tissue gets a random mean per sequence, drawn widely but under the contrast order of
each sequence (:data:`DEFAULT_RULES`, :data:`CONTRAST_ORDER`), then the image goes
through a chain of randomised artefacts:

1. piecewise-constant tissue means (look-up table),
2. partial volume + blur: small Gaussian PSF (blurring the rendered image equals
   blurring the one-hot maps before mixing, the model being linear),
3. anisotropic thick slices on some sequences (area-downsample along one axis by the
   slice thickness, linear upsample back),
4. inside the mask only: smooth within-tissue texture (one low-resolution noise field,
   per-tissue amplitude, larger for lesion tissue), a smooth multiplicative bias field
   (one shape shared by the four sequences, as they share the receive coil, with a
   per-sequence strength), Rician noise, gamma and a global scale per sequence,
5. skull stripping: every non-background tissue is kept, including extra-axial CSF
   and the dura (BraTS stripping keeps extra-axial tumour mostly, FACTS §4: 90.3% of
   BraTS-MEN labels touch the mask edge); with ``strip_outer_dura_prob`` the outermost
   dura shell (dura voxels touching the background) is removed, as stripping tools do.

Randomness is split: :func:`sample_appearance_params` draws every scalar from a
``torch.Generator`` into a frozen, JSON-able :class:`AppearanceParams` (with a
``seed`` for the full-size random fields); :func:`render` is pure given the params, so
a case replays bit-exactly (on the same device type). Speed: the full-size work is a
handful of elementwise passes; the blur is a 3-tap binomial filter applied as shifted
in-place adds (exact variance, measured several times faster than ``conv1d``/``conv3d``
on CPU); low-resolution fields are upsampled with ``F.interpolate``; everything after the
blur runs on the masked voxels only (flat ``index_select`` / ``index_copy_``).

FACTS §n: section n of ``docs/MENINGIOMA_FACTS.md`` (sourced meningioma and MR facts).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from menseg.constants import MODALITIES
from menseg.draws import draw_seed, log_uniforms, uniforms
from menseg.errors import MensegError
from menseg.filters import gaussian_blur
from menseg.synth import tissues as T
from menseg.synth.serial import from_dict

log = logging.getLogger(__name__)

Tensor = torch.Tensor

# ----------------------------------------------------------------- intensity rules
#
# Rule syntax (one uniform draw u per rule, evaluated in insertion order, refs must be
# defined earlier; "seq.tissue" refers to another sequence evaluated earlier):
#   "lo..hi"            absolute mean, u in [lo, hi]
#   "ref * lo..hi"      ratio to an earlier tissue: ref * u
#   "a ~ b lo..hi"      between two earlier tissues: a + (b - a) * u
# Ratios < 1 (or interpolation fractions in (0, 1)) are what enforces an order.
# Units are arbitrary (about 0..1 before the global scale).

#: Default per-sequence tissue-intensity rules (see module docstring for the syntax).
DEFAULT_RULES: dict[str, dict[str, str]] = {
    # T1 native: WM > GM > CSF (standard T1 contrast). Tumour iso- to hypointense vs GM
    # (isointense 60-90%, hypointense 10-40%, FACTS §2, neurologyneeds; grade 1 slightly
    # hypo/iso, PMC7768868). Oedema mildly hypointense (FACTS §2). Calcification T1-hypo
    # (FACTS §1, jbsr.be 10.5334/jbsr.2751): below CSF. Cyst CSF-like.
    "t1n": {
        "wm": "0.55..0.85",
        "gm": "wm * 0.65..0.90",
        "csf": "gm * 0.20..0.55",
        "ventricle": "csf * 0.95..1.05",
        "dura": "gm * 0.50..0.95",
        "tumour": "gm * 0.75..1.02",  # iso/hypo vs GM (FACTS §2)
        "dural_tail": "dura * 0.95..1.40",
        "cyst": "csf * 1.00..1.40",  # CSF-like, proteinaceous at most slightly brighter
        "necrosis": "tumour * 0.50..0.85",
        "calcification": "csf * 0.30..0.90",  # dark on every sequence (FACTS §1)
        "oedema": "wm * 0.70..0.95",  # mildly T1-hypo (FACTS §2)
    },
    # T1 + Gd: same non-enhancing contrast as T1n; tumour intense enhancement clearly
    # above GM/WM (FACTS §2 T1+Gd; §6: +80-200% T1w signal rise, unverified) -> above WM,
    # the brightest healthy tissue; dural tail enhances at least as much as the tumour
    # (Goldsher criteria, FACTS §1/§6): 0.9..1.25 x tumour; normal dura enhances
    # (FACTS §6) but stays below the tumour; NETC / oedema do not enhance (FACTS §6).
    "t1c": {
        "wm": "0.55..0.85",
        "gm": "wm * 0.65..0.90",
        "csf": "gm * 0.20..0.55",
        "ventricle": "csf * 0.95..1.05",
        "tumour": "wm * 1.30..2.20",
        "dura": "tumour * 0.50..0.90",
        "dural_tail": "tumour * 0.90..1.25",
        "cyst": "csf * 1.00..1.40",
        "necrosis": "gm * 0.40..0.85",
        "calcification": "csf * 0.30..0.90",
        "oedema": "wm * 0.70..0.95",
    },
    # T2 (TSE): CSF brightest, WM < GM (standard T2 contrast). Tumour from hypo to hyper
    # vs GM (iso ~50%, hyper 35-40%, fibroblastic/transitional mostly hypo, FACTS §2):
    # anywhere from WM up to 60% of the way to CSF. Oedema bright (FACTS §2): between GM
    # and CSF. Calcification T2-hypo (FACTS §1): darkest. Dura fibrous, dark.
    "t2w": {
        "csf": "0.75..1.00",
        "ventricle": "csf * 0.95..1.05",
        "wm": "csf * 0.25..0.50",
        "gm": "wm * 1.15..1.60",
        "dura": "wm * 0.50..0.90",
        "tumour": "wm ~ csf 0.00..0.60",
        "dural_tail": "dura * 1.00..1.60",
        "cyst": "csf * 0.85..1.00",
        "necrosis": "tumour ~ csf 0.20..0.80",
        "calcification": "wm * 0.10..0.45",
        "oedema": "gm ~ csf 0.25..0.80",
    },
    # FLAIR: CSF nulled (dark), GM > WM, oedema bright above GM (SNFH, FACTS §2/§4),
    # tumour iso to mildly hyper vs GM (FACTS §2, unverified), cyst CSF-like (dark,
    # proteinaceous cysts a little brighter), calcification dark (FACTS §1).
    "t2f": {
        "wm": "0.40..0.65",
        "gm": "wm * 1.05..1.40",
        "csf": "wm * 0.05..0.35",
        "ventricle": "csf * 0.90..1.10",
        "dura": "wm * 0.30..0.90",
        "tumour": "gm * 0.90..1.30",
        "dural_tail": "dura * 1.00..1.50",
        "cyst": "csf ~ wm 0.00..0.60",
        "necrosis": "csf ~ tumour 0.30..0.90",
        "calcification": "wm * 0.05..0.30",
        "oedema": "gm * 1.20..1.80",
    },
}

#: Orders (sequence, brighter, darker) that :data:`DEFAULT_RULES` guarantees for every
#: draw (tissue means before artefacts). Tests check each of them on many seeds.
CONTRAST_ORDER: tuple[tuple[str, str, str], ...] = (
    ("t1n", "wm", "gm"), ("t1n", "gm", "csf"), ("t1n", "wm", "tumour"), ("t1n", "tumour", "csf"),
    ("t1n", "wm", "oedema"), ("t1n", "csf", "calcification"), ("t1n", "tumour", "necrosis"),
    ("t1c", "wm", "gm"), ("t1c", "gm", "csf"), ("t1c", "tumour", "wm"), ("t1c", "tumour", "gm"),
    ("t1c", "tumour", "dura"), ("t1c", "tumour", "oedema"), ("t1c", "tumour", "cyst"),
    ("t1c", "tumour", "necrosis"), ("t1c", "tumour", "calcification"),
    ("t2w", "csf", "gm"), ("t2w", "gm", "wm"), ("t2w", "csf", "tumour"), ("t2w", "oedema", "gm"),
    ("t2w", "csf", "oedema"), ("t2w", "wm", "calcification"), ("t2w", "dura", "calcification"),
    ("t2f", "gm", "wm"), ("t2f", "wm", "csf"), ("t2f", "oedema", "gm"), ("t2f", "oedema", "wm"),
    ("t2f", "wm", "calcification"), ("t2f", "wm", "cyst"),
)

_NAME_TO_ID = {name: tid for tid, name in T.TISSUE_NAMES.items()}
_LESION_GROUP = frozenset(T.LESION)
_RULE_RE = re.compile(
    r"^\s*(?:(?P<a>[A-Za-z_][\w.]*)\s*(?:~\s*(?P<b>[A-Za-z_][\w.]*)\s*)?\*?\s*)?"
    r"(?P<lo>[-+0-9.eE]+)\s*\.\.\s*(?P<hi>[-+0-9.eE]+)\s*$"
)


@dataclass(frozen=True)
class AppearanceConfig:
    """All randomisation ranges of the appearance model (mm, relative units).

    Ranges are ``(lo, hi)`` of a uniform draw unless noted; ``intensity_rules`` are the
    per-sequence tissue-mean rules (:data:`DEFAULT_RULES`).
    """

    intensity_rules: dict[str, dict[str, str]] = field(default_factory=lambda: deepcopy(DEFAULT_RULES))
    #: within-tissue texture, relative std of the smooth field (healthy / lesion tissue);
    #: tumours are heterogeneous in all but the smallest (FACTS §2, spinwarp NeuroWeb).
    texture_healthy: tuple[float, float] = (0.0, 0.05)
    texture_lesion: tuple[float, float] = (0.02, 0.15)
    #: control-point spacing of the texture fields (mm)
    texture_scale_mm: tuple[float, float] = (4.0, 16.0)
    #: partial-volume PSF sigma (mm), all sequences
    pv_sigma_mm: tuple[float, float] = (0.25, 0.6)
    #: extra blur sigma per sequence (mm); total sigma is sqrt(pv^2 + blur^2)
    blur_sigma_mm: tuple[float, float] = (0.0, 0.6)
    #: probability per sequence of a thick-slice (2D) acquisition, and its thickness (mm)
    thick_slice_prob: float = 0.4
    slice_thickness_mm: tuple[float, float] = (1.0, 6.0)
    #: bias field: std of the log-field control values per sequence, control spacing (mm)
    bias_strength: tuple[float, float] = (0.0, 0.3)
    bias_scale_mm: tuple[float, float] = (50.0, 120.0)
    #: Rician noise sigma relative to the brightest tissue mean of the sequence
    noise_sigma: tuple[float, float] = (0.0, 0.05)
    #: log of the gamma exponent per sequence
    log_gamma: tuple[float, float] = (-0.3, 0.3)
    #: global intensity scale per sequence (log-uniform), like a scanner's arbitrary units
    scale: tuple[float, float] = (0.5, 2.0)
    #: probability of removing the outermost dura shell with the skull
    strip_outer_dura_prob: float = 0.5

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AppearanceConfig:
        """Build from a plain dict (e.g. YAML; lists become tuples); unknown keys are errors."""
        return from_dict(cls, dict(d))


@dataclass(frozen=True)
class AppearanceParams:
    """One draw of :class:`AppearanceConfig`: everything :func:`render` needs.

    Per-sequence fields are tuples in MODALITIES order; ``means``/``texture`` are
    ``(4, n_classes)`` nested tuples indexed by tissue id (class 0 = background).
    """

    means: tuple[tuple[float, ...], ...]
    texture: tuple[tuple[float, ...], ...]
    texture_scale_mm: float
    blur_sigma_mm: tuple[float, ...]  #: total PSF sigma per sequence (PV and blur)
    slice_axis: tuple[int, ...]  #: -1 = no thick slices
    slice_thickness_mm: tuple[float, ...]
    bias_strength: tuple[float, ...]
    bias_scale_mm: float
    noise_sigma: tuple[float, ...]  #: absolute (same units as means)
    gamma: tuple[float, ...]
    scale: tuple[float, ...]
    strip_outer_dura: bool
    seed: int  #: seeds every full-size random field in :func:`render`

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (tuples become lists through ``json``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AppearanceParams:
        """Inverse of :meth:`to_dict` (accepts lists from JSON)."""
        return from_dict(cls, dict(d))


# ----------------------------------------------------------------- sampling


def _parse_rule(seq: str, tissue: str, rule: str) -> tuple[str | None, str | None, float, float]:
    m = _RULE_RE.match(rule)
    if m is None:
        raise MensegError(f"appearance rule {seq}.{tissue} = {rule!r}: expected 'lo..hi', "
                          "'ref * lo..hi' or 'a ~ b lo..hi'")
    return m["a"], m["b"], float(m["lo"]), float(m["hi"])


def sample_tissue_means(gen: torch.Generator, rules: Mapping[str, Mapping[str, str]]) -> list[list[float]]:
    """Draw tissue means ``(4, N_TISSUES)`` (MODALITIES order, background 0) from ``rules``.

    Exactly one uniform per rule, in insertion order, so replay does not depend on values.
    """
    values: dict[str, float] = {}
    for seq, seq_rules in rules.items():
        if seq not in MODALITIES:
            raise MensegError(f"appearance rules: unknown sequence {seq!r} (expected {MODALITIES})")
        for tissue, rule in seq_rules.items():
            if tissue not in _NAME_TO_ID or tissue == "background":
                raise MensegError(f"appearance rule {seq}.{tissue}: unknown tissue")
            a, b, lo, hi = _parse_rule(seq, tissue, rule)
            (u,) = uniforms(gen, 1)
            s = lo + (hi - lo) * u

            def ref(name: str, seq: str = seq, tissue: str = tissue) -> float:
                key = name if "." in name else f"{seq}.{name}"
                if key not in values:
                    raise MensegError(f"appearance rule {seq}.{tissue}: {name!r} is not defined before it")
                return values[key]

            if a is None:
                v = s
            elif b is None:
                v = ref(a) * s
            else:
                va, vb = ref(a), ref(b)
                v = va + (vb - va) * s
            values[f"{seq}.{tissue}"] = v
    out = [[0.0] * T.N_TISSUES for _ in MODALITIES]
    for c, seq in enumerate(MODALITIES):
        for tid, name in T.TISSUE_NAMES.items():
            if tid == T.BACKGROUND:
                continue
            key = f"{seq}.{name}"
            if key not in values:
                raise MensegError(f"appearance rules: no rule for {key}")
            out[c][tid] = max(values[key], 0.0)
    return out


def _sample_artefacts(gen: torch.Generator, cfg: AppearanceConfig, means: Sequence[Sequence[float]],
                      ) -> dict[str, Any]:
    """Draw every artefact scalar (fixed number of draws)."""
    n = len(MODALITIES)
    pv = uniforms(gen, 1, *cfg.pv_sigma_mm)[0]
    blur = uniforms(gen, n, *cfg.blur_sigma_mm)
    thick_u = uniforms(gen, n)
    axis_u = uniforms(gen, n)
    thick = uniforms(gen, n, *cfg.slice_thickness_mm)
    bias = uniforms(gen, n, *cfg.bias_strength)
    (bias_scale,) = uniforms(gen, 1, *cfg.bias_scale_mm)
    (tex_scale,) = uniforms(gen, 1, *cfg.texture_scale_mm)
    noise = uniforms(gen, n, *cfg.noise_sigma)
    gamma = [math.exp(v) for v in uniforms(gen, n, *cfg.log_gamma)]
    scale = log_uniforms(gen, n, *cfg.scale)
    (strip_u,) = uniforms(gen, 1)
    seed = draw_seed(gen)
    axes = [min(int(a * 3), 2) if t < cfg.thick_slice_prob else -1
            for a, t in zip(axis_u, thick_u, strict=True)]
    return dict(
        texture_scale_mm=tex_scale,
        blur_sigma_mm=tuple(math.sqrt(pv * pv + b * b) for b in blur),
        slice_axis=tuple(axes),
        slice_thickness_mm=tuple(th if a >= 0 else 0.0 for th, a in zip(thick, axes, strict=True)),
        bias_strength=tuple(bias),
        bias_scale_mm=bias_scale,
        noise_sigma=tuple(s * max(m) for s, m in zip(noise, means, strict=True)),
        gamma=tuple(gamma),
        scale=tuple(scale),
        strip_outer_dura=strip_u < cfg.strip_outer_dura_prob,
        seed=seed,
    )


def sample_appearance_params(gen: torch.Generator, cfg: AppearanceConfig | None = None) -> AppearanceParams:
    """Draw one appearance (tissue means under the contrast rules + artefacts) from ``gen`` (CPU)."""
    cfg = cfg or AppearanceConfig()
    means = sample_tissue_means(gen, cfg.intensity_rules)
    tex_h = uniforms(gen, len(MODALITIES) * T.N_TISSUES, *cfg.texture_healthy)
    tex_l = uniforms(gen, len(MODALITIES) * T.N_TISSUES, *cfg.texture_lesion)
    texture = tuple(
        tuple(0.0 if t == T.BACKGROUND else
              (tex_l if t in _LESION_GROUP else tex_h)[c * T.N_TISSUES + t] for t in range(T.N_TISSUES))
        for c in range(len(MODALITIES))
    )
    art = _sample_artefacts(gen, cfg, means)
    log.debug("appearance: slice axes %s, blur %s mm, noise %s", art["slice_axis"],
              [round(v, 2) for v in art["blur_sigma_mm"]], [round(v, 3) for v in art["noise_sigma"]])
    return AppearanceParams(
        means=tuple(tuple(m) for m in means),
        texture=texture,
        **art,
    )


def sample_random_intensity_params(gen: torch.Generator, n_classes: int,
                                   cfg: AppearanceConfig | None = None) -> AppearanceParams:
    """SynthSeg-style params: every class ``1..n_classes-1`` a uniform random mean in [0, 1]
    per sequence, no contrast order; class 0 is background (0 after stripping).

    Artefacts are drawn from ``cfg`` as in :func:`sample_appearance_params`; texture uses
    the healthy range for every class; no dura stripping (the class ids are arbitrary).
    """
    cfg = cfg or AppearanceConfig()
    if n_classes < 2:
        raise MensegError(f"render_random_intensities: need at least 2 classes, got {n_classes}")
    nc = len(MODALITIES)
    raw = uniforms(gen, nc * n_classes)
    tex = uniforms(gen, nc * n_classes, *cfg.texture_healthy)
    means = tuple(tuple(0.0 if k == 0 else raw[c * n_classes + k] for k in range(n_classes))
                  for c in range(nc))
    texture = tuple(tuple(0.0 if k == 0 else tex[c * n_classes + k] for k in range(n_classes))
                    for c in range(nc))
    art = _sample_artefacts(gen, cfg, means)
    art["strip_outer_dura"] = False
    return AppearanceParams(means=means, texture=texture, **art)


# ----------------------------------------------------------------- rendering helpers


def thick_slices(x: Tensor, axis: int, thickness_vox: float) -> Tensor:
    """Simulate a thick-slice acquisition of ``x`` (X, Y, Z): average slabs of
    ``thickness_vox`` voxels along ``axis`` (area resampling) and interpolate back linearly."""
    if axis < 0 or thickness_vox <= 1.2:
        return x
    size = list(x.shape)
    low = list(size)
    low[axis] = max(1, round(size[axis] / thickness_vox))
    y = F.interpolate(x[None, None], size=tuple(low), mode="area")
    return F.interpolate(y, size=tuple(size), mode="trilinear", align_corners=False)[0, 0]


def outer_shell(tissue: Tensor, tissue_id: int) -> Tensor:
    """Bool (X, Y, Z): voxels of ``tissue_id`` with a background 6-neighbour (or on the border)."""
    bg = tissue == T.BACKGROUND
    near = torch.zeros_like(bg)
    for d in range(3):
        n = bg.shape[d]
        near.narrow(d, 0, n - 1).logical_or_(bg.narrow(d, 1, n - 1))
        near.narrow(d, 1, n - 1).logical_or_(bg.narrow(d, 0, n - 1))
        near.narrow(d, 0, 1).fill_(True)
        near.narrow(d, n - 1, 1).fill_(True)
    return near & (tissue == tissue_id)


def smooth_field(gen: torch.Generator, shape: Sequence[int], spacing: Sequence[float], scale_mm: float,
                 device: torch.device) -> Tensor:
    """Smooth random field (X, Y, Z): standard-normal control values every ``scale_mm``
    (at least 2 per axis), trilinearly upsampled (std below 1 between control points)."""
    g = [max(2, math.ceil(n * s / max(scale_mm, 1e-3)) + 1) for n, s in zip(shape, spacing, strict=True)]
    lr = torch.randn(g, generator=gen, device=device)[None, None]
    return F.interpolate(lr, size=tuple(shape), mode="trilinear", align_corners=True)[0, 0]


# ----------------------------------------------------------------- render


def render(tissue: Tensor, params: AppearanceParams, spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Tensor:
    """Render a tissue map with fixed appearance params.

    Args:
        tissue: int64 (X, Y, Z) tissue ids (or any class ids < ``len(params.means[0])``).
        params: from :func:`sample_appearance_params` / :func:`sample_random_intensity_params`.
        spacing: voxel size in mm (x, y, z).

    Returns:
        float32 (4, X, Y, Z) in MODALITIES order on ``tissue.device``; 0 outside the mask.
        Deterministic given (tissue, params, spacing, device type).
    """
    if tissue.dim() != 3:
        raise MensegError(f"render: tissue map must be 3D (X, Y, Z), got shape {tuple(tissue.shape)}")
    dev = tissue.device
    tissue = tissue.long().contiguous()
    n_classes = len(params.means[0])
    if int(tissue.max()) >= n_classes or int(tissue.min()) < 0:
        raise MensegError(f"render: tissue ids must lie in [0, {n_classes - 1}]")
    shape = tuple(tissue.shape)
    sp = [float(s) for s in spacing]
    nc = len(MODALITIES)
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(params.seed))

    # 1. piecewise-constant means
    means = torch.tensor(params.means, dtype=torch.float32, device=dev)  # (C, K)
    img = means.index_select(1, tissue.reshape(-1)).view(nc, *shape)  # (C, X, Y, Z)

    # 2. partial volume + PSF blur
    sig = torch.tensor([[s / sp[d] for d in range(3)] for s in params.blur_sigma_mm], dtype=torch.float64)
    img = gaussian_blur(img, sig, "binomial")

    # 3. thick slices per sequence
    for c in range(nc):
        ax = params.slice_axis[c]
        if ax >= 0:
            img[c] = thick_slices(img[c], ax, params.slice_thickness_mm[c] / sp[ax])

    # 5 (mask first: the rest only touches voxels inside it)
    mask = tissue != T.BACKGROUND
    if params.strip_outer_dura:
        mask &= ~outer_shell(tissue, T.DURA)
    lin = mask.view(-1).nonzero().squeeze(1)  # flat indices of the N masked voxels
    vals = img.view(nc, -1).index_select(1, lin)  # (C, N)
    t_in = tissue.view(-1).index_select(0, lin)

    # 4. texture (one smooth field, per-tissue amplitude) and bias (one shape, per-sequence strength)
    tex = smooth_field(gen, shape, sp, params.texture_scale_mm, dev).view(-1).index_select(0, lin)
    bias = smooth_field(gen, shape, sp, params.bias_scale_mm, dev).view(-1).index_select(0, lin)
    amp = torch.tensor(params.texture, dtype=torch.float32, device=dev)
    tex.clamp_(-3.0, 3.0)  # bounded field: 1 + amp * tex stays positive for amp < 1/3
    factor = amp.index_select(1, t_in).mul_(tex).add_(1.0)  # (C, N)
    if float(amp.max()) >= 1.0 / 3.0:
        factor.clamp_(min=0.0)
    vals.mul_(factor)
    strength = torch.tensor(params.bias_strength, dtype=torch.float32, device=dev).view(-1, 1)
    vals.mul_(torch.mul(bias, strength).exp_())

    # Rician noise: |signal + n_re + i n_im|
    sigma = torch.tensor(params.noise_sigma, dtype=torch.float32, device=dev).view(-1, 1)
    if float(sigma.max()) > 0:
        noise = torch.randn((2, *vals.shape), generator=gen, device=dev)
        vals = torch.hypot(vals.addcmul_(noise[0], sigma), noise[1].mul_(sigma))

    # gamma around the brightest tissue mean (monotone: keeps every contrast order), then scale:
    # (v / ref)^g * ref * scale = v^g * ref^(1-g) * scale
    ref = means.max(dim=1).values.clamp(min=1e-6).view(-1, 1)
    gamma = torch.tensor(params.gamma, dtype=torch.float32, device=dev).view(-1, 1)
    scale = torch.tensor(params.scale, dtype=torch.float32, device=dev).view(-1, 1)
    vals = vals.pow_(gamma).mul_(ref.pow(1.0 - gamma) * scale)

    out = torch.zeros((nc, tissue.numel()), dtype=torch.float32, device=dev)
    out.index_copy_(1, lin, vals)
    return out.view(nc, *shape)


def render_random_intensities(tissue: Tensor, n_classes: int, gen: torch.Generator,
                              spacing: Sequence[float] = (1.0, 1.0, 1.0),
                              cfg: AppearanceConfig | None = None) -> tuple[Tensor, AppearanceParams]:
    """SynthSeg-style rendering of any label map: a random intensity per class and sequence.

    Args:
        tissue: int64 (X, Y, Z) class map with values in [0, n_classes); 0 = background.
        n_classes: number of classes (including background).
        gen: CPU generator for the params.
        spacing: voxel size (mm).
        cfg: artefact ranges (its intensity rules are ignored).

    Returns:
        (image float32 (4, X, Y, Z), params) — ``render(tissue, params, spacing)`` replays it.
    """
    params = sample_random_intensity_params(gen, n_classes, cfg)
    return render(tissue, params, spacing), params
