"""Longitudinal visit pairs for temporal fusion: every labelled visit with its registered prior.

Training (:func:`load_visit_pairs`, :class:`PairSampler`). The visits of a longitudinal
dataset (:func:`menseg.data.layouts.discover_series`) are preprocessed like any case
(:func:`menseg.data.dataset.preprocess_dataset`, under ``cache_dir/"visits"``). Each labelled
visit ``k >= 1`` of a patient is paired with the patient's previous labelled visit ``k - 1``:
the prior is rigidly registered onto the current visit (t1c, channel 0, of both preprocessed
grids; :func:`menseg.ism.register.register_rigid`) and its image (trilinear) and label
(nearest) are resampled onto the current preprocessed grid, so both visits share one grid
and a patch taken at the same voxel place describes the same anatomy. A patient's first
labelled visit is a pair without prior. The registered priors are cached::

    cache_dir/pairs/<case_id>_prior.npy       float32 (4, x, y, z) on the current visit's grid
    cache_dir/pairs/<case_id>_prior_seg.npy   uint8 (x, y, z)
    cache_dir/pairs/<case_id>.json            transform, prior id, gap, key (written last)

An entry is reused when its key matches: the preprocessing cache keys of both visits
(:func:`menseg.data.dataset.cache_key`: version, spacing, size + mtime of every source file),
both preprocessed affines, the registration settings and seed. Any change recomputes it.

Prediction (:func:`prepare_prior`): the prior visit of a case being segmented is preprocessed
with the same spacing and registered + resampled onto the current case's preprocessed grid.

Layer rank: the same as :mod:`menseg.nets` (may import constants, errors, utils, config,
geometry, data, nets and ism; never infer, train, bench or cli).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from menseg.data.dataset import PreprocessedCase, cache_key, preprocess_dataset
from menseg.data.layouts import CaseFiles, discover_series
from menseg.data.preprocess import load_case, preprocess, present_mask
from menseg.data.sampling import choose_start, crop_pad, foreground_coords, n_foreground
from menseg.errors import MensegError
from menseg.ism.register import RegistrationConfig, RigidTransform, register_rigid, resample_to_fixed
from menseg.utils import atomic_path, derive_seed, write_json_atomic

log = logging.getLogger(__name__)

#: Bump when the pair cache format or the registration / resampling recipe changes.
PAIRS_VERSION = 1
#: Sub-folders of ``cache_dir``: preprocessed visits, registered priors.
VISITS_DIR = "visits"
PAIRS_DIR = "pairs"


@dataclass(frozen=True)
class VisitPair:
    """One labelled visit (preprocessed) and, if any, its previous labelled visit on the same grid.

    ``image`` float32 ``(4, x, y, z)`` and ``label`` uint8 ``(x, y, z)`` of the current visit
    (read-only memmaps from the cache); ``prior_image`` / ``prior_label`` the previous visit
    registered and resampled onto that grid (None for a patient's first visit; zero outside
    the prior's field of view); ``gap_days`` = current day - prior day (0.0 without prior);
    ``spacing`` (mm) and ``affine`` (4x4 voxel -> RAS mm) of the current preprocessed grid;
    ``transform`` maps current RAS mm -> prior RAS mm (None without prior).
    """

    patient: str
    case_id: str
    prior_id: str | None
    gap_days: float
    image: np.ndarray
    label: np.ndarray
    prior_image: np.ndarray | None
    prior_label: np.ndarray | None
    spacing: tuple[float, float, float]
    affine: np.ndarray | None = None
    transform: RigidTransform | None = None

    @property
    def has_prior(self) -> bool:
        return self.prior_image is not None


# ----------------------------------------------------------------------------- helpers


def visit_seed(seed: int, case_id: str) -> int:
    """Registration seed of the pair whose current visit is ``case_id`` (fits ITK's 31 bits)."""
    return derive_seed(int(seed), "visit", str(case_id)) % 2**31


def _grid_affine(props: dict[str, Any], what: str) -> np.ndarray:
    try:
        aff = np.asarray(props["affine"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise MensegError(f"{what}: preprocessing record has no 'affine'") from None
    if aff.shape != (4, 4):
        raise MensegError(f"{what}: preprocessed affine must be 4x4, got shape {aff.shape}")
    return aff


def _jsonable(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples -> lists), so keys compare equal after a round trip."""
    return json.loads(json.dumps(obj))


def _pair_key(
    cur: CaseFiles,
    prior: CaseFiles,
    spacing: Sequence[float],
    cur_pp: PreprocessedCase,
    prior_pp: PreprocessedCase,
    seed: int,
    cfg: RegistrationConfig,
) -> dict[str, Any]:
    return _jsonable({
        "version": PAIRS_VERSION,
        "current": {"case_id": cur.case_id, "preprocess": cache_key(cur, spacing),
                    "affine": cur_pp.props["affine"], "shape": cur_pp.props["shape"]},
        "prior": {"case_id": prior.case_id, "preprocess": cache_key(prior, spacing),
                  "affine": prior_pp.props["affine"], "shape": prior_pp.props["shape"]},
        "registration": dataclasses.asdict(cfg),
        "seed": visit_seed(seed, cur.case_id),
    })


def _pair_paths(pairs_dir: Path, case_id: str) -> tuple[Path, Path, Path]:
    return (pairs_dir / f"{case_id}_prior.npy", pairs_dir / f"{case_id}_prior_seg.npy",
            pairs_dir / f"{case_id}.json")


def _load_pair(
    pairs_dir: Path, case_id: str, key: dict[str, Any], shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray, RigidTransform] | None:
    img_p, seg_p, meta_p = _pair_paths(pairs_dir, case_id)
    if not meta_p.is_file():
        return None
    try:
        meta = json.loads(meta_p.read_text())
        if meta.get("key") != key:
            return None
        transform = RigidTransform.from_dict(meta["transform"])
        image = np.load(img_p, mmap_mode="r")
        label = np.load(seg_p, mmap_mode="r")
    except (OSError, ValueError, KeyError, TypeError, MensegError):
        return None
    shape = tuple(int(s) for s in shape)
    if image.ndim != 4 or tuple(image.shape[1:]) != shape or tuple(label.shape) != shape:
        return None
    return image, label, transform


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, arr)


def _register_pair(
    cur_pp: PreprocessedCase, prior_pp: PreprocessedCase, seed: int, cfg: RegistrationConfig
) -> tuple[np.ndarray, np.ndarray, RigidTransform]:
    """Register ``prior_pp`` onto ``cur_pp`` (t1c) and resample its image and label onto that grid."""
    cur_aff = _grid_affine(cur_pp.props, cur_pp.case_id)
    prior_aff = _grid_affine(prior_pp.props, prior_pp.case_id)
    if prior_pp.label is None:
        raise MensegError(f"prior visit '{prior_pp.case_id}' has no label")
    transform = register_rigid(
        np.asarray(prior_pp.image[0]), prior_aff, np.asarray(cur_pp.image[0]), cur_aff,
        seed=seed, cfg=cfg,
    )
    shape = tuple(int(s) for s in cur_pp.image.shape[1:])
    image = resample_to_fixed(np.asarray(prior_pp.image), prior_aff, transform, shape, cur_aff, order=1)
    label = resample_to_fixed(np.asarray(prior_pp.label), prior_aff, transform, shape, cur_aff, order=0)
    return image.astype(np.float32, copy=False), label.astype(np.uint8, copy=False), transform


# ----------------------------------------------------------------------------- training pairs


def load_visit_pairs(
    root: str | Path,
    spacing: Sequence[float],
    cache_dir: str | Path,
    cases: Sequence[str] = (),
    seed: int = 0,
    reg_cfg: RegistrationConfig | None = None,
    progress: bool = True,
) -> list[VisitPair]:
    """All labelled visits of a longitudinal dataset, each with its registered prior visit.

    Args:
        root: longitudinal dataset (``root/<patient>/timepoints.json`` + visit folders).
        spacing: target voxel size (mm) of preprocessing.
        cache_dir: cache folder: preprocessed visits in ``cache_dir/visits``, registered
            priors in ``cache_dir/pairs`` (module docstring).
        cases: if non-empty, only these current-visit case ids (their priors are still
            used); an id that is not a labelled visit of the dataset is an error.
        seed: master seed; the pair of visit ``c`` registers with :func:`visit_seed` ``(seed, c)``.
        reg_cfg: registration settings (default :class:`RegistrationConfig`).
        progress: show tqdm progress bars.

    Returns:
        One :class:`VisitPair` per selected labelled visit, ordered by patient, then day.
        A visit without label is skipped (logged) and is nobody's prior.
    """
    cfg = reg_cfg if reg_cfg is not None else RegistrationConfig()
    cache_dir = Path(cache_dir)
    spacing = [float(s) for s in spacing]
    series = discover_series(root)

    # (patient, current, prior or None, gap) for every labelled visit, patients sorted, by day.
    plan: list[tuple[str, CaseFiles, CaseFiles | None, float]] = []
    all_ids: set[str] = set()
    for patient, visits in series.items():
        prev: tuple[CaseFiles, int] | None = None
        for case, day in visits:
            all_ids.add(case.case_id)
            if case.label is None:
                log.info("visit %s of patient %s has no label: skipped", case.case_id, patient)
                continue
            if prev is None:
                plan.append((patient, case, None, 0.0))
            else:
                plan.append((patient, case, prev[0], float(day - prev[1])))
            prev = (case, day)
    if cases:
        wanted = [str(c) for c in cases]
        known = {p[1].case_id for p in plan}
        for cid in wanted:
            if cid not in known:
                why = "has no label" if cid in all_ids else "is not a visit of the dataset"
                raise MensegError(f"case '{cid}' {why}", Path(root))
        chosen = set(wanted)
        plan = [p for p in plan if p[1].case_id in chosen]
    if not plan:
        raise MensegError("longitudinal dataset holds no labelled visit", Path(root))

    needed: dict[str, CaseFiles] = {}
    for _, cur, prior, _ in plan:
        needed.setdefault(cur.case_id, cur)
        if prior is not None:
            needed.setdefault(prior.case_id, prior)
    visit_cases = sorted(needed.values(), key=lambda c: c.case_id)
    pp = {
        c.case_id: p
        for c, p in zip(
            visit_cases,
            preprocess_dataset(visit_cases, cache_dir / VISITS_DIR, spacing, progress=progress),
            strict=True,
        )
    }

    pairs_dir = cache_dir / PAIRS_DIR
    pairs_dir.mkdir(parents=True, exist_ok=True)
    out: list[VisitPair] = []
    n_registered = n_reused = 0
    bar = tqdm(plan, desc="registering visits", unit="pair", disable=not progress)
    for patient, cur, prior, gap in bar:
        bar.set_postfix_str(cur.case_id, refresh=False)
        cur_pp = pp[cur.case_id]
        if cur_pp.label is None:  # pragma: no cover - labelled by construction
            raise MensegError(f"visit '{cur.case_id}' has no label after preprocessing")
        affine = _grid_affine(cur_pp.props, cur.case_id)
        common = dict(
            patient=patient, case_id=cur.case_id, image=cur_pp.image, label=cur_pp.label,
            spacing=cur_pp.spacing, affine=affine,
        )
        if prior is None:
            out.append(VisitPair(prior_id=None, gap_days=0.0, prior_image=None, prior_label=None,
                                 **common))  # type: ignore[arg-type]
            continue
        prior_pp = pp[prior.case_id]
        key = _pair_key(cur, prior, spacing, cur_pp, prior_pp, seed, cfg)
        shape = cur_pp.image.shape[1:]
        cached = _load_pair(pairs_dir, cur.case_id, key, shape)
        if cached is not None:
            n_reused += 1
        else:
            image, label, transform = _register_pair(cur_pp, prior_pp, visit_seed(seed, cur.case_id), cfg)
            img_p, seg_p, meta_p = _pair_paths(pairs_dir, cur.case_id)
            meta_p.unlink(missing_ok=True)  # the entry is incomplete until the JSON is back
            _save_npy(img_p, image)
            _save_npy(seg_p, label)
            write_json_atomic(meta_p, {
                "key": key,
                "case_id": cur.case_id,
                "prior_id": prior.case_id,
                "gap_days": gap,
                "transform": transform.to_dict(),
            })
            cached = _load_pair(pairs_dir, cur.case_id, key, shape)
            if cached is None:  # pragma: no cover - we just wrote it
                raise MensegError("pair cache entry unreadable right after writing", meta_p)
            n_registered += 1
        prior_image, prior_label, transform = cached
        out.append(VisitPair(prior_id=prior.case_id, gap_days=gap, prior_image=prior_image,
                             prior_label=prior_label, transform=transform,
                             **common))  # type: ignore[arg-type]
    log.info(
        "%d visit pairs (%d with a prior): %d registered, %d reused from %s",
        len(out), n_registered + n_reused, n_registered, n_reused, pairs_dir,
    )
    return out


class PairSampler:
    """Patches at the SAME location from current and prior (they share a grid).

    Pairs are picked uniformly; a share ``fg_share`` of the patches is centred on a
    foreground voxel of the *current* label (the forced ones come last, as
    :class:`menseg.data.sampling.PatchSampler`); the rest are placed uniformly.
    All randomness comes from the generator passed to :meth:`batch`.
    """

    def __init__(self, pairs: Sequence[VisitPair], patch_size: Sequence[int], fg_share: float) -> None:
        if not pairs:
            raise MensegError("PairSampler needs at least one visit pair")
        self.pairs = list(pairs)
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise MensegError(f"patch size must be three positive ints, got {patch_size}")
        if not 0.0 <= float(fg_share) <= 1.0:
            raise MensegError(f"fg_share must be in [0, 1], got {fg_share}")
        self.fg_share = float(fg_share)
        for p in self.pairs:
            shape = tuple(p.label.shape)
            if tuple(p.image.shape[1:]) != shape or (
                p.prior_image is not None and tuple(p.prior_image.shape[1:]) != shape
            ) or (p.prior_label is not None and tuple(p.prior_label.shape) != shape):
                raise MensegError(f"visit pair '{p.case_id}': arrays are not on one grid")
        self.fg = [foreground_coords(p.label) for p in self.pairs]

    def _origin_mm(self, pair: VisitPair, start: Sequence[int]) -> np.ndarray:
        idx = np.asarray([*start, 1.0], dtype=np.float64)
        if pair.affine is not None:
            return (np.asarray(pair.affine, dtype=np.float64) @ idx)[:3]
        return idx[:3] * np.asarray(pair.spacing, dtype=np.float64)

    def batch(self, rng: np.random.Generator, batch_size: int) -> dict[str, np.ndarray]:
        """One batch: ``image (B,4,*p) f32, label (B,*p) u8, prior_image (B,4,*p) f32`` (zeros
        without prior), ``prior_label (B,*p) u8, has_prior (B,) bool, gap_days (B,) f32`` and
        ``origin_mm (B,3) f32`` (RAS mm of each patch's voxel 0; informational)."""
        if batch_size < 1:
            raise MensegError(f"batch size must be >= 1, got {batch_size}")
        n_fg = n_foreground(batch_size, self.fg_share, rng)
        ps = self.patch_size
        images, labels, p_images, p_labels = [], [], [], []
        has_prior = np.zeros(batch_size, dtype=bool)
        gaps = np.zeros(batch_size, dtype=np.float32)
        origins = np.zeros((batch_size, 3), dtype=np.float32)
        for b in range(batch_size):
            i = int(rng.integers(len(self.pairs)))
            pair = self.pairs[i]
            fg = self.fg[i] if b >= batch_size - n_fg else None
            start = choose_start(pair.label.shape, ps, rng, fg)
            img = crop_pad(pair.image, start, ps).astype(np.float32, copy=False)
            images.append(img)
            labels.append(crop_pad(pair.label, start, ps).astype(np.uint8, copy=False))
            if pair.prior_image is not None and pair.prior_label is not None:
                p_images.append(crop_pad(pair.prior_image, start, ps).astype(np.float32, copy=False))
                p_labels.append(crop_pad(pair.prior_label, start, ps).astype(np.uint8, copy=False))
                has_prior[b] = True
                gaps[b] = pair.gap_days
            else:
                p_images.append(np.zeros(img.shape, dtype=np.float32))
                p_labels.append(np.zeros(ps, dtype=np.uint8))
            origins[b] = self._origin_mm(pair, start)
        return {
            "image": np.stack(images),
            "label": np.stack(labels),
            "prior_image": np.stack(p_images),
            "prior_label": np.stack(p_labels),
            "has_prior": has_prior,
            "gap_days": gaps,
            "origin_mm": origins,
        }


# ----------------------------------------------------------------------------- prediction


def prepare_prior(
    current_image_pp: np.ndarray,
    current_props: dict[str, Any],
    prior: CaseFiles,
    spacing: Sequence[float],
    seed: int = 0,
    reg_cfg: RegistrationConfig | None = None,
    channel: int = 0,
) -> tuple[np.ndarray, RigidTransform]:
    """The prior visit of a case being segmented, on that case's preprocessed grid.

    Loads and preprocesses ``prior`` (same ``spacing``; its label, if any, is ignored),
    registers its t1c onto the current t1c (``current_props["affine"]`` gives the grid;
    seed :func:`visit_seed` ``(seed, current_props["case_id"])`` as in training, so a training
    case reproduces its cached transform) and resamples all channels trilinearly.

    Args:
        current_image_pp: the current case's preprocessed image ``(4, x, y, z)``.
        current_props: its preprocessing record (``affine``, ``shape``; ``case_id`` optional).
        prior: files of the earlier visit.
        spacing: the target spacing (mm) the current case was preprocessed with.
        channel: the sequence (``MODALITIES`` index) the visits are registered on; 0 = t1c, use
            another when the current case lacks t1c.

    Returns:
        ``(prior_pp, transform)``: float32 ``(4, x, y, z)`` on the current grid (0 outside the
        prior's field of view) and the rigid map current RAS mm -> prior RAS mm.
    """
    cfg = reg_cfg if reg_cfg is not None else RegistrationConfig()
    cur = np.asarray(current_image_pp)
    if cur.ndim != 4:
        raise MensegError(f"current image must be (C, x, y, z), got shape {cur.shape}")
    cur_aff = _grid_affine(current_props, "current case")
    shape = current_props.get("shape")
    if shape is not None and list(cur.shape[1:]) != [int(s) for s in shape]:
        raise MensegError(
            f"current image shape {list(cur.shape[1:])} differs from its preprocessed shape {shape}"
        )
    image, _, affine = load_case(prior)  # a sequence the prior lacks is a zero channel
    prior_pp, _, prior_props = preprocess(image, None, affine, [float(s) for s in spacing],
                                          present=present_mask(prior), name=prior.case_id)
    if prior_pp.shape[0] != cur.shape[0]:
        raise MensegError(
            f"prior visit '{prior.case_id}' has {prior_pp.shape[0]} channels, the current case "
            f"{cur.shape[0]}"
        )
    cur_sp = current_props.get("target_spacing")
    if cur_sp is not None and not np.allclose(cur_sp, prior_props["target_spacing"]):
        raise MensegError(
            f"prior preprocessed at spacing {prior_props['target_spacing']} mm, the current case at "
            f"{list(cur_sp)} mm"
        )
    prior_aff = np.asarray(prior_props["affine"], dtype=np.float64)
    transform = register_rigid(
        prior_pp[channel], prior_aff, cur[channel], cur_aff,
        seed=visit_seed(seed, str(current_props.get("case_id", ""))), cfg=cfg,
    )
    out = resample_to_fixed(prior_pp, prior_aff, transform, cur.shape[1:], cur_aff, order=1)
    log.info("prior visit %s registered onto the current grid %s", prior.case_id, list(cur.shape[1:]))
    return out.astype(np.float32, copy=False), transform


__all__ = [
    "PAIRS_DIR",
    "PAIRS_VERSION",
    "VISITS_DIR",
    "PairSampler",
    "VisitPair",
    "load_visit_pairs",
    "prepare_prior",
    "visit_seed",
]
