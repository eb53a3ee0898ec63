"""The synthesis chain and its one config: anatomy -> lesion (mass effect, oedema) -> appearance.

One case::

    cfg = SynthConfig(spacing=(4.0, 4.0, 4.0))        # 40x48x40 voxels, the 160x192x160 mm crop
    case = generate_case(cfg, seed=0, index=7, device="cpu")
    case.image  # (4, X, Y, Z) float32, MODALITIES order (t1c, t1n, t2f, t2w), background 0
    case.label  # (X, Y, Z) uint8 BraTS-MEN labels (1 NETC, 2 SNFH, 3 ET)

Randomness: every stage of case ``index`` draws from its own CPU
``torch.Generator`` seeded with ``derive_seed(seed, "case", index, stage)``, so
case *i* does not depend on any other case, and changing one stage's settings
does not change the draws of the others. The sampled parameters of every stage
are frozen dataclasses, kept as plain dicts in ``SynthCase.params``; the
sidecar JSON that the writer stores next to each case holds them with the
config, and :func:`replay_case` re-renders the case bit-exactly from it (on
the same device type and torch version).

Appearance is either the randomised model (:mod:`menseg.synth.appearance`,
default) or, with ``SynthConfig.site`` set, the MR-physics model of one fixed
scanner site (:mod:`menseg.synth.site`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from menseg.device import resolve_device
from menseg.errors import MensegError
from menseg.synth import anatomy as _anatomy
from menseg.synth import appearance as _appearance
from menseg.synth import lesion as _lesion
from menseg.synth import site as _site
from menseg.synth.anatomy import AnatomyConfig
from menseg.synth.appearance import AppearanceConfig
from menseg.synth.lesion import LesionConfig
from menseg.synth.longitudinal import LongitudinalConfig
from menseg.synth.serial import from_dict, to_plain
from menseg.synth.tissues import tissue_to_label
from menseg.utils import derive_seed

log = logging.getLogger(__name__)

#: Field of view of the default synthesis grid (mm): the brain bounding-box crop, 160x192x160 at 1 mm.
FOV_MM: tuple[float, float, float] = (160.0, 192.0, 160.0)
#: Version of the sidecar format (bump when its keys change).
SIDECAR_VERSION = 1
#: Stage names, in chain order; each has its own generator per case.
STAGES: tuple[str, ...] = ("anatomy", "lesion", "appearance", "render")

Layout = Literal["brats", "nnunet", "longitudinal"]


@dataclass(frozen=True)
class SynthConfig:
    """Everything that shapes a synthetic case. ``to_dict`` / ``from_dict`` round-trip via YAML/JSON.

    Attributes:
        anatomy, lesion, appearance: the stage configs (randomisation ranges live there).
        longitudinal: growth / visit settings for :func:`menseg.synth.longitudinal.generate_series`.
        site: name of a :func:`menseg.synth.site.site_profile` to render with the MR-physics
            model of that scanner site instead of the randomised appearance; None = randomised.
        spacing: voxel size (mm) of the synthesis grid, (X, Y, Z) in RAS order.
        shape: grid size in voxels; None = the 160x192x160 mm brain crop (``FOV_MM``) at
            ``spacing`` (160x192x160 at 1 mm, 40x48x40 at 4 mm).
    """

    anatomy: AnatomyConfig = field(default_factory=AnatomyConfig)
    lesion: LesionConfig = field(default_factory=LesionConfig)
    appearance: AppearanceConfig = field(default_factory=AppearanceConfig)
    longitudinal: LongitudinalConfig = field(default_factory=LongitudinalConfig)
    site: str | None = None
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    shape: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if len(self.spacing) != 3 or any(float(s) <= 0 for s in self.spacing):
            raise MensegError(f"synth spacing must be three positive mm values, got {self.spacing}")
        if self.shape is not None and (len(self.shape) != 3 or any(int(n) < 8 for n in self.shape)):
            raise MensegError(f"synth shape must be three sizes >= 8 voxels, got {self.shape}")

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """Voxels (X, Y, Z) of the synthesis grid."""
        if self.shape is not None:
            return tuple(int(n) for n in self.shape)  # type: ignore[return-value]
        return tuple(max(8, round(f / s)) for f, s in zip(FOV_MM, self.spacing, strict=True))  # type: ignore[return-value]

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (lists for tuples), for YAML / JSON."""
        return to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SynthConfig:
        """Inverse of :meth:`to_dict`; missing keys keep their defaults, unknown keys are errors."""
        return from_dict(cls, data)


