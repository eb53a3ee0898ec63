"""The synthetic stream of a Sim2Real run (``sim2real.stream``): unlimited synthetic meningiomas with a fixed
memory footprint.

Case ``j`` of a run's stream is a pure function of ``(stream seed, j)``:

- its anatomy: with probability ``label_map_share`` (when ``label_maps`` is set) one of the real whole-head
  label maps, resampled to the run's grid (nearest, integer stride), with the lesion grown against its
  dural surface and SynthSeg-style random intensities per class
  (:func:`menseg.synth.from_labels.synth_on_label_map`); otherwise the deformed template of the engine;
- its appearance (template cases): one of ``sites``, uniformly: ``random`` (the randomised appearance
  model) or an MR-physics site profile (:mod:`menseg.synth.site`);
- then the trainer's own preprocessing (:func:`menseg.data.preprocess.preprocess`: crop, resample, z-score).

:class:`RollingPool` holds generation ``g = step // refresh_every``: cases ``g * n .. g * n + n - 1``
(``n = sim2real.n_synthetic``). While generation ``g`` trains, a background thread makes ``g + 1`` (and
translates it, when the run has a translator); the trainer waits only when synthesis is slower than
``refresh_every`` steps, and the log says how long. Because a generation depends on the step alone, a
resumed run rebuilds the generation it stopped in and continues bit for bit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from menseg.config import StreamConfig
from menseg.errors import MensegError
from menseg.utils import derive_seed

log = logging.getLogger(__name__)

#: The randomised appearance model's name among ``sim2real.stream.sites``.
RANDOM = "random"
#: Label mappings shipped with the package (``sim2real.stream.label_mapping``).
MAPPINGS_DIR = Path(__file__).resolve().parents[1] / "synth" / "mappings"
#: CSF of a label map farther than this (mm) from the brain's other classes is dropped: whole-head maps
#: label the spinal canal and the cisterns down the neck as CSF, which skull-stripped scans do not show.
CSF_MARGIN_MM = 6.0
#: Tries with fresh lesion draws before a label-map case gives up (a map with no room for a lesion).
TRIES = 4

Case = tuple[str, np.ndarray, np.ndarray]  # (case id, image (4, X, Y, Z) f32, label (X, Y, Z) uint8)


@dataclass
class LabelMap:
    """One label map on (about) the run's grid."""

    stem: str
    labels: np.ndarray  # (X, Y, Z) int
    affine: np.ndarray  # 4x4


def resolve_mapping(name: str | None) -> dict[int, int] | None:
    """``sim2real.stream.label_mapping``: a packaged name (``synthseg``), a JSON file, or None."""
    from menseg.synth.from_labels import load_label_mapping

    if not name:
        return None
    packaged = MAPPINGS_DIR / f"{name}.json"
    if packaged.is_file():
        return load_label_mapping(packaged)
    if Path(name).is_file():
        return load_label_mapping(name)
    known = ", ".join(sorted(p.stem for p in MAPPINGS_DIR.glob("*.json")))
    raise MensegError(f"sim2real.stream.label_mapping '{name}' is neither a packaged mapping ({known}) nor a "
                      "JSON file")


def trim_csf(labels: np.ndarray, mapping: dict[int, int], voxel_mm: Sequence[float]) -> np.ndarray:
    """``labels`` with the CSF classes (per ``mapping``) set to 0 beyond :data:`CSF_MARGIN_MM` of every
    other kept class (classes the mapping sends to background do not count)."""
    from scipy import ndimage

    from menseg.synth import tissues as T

    csf_ids = [c for c, t in mapping.items() if t == T.CSF]
    dropped = [c for c, t in mapping.items() if t == T.BACKGROUND]
    csf = np.isin(labels, csf_ids)
    if not csf.any():
        return labels
    brain = (labels > 0) & ~csf & ~np.isin(labels, dropped)
    if not brain.any():
        return labels
    dist = ndimage.distance_transform_edt(~brain, sampling=tuple(float(v) for v in voxel_mm))
    return np.where(csf & (dist > CSF_MARGIN_MM), 0, labels)


