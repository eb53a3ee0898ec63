"""Sim2Real inside the trainer: which source each sample comes from, the synthetic and injected pools,
the translator and the feature-alignment term (DESIGN.md, idea 2).

A Sim2Real step draws each of its ``train.batch_size`` samples from one of three sources:

- ``real``: a labelled real case (the user's own, ``data.root``);
- ``synthetic``: a case of the run's synthetic pool (``sim2real.n_synthetic`` procedural cases, made
  once per run seed), translated to the real scans' appearance when ``sim2real.translator.enabled``;
- ``injected``: a real scan (labelled or from ``data.unlabeled_root``) with a synthetic meningioma grown
  into it by the synthetic engine's injection path (``sim2real.inject``).

The shares follow ``sim2real.schedule`` (real) and ``sim2real.inject.share`` (injected among the rest).
Sample ``j = step * batch_size + b`` takes the source whose cumulative share interval holds
``u_j = frac(u_0 + j * (sqrt(5) - 1) / 2)`` (a golden-ratio Weyl sequence with ``u_0`` from the run
seed): a pure function of ``(seed, step, b)`` like the rest of the trainer, and over any run of samples
the counts match the configured shares far more closely than independent draws would.

On an unlabelled scan only the injected lesion, a margin around it and the space outside the head are
known; every other voxel carries the label :data:`UNKNOWN` and is left out of the loss (the scan may hold
its own, unlabelled tumour).

Randomness: ``"s2r-sources"`` (the offset ``u_0``), ``"s2r-inject"`` (per scan and variant),
``"s2r-synthetic-pool"`` (the pool), ``"s2r-align"`` (per step: alignment patches and voxels),
``"aug-align"`` (per step and sample: their augmentation).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from menseg.config import Config, Sim2RealConfig, to_dict
from menseg.data.sampling import PatchChoice, PatchSampler, choose_start, foreground_coords, n_foreground
from menseg.errors import MensegError
from menseg.train.augment import augment_batch
from menseg.train.batches import StepBatches
from menseg.train.parts import Part, TrainSetup, full_precision, register
from menseg.utils import derive_seed, json_digest

log = logging.getLogger(__name__)

Tensor = torch.Tensor

#: Label value of voxels whose class is unknown (left out of the loss).
UNKNOWN = 255
#: Sample sources, in the order of their share intervals.
SOURCES: tuple[str, ...] = ("real", "synthetic", "injected")
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


# ---------------------------------------------------------------- schedule


def source_shares(
    s2r: Sim2RealConfig, step: int, total: int, has_real: bool = True
) -> tuple[float, float, float]:
    """``(real, synthetic, injected)`` shares of the samples of (0-based) ``step`` of ``total``."""
    sch = s2r.schedule
    p = step / max(total, 1)
    if sch.mode == "mixed":
        real = sch.real_start + (sch.real_end - sch.real_start) * p
    else:  # pretrain: synthetic (+ injected) only, then real_end
        real = 0.0 if p < sch.switch else sch.real_end
    if not has_real:
        real = 0.0
    inj = s2r.inject.share if s2r.inject.enabled else 0.0
    return real, (1.0 - real) * (1.0 - inj), (1.0 - real) * inj


def sample_sources(s2r: Sim2RealConfig, seed: int, step: int, batch_size: int, total: int,
                   has_real: bool = True) -> list[int]:
    """Source index (into :data:`SOURCES`) of each sample of ``step`` (see the module docstring)."""
    u0 = derive_seed(seed, "s2r-sources") / float(1 << 63)
    shares = source_shares(s2r, step, total, has_real)
    edges = np.cumsum(shares)
    out = []
    for b in range(batch_size):
        u = (u0 + (step * batch_size + b) * _GOLDEN) % 1.0
        k = int(np.searchsorted(edges, u, side="right"))
        while k < len(SOURCES) - 1 and shares[k] == 0.0:  # never land on an empty source
            k += 1
        if shares[min(k, len(SOURCES) - 1)] == 0.0:
            k = max(i for i, s in enumerate(shares) if s > 0)
        out.append(min(k, len(SOURCES) - 1))
    return out


# ---------------------------------------------------------------- sampler


class MixedSampler(PatchSampler):
    """One :class:`PatchSampler` over real, synthetic and injected cases (concatenated, in that order).

    Case indices are global, so ISM's partner lookup works unchanged; :meth:`sample_step` draws the
    source of each sample from the schedule, then the case uniformly within that source and the place
    as :class:`PatchSampler` does (the forced-foreground patches last). Foreground means tumour labels
    1..3 (never :data:`UNKNOWN`).
    """

    def __init__(self, groups: dict[str, Sequence[tuple[np.ndarray, np.ndarray]]], patch_size: Sequence[int],
                 fg_share: float, s2r: Sim2RealConfig, seed: int, total: int) -> None:
        self.ranges: list[tuple[int, int]] = []
        lo = 0
        for name in SOURCES:
            n = len(groups.get(name, ()))
            self.ranges.append((lo, lo + n))
            lo += n
        self.s2r, self.seed, self.total = s2r, int(seed), int(total)
        self.has_real = self.ranges[0][1] > self.ranges[0][0]
        for k, name in enumerate(SOURCES):
            lo, hi = self.ranges[k]
            needed = any(source_shares(s2r, t, total, self.has_real)[k] > 0
                         for t in (0, total // 2, total - 1))
            if needed and hi == lo:
                raise MensegError(f"sim2real: the schedule draws '{name}' samples but there are none "
                                  "(check data.root, data.unlabeled_root and sim2real.inject)")
        super().__init__([c for name in SOURCES for c in groups.get(name, ())], patch_size, fg_share)
        self.fg = [foreground_coords(np.where(lab == UNKNOWN, 0, lab)) if (lab == UNKNOWN).any() else fg
                   for (_, lab), fg in zip(self.cases, self.fg, strict=True)]
        self.stream: Any = None  # a sim2real.stream.RollingPool renewing the synthetic cases
        self.generation = 0
        self.on_renew: list[Any] = []  # called with the new synthetic cases

    def follow(self, stream: Any, generation: int = 0) -> None:
        """Take the synthetic cases from ``stream`` (a :class:`~menseg.sim2real.stream.RollingPool`, whose
        ``generation`` is what the sampler holds now) from here on."""
        self.stream, self.generation = stream, generation

    def _renew(self, step: int) -> None:
        g = self.stream.generation_of(step)
        if g == self.generation:
            return
        lo, hi = self.ranges[SOURCES.index("synthetic")]
        new = [(img, lab) for _, img, lab in self.stream.get(g)]
        self.cases[lo:hi] = new
        self.fg[lo:hi] = [foreground_coords(lab) for _, lab in new]
        self.generation = g
        for fn in self.on_renew:
            fn(new)

    def source_of(self, case: int) -> int:
        """Source index of global case ``case``."""
        return next(k for k, (lo, hi) in enumerate(self.ranges) if lo <= case < hi)

    def sample_step(self, step: int, rng: np.random.Generator, batch_size: int) -> list[PatchChoice]:
        """Patch choices of ``step`` (the synthetic cases of a stream renewed first when ``step`` starts a
        new generation)."""
        if self.stream is not None:
            self._renew(step)
        sources = sample_sources(self.s2r, self.seed, step, batch_size, self.total, self.has_real)
        n_fg = n_foreground(batch_size, self.fg_share, rng)
        out = []
        for b, k in enumerate(sources):
            lo, hi = self.ranges[k]
            ci = int(lo + rng.integers(hi - lo))
            force = b >= batch_size - n_fg
            fg = self.fg[ci] if force else None
            start = choose_start(self.cases[ci][1].shape, self.patch_size, rng, fg)
            out.append(PatchChoice(ci, start, force and fg is not None and len(fg) > 0))
        return out


# ---------------------------------------------------------------- pools


def synthetic_pool(cfg: Config, cache: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """The run seed's synthetic pool ``[(case_id, image, label)]``, shared by runs with one cache (the fixed
    pool of randomised template cases; a ``sim2real.stream`` run takes generation 0 of its stream)."""
    from menseg.synth.pool import synthetic_pool_cases

    n, seed = cfg.sim2real.n_synthetic, derive_seed(cfg.train.seed, "s2r-synthetic-pool")
    key = json_digest({"n": n, "seed": seed, "spacing": list(cfg.data.spacing)})[:12]
    pre = synthetic_pool_cases(cache / "sim2real" / f"synthetic-{key}", n, seed, cfg.data.spacing,
                               cache / "sim2real" / f"synthetic-{key}" / "preprocessed", prefix="S2R-SYN",
                               what="Sim2Real")
    return [(c.case_id, np.asarray(c.image), np.asarray(c.label)) for c in pre]


def known_mask(
    lesion: np.ndarray, head: np.ndarray, margin_mm: float, spacing: Sequence[float]
) -> np.ndarray:
    """Voxels of an unlabelled scan whose class is known after an injection: within ``margin_mm`` of the
    injected ``lesion`` (bool ``(X, Y, Z)``), or outside the ``head``."""
    from scipy import ndimage

    if not lesion.any():
        return ~head
    dist = ndimage.distance_transform_edt(~lesion, sampling=tuple(float(s) for s in spacing))
    return (dist <= margin_mm) | ~head


def inject_pool(
    cfg: Config, labelled: Sequence[tuple[str, np.ndarray, np.ndarray]],
    unlabelled: Sequence[tuple[str, np.ndarray]], progress: bool = True,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``sim2real.inject.per_scan`` injected variants of every real scan: ``[(image, label)]``.

    A labelled scan keeps its label (the new lesion is placed away from it and added); an unlabelled
    scan's label is the new lesion, 0 where known (:func:`known_mask`) and :data:`UNKNOWN` elsewhere.
    Variant ``k`` of scan ``c`` is drawn from ``(train.seed, "s2r-inject", c, k)``. A scan with no room
    for a lesion is skipped with a warning.
    """
    from tqdm.auto import tqdm

    from menseg.synth.inject import inject_arrays
    from menseg.synth.lesion import LesionConfig

    inj, spacing = cfg.sim2real.inject, cfg.data.spacing
    affine = np.diag([*map(float, spacing), 1.0])
    jobs = [(cid, img, lab) for cid, img, lab in labelled] + [(cid, img, None) for cid, img in unlabelled]
    out: list[tuple[np.ndarray, np.ndarray]] = []
    bar = tqdm(total=len(jobs) * inj.per_scan, desc="injecting lesions", unit="scan", disable=not progress,
               leave=False)
    for cid, img, lab in jobs:
        for k in range(inj.per_scan):
            seed = derive_seed(cfg.train.seed, "s2r-inject", cid, k)
            try:
                res = inject_arrays(np.array(img), None if lab is None else np.array(lab), affine,
                                    LesionConfig(), seed)
            except MensegError as e:
                log.warning("no injection into %s (variant %d): %s", cid, k, e)
                bar.update(1)
                continue
            label = res.label
            if lab is None:
                head = (res.image != 0).any(0)
                known = known_mask(label > 0, head, inj.known_margin_mm, spacing)
                label = np.where(known, label, UNKNOWN).astype(np.uint8)
            out.append((res.image, label))
            bar.update(1)
    bar.close()
    log.info("semantic injection: %d injected scans from %d labelled and %d unlabelled real scans",
             len(out), len(labelled), len(unlabelled))
    return out