@dataclass
class SynthCase:
    """One synthetic case.

    Attributes:
        image: ``(4, X, Y, Z)`` float32 on the generation device, MODALITIES order, background 0.
        label: ``(X, Y, Z)`` uint8 BraTS-MEN labels.
        tissue: ``(X, Y, Z)`` int64 tissue classes (:mod:`menseg.synth.tissues`).
        affine: ``(4, 4)`` float64 voxel -> RAS mm.
        params: JSON-serialisable: seed, index, config, every stage's sampled parameters.
        timings: seconds per stage (``anatomy``, ``lesion``, ``appearance``, ``pose``), CUDA-synchronised.
    """

    image: torch.Tensor
    label: torch.Tensor
    tissue: torch.Tensor
    affine: np.ndarray
    params: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)


# ----------------------------------------------------------------------------- helpers


def grid_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """RAS affine (4x4, mm) of a grid with ``spacing`` whose centre is at the origin."""
    a = np.diag([*map(float, spacing), 1.0])
    a[:3, 3] = -(np.asarray(shape, float) - 1) / 2 * np.asarray(spacing, float)
    return a


def stage_seeds(seed: int, index: int) -> dict[str, int]:
    """Per-stage seeds of case ``index`` (derived, so cases are independent of each other)."""
    return {s: derive_seed(seed, "case", index, s) for s in STAGES}


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class _Clock:
    """Per-stage wall time; synchronises CUDA so a stage's kernels count towards it."""

    def __init__(self, device: torch.device, out: dict[str, float]) -> None:
        self.device, self.out = device, out
        self._sync()
        self.t = time.perf_counter()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def lap(self, name: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.out[name] = self.out.get(name, 0.0) + now - self.t
        self.t = now


# ----------------------------------------------------------------------------- the chain


def _site_profile(cfg: SynthConfig) -> Any:
    """The fixed :class:`menseg.synth.site.SiteProfile` of ``cfg.site`` (MensegError if unknown)."""
    return None if cfg.site is None else _site.site_profile(cfg.site)


def run_chain(
    cfg: SynthConfig,
    seeds: dict[str, int],
    device: torch.device,
    *,
    anatomy_params: Any = None,
    lesion_params: Any = None,
    appearance_params: Any = None,
    site_params: Any = None,
    lesion_hook: Callable[[Any], Any] | None = None,
    pose: Any = None,
    base: dict[str, Any] | None = None,
) -> SynthCase:
    """Run anatomy -> lesion -> (pose) -> appearance; sample every params argument left None.

    ``seeds`` holds one seed per stage (:data:`STAGES`); ``render`` seeds the site model's
    per-case draws (the randomised appearance carries its noise seed in its params). ``lesion_hook`` may
    rewrite the sampled lesion params before they are applied (longitudinal
    growth); ``pose`` (:class:`menseg.synth.longitudinal.Pose`) moves the head
    rigidly before rendering. ``base`` is merged into the returned params.
    """
    timings: dict[str, float] = {}
    clock = _Clock(device, timings)
    shape, spacing = cfg.grid_shape, tuple(float(s) for s in cfg.spacing)
    template = _anatomy.load_template(spacing=spacing, shape=shape, device=device)
    if anatomy_params is None:
        anatomy_params = _anatomy.sample_anatomy_params(_generator(seeds["anatomy"]), cfg.anatomy)
    anatomy = _anatomy.make_anatomy(template, anatomy_params, device)
    clock.lap("anatomy")
    if lesion_params is None:
        lesion_params = _lesion.sample_lesion_params(_generator(seeds["lesion"]), cfg.lesion, anatomy)
        if lesion_hook is not None:
            lesion_params = lesion_hook(lesion_params)
    res = _lesion.apply_lesions(anatomy.tissue, lesion_params, device,
                                cortex_mm=cfg.lesion.oedema_cortex_mm)
    tissue, label = res.tissue, res.label
    clock.lap("lesion")
    if pose is not None:
        from menseg.synth.longitudinal import apply_pose

        tissue = apply_pose(tissue, pose, spacing)
        label = tissue_to_label(tissue)
        clock.lap("pose")
    profile = _site_profile(cfg)
    if profile is not None:
        if site_params is None:
            site_params = _site.sample_site_params(profile, seeds["render"])
        image = _site.render_site_params(tissue, profile, site_params, spacing)
        appearance_params = None
    else:
        site_params = None
        if appearance_params is None:
            appearance_params = _appearance.sample_appearance_params(
                _generator(seeds["appearance"]), cfg.appearance
            )
        image = _appearance.render(tissue, appearance_params, spacing)  # noise seed is in the params
    clock.lap("appearance")
    params: dict[str, Any] = {
        **(base or {}),
        "config": cfg.to_dict(),
        "seeds": dict(seeds),
        "anatomy": to_plain(anatomy_params),
        "lesion": to_plain(lesion_params),
        "appearance": to_plain(appearance_params),
        "site": to_plain(profile),
        "site_case": to_plain(site_params),
        "pose": to_plain(pose),
    }
    affine = template.affine  # voxel -> MNI mm (the grid is centred on the template brain)
    return SynthCase(
        image=image.to(torch.float32), label=label.to(torch.uint8), tissue=tissue,
        affine=affine, params=params, timings=timings,
    )


def generate_case(
    cfg: SynthConfig, seed: int, index: int, device: str | torch.device = "cpu"
) -> SynthCase:
    """Case ``index`` of the stream with master ``seed`` (independent of every other index).

    Returns a :class:`SynthCase`: image ``(4, X, Y, Z)`` float32 and label ``(X, Y, Z)``
    uint8 on ``device``, ``X, Y, Z = cfg.grid_shape`` at ``cfg.spacing`` mm.
    """
    dev = resolve_device(device)
    base = {"kind": "case", "seed": int(seed), "index": int(index)}
    return run_chain(cfg, stage_seeds(seed, index), dev, base=base)


# ----------------------------------------------------------------------------- replay


def load_sidecar(path: str | Path) -> dict[str, Any]:
    """Read and sanity-check a ``<case>-params.json`` sidecar."""
    from menseg.synth.writer import read_sidecar

    side = read_sidecar(path)
    for key in ("kind", "seed", "config", "seeds"):
        if key not in side:
            raise MensegError(f"sidecar lacks '{key}'", path)
    return side


#: Keys of ``SynthCase.params`` written by :func:`run_chain` (the rest is caller context).
_CHAIN_KEYS = ("config", "seeds", "anatomy", "lesion", "appearance", "site", "site_case", "pose")


def replay_params(params: dict[str, Any], device: str | torch.device = "cpu") -> SynthCase:
    """Re-render a case from its stored parameters (``SynthCase.params`` or a sidecar dict).

    Uses the stored stage parameters (not a re-draw), so an edited sidecar renders
    the edited case; the stored seeds drive only the render-time noise.
    """
    from menseg.synth import longitudinal

    dev = resolve_device(device)
    cfg = SynthConfig.from_dict(params["config"])
    ap = from_dict(_anatomy.AnatomyParams, params["anatomy"])
    lp = from_dict(_lesion.LesionParams, params["lesion"])
    app = params.get("appearance")
    app = None if app is None else from_dict(_appearance.AppearanceParams, app)
    sc = params.get("site_case")
    sc = None if sc is None else from_dict(_site.SiteCaseParams, sc)
    pose = params.get("pose")
    pose = None if pose is None else from_dict(longitudinal.Pose, pose)
    base = {k: v for k, v in params.items() if k not in _CHAIN_KEYS}
    seeds = {k: int(v) for k, v in params["seeds"].items()}
    return run_chain(cfg, seeds, dev, anatomy_params=ap, lesion_params=lp,
                     appearance_params=app, site_params=sc, pose=pose, base=base)


def replay_case(sidecar: str | Path | dict[str, Any], device: str | torch.device = "cpu") -> SynthCase:
    """Re-create a case bit-exactly from its sidecar (path or loaded dict).

    The stored parameters are re-rendered (:func:`replay_params`). Cases and
    longitudinal visits both replay.
    """
    side = load_sidecar(sidecar) if not isinstance(sidecar, dict) else sidecar
    return replay_params(side, device)


# ----------------------------------------------------------------------------- streaming


class SynthStream(torch.utils.data.IterableDataset):
    """Endless (or ``n_batches``-long) stream of synthetic batches for on-the-fly training.

    Batch ``step`` holds cases ``step * batch_size + b`` (b < batch_size) of the
    stream with master ``seed``, so any batch is reproducible from (seed, step)
    alone (see :meth:`batch`) and resuming at ``start=step`` continues exactly.
    Yields ``(image (B, 4, X, Y, Z) float32, label (B, X, Y, Z) uint8)`` on ``device``.
    Under a ``DataLoader`` with workers, worker w takes steps w, w+W, ... (use a
    CPU device there).
    """

    def __init__(
        self,
        cfg: SynthConfig,
        seed: int,
        batch_size: int = 2,
        device: str | torch.device = "auto",
        start: int = 0,
        n_batches: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise MensegError(f"batch_size must be >= 1, got {batch_size}")
        self.cfg, self.seed, self.batch_size = cfg, int(seed), int(batch_size)
        self.device = resolve_device(device)
        self.start, self.n_batches = int(start), n_batches

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch number ``step``: ``(image (B, 4, X, Y, Z) f32, label (B, X, Y, Z) uint8)``."""
        cases = [
            generate_case(self.cfg, self.seed, step * self.batch_size + b, self.device)
            for b in range(self.batch_size)
        ]
        return torch.stack([c.image for c in cases]), torch.stack([c.label for c in cases])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start + wid
        stop = None if self.n_batches is None else self.start + self.n_batches
        while stop is None or step < stop:
            yield self.batch(step)
            step += nw


# ----------------------------------------------------------------------------- datasets


def synth_dataset(
    out: str | Path,
    n_cases: int,
    layout: Layout = "brats",
    seed: int = 0,
    cfg: SynthConfig | None = None,
    preview: bool = False,
    visits: int = 3,
    device: str | torch.device = "auto",
    prefix: str = "SYNTH-MEN",
    max_previews: int = 16,
) -> list[Path]:
    """Write a synthetic dataset; returns the sidecar JSON path of every case written.

    Args:
        out: new or empty folder (a non-empty one is refused). Everything is written to a
            temporary folder beside it that is renamed onto ``out`` at the end, so an
            error leaves nothing behind.
        n_cases: cases (brats, nnunet) or patients (longitudinal, ``visits`` cases each).
        layout: ``brats`` (``out/<case>/<case>-t1c.nii.gz``...), ``nnunet`` (imagesTr/,
            labelsTr/, dataset.json; sidecars in ``params/``) or ``longitudinal``
            (``out/<patient>/<patient>-<ttt>/...`` + ``out/<patient>/timepoints.json``).
        seed: master seed; case i is ``generate_case(cfg, seed, i)``, patient p is
            ``generate_series(cfg, seed, p, visits)``.
        cfg: synthesis settings (default :class:`SynthConfig`, 1 mm, 160x192x160).
        preview: also write PNG mosaics (``out/preview/<case>.png``) of the first
            ``max_previews`` cases.
        visits: visits per patient (longitudinal only).
        device: where to synthesise (``auto`` = CUDA if available).
        prefix: case id prefix: ``<prefix>-<index:05d>-<ttt>`` (BraTS style).
    """
    from tqdm.auto import tqdm

    from menseg.synth import writer
    from menseg.synth.longitudinal import generate_series

    cfg = cfg if cfg is not None else SynthConfig()
    dev = resolve_device(device)
    if layout not in ("brats", "nnunet", "longitudinal"):
        raise MensegError(f"unknown layout '{layout}' (use brats, nnunet or longitudinal)")
    if n_cases < 1:
        raise MensegError(f"number of cases must be >= 1, got {n_cases}")
    if layout == "longitudinal" and visits < 1:
        raise MensegError(f"visits must be >= 1, got {visits}")
    if cfg.site is not None:
        _site_profile(cfg)  # fail before any work
    sidecars: list[Path] = []
    n_previews = 0
    with writer.DatasetWriter(out, layout) as w:
        for i in tqdm(range(n_cases), desc=f"synth ({layout})", unit="patient" if layout ==
                      "longitudinal" else "case", disable=None):
            if layout == "longitudinal":
                series = generate_series(cfg, seed, i, visits, dev)
                patient = writer.patient_id(prefix, i)
                for t, case in enumerate(series):
                    cid = writer.case_id(prefix, i, t)
                    sidecars.append(w.write(case, cid, patient=patient, day=case.params["day"]))
                    if preview and n_previews < max_previews:
                        w.write_preview(case, cid)
                        n_previews += 1
            else:
                case = generate_case(cfg, seed, i, dev)
                cid = writer.case_id(prefix, i, 0)
                sidecars.append(w.write(case, cid))
                if preview and n_previews < max_previews:
                    w.write_preview(case, cid)
                    n_previews += 1
    final = Path(out)
    return [final / p for p in w.relative(sidecars)]


def with_spacing(cfg: SynthConfig, spacing: float | tuple[float, float, float]) -> SynthConfig:
    """``cfg`` on another grid spacing (same field of view unless ``cfg.shape`` is fixed)."""
    sp = (float(spacing),) * 3 if isinstance(spacing, int | float) else tuple(map(float, spacing))
    return replace(cfg, spacing=sp)  # type: ignore[arg-type]


__all__ = [
    "FOV_MM",
    "SIDECAR_VERSION",
    "STAGES",
    "SynthCase",
    "SynthConfig",
    "SynthStream",
    "generate_case",
    "grid_affine",
    "load_sidecar",
    "replay_case",
    "replay_params",
    "resolve_device",
    "run_chain",
    "stage_seeds",
    "synth_dataset",
    "with_spacing",
]
