"""Rigid registration of an earlier visit onto the current one (SimpleITK), and resampling.

Before the features of a prior visit can be fused into the current visit's
features (:mod:`menseg.ism.temporal`), both visits must share one voxel grid:
the prior (moving) visit is rigidly registered to the current (fixed) visit
and resampled onto the fixed grid.

Coordinate conventions, stated once:

- menseg arrays are ``(X, Y, Z)`` (channel-first ``(C, X, Y, Z)``) with a nibabel
  4x4 affine that maps a voxel index ``(i, j, k, 1)`` to **RAS+** world mm
  (+x = patient's Right, +y = Anterior, +z = Superior).
- ITK works in **LPS+** world mm (+x = Left, +y = Posterior, +z = Superior), and
  a SimpleITK image built from a numpy array indexes it as ``[k, j, i]``. The
  two worlds differ by ``F = diag(-1, -1, 1)``: ``p_lps = F @ p_ras``. So for an
  array ``a`` with RAS affine ``A`` the ITK image is ``a.transpose(2, 1, 0)`` with
  ``origin = F @ A[:3, 3]``, ``spacing = |A[:3, i]|`` (column norms) and
  ``direction = F @ A[:3, :3] / spacing`` (see :func:`to_sitk_image`).
- ITK's registration returns the transform that maps a point of the **fixed**
  world to the corresponding point of the **moving** world (the direction a
  resampler needs). :class:`RigidTransform` keeps that direction, in RAS mm:
  ``M_ras = F4 @ M_lps @ F4`` with ``F4 = diag(-1, -1, 1, 1)`` (F4 is its own inverse).

Resampling (:func:`resample_to_fixed`) does not go through ITK: the voxel map
``inv(A_moving) @ M_ras @ A_fixed`` is applied with :func:`scipy.ndimage.affine_transform`,
which is exact for any affine (ITK images cannot hold sheared affines) and
handles channels and integer labels directly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from menseg.errors import MensegError

log = logging.getLogger(__name__)

#: RAS <-> LPS flip of world coordinates (3x3 and homogeneous 4x4); each is its own inverse.
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
RAS_TO_LPS_4 = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class RegistrationConfig:
    """Settings of :func:`register_rigid` (Euler3D, Mattes MI, multi-resolution)."""

    #: Histogram bins of the Mattes mutual information.
    bins: int = 32
    #: Share of fixed-image voxels sampled for the metric (random, seeded); 1.0 = all voxels ...
    sampling_percentage: float = 0.5
    #: ... but at most this many at full resolution (the cost of a 240x240x155 scan stays bounded).
    max_samples: int = 200_000
    #: Pyramid: shrink factor and Gaussian smoothing sigma (voxels) per level, coarse to fine.
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas: tuple[float, ...] = (2.0, 1.0, 0.0)
    #: A pyramid level is dropped when it would leave fewer voxels than this on some axis.
    min_level_size: int = 8
    #: Regular-step gradient descent: first step (in units of ~1 mm of physical shift, the
    #: optimizer scales come from the physical shift), smallest step, iterations per level.
    learning_rate: float = 1.0
    min_step: float = 1e-4
    iterations: int = 200
    relaxation: float = 0.5
    #: Centred initialisation: "moments" (centres of intensity mass; robust to different fields of
    #: view) or "geometry" (centres of the grids).
    init: Literal["moments", "geometry"] = "moments"
    #: Intensities are clipped to these percentiles and scaled to [0, 1] before registration
    #: (MI is nearly invariant to it; it makes the moments and the histogram range robust).
    clip_percentiles: tuple[float, float] = (0.5, 99.5)
    #: ITK threads during registration. 1 makes the result bit-reproducible (ITK's threaded metric
    #: sums in a thread-dependent order); more is faster on large volumes but varies ~1e-8.
    threads: int = 1


@dataclass(frozen=True)
class RigidTransform:
    """A rigid map from the fixed (current visit) world to the moving (prior visit) world, RAS+ mm.

    ``x_moving = R @ x_fixed + t`` with ``R`` (3x3 rotation) and ``t`` (mm) the blocks
    of :attr:`matrix` (4x4, row-major nested tuples so the object is hashable and
    JSON-friendly). ``metric`` is the final Mattes MI value (negative; lower = better
    match), ``iterations`` and ``stop`` the optimizer's last level report.
    """

    matrix: tuple[tuple[float, ...], ...]
    metric: float = float("nan")
    iterations: int = 0
    stop: str = ""

    def __post_init__(self) -> None:
        m = np.asarray(self.matrix, dtype=np.float64)
        if m.shape != (4, 4) or not np.isfinite(m).all():
            raise MensegError(f"a rigid transform needs a finite 4x4 matrix, got shape {m.shape}")

    @classmethod
    def identity(cls) -> RigidTransform:
        return cls.from_array(np.eye(4))

    @classmethod
    def from_array(cls, m: np.ndarray, **kw: Any) -> RigidTransform:
        """From a 4x4 array (fixed RAS mm -> moving RAS mm)."""
        m = np.asarray(m, dtype=np.float64)
        return cls(tuple(tuple(float(v) for v in row) for row in m), **kw)

    def as_array(self) -> np.ndarray:
        """The 4x4 float64 matrix (fixed RAS mm -> moving RAS mm)."""
        return np.asarray(self.matrix, dtype=np.float64)

    @property
    def rotation(self) -> np.ndarray:
        """3x3 rotation block ``R``."""
        return self.as_array()[:3, :3]

    @property
    def translation_mm(self) -> np.ndarray:
        """Translation ``t`` (mm, RAS)."""
        return self.as_array()[:3, 3]

    def rotation_angle_deg(self) -> float:
        """Total rotation angle (degrees) of ``R`` (axis-angle magnitude)."""
        return rotation_angle_deg(self.rotation)

    def inverse(self) -> RigidTransform:
        """The map from the moving world to the fixed world."""
        return RigidTransform.from_array(np.linalg.inv(self.as_array()))

    def apply(self, points_mm: np.ndarray) -> np.ndarray:
        """Map fixed-world points ``(..., 3)`` (RAS mm) to moving-world points ``(..., 3)``."""
        p = np.asarray(points_mm, dtype=np.float64)
        return p @ self.rotation.T + self.translation_mm

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (e.g. a sidecar of a prediction with ``--prior``)."""
        return {
            "matrix_ras_fixed_to_moving": [list(r) for r in self.matrix],
            "rotation_deg": self.rotation_angle_deg(),
            "translation_mm": self.translation_mm.tolist(),
            "metric": self.metric,
            "iterations": self.iterations,
            "stop": self.stop,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RigidTransform:
        return cls.from_array(
            np.asarray(d["matrix_ras_fixed_to_moving"]),
            metric=float(d.get("metric", float("nan"))),
            iterations=int(d.get("iterations", 0)),
            stop=str(d.get("stop", "")),
        )


def rotation_angle_deg(r: np.ndarray) -> float:
    """Rotation angle (degrees) of a 3x3 rotation matrix: ``acos((trace - 1) / 2)``."""
    c = (float(np.trace(np.asarray(r, dtype=np.float64))) - 1.0) / 2.0
    return math.degrees(math.acos(min(1.0, max(-1.0, c))))


# ----------------------------------------------------------------------------- RAS <-> ITK


def _spacing_direction(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column norms (mm) and the nearest orthonormal direction (RAS) of an affine's 3x3 block."""
    lin = np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    if (spacing <= 0).any() or abs(np.linalg.det(lin)) < 1e-12:
        raise MensegError("registration needs a non-singular affine")
    direction = lin / spacing
    u, _, vt = np.linalg.svd(direction)
    ortho = u @ vt  # polar factor: the nearest orthonormal matrix, keeps the handedness
    if np.abs(ortho - direction).max() > 1e-4:
        log.warning(
            "sheared affine: registration uses its nearest orthonormal direction "
            "(resampling stays exact)"
        )
    return spacing, ortho


def to_sitk_image(array: np.ndarray, affine: np.ndarray) -> Any:
    """A SimpleITK float32 image holding ``array (X, Y, Z)`` at its physical place.

    ITK voxel index ``(i, j, k)`` is ``array[i, j, k]`` and sits at the LPS point
    ``F @ (affine @ (i, j, k, 1))[:3]`` with ``F = diag(-1, -1, 1)`` (module docstring).
    """
    import SimpleITK as sitk

    a = np.asarray(array)
    if a.ndim != 3:
        raise MensegError(f"registration needs a 3D array (X, Y, Z), got shape {a.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    spacing, direction = _spacing_direction(affine)
    img = sitk.GetImageFromArray(np.ascontiguousarray(a.transpose(2, 1, 0), dtype=np.float32))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(v) for v in RAS_TO_LPS @ affine[:3, 3]])
    img.SetDirection([float(v) for v in (RAS_TO_LPS @ direction).ravel()])
    return img


def _matrix_lps(transform: Any) -> np.ndarray:
    """4x4 matrix of an (affine) ITK transform, read off by mapping the origin and unit vectors."""
    o = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)), dtype=np.float64)
    m = np.eye(4)
    m[:3, 3] = o
    for i in range(3):
        e = [0.0, 0.0, 0.0]
        e[i] = 1.0
        m[:3, i] = np.asarray(transform.TransformPoint(tuple(e)), dtype=np.float64) - o
    return m