def fitted_translator(cfg: Config, synthetic: Sequence[tuple[str, np.ndarray, np.ndarray]],
                      real: Sequence[tuple[str, np.ndarray]], cache: Path, device: str,
                      progress: bool = True) -> tuple[nn.Module, float]:
    """The sim->real generator of the run (loaded on ``device``), and the seconds spent fitting it.

    ``sim2real.translator.path`` names a fitted translator; otherwise one is fitted from ``synthetic``
    and ``real`` and cached under ``cache/sim2real/translator-<digest>`` (the digest covers the pool,
    the real scans, the translator settings, the seed and a stream's recipe, so every run of a benchmark
    seed shares it).
    """
    from menseg.sim2real.translator import NOT_FIT, fit_translator, load_translator

    tc = cfg.sim2real.translator
    fit_seconds = 0.0
    if tc.path:
        path = Path(tc.path)
    else:
        settings = {k: v for k, v in to_dict(tc).items() if k not in NOT_FIT}
        what: dict[str, Any] = {"synthetic": [c for c, _, _ in synthetic], "real": [c for c, _ in real],
                                "settings": settings, "seed": cfg.train.seed,
                                "spacing": list(cfg.data.spacing)}
        if not cfg.sim2real.stream.default:  # stream cases are named by index: their recipe tells them apart
            what["stream"] = to_dict(cfg.sim2real.stream)
        folder = cache / "sim2real" / f"translator-{json_digest(what)[:12]}"
        path = folder / "translator.pt"
        if not path.is_file():
            import time

            log.info("fitting the sim->real translator (%d steps) in %s", tc.steps, folder)
            t0 = time.perf_counter()
            fit_translator([(img, lab) for _, img, lab in synthetic], [img for _, img in real], tc, folder,
                           seed=derive_seed(cfg.train.seed, "s2r-translator"), device=device,
                           resume=(folder / "latest.pt").is_file(), progress=progress,
                           spacing=tuple(cfg.data.spacing))  # type: ignore[arg-type]
            fit_seconds = time.perf_counter() - t0
    return load_translator(path, device=device), fit_seconds