def load_label_maps(folder: str | Path, spacing: Sequence[float],
                    mapping: dict[int, int] | None = None) -> list[LabelMap]:
    """Every label map of ``folder``, subsampled by the integer stride that brings its voxels closest to
    ``min(spacing)`` mm (nearest neighbour: labels stay labels); with a ``mapping``, CSF far from the
    brain is dropped (:func:`trim_csf`)."""
    from menseg.data.validate import spacing_of
    from menseg.synth.from_labels import find_label_maps, map_stem, read_label_map

    paths = find_label_maps(folder)  # MensegError when there are none
    out = []
    for p in paths:
        data, affine, _ = read_label_map(p)
        stride = max(1, round(float(min(spacing)) / float(min(spacing_of(affine)))))
        lab = np.ascontiguousarray(data[::stride, ::stride, ::stride])
        aff = np.asarray(affine, np.float64).copy()
        aff[:3, :3] *= stride
        if mapping:
            lab = trim_csf(lab, mapping, spacing_of(aff))
        out.append(LabelMap(map_stem(p), lab, aff))
    log.info("stream: %d label maps from %s on a grid of %g mm", len(out), folder,
             float(min(spacing_of(out[0].affine))))
    return out


@dataclass
class StreamSource:
    """What every case of one run's stream is made from (see the module docstring)."""

    cfg: StreamConfig
    seed: int
    spacing: tuple[float, float, float]
    maps: list[LabelMap] = field(default_factory=list)
    mapping: dict[int, int] | None = None

    @classmethod
    def build(cls, cfg: StreamConfig, seed: int, spacing: Sequence[float]) -> StreamSource:
        from menseg.synth.site import list_sites

        bad = [s for s in cfg.sites if s != RANDOM and s not in list_sites()]
        if bad:
            raise MensegError(f"sim2real.stream.sites: unknown '{bad[0]}' (use {RANDOM} or one of "
                              f"{', '.join(list_sites())})")
        sp = tuple(float(s) for s in spacing)
        mapping = resolve_mapping(cfg.label_mapping) if cfg.label_maps else None
        maps = load_label_maps(cfg.label_maps, sp, mapping) if cfg.label_maps else []
        return cls(cfg, int(seed), sp, maps, mapping)  # type: ignore[arg-type]

    def kind(self, j: int) -> str:
        """``map:<stem>`` or the appearance (``random`` / a site) of case ``j``."""
        rng = np.random.default_rng(derive_seed(self.seed, "stream-kind", j))
        use_map = bool(self.maps) and rng.random() < self.cfg.label_map_share
        pick = int(rng.integers(len(self.maps) if use_map else len(self.cfg.sites)))
        return f"map:{self.maps[pick].stem}" if use_map else self.cfg.sites[pick]

    def case(self, j: int) -> Case:
        """Case ``j``, preprocessed on the run's grid."""
        from menseg.data.preprocess import preprocess

        kind = self.kind(j)
        cid = f"STREAM-{j:07d}"
        if kind.startswith("map:"):
            image, label, affine = self._on_map(j, kind[4:])
        else:
            from menseg.synth.engine import SynthConfig, generate_case, with_spacing

            scfg = with_spacing(SynthConfig(site=None if kind == RANDOM else kind), float(min(self.spacing)))
            c = generate_case(scfg, derive_seed(self.seed, "stream-template"), j, "cpu")
            image, label, affine = c.image.numpy(), c.label.numpy(), np.asarray(c.affine, np.float64)
        img, lab, _ = preprocess(image, label, affine, self.spacing, name=cid)
        assert lab is not None
        return cid, img, lab

    def _on_map(self, j: int, stem: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from menseg.synth.from_labels import synth_on_label_map

        lm = next(m for m in self.maps if m.stem == stem)
        err: MensegError | None = None
        for t in range(TRIES):
            try:
                c = synth_on_label_map(lm.labels, lm.affine, derive_seed(self.seed, "stream-map", j, t),
                                       self.mapping, where=stem)
                return c.image, c.label, c.affine
            except MensegError as e:  # no room for this lesion draw: draw again
                err = e
        raise MensegError(f"stream case {j}: {err}")


class _Job:
    """One generation being made in a daemon thread (a process that stops mid-run does not wait for it)."""

    def __init__(self, fn: Callable[[int], list[Case]], g: int) -> None:
        self.result: list[Case] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(fn, g), name=f"menseg-stream-{g}", daemon=True)
        self.thread.start()

    def _run(self, fn: Callable[[int], list[Case]], g: int) -> None:
        try:
            self.result = fn(g)
        except BaseException as e:  # noqa: BLE001 - raised again in the trainer's thread by wait()
            self.error = e

    def wait(self) -> list[Case]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class RollingPool:
    """Generation ``g`` of a stream: ``n`` cases made by ``make(j)``, optionally passed through ``transform``
    (e.g. the translator), with the next generation made in a background thread.

    Counters (for the log and the stream's samples/s): ``made`` cases, ``make_seconds`` spent making them
    (wall time in whichever thread made them), ``wait_seconds`` the trainer spent waiting for a generation.
    """

    def __init__(self, make: Callable[[int], Case], n: int, every: int, prefetch: bool = True,
                 transform: Callable[[list[Case]], list[Case]] | None = None) -> None:
        if n < 1 or every < 1:
            raise MensegError("a rolling pool needs n >= 1 cases and a refresh every >= 1 steps")
        self.make, self.n, self.every, self.transform = make, int(n), int(every), transform
        self.prefetch = prefetch
        self.made, self.make_seconds, self.wait_seconds = 0, 0.0, 0.0
        self._lock = threading.Lock()
        self._ready: dict[int, list[Case]] = {}
        self._pending: dict[int, _Job] = {}

    def generation_of(self, step: int) -> int:
        """The generation that trains at (0-based) ``step``."""
        return int(step) // self.every

    def raw(self, g: int) -> list[Case]:
        """Generation ``g`` made now, without ``transform`` (e.g. to fit the translator on)."""
        return [self.make(g * self.n + i) for i in range(self.n)]

    def put(self, g: int, cases: list[Case]) -> None:
        """Hand over generation ``g`` made elsewhere (e.g. translated after fitting on :meth:`raw`)."""
        if len(cases) != self.n:
            raise MensegError(f"a generation holds {self.n} cases, got {len(cases)}")
        self._ready[g] = list(cases)

    def _build(self, g: int) -> list[Case]:
        t0 = time.perf_counter()
        cases = self.raw(g)
        if self.transform is not None:
            cases = self.transform(cases)
        with self._lock:
            self.made += len(cases)
            self.make_seconds += time.perf_counter() - t0
        return cases

    def get(self, g: int) -> list[Case]:
        """Generation ``g`` (made now, or waited for when the background thread is on it); starts making
        ``g + 1`` in the background and forgets older generations."""
        if g not in self._ready:
            t0 = time.perf_counter()
            job = self._pending.pop(g, None)
            self._ready[g] = job.wait() if job is not None else self._build(g)
            waited = time.perf_counter() - t0
            self.wait_seconds += waited
            rate = self.made / self.make_seconds if self.make_seconds > 0 else float("nan")
            log.info("stream: synthetic generation %d ready (%d cases, made at %.2f cases/s; the trainer "
                     "waited %.1f s for it, %.1f s in all)", g, self.n, rate, waited, self.wait_seconds)
        for old in [k for k in self._ready if k < g]:
            del self._ready[old]
        for old in [k for k in self._pending if k < g]:
            del self._pending[old]  # a daemon thread: its result is dropped
        if self.prefetch and g + 1 not in self._pending and g + 1 not in self._ready:
            self._pending[g + 1] = _Job(self._build, g + 1)
        return self._ready[g]


__all__ = ["CSF_MARGIN_MM", "RANDOM", "LabelMap", "RollingPool", "StreamSource", "load_label_maps",
           "resolve_mapping", "trim_csf"]