def lps_to_ras_matrix(m_lps: np.ndarray) -> np.ndarray:
    """A 4x4 world map in LPS mm -> the same map in RAS mm (``F4 @ M @ F4``)."""
    return RAS_TO_LPS_4 @ np.asarray(m_lps, dtype=np.float64) @ RAS_TO_LPS_4


def _normalise(a: np.ndarray, clip: tuple[float, float]) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise MensegError("registration input contains NaN/inf")
    lo, hi = np.percentile(a, clip)
    if hi <= lo:
        lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        raise MensegError("registration input is a constant image")
    return ((np.clip(a, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def _pyramid(cfg: RegistrationConfig, shapes: Sequence[Sequence[int]]) -> tuple[list[int], list[float]]:
    if len(cfg.shrink_factors) != len(cfg.smoothing_sigmas) or not cfg.shrink_factors:
        raise MensegError("registration shrink_factors and smoothing_sigmas need the same, non-zero length")
    smallest = min(min(s) for s in shapes)
    keep = [
        (int(f), float(s))
        for f, s in zip(cfg.shrink_factors, cfg.smoothing_sigmas, strict=True)
        if f == 1 or smallest // f >= cfg.min_level_size
    ]
    if not keep:
        keep = [(1, 0.0)]
    return [f for f, _ in keep], [s for _, s in keep]


def _run_registration(
    fixed_img: Any,
    moving_img: Any,
    seed: int,
    cfg: RegistrationConfig,
    pyramid: tuple[list[int], list[float]],
) -> tuple[Any, Any]:
    """Initialise and run the ITK registration; returns (final transform, the method)."""
    import SimpleITK as sitk

    mode = {
        "moments": sitk.CenteredTransformInitializerFilter.MOMENTS,
        "geometry": sitk.CenteredTransformInitializerFilter.GEOMETRY,
    }
    initial = sitk.CenteredTransformInitializer(
        fixed_img, moving_img, sitk.Euler3DTransform(), mode[cfg.init]
    )

    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(cfg.threads)
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=cfg.bins)
    n_voxels = int(np.prod(fixed_img.GetSize()))
    share = min(cfg.sampling_percentage, cfg.max_samples / max(n_voxels, 1))
    if share >= 1.0:
        reg.SetMetricSamplingStrategy(reg.NONE)
    else:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(share, 1 + int(seed) % (2**31 - 2))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=cfg.learning_rate,
        minStep=cfg.min_step,
        numberOfIterations=cfg.iterations,
        relaxationFactor=cfg.relaxation,
        gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    shrink, sigmas = pyramid
    reg.SetShrinkFactorsPerLevel(shrink)
    reg.SetSmoothingSigmasPerLevel(sigmas)
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(initial, inPlace=False)
    return reg.Execute(fixed_img, moving_img), reg


def register_rigid(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    seed: int = 0,
    cfg: RegistrationConfig | None = None,
) -> RigidTransform:
    """Rigidly register ``moving (X, Y, Z)`` onto ``fixed (X', Y', Z')``.

    Euler3D transform, Mattes mutual information (so different contrasts or
    scanners across visits are fine), regular-step gradient descent with
    optimizer scales from the physical shift, a multi-resolution pyramid
    (``cfg.shrink_factors`` / ``cfg.smoothing_sigmas``) and centred initialisation
    (``cfg.init``). Deterministic (bit for bit): the metric's random sampling is
    seeded from ``seed`` (shifted by one: SimpleITK reads seed 0 as "wall clock"),
    and ITK runs on ``cfg.threads`` = 1 thread: ITK's *global* default thread count
    is set for the call and restored afterwards (the per-method setting does not
    reach the metric), so do not run other ITK work concurrently in other threads.

    Args:
        moving, fixed: intensity volumes (one sequence each, e.g. t1c of both visits).
        moving_affine, fixed_affine: their 4x4 voxel -> RAS mm affines.
        seed: sampling seed of the metric.

    Returns:
        :class:`RigidTransform` mapping fixed RAS mm -> moving RAS mm (what
        :func:`resample_to_fixed` needs).
    """
    import SimpleITK as sitk

    cfg = cfg or RegistrationConfig()
    fixed_img = to_sitk_image(_normalise(fixed, cfg.clip_percentiles), fixed_affine)
    moving_img = to_sitk_image(_normalise(moving, cfg.clip_percentiles), moving_affine)
    if cfg.init not in ("moments", "geometry"):
        raise MensegError(f"unknown registration init '{cfg.init}' (known: moments, geometry)")
    pyramid = _pyramid(cfg, [fixed.shape, moving.shape])
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(cfg.threads)
    try:
        final, reg = _run_registration(fixed_img, moving_img, seed, cfg, pyramid)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)

    m_ras = lps_to_ras_matrix(_matrix_lps(final))
    u, _, vt = np.linalg.svd(m_ras[:3, :3])  # remove rounding: keep an exact rotation
    m_ras[:3, :3] = u @ vt
    out = RigidTransform.from_array(
        m_ras,
        metric=float(reg.GetMetricValue()),
        iterations=int(reg.GetOptimizerIteration()),
        stop=str(reg.GetOptimizerStopConditionDescription()),
    )
    log.info(
        "rigid registration: rotation %.2f deg, translation %s mm, metric %.4f (%s)",
        out.rotation_angle_deg(),
        np.round(out.translation_mm, 2).tolist(),
        out.metric,
        out.stop,
    )
    return out


# ----------------------------------------------------------------------------- resampling


def voxel_map(
    moving_affine: np.ndarray, transform: RigidTransform, fixed_affine: np.ndarray
) -> np.ndarray:
    """4x4 map from a fixed voxel index to the moving voxel index it samples.

    ``inv(A_moving) @ M_ras @ A_fixed``: fixed voxel -> fixed RAS mm -> moving RAS mm -> moving voxel.
    """
    a_m = np.asarray(moving_affine, dtype=np.float64)
    a_f = np.asarray(fixed_affine, dtype=np.float64)
    return np.linalg.solve(a_m, transform.as_array() @ a_f)


def resample_to_fixed(
    moving_arrays: np.ndarray,
    moving_affine: np.ndarray,
    transform: RigidTransform,
    fixed_shape: Sequence[int],
    fixed_affine: np.ndarray,
    order: int = 1,
) -> np.ndarray:
    """Resample the moving visit onto the fixed visit's grid.

    Args:
        moving_arrays: ``(C, X, Y, Z)`` (or ``(X, Y, Z)``) on the moving grid.
        moving_affine, fixed_affine: 4x4 voxel -> RAS mm affines.
        transform: fixed RAS mm -> moving RAS mm (from :func:`register_rigid`).
        fixed_shape: ``(X', Y', Z')`` of the fixed grid.
        order: 1 (trilinear) for images -> float32; 0 (nearest) for labels -> the input
            dtype, values are a subset of the input's (labels stay integer).

    Returns:
        ``(C, X', Y', Z')`` (or ``(X', Y', Z')`` for a 3D input); 0 outside the moving field of view.
        With an identity voxel map (same grid, identity transform) the input is copied exactly.
    """
    from scipy import ndimage

    a = np.asarray(moving_arrays)
    squeeze = a.ndim == 3
    if squeeze:
        a = a[None]
    if a.ndim != 4:
        raise MensegError(f"resample_to_fixed needs (C, X, Y, Z) or (X, Y, Z), got shape {a.shape}")
    if order not in (0, 1, 2, 3):
        raise MensegError(f"resampling order must be 0 (labels) to 3, got {order}")
    fixed_shape = tuple(int(s) for s in fixed_shape)
    if len(fixed_shape) != 3:
        raise MensegError(f"fixed_shape must have 3 entries, got {fixed_shape}")
    m = voxel_map(moving_affine, transform, fixed_affine)
    out_dtype = a.dtype if order == 0 else np.float32
    if fixed_shape == a.shape[1:] and np.allclose(m, np.eye(4), rtol=0.0, atol=1e-9):
        out = a.astype(out_dtype, copy=True)
    else:
        out = np.empty((a.shape[0], *fixed_shape), dtype=out_dtype)
        src = a if order == 0 else a.astype(np.float32, copy=False)
        for c in range(a.shape[0]):
            ndimage.affine_transform(
                src[c], m[:3, :3], offset=m[:3, 3], output_shape=fixed_shape, output=out[c],
                order=order, mode="constant", cval=0.0,
            )
    return out[0] if squeeze else out


__all__ = [
    "RAS_TO_LPS",
    "RAS_TO_LPS_4",
    "RegistrationConfig",
    "RigidTransform",
    "lps_to_ras_matrix",
    "register_rigid",
    "resample_to_fixed",
    "rotation_angle_deg",
    "to_sitk_image",
    "voxel_map",
]