def _translate_cases(gen: nn.Module, cases: list[tuple[str, np.ndarray, np.ndarray]]
                     ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """A generation of stream cases carried to the real scans' appearance by ``gen``."""
    from menseg.sim2real.translator import translate_image

    return [(cid, translate_image(gen, img), lab) for cid, img, lab in cases]


# ---------------------------------------------------------------- alignment


def _encoder(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """``(DynUNet, stem or None)`` of a plain DynUNet or an ISMNet."""
    net = getattr(model, "net", model)
    stem = model._stem(None) if hasattr(model, "_stem") else None  # noqa: SLF001 - ISMNet's bound stem
    return net, stem


@dataclass
class AlignStep:
    """The feature-alignment term of a step: encoder features of ``align.batch_size`` (augmented) source
    patches against as many real patches, through a :class:`menseg.sim2real.align.FeatureAligner`.

    ``source``: synthetic pool (translated when the translator is on; renewed with a stream's
    generations); ``target``: real scans (labels unused).
    """

    cfg: Config
    model: nn.Module
    aligner: nn.Module
    source: PatchSampler
    target: PatchSampler

    def renew(self, cases: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        """Draw source patches from these synthetic cases from now on."""
        self.source = PatchSampler(cases, self.source.patch_size, self.source.fg_share)

    def loss(self, step: int, device: torch.device) -> tuple[Tensor, dict[str, float]]:
        from menseg.nets.unet import encode
        from menseg.sim2real.align import align_weight

        ac, seed = self.cfg.sim2real.align, self.cfg.train.seed
        rng = np.random.default_rng(derive_seed(seed, "s2r-align", step))
        patches = []
        for sampler in (self.source, self.target):
            for choice in sampler.sample(rng, ac.batch_size):
                patches.append(sampler.extract(choice)[0])
        x = torch.from_numpy(np.stack(patches)).to(device)
        seeds = [derive_seed(seed, "aug-align", step, b) for b in range(x.shape[0])]
        with full_precision(x):  # augmented as the trainer's own batch, in fp32
            x, _ = augment_batch(x, torch.zeros((x.shape[0], *x.shape[2:]), dtype=torch.uint8, device=device),
                                 self.cfg.aug, seeds, self.cfg.data.spacing)
        net, stem = _encoder(self.model)
        feats = encode(net, x, stem, stop=max(ac.levels))  # type: ignore[arg-type]
        n = ac.batch_size
        src = [f[:n] for f in feats]
        tgt = [f[n:] for f in feats]
        w = align_weight(ac, step, self.cfg.train.steps)
        g = torch.Generator().manual_seed(derive_seed(seed, "s2r-align-voxels", step))
        loss, stats = self.aligner(src, tgt, w, g)
        return loss, {f"s2r_{k}": float(v) for k, v in stats.items()}


# ---------------------------------------------------------------- assembly


@dataclass
class Sim2RealParts:
    """What :func:`build` gives the trainer."""

    sampler: MixedSampler
    align: AlignStep | None
    info: dict[str, Any]


def _stream(cfg: Config) -> Any:
    """The run's :class:`~menseg.sim2real.stream.RollingPool` over its stream (``sim2real.stream``); with
    ``refresh_every`` 0 only its generation 0 is used (a fixed pool of stream cases)."""
    from menseg.sim2real.stream import RollingPool, StreamSource

    sc = cfg.sim2real.stream
    if sc.refresh_every and cfg.train.num_workers:
        raise MensegError("sim2real.stream.refresh_every needs train.num_workers=0 (the synthetic cases are "
                          "renewed in the training process)")
    source = StreamSource.build(sc, derive_seed(cfg.train.seed, "s2r-stream"), cfg.data.spacing)
    log.info("sim2real stream: %d cases per generation%s; appearances %s%s", cfg.sim2real.n_synthetic,
             f", renewed every {sc.refresh_every} steps" if sc.refresh_every else " (one fixed pool)",
             ", ".join(sc.sites),
             f"; {sc.label_map_share:.0%} on {len(source.maps)} label maps" if source.maps else "")
    return RollingPool(source.case, cfg.sim2real.n_synthetic, max(sc.refresh_every, 1), sc.prefetch)


def _unlabelled(cfg: Config, cache: Path, progress: bool = True) -> list[tuple[str, np.ndarray]]:
    from menseg.data.dataset import unlabelled_scans

    if not cfg.data.unlabeled_root:
        return []
    return unlabelled_scans(cfg.data.unlabeled_root, cache, cfg.data.spacing, progress)


def build(cfg: Config, model: nn.Module, train_cases: Sequence[Any], cache: Path, device: torch.device,
          progress: bool = True) -> Sim2RealParts:
    """Pools, translator, sampler and alignment term of a Sim2Real run (``train_cases``: the labelled
    real cases, PreprocessedCase-like with ``case_id``, ``image``, ``label``; may be empty). The
    alignment term's own parameters (a domain classifier) are on ``device``."""
    s2r = cfg.sim2real
    labelled = [(c.case_id, np.asarray(c.image), np.asarray(c.label)) for c in train_cases]
    unlabelled = _unlabelled(cfg, cache, progress)
    real_scans = unlabelled or [(cid, img) for cid, img, _ in labelled]
    info: dict[str, Any] = {"n_labelled": len(labelled), "n_unlabelled": len(unlabelled)}
    need_syn = s2r.inject.share < 1.0 or not s2r.inject.enabled or s2r.align.method != "none"
    stream = None
    if need_syn and not s2r.stream.default:
        stream = _stream(cfg)
        synthetic = stream.raw(0)
    else:
        synthetic = synthetic_pool(cfg, cache) if need_syn else []
    syn_images = [img for _, img, _ in synthetic]
    if s2r.translator.enabled and synthetic:
        if not real_scans:
            raise MensegError("sim2real.translator needs real scans (data.unlabeled_root or labelled cases)")
        from menseg.sim2real.translator import translate_image

        gen, info["translator_fit_seconds"] = fitted_translator(cfg, synthetic, real_scans, cache,
                                                                str(device), progress)
        syn_images = [translate_image(gen, img) for img in syn_images]
        if stream is not None:  # later generations are translated as they are made
            stream.transform = functools.partial(_translate_cases, gen)
    injected = []
    if s2r.inject.enabled:
        hosts = unlabelled if s2r.inject.into == "both" or not labelled else []
        injected = inject_pool(cfg, labelled, hosts, progress)
    groups = {"real": [(img, lab) for _, img, lab in labelled],
              "synthetic": [(img, lab) for img, (_, _, lab) in zip(syn_images, synthetic, strict=True)],
              "injected": injected}
    info.update({f"n_{k}": len(v) for k, v in groups.items()})
    sampler = MixedSampler(groups, cfg.train.patch_size, cfg.train.fg_oversample, s2r, cfg.train.seed,
                           cfg.train.steps)
    if stream is not None and s2r.stream.refresh_every:
        stream.put(0, [(cid, img, lab) for img, (cid, _, lab) in zip(syn_images, synthetic, strict=True)])
        sampler.follow(stream, 0)
        info["stream_refresh_every"] = s2r.stream.refresh_every
    align = None
    if s2r.align.method != "none":
        from menseg.nets.unet import level_channels
        from menseg.sim2real.align import FeatureAligner

        if not real_scans:
            raise MensegError("sim2real.align needs real scans (data.unlabeled_root or labelled cases)")
        net, _ = _encoder(model)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(cfg.train.seed, "s2r-aligner-init"))
            aligner = FeatureAligner(s2r.align, level_channels(net)).to(device)  # type: ignore[arg-type]
        source = PatchSampler(groups["synthetic"], cfg.train.patch_size, cfg.train.fg_oversample)
        target = PatchSampler([(img, np.zeros(img.shape[1:], np.uint8)) for _, img in real_scans],
                              cfg.train.patch_size, 0.0)
        align = AlignStep(cfg, model, aligner, source, target)
        sampler.on_renew.append(align.renew)
    log.info("sim2real: %s", ", ".join(f"{k} {v}" for k, v in info.items()))
    return Sim2RealParts(sampler, align, info)


class MixedBatches(StepBatches):
    """:class:`StepBatches` for Sim2Real (``sampler``: a :class:`MixedSampler`): the source of each sample
    of step ``t`` follows the schedule; ``case`` indices are global."""

    def choices(self, step: int, rng: np.random.Generator) -> list[Any]:
        return self.sampler.sample_step(step, rng, self.batch_size)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the part


@register
class Sim2RealPart(Part):
    """Sim2Real as a training part: the mixed sampler over real, synthetic (translated) and injected
    cases, the unknown-label mask of unlabelled hosts, the per-source sample counts, and the
    feature-alignment term with its domain classifier (checkpoint key ``aligner``)."""

    name = "sim2real"
    count_stats = frozenset({f"s2r_{s}" for s in SOURCES})

    trains_without_labels = True
    uses_unlabelled = True

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.parts: Sim2RealParts | None = None
        self.unused_parameters = cfg.sim2real.align.method != "none"  # the domain classifier's own steps

    @classmethod
    def enabled(cls, cfg: Config) -> bool:
        return cfg.sim2real.enabled

    def setup(self, run: TrainSetup) -> None:
        self.parts = build(self.cfg, run.model, run.train_cases, run.cache, run.device,  # type: ignore[arg-type]
                           run.progress)
        run.sampler = self.parts.sampler
        run.batches = MixedBatches
        if self.parts.align is not None:  # alignment patches are the rank's own draws
            self.parts.align.cfg = run.rank_cfg

    @property
    def _align(self) -> AlignStep | None:
        return self.parts.align if self.parts is not None else None

    def modules(self) -> dict[str, nn.Module]:
        return {"aligner": self._align.aligner} if self._align is not None else {}

    def bind(self, model: nn.Module) -> None:
        if self._align is not None:
            self._align.model = model

    def label_mask(self, lab: Tensor, always: bool) -> tuple[Tensor, Tensor | None]:
        unknown = lab == UNKNOWN
        if always or bool(unknown.any()):
            return lab.masked_fill(unknown, 0), ~unknown
        return lab, None

    def batch_stats(self, meta: Tensor) -> dict[str, float]:
        assert self.parts is not None
        srcs = [self.parts.sampler.source_of(int(c)) for c in meta.tolist()]
        return {f"s2r_{n}": float(srcs.count(k)) for k, n in enumerate(SOURCES)}

    def extra_loss(self, step: int, device: torch.device) -> tuple[Tensor, dict[str, float]] | None:
        return self._align.loss(step, device) if self._align is not None else None
