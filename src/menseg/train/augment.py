"""Replayable torch augmentations for 3D multi-modal patches.

Every transform is registered in :data:`TRANSFORMS` and splits into

- ``sample_params(gen: torch.Generator, shape, cfg: AugConfig, spacing) -> frozen dataclass``:
  all randomness, drawn on the CPU from ``gen`` (a fixed number of draws per
  call, whatever the outcome, so later transforms do not depend on earlier
  coin flips); and
- ``apply(image, label, params) -> (image, label)``: pure and deterministic
  given the params; runs on whatever device the tensors are on.

``image`` is float ``(C, X, Y, Z)``, ``label`` integer ``(X, Y, Z)`` with
values in {0,1,2,3}; ``shape`` is the image shape ``(C, X, Y, Z)``. Transforms
that need a full-size random field (noise) store an integer seed in their params
and draw the field on the tensor's device inside ``apply``.

Rotation, scaling and elastic deformation are *spatial*: :func:`apply_augment`
fuses consecutive spatial transforms into one sampling grid (one affine
matrix about the patch centre plus an optional smooth displacement field) and
one ``F.grid_sample`` call (image linear, label nearest), so the patch is
interpolated only once. Points mapped outside the patch read 0 (the z-scored
background). Flips are exact ``torch.flip``. Lengths named ``_mm`` in :class:`AugConfig` are
millimetres, turned into voxels of the preprocessed grid with its ``spacing``; the other widths
(``blur_sigma``) are in voxels.

The pipeline order follows nnU-Net: spatial, intensity (bias, noise, blur,
low resolution, gamma), then mirroring.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from menseg.config import AugConfig
from menseg.draws import draw_seed, uniforms
from menseg.filters import gaussian_blur
from menseg.geometry import rotation_matrix

Tensor = torch.Tensor
Generator = torch.Generator
Shape = Sequence[int]  #: an image's ``(C, X, Y, Z)``
Spacing = Sequence[float]  #: mm per voxel along x, y, z


class Transform(Protocol):
    """What a registered augmentation provides."""

    name: str
    spatial: bool

    def sample_params(self, gen: Generator, shape: Shape, cfg: AugConfig, spacing: Spacing) -> Any: ...

    def apply(self, image: Tensor, label: Tensor | None, params: Any) -> tuple[Tensor, Tensor | None]: ...


#: name -> transform, in pipeline order (registration order).
TRANSFORMS: dict[str, Transform] = {}


def register(name: str, spatial: bool = False) -> Callable[[type], type]:
    """Class decorator: instantiate and add to :data:`TRANSFORMS` under ``name``."""

    def deco(cls: type) -> type:
        obj = cls()
        obj.name = name
        obj.spatial = spatial
        TRANSFORMS[name] = obj
        return cls

    return deco


# ---------------------------------------------------------------- spatial helpers


def _base_grid(shape: Sequence[int], device: torch.device) -> Tensor:
    """Voxel coordinates relative to the patch centre, ``(X, Y, Z, 3)`` float32."""
    axes = [torch.arange(n, device=device, dtype=torch.float32) - (n - 1) / 2 for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def _sample_grid(image: Tensor, label: Tensor | None, coords: Tensor) -> tuple[Tensor, Tensor | None]:
    """Resample at voxel ``coords`` ``(X, Y, Z, 3)`` (centre-relative): image linear, label nearest."""
    shape = image.shape[1:]
    half = torch.tensor([(n - 1) / 2 if n > 1 else 1.0 for n in shape], device=coords.device)
    # grid_sample wants normalised (x=W, y=H, z=D) order, i.e. our axes reversed.
    grid = (coords / half).flip(-1).unsqueeze(0)
    out = F.grid_sample(
        image.unsqueeze(0).float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True
    )[0].to(image.dtype)
    lab = None
    if label is not None:
        lab = F.grid_sample(
            label[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=True
        )[0, 0].round().to(label.dtype)
    return out, lab


class SpatialTransform:
    """Base for transforms that act through the sampling grid.

    ``matrix(params)`` maps output voxel offsets (from the centre) to input
    offsets; ``displacement(params, shape, device)`` adds a per-voxel offset
    ``(X, Y, Z, 3)`` in voxels (or None).
    """

    name: str
    spatial: bool

    def matrix(self, params: Any) -> Tensor:
        return torch.eye(3, dtype=torch.float64)

    def displacement(self, params: Any, shape: Sequence[int], device: torch.device) -> Tensor | None:
        return None

    def active(self, params: Any) -> bool:
        return bool(params.active)

    def apply(self, image: Tensor, label: Tensor | None, params: Any) -> tuple[Tensor, Tensor | None]:
        return apply_spatial(image, label, [(self, params)])


def apply_spatial(
    image: Tensor, label: Tensor | None, items: Sequence[tuple[SpatialTransform, Any]]
) -> tuple[Tensor, Tensor | None]:
    """Apply several spatial transforms with one grid: the first listed acts first on the image.

    Output voxel ``p`` (offset from the centre) reads the input at
    ``M_1 M_2 ... M_n (p + d(p))`` where ``d`` is the sum of the displacement
    fields: exact composition when the displacement transforms come last in
    the list (as in the registered order rotate, scale, elastic).
    """
    active = [(t, p) for t, p in items if t.active(p)]
    if not active:
        return image, label
    shape = image.shape[1:]
    coords = _base_grid(shape, image.device)
    m = torch.eye(3, dtype=torch.float64)
    disp = None
    for t, p in active:
        m = m @ t.matrix(p)
        d = t.displacement(p, shape, image.device)
        if d is not None:
            disp = d if disp is None else disp + d
    if disp is not None:
        coords = coords + disp
    coords = coords @ m.to(device=image.device, dtype=torch.float32).T
    return _sample_grid(image, label, coords)


# ---------------------------------------------------------------- spatial transforms


@dataclass(frozen=True)
class RotateParams:
    active: bool
    angles: tuple[float, float, float]  #: radians about x, y, z


@register("rotate", spatial=True)
class Rotate(SpatialTransform):
    """Rotation about the patch centre, each axis uniform in ±``cfg.rotate_deg``."""

    def sample_params(self, gen: Generator, shape: Shape, cfg: AugConfig, spacing: Spacing) -> RotateParams:
        (u,) = uniforms(gen, 1)
        r = math.radians(cfg.rotate_deg)
        a = uniforms(gen, 3, -r, r)
        return RotateParams(u < cfg.p_rotate, (a[0], a[1], a[2]))

    def matrix(self, params: RotateParams) -> Tensor:
        return rotation_matrix(params.angles)


@dataclass(frozen=True)
class ScaleParams:
    active: bool
    factor: float  #: >1 samples a larger region (content shrinks)


@register("scale", spatial=True)
class Scale(SpatialTransform):
    """Isotropic scaling about the patch centre, factor uniform in ``cfg.scale_range``."""

    def sample_params(self, gen: Generator, shape: Shape, cfg: AugConfig, spacing: Spacing) -> ScaleParams:
        (u,) = uniforms(gen, 1)
        (f,) = uniforms(gen, 1, *cfg.scale_range)
        return ScaleParams(u < cfg.p_scale, f)

    def matrix(self, params: ScaleParams) -> Tensor:
        return torch.eye(3, dtype=torch.float64) * params.factor


@dataclass(frozen=True)
class ElasticParams:
    active: bool
    grid: int  #: control points per axis
    #: (3, grid, grid, grid) control displacements in voxels of the grid they were drawn for (component
    #: k along axis k), C order
    offsets: tuple[float, ...]


@register("elastic", spatial=True)
class Elastic(SpatialTransform):
    """Smooth random deformation: Gaussian control-point offsets (sd ``elastic_magnitude_mm`` mm, so
    ``elastic_magnitude_mm / spacing`` voxels along each axis) on a ``elastic_grid``^3 lattice, upsampled
    with cubic-like trilinear smoothing."""

    def sample_params(self, gen: Generator, shape: Shape, cfg: AugConfig, spacing: Spacing) -> ElasticParams:
        (u,) = uniforms(gen, 1)
        g = int(cfg.elastic_grid)
        off = torch.randn(3, g**3, generator=gen, dtype=torch.float64) * cfg.elastic_magnitude_mm
        off = off / torch.tensor([float(v) for v in spacing], dtype=torch.float64)[:, None]  # mm -> voxels
        return ElasticParams(u < cfg.p_elastic, g, tuple(off.flatten().tolist()))

    def displacement(self, params: ElasticParams, shape: Sequence[int], device: torch.device) -> Tensor:
        g = params.grid
        ctrl = torch.tensor(params.offsets, dtype=torch.float32, device=device).reshape(1, 3, g, g, g)
        field = F.interpolate(ctrl, size=tuple(shape), mode="trilinear", align_corners=True)
        return field[0].permute(1, 2, 3, 0)


# ---------------------------------------------------------------- intensity transforms


@dataclass(frozen=True)
class BiasParams:
    active: bool
    coeffs: tuple[tuple[float, ...], ...]  #: per channel, 10 coefficients of a 2nd order polynomial


_POLY_TERMS = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (0, 0, 1), (2, 0, 0), (0, 2, 0), (0, 0, 2), (1, 1, 0),
               (1, 0, 1), (0, 1, 1)]


@register("bias")
class BiasField:
    """Multiplicative smooth bias field ``exp(poly(x, y, z))`` per channel; coefficients
    uniform in ±``cfg.bias_strength`` (constant term 0)."""

    def sample_params(self, gen: Generator, shape: Shape, cfg: AugConfig, spacing: Spacing) -> BiasParams:
        (u,) = uniforms(gen, 1)
        c = shape[0]
        vals = uniforms(gen, c * len(_POLY_TERMS), -cfg.bias_strength, cfg.bias_strength)
        coeffs = tuple(
            (0.0, *vals[i * len(_POLY_TERMS) + 1 : (i + 1) * len(_POLY_TERMS)]) for i in range(c)
        )
        return BiasParams(u < cfg.p_bias, coeffs)

    def apply(self, image: Tensor, label: Tensor | None, params: BiasParams) -> tuple[Tensor, Tensor | None]:
        if not params.active:
            return image, label
        x, y, z = (torch.linspace(-1, 1, n, device=image.device) for n in image.shape[1:])
        x, y, z = x[:, None, None], y[None, :, None], z[None, None, :]
        fields = []
        for c in params.coeffs:
            # Broadcast 1-D axes: far cheaper than materialising every term at full size.
            terms = [x**a * y**b * z**e for a, b, e in _POLY_TERMS]
            fields.append(sum(k * t for k, t in zip(c, terms, strict=True)))
        log_field = torch.stack([f.expand(image.shape[1:]) for f in fields])
        return image * torch.exp(log_field).to(image.dtype), label


@dataclass(frozen=True)
class NoiseParams:
    active: bool
    std: float
    seed: int  #: seed of the noise field, drawn on the image's device


@register("noise")
class GaussianNoise:
    """Additive Gaussian noise, sd uniform in ``cfg.noise_std``."""

    def sample_params(self, gen: Generator, shape: Shape, cfg: AugConfig, spacing: Spacing) -> NoiseParams:
        (u,) = uniforms(gen, 1)
        (std,) = uniforms(gen, 1, *cfg.noise_std)
        return NoiseParams(u < cfg.p_noise, std, draw_seed(gen))

    def apply(self, image: Tensor, label: Tensor | None, params: NoiseParams) -> tuple[Tensor, Tensor | None]:
        if not params.active or params.std == 0:
            return image, label
        g = torch.Generator(device=image.device)
        g.manual_seed(params.seed)
        noise = torch.randn(image.shape, generator=g, device=image.device, dtype=torch.float32)
        return image + (noise * params.std).to(image.dtype), label


@dataclass(frozen=True)
class BlurParams:
    active: bool
    sigmas: tuple[float, ...]  #: per channel, voxels


@register("blur")
class Blur:
    """Gaussian blur, sigma per channel uniform in ``cfg.blur_sigma`` voxels."""

    def sample_params(self, gen: Generator, shape: Shape, cfg: AugConfig, spacing: Spacing) -> BlurParams:
        (u,) = uniforms(gen, 1)
        return BlurParams(u < cfg.p_blur, tuple(uniforms(gen, shape[0], *cfg.blur_sigma)))

    def apply(self, image: Tensor, label: Tensor | None, params: BlurParams) -> tuple[Tensor, Tensor | None]:
        if not params.active:
            return image, label
        return gaussian_blur(image, params.sigmas, "sampled"), label


@dataclass(frozen=True)
class LowResParams:
    active: bool
    zoom: float  #: downsampling factor (<1)


@register("lowres")
class LowResolution:
    """Simulate low resolution: nearest downsampling by ``zoom`` then trilinear upsampling."""

    def sample_params(self, gen: Generator, shape: Shape, cfg: AugConfig, spacing: Spacing) -> LowResParams:
        (u,) = uniforms(gen, 1)
        (z,) = uniforms(gen, 1, *cfg.lowres_zoom)
        return LowResParams(u < cfg.p_lowres, z)

    def apply(
        self, image: Tensor, label: Tensor | None, params: LowResParams
    ) -> tuple[Tensor, Tensor | None]:
        if not params.active:
            return image, label
        shape = tuple(image.shape[1:])
        small = tuple(max(1, round(n * params.zoom)) for n in shape)
        if small == shape:
            return image, label
        v = F.interpolate(image.unsqueeze(0).float(), size=small, mode="nearest")
        v = F.interpolate(v, size=shape, mode="trilinear", align_corners=False)
        return v[0].to(image.dtype), label


@dataclass(frozen=True)
class GammaParams:
    active: bool
    gammas: tuple[float, ...]  #: per channel
    invert: bool  #: apply to the inverted image (as nnU-Net's inverted gamma)


@register("gamma")
class Gamma:
    """Gamma on each channel rescaled to [0, 1] and back (range preserved). Half the
    draws take gamma < 1 from ``[lo, 1)``, half > 1 from ``[1, hi]`` (nnU-Net)."""

    def sample_params(self, gen: Generator, shape: Shape, cfg: AugConfig, spacing: Spacing) -> GammaParams:
        u, inv = uniforms(gen, 2)
        lo, hi = cfg.gamma_range
        gammas = []
        for side, t in zip(uniforms(gen, shape[0]), uniforms(gen, shape[0]), strict=True):
            if side < 0.5 and lo < 1.0:
                gammas.append(lo + (min(1.0, hi) - lo) * t)
            else:
                a = max(1.0, lo)
                gammas.append(a + (max(hi, a) - a) * t)
        return GammaParams(u < cfg.p_gamma, tuple(gammas), inv < 0.15)

    def apply(self, image: Tensor, label: Tensor | None, params: GammaParams) -> tuple[Tensor, Tensor | None]:
        if not params.active:
            return image, label
        out = []
        for c, g in enumerate(params.gammas):
            v = -image[c] if params.invert else image[c]
            lo, hi = v.min(), v.max()
            rng = (hi - lo).clamp_min(1e-7)
            w = ((v - lo) / rng).clamp(0, 1) ** g * rng + lo
            out.append(-w if params.invert else w)
        return torch.stack(out).to(image.dtype), label


@dataclass(frozen=True)
class FlipParams:
    axes: tuple[bool, bool, bool]  #: flip X, Y, Z

    @property
    def active(self) -> bool:
        return any(self.axes)


@register("flip")
class Flip:
    """Mirror each spatial axis with probability ``cfg.p_flip`` (exact, no interpolation)."""

    def sample_params(self, gen: Generator, shape: Shape, cfg: AugConfig, spacing: Spacing) -> FlipParams:
        u = uniforms(gen, 3)
        return FlipParams((u[0] < cfg.p_flip, u[1] < cfg.p_flip, u[2] < cfg.p_flip))

    def apply(self, image: Tensor, label: Tensor | None, params: FlipParams) -> tuple[Tensor, Tensor | None]:
        dims = [ax for ax in range(3) if params.axes[ax]]
        if not dims:
            return image, label
        image = torch.flip(image, [d + 1 for d in dims])
        if label is not None:
            label = torch.flip(label, dims)
        return image, label


# ---------------------------------------------------------------- pipeline


@dataclass(frozen=True)
class AugParams:
    """Parameters of the whole pipeline for one sample: ``((name, params), ...)`` in order."""

    items: tuple[tuple[str, Any], ...]


def sample_augment(
    gen: torch.Generator, shape: Sequence[int], cfg: AugConfig, spacing: Sequence[float],
    names: Sequence[str] | None = None,
) -> AugParams:
    """Draw parameters of every registered transform (or ``names``), in pipeline order, for a patch of
    ``shape`` on a grid of ``spacing`` mm (lengths in mm, such as ``elastic_magnitude_mm``, become voxels)."""
    chosen = [n for n in TRANSFORMS if names is None or n in names]
    sp = tuple(float(v) for v in spacing)
    return AugParams(tuple((n, TRANSFORMS[n].sample_params(gen, tuple(shape), cfg, sp)) for n in chosen))


def apply_augment(image: Tensor, label: Tensor | None, params: AugParams) -> tuple[Tensor, Tensor | None]:
    """Apply a sampled pipeline to one sample (``(C, X, Y, Z)``, ``(X, Y, Z)``).

    Consecutive spatial transforms share one resampling.
    """
    pending: list[tuple[SpatialTransform, Any]] = []
    for name, p in params.items:
        t = TRANSFORMS[name]
        if t.spatial:
            pending.append((t, p))  # type: ignore[arg-type]
            continue
        if pending:
            image, label = apply_spatial(image, label, pending)
            pending = []
        image, label = t.apply(image, label, p)
    if pending:
        image, label = apply_spatial(image, label, pending)
    return image, label


def augment_batch(
    images: Tensor, labels: Tensor, cfg: AugConfig, seeds: Sequence[int], spacing: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """Augment a batch ``(B, C, X, Y, Z)``, ``(B, X, Y, Z)`` on a grid of ``spacing`` mm; sample ``b`` uses
    ``seeds[b]``."""
    outs_i, outs_l = [], []
    for b in range(images.shape[0]):
        gen = torch.Generator().manual_seed(int(seeds[b]))
        p = sample_augment(gen, images.shape[1:], cfg, spacing)
        i, lab = apply_augment(images[b], labels[b], p)
        outs_i.append(i)
        outs_l.append(lab)
    return torch.stack(outs_i), torch.stack(outs_l)


__all__ = [
    "TRANSFORMS",
    "AugParams",
    "apply_augment",
    "apply_spatial",
    "augment_batch",
    "register",
    "sample_augment",
]
