"""``menseg bench efficiency``: segmentation quality vs number of labelled cases.

Protocol (DESIGN.md, "Benchmark"):

- A *pool* of labelled cases and a fixed *test split* that no run trains on. With
  ``--data`` both come from the user's dataset (the test split is drawn once, from a
  fixed seed, and recorded); without it, from the embedded synthetic "site" cohort
  (:func:`embedded_cohort`), generated once and cached.
- For every seed ``s`` the pool is permuted from ``(s, "bench-subset")`` and the run
  with ``N`` labelled cases trains on the first ``N`` cases of that permutation, so
  the subsets are nested (3 of them are in the 5, the 5 in the 10) and every variant
  sees exactly the same cases for the same ``(N, s)``.
- Every (variant, N, seed) trains on the same budget: the profile's ``budget``
  overrides (steps, patch, network, spacing) are applied on top of each variant's
  YAML, with ``train.seed = s`` and no validation hold-out (all N cases train; the
  final checkpoint is evaluated, as nnU-Net does).
- The final model predicts the test split in each case's own space and is scored
  with the BraTS-MEN lesion-wise metrics (:mod:`menseg.evaluate`).

Folder (``--out``)::

    bench.json                 the plan: data, pool and test ids, profile, runs
    preprocessed/              preprocessing cache shared by all runs
    runs/<variant>/n<N>/seed<s>/
        train/                 the trainer's run folder (config.yaml, latest.pt, metrics.jsonl)
        predictions/           <case>.nii.gz for every test case
        evaluation/            metrics.csv, summary.json
        run.json               written last: the run is finished
    report/                    results.csv, per_case.csv, tests.csv, figures, report.md, report.html

Resume: running the same command again skips every run with a ``run.json`` (its
config must be unchanged), continues an interrupted training from ``latest.pt`` and
redoes an unfinished prediction/evaluation. Adding variants, Ns or seeds to a
finished benchmark adds runs; changing the data or the budget is refused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from menseg.config import (
    LEGACY_VALUES,
    PACKAGED_CONFIGS,
    Config,
    flat_config,
    load_config,
    off_in_both,
    to_dict,
)
from menseg.data.layouts import CaseFiles, discover_cases
from menseg.errors import MensegError
from menseg.utils import (
    LOCK_NAME,
    atomic_leftovers,
    derive_seed,
    folder_lock,
    json_digest,
    remove_atomic_leftovers,
    write_json_atomic,
    write_text_atomic,
)

log = logging.getLogger(__name__)

PROFILES_DIR = PACKAGED_CONFIGS / "bench"
#: Version of the bench.json / run.json formats.
BENCH_VERSION = 2
#: Bumped when the embedded cohort's recipe changes (invalidates cached cohorts).
COHORT_VERSION = 1


# ---------------------------------------------------------------- profiles


@dataclass(frozen=True)
class CohortSpec:
    """An embedded synthetic cohort: one scanner site of the engine's MR-physics model.

    ``lesion`` and ``anatomy`` override the engine's population priors
    (:class:`menseg.synth.lesion.LesionConfig`, :class:`menseg.synth.anatomy.AnatomyConfig`),
    so that another hospital can differ in its patients (location mix, sizes, en-plaque
    share, oedema rate) as well as in its scanner (``site``: field strength, sequences,
    slice thickness and plane).
    """

    site: str = "site-a"
    spacing_mm: float = 2.0
    n_pool: int = 16
    n_test: int = 12
    n_unlabeled: int = 8
    seed: int = 0
    lesion: dict[str, Any] = dataclasses.field(default_factory=dict)
    anatomy: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: case ids are ``<prefix>-POOL-...``, ``<prefix>-TEST-...``, ``<prefix>-UNLAB-...``
    prefix: str = "BENCH"

    def key(self) -> dict[str, Any]:
        """What identifies the cohort's data (fields at their defaults that were added later are left
        out, so the caches of older cohorts stay valid)."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items()
                if not ((k in ("lesion", "anatomy") and not v) or (k == "prefix" and v == "BENCH"))}

    def synth_config(self) -> Any:
        """The engine's :class:`~menseg.synth.engine.SynthConfig` of this cohort (MensegError on a bad
        site or prior key)."""
        from menseg.synth.engine import SynthConfig, with_spacing
        from menseg.synth.site import site_profile

        site_profile(self.site)  # unknown site: one-line error listing the known ones
        d = with_spacing(SynthConfig(), self.spacing_mm).to_dict()
        d["site"] = self.site
        for section in ("lesion", "anatomy"):
            overrides = getattr(self, section)
            if not isinstance(overrides, dict):
                raise MensegError(f"cohort {section} priors must be a mapping, got {overrides!r}")
            d[section].update(overrides)
        return SynthConfig.from_dict(d)


@dataclass(frozen=True)
class Profile:
    """A benchmark budget: defaults for N and seeds, the cohorts, and config overrides.

    ``cohort`` is the home site (labelled pool, unlabelled scans, home test set); ``away``
    are other sites nobody trains on (test sets, and unlabelled scans for ``--adapt``);
    ``ceiling`` adds runs of the reference variant on the whole labelled pool.
    """

    name: str
    description: str
    labeled: tuple[int, ...]
    seeds: int
    cohort: CohortSpec
    budget: dict[str, Any]
    away: tuple[CohortSpec, ...] = ()
    ceiling: bool = False

    def overrides(self) -> list[str]:
        """The budget as ``key=value`` overrides for :func:`menseg.config.load_config`."""
        return [f"{k}={json.dumps(v)}" for k, v in self.budget.items()]


def profile_names() -> list[str]:
    """Names of the packaged profiles."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """A packaged profile (``quick``, ``medium``, ``full``) or a profile YAML file."""
    p = Path(name_or_path)
    if not p.is_file():
        p = PROFILES_DIR / f"{name_or_path}.yaml"
        if not p.is_file():
            raise MensegError(
                f"no benchmark profile '{name_or_path}' (packaged: {', '.join(profile_names())})"
            )
    try:
        d = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise MensegError(f"profile is not valid YAML ({e})", p) from None
    known = {"name", "description", "labeled", "seeds", "cohort", "budget", "away", "ceiling"}
    if not isinstance(d, dict) or set(d) - known:
        bad = sorted(set(d) - known) if isinstance(d, dict) else ["(not a mapping)"]
        raise MensegError(f"unknown profile key '{bad[0]}' (known: {', '.join(sorted(known))})", p)
    cohort = _cohort(d.get("cohort") or {}, p, "cohort")
    away_list = d.get("away") or []
    if not isinstance(away_list, list):
        raise MensegError("away must be a list of cohorts (one per site)", p)
    # away sites train nothing: no labelled pool unless the profile says otherwise
    away = tuple(_cohort({"n_pool": 0, "n_unlabeled": 0, "prefix": _site_prefix(a.get("site")), **a}
                         if isinstance(a, dict) else a, p, "away") for a in away_list)
    sites = [cohort.site, *(a.site for a in away)]
    if len(set(sites)) != len(sites):
        raise MensegError(f"site '{next(s for s in sites if sites.count(s) > 1)}' appears twice in the "
                          "profile (home and away sites must differ)", p)
    budget = d.get("budget") or {}
    if not isinstance(budget, dict):
        raise MensegError("budget must be a mapping of config keys to values", p)
    prof = Profile(
        name=str(d.get("name", p.stem)),
        description=str(d.get("description", "")),
        labeled=tuple(int(n) for n in d.get("labeled", (3, 5, 10))),
        seeds=int(d.get("seeds", 3)),
        cohort=cohort,
        budget=dict(budget),
        away=away,
        ceiling=bool(d.get("ceiling", False)),
    )
    load_config("baseline", prof.overrides())  # every budget key must be a valid config key
    return prof


def _site_prefix(site: Any) -> str:
    """Case-id prefix of an away site's cohort: ``site-b`` -> ``SITEB``."""
    return "".join(ch for ch in str(site).upper() if ch.isalnum()) or "AWAY"


def _cohort(d: Any, path: Path, section: str) -> CohortSpec:
    if not isinstance(d, dict):
        raise MensegError(f"bad {section} section (not a mapping)", path)
    try:
        spec = CohortSpec(**d)
    except TypeError as e:
        raise MensegError(f"bad {section} section ({e})", path) from None
    try:
        spec.synth_config()
    except MensegError as e:
        raise MensegError(f"bad {section} section: {e}", path) from None
    if spec.n_test < 1 or spec.n_pool < 0 or spec.n_unlabeled < 0:
        raise MensegError(f"bad {section} section: n_test must be >= 1, n_pool and n_unlabeled >= 0", path)
    return spec


# ---------------------------------------------------------------- data


def default_cache_dir() -> Path:
    """``$MENSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/menseg``, else ``~/.cache/menseg``."""
    if os.environ.get("MENSEG_CACHE_DIR"):
        return Path(os.environ["MENSEG_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "menseg"


def embedded_cohort(spec: CohortSpec, cache_dir: str | Path | None = None) -> Path:
    """Folder of the embedded cohort for ``spec``, generating it on first use.

    Layout: ``labeled/`` (the pool), ``test/`` and ``unlabeled/`` (no label files), each
    in the BraTS layout, plus ``cohort.json``. Built in a temporary folder and renamed,
    so an interrupted build leaves nothing that looks finished.
    """
    from menseg.synth.engine import SIDECAR_VERSION, synth_dataset

    key = {"cohort": spec.key(), "version": COHORT_VERSION, "sidecar": SIDECAR_VERSION}
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / "cohorts" / f"{spec.site}-{spec.spacing_mm:g}mm-{json_digest(key)[:12]}"
    if (folder / "cohort.json").is_file():
        return folder
    if spec.n_test < 1 or spec.n_pool < 0 or spec.n_unlabeled < 0:
        raise MensegError(f"cohort needs at least one test case and no negative size, got {spec}")
    log.info("generating the embedded %s cohort (%d pool, %d test, %d unlabelled cases at %g mm) in %s",
             spec.site, spec.n_pool, spec.n_test, spec.n_unlabeled, spec.spacing_mm, folder)
    cfg = spec.synth_config()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        parts = [("labeled", spec.n_pool, "POOL"), ("test", spec.n_test, "TEST"),
                 ("unlabeled", spec.n_unlabeled, "UNLAB")]
        for i, (sub, n, tag) in enumerate(parts):
            if n == 0:
                continue
            seed = derive_seed(spec.seed, "cohort", i)
            synth_dataset(tmp / sub, n, "brats", seed=seed, cfg=cfg, prefix=f"{spec.prefix}-{tag}",
                          device="cpu",
                          preview=sub == "test", max_previews=4)
        for seg in (tmp / "unlabeled").glob("*/*-seg.nii.gz"):
            seg.unlink()
        write_json_atomic(tmp / "cohort.json", key)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / "cohort.json").is_file():  # not a concurrent build that finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


#: Name of the home site's test set (away test sets are named after their site or folder).
HOME = "home"


@dataclass(frozen=True)
class BenchData:
    """The labelled pool, the test sets (home first) and the unlabelled scans per site."""

    description: str
    pool: tuple[CaseFiles, ...]
    test_sets: dict[str, tuple[CaseFiles, ...]]
    unlabeled: dict[str, Path]  #: site -> folder of unlabelled scans (HOME: the home site's)
    roots: tuple[Path, ...]  #: data.root of the runs (the pool's folder)
    cohorts: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  #: site -> cohort key

    @property
    def test(self) -> tuple[CaseFiles, ...]:
        """The home test set."""
        return self.test_sets[HOME]

    @property
    def unlabeled_root(self) -> Path | None:
        """The home site's unlabelled scans (what the variants use unless adapting to a site)."""
        return self.unlabeled.get(HOME)

    @property
    def n_unlabeled(self) -> int:
        return _count_unlabeled(self.unlabeled_root)

    def unlabeled_ids(self) -> dict[str, list[str]]:
        """Site -> sorted case ids of its unlabelled scans (part of the protocol)."""
        return {k: sorted(c.case_id for c in discover_cases(v)) for k, v in self.unlabeled.items()}


def split_test(ids: Sequence[str], test_size: int) -> tuple[list[str], list[str]]:
    """``(pool, test)`` ids: ``test_size`` cases drawn once from a fixed seed, both sorted."""
    ids = sorted(ids)
    if not 0 < test_size < len(ids):
        raise MensegError(f"test size must be between 1 and {len(ids) - 1}, got {test_size}")
    perm = np.random.default_rng(derive_seed(0, "bench-test")).permutation(len(ids))
    test = sorted(ids[i] for i in perm[:test_size])
    return [i for i in ids if i not in set(test)], test


def draw_subsets(pool: Sequence[str], labeled: Sequence[int], seed: int) -> dict[int, list[str]]:
    """Nested labelled subsets for one seed: ``{N: sorted ids}``.

    The pool (sorted) is permuted from ``(seed, "bench-subset")``; subset N is the
    first N ids of the permutation, so smaller subsets are inside larger ones.
    """
    pool = sorted(pool)
    if max(labeled) > len(pool):
        raise MensegError(f"{max(labeled)} labelled cases asked for, but the pool holds {len(pool)}")
    perm = np.random.default_rng(derive_seed(seed, "bench-subset")).permutation(len(pool))
    return {n: sorted(pool[i] for i in perm[:n]) for n in labeled}


def _labelled(root: Path) -> list[CaseFiles]:
    cases = [c for c in discover_cases(root) if c.label is not None]
    if not cases:
        raise MensegError("no labelled cases found", root)
    return cases


def _count_unlabeled(root: Path | None) -> int:
    if root is None:
        return 0
    if not root.is_dir():
        raise MensegError("unlabelled scans folder not found", root)
    n = len(discover_cases(root))
    if n == 0:
        raise MensegError("no cases found in the unlabelled scans folder", root)
    return n


def resolve_data(
    profile: Profile,
    data: str | Path | None,
    unlabeled: str | Path | None,
    test_size: int | None,
    labeled: Sequence[int],
    cache_dir: str | Path | None = None,
    away: Sequence[str | Path] = (),
) -> BenchData:
    """The benchmark's data: the embedded cohorts (``data`` None) or the user's dataset.

    ``away``: labelled folders of other sites, each one more test set named after the folder
    (added to the profile's away cohorts when the embedded data is used).
    ``test_size``: with ``data``, the cases held out for the home test set (default half); with
    the embedded cohort, how many of its test cases to use (at most what it holds).
    """
    unl = Path(unlabeled) if unlabeled is not None else None
    test_sets: dict[str, tuple[CaseFiles, ...]] = {}
    unl_sites: dict[str, Path] = {}
    cohorts: dict[str, dict[str, Any]] = {}
    if data is None:
        folder = embedded_cohort(profile.cohort, cache_dir)
        pool, test = _labelled(folder / "labeled"), _labelled(folder / "test")
        if test_size is not None:
            if not 0 < test_size <= len(test):
                raise MensegError(f"--test-size {test_size} is outside 1..{len(test)}, the test cases the "
                                  f"embedded cohort ({profile.cohort.site}) holds")
            test = sorted(test, key=lambda c: c.case_id)[:test_size]
        if unl is None and profile.cohort.n_unlabeled > 0:
            unl = folder / "unlabeled"
        c = profile.cohort
        desc = (f"embedded synthetic cohort ({c.site} MR-physics model, {c.spacing_mm:g} mm): "
                f"{len(pool)} labelled pool, {len(test)} test cases")
        roots = (folder / "labeled",)
        cohorts[HOME] = c.key()
        for spec in profile.away:
            af = embedded_cohort(spec, cache_dir)
            test_sets[spec.site] = tuple(_labelled(af / "test"))
            if spec.n_unlabeled > 0:
                unl_sites[spec.site] = af / "unlabeled"
            cohorts[spec.site] = spec.key()
            desc += f"; away {spec.site}: {spec.n_test} test cases"
    else:
        root = Path(data)
        cases = _labelled(root)
        n_test = test_size if test_size is not None else len(cases) // 2
        pool_ids, test_ids = split_test([c.case_id for c in cases], n_test)
        by_id = {c.case_id: c for c in cases}
        pool, test = [by_id[i] for i in pool_ids], [by_id[i] for i in test_ids]
        desc = (f"{root.name}: {len(cases)} labelled cases, {len(pool)} in the pool, {len(test)} held out "
                "for test")
        roots = (root,)
    for extra in away:
        folder = Path(extra)
        name = folder.name
        if name == HOME or name in test_sets:
            raise MensegError(f"two test sets are named '{name}' (rename the --away folder)", folder)
        if not folder.is_dir():
            raise MensegError("--away folder not found", folder)
        test_sets[name] = tuple(_labelled(folder))
        desc += f"; away {name}: {len(test_sets[name])} test cases"
    if max(labeled) > len(pool):
        raise MensegError(
            f"{max(labeled)} labelled cases asked for, but only {len(pool)} are in the pool "
            f"(lower --labeled or --test-size)", roots[0]
        )
    if max(labeled) == len(pool):
        log.warning("the largest N uses the whole pool: its runs differ only in the seed, not the cases")
    if unl is not None:
        _count_unlabeled(unl)  # exists and holds cases
        unl_sites = {HOME: unl, **unl_sites}
    return BenchData(desc, tuple(pool), {HOME: tuple(test), **test_sets}, unl_sites, roots, cohorts)


# ---------------------------------------------------------------- plan


#: Config keys that say where a run is written or run, not what it is: a results folder continued on
#: another machine (other paths, another device) holds the same runs.
MACHINE_KEYS: tuple[str, ...] = (
    "out_dir", "data.cache_dir", "train.device", "data.root", "data.unlabeled_root")


#: Identity key holding the sha256 of a run's ``model.init`` weights (:meth:`RunSpec.identity`).
INIT_DIGEST_KEY = "model.init_sha256"


@dataclass(frozen=True)
class RunSpec:
    """One (variant, N, seed) run and its resolved config.

    ``unlabeled_from``: whose unlabelled scans the run uses (HOME, an away site when it adapts
    to that site, None when it uses none).
    """

    variant: str
    n_labeled: int
    seed: int
    train_cases: tuple[str, ...]
    folder: Path
    cfg: Config
    unlabeled_from: str | None = None

    @property
    def key(self) -> str:
        return f"{self.variant}/n{self.n_labeled}/seed{self.seed}"

    def identity(self) -> dict[str, Any]:
        """The flattened config that defines the run (not where it is written or run); a run started from
        other weights (``model.init``) also records their sha256 (``model.init_sha256``), so new weights
        under the same model name make it another run."""
        d = flat_config(to_dict(self.cfg))
        for k in MACHINE_KEYS:
            d.pop(k, None)
        if self.cfg.model.init:
            from menseg.models import init_digest

            d[INIT_DIGEST_KEY] = init_digest(self.cfg.model.init)
        return d

    def differences(self, stored: dict[str, Any]) -> list[str]:
        """Keys where ``stored`` (a finished run's identity) differs from this run's.

        A key the stored run did not have (a config option added to menseg later) counts
        as equal when this run leaves it at its default, or, for a key whose default changed
        what a run does, at the value runs had before it (:data:`menseg.config.LEGACY_VALUES`);
        machine-specific keys (paths, device: :data:`MACHINE_KEYS`) are not compared, nor the keys of a
        section switched off in both runs (:func:`menseg.config.off_in_both`).
        """
        now = self.identity()
        default = {**flat_config(to_dict(Config())), **LEGACY_VALUES}
        keys = (set(now) | set(stored)) - set(MACHINE_KEYS)
        then = {k: stored[k] if k in stored else default.get(k) for k in keys}
        return sorted(k for k in keys if then.get(k) != now.get(k) and not off_in_both(k, then, now))


def variant_name(variant: str) -> str:
    """The name a variant is reported under: the config's stem (``configs/ism.yaml`` -> ``ism``)."""
    return Path(variant).name.removesuffix(".yaml").removesuffix(".yml")


def parse_adapt(adapt: Sequence[str], variants: Sequence[str], data: BenchData) -> list[tuple[str, str]]:
    """``VARIANT@SITE`` items -> ``(variant, site)``: the variant trained with that away site's
    unlabelled scans instead of the home site's (adapting to a new hospital)."""
    out = []
    for item in adapt:
        variant, sep, site = item.rpartition("@")
        if not sep or not variant or not site:
            raise MensegError(f"--adapt takes VARIANT@SITE (e.g. sim2real@site-b), got '{item}'")
        away = [k for k in data.test_sets if k != HOME]
        if site not in data.test_sets or site == HOME:
            raise MensegError(f"--adapt {item}: unknown away site '{site}' (away sites: "
                              f"{', '.join(away) or 'none'})")
        if site not in data.unlabeled:
            raise MensegError(f"--adapt {item}: site '{site}' has no unlabelled scans (n_unlabeled in the "
                              "profile's away cohort)")
        if variant_name(variant) not in {variant_name(v) for v in variants}:
            log.info("--adapt %s: %s is not among the variants; it runs only adapted", item, variant)
        out.append((variant, site))
    return out


def plan_runs(
    out: Path,
    variants: Sequence[str],
    labeled: Sequence[int],
    seeds: Sequence[int],
    profile: Profile,
    data: BenchData,
    overrides: Sequence[str] = (),
    device: str = "auto",
    adapt: Sequence[str] = (),
) -> list[RunSpec]:
    """Every run, seed-major (a complete learning curve exists after the first seed).

    Per seed and N: the variants, then the adapted ones (``adapt``: ``VARIANT@SITE``, named
    ``VARIANT@SITE``); per seed, last, the ceiling (profile ``ceiling``): the first variant
    trained on the whole labelled pool.
    """
    names = [variant_name(v) for v in variants]
    if len(set(names)) != len(names):
        raise MensegError(f"two variants share the name '{next(n for n in names if names.count(n) > 1)}'")
    if min(labeled, default=1) < 0:
        raise MensegError(f"numbers of labelled cases must be >= 0, got {list(labeled)}")
    jobs: list[tuple[str, str, str | None]] = [(v, n, HOME if data.unlabeled_root else None)
                                               for v, n in zip(variants, names, strict=True)]
    jobs += [(v, f"{variant_name(v)}@{site}", site) for v, site in parse_adapt(adapt, variants, data)]
    pool_size = len(data.pool)
    ceiling = profile.ceiling and pool_size not in labeled
    runs, skipped = [], set()
    for seed in seeds:
        subsets = draw_subsets([c.case_id for c in data.pool], [*labeled, *([pool_size] if ceiling else [])],
                               seed)
        plan = [(n, job) for n in labeled for job in jobs]
        if ceiling:
            plan.append((pool_size, jobs[0]))
        for n, (variant, name, unl_from) in plan:
            folder = out / "runs" / name / f"n{n}" / f"seed{seed}"
            # N = 0: no labelled case at all (data.root unset); only variants that train without
            # labels (sim2real: synthetic + unlabelled scans) run there
            root = json.dumps(str(data.roots[0])) if n > 0 else "null"
            unl = json.dumps(str(data.unlabeled[unl_from])) if unl_from else "null"
            ov = [
                *profile.overrides(), *overrides,
                f"data.root={root}",
                f"data.cases={json.dumps(subsets[n])}",
                "data.val_fraction=0", "data.val_cases=[]",
                f"data.cache_dir={json.dumps(str(out / 'preprocessed'))}",
                f"data.unlabeled_root={unl}",
                f"train.seed={seed}",
                f"train.device={device}",
                f"out_dir={json.dumps(str(folder / 'train'))}",
            ]
            cfg = load_config(variant, ov)
            if unl_from not in (None, HOME) and not cfg.sim2real.enabled:
                raise MensegError(f"--adapt {name}: {variant_name(variant)} uses no unlabelled scans "
                                  "(adapting applies to variants with sim2real enabled)")
            if n == 0 and not cfg.sim2real.enabled:
                if name not in skipped:
                    log.info("variant %s needs labelled cases: no N = 0 runs for it", name)
                    skipped.add(name)
                continue
            runs.append(RunSpec(name, n, seed, tuple(subsets[n]), folder, cfg,
                                unl_from if cfg.sim2real.enabled else None))
    return runs


def _foreign(out: Path) -> bool:
    """``out`` holds something besides our lock and the temporary files of a killed first write."""
    if not out.is_dir():
        return False
    leftovers = set(atomic_leftovers(out))
    return any(p.name not in (LOCK_NAME, ".gitignore") and p not in leftovers for p in out.iterdir())


#: What a results folder may hold in git: everything but these (checkpoints, predictions, caches).
RESULTS_GITIGNORE = """\
# menseg bench: the results (bench.json, run.json, evaluation/, report/) can be committed and
# continued elsewhere with the same command; what is heavy or machine-specific stays out.
# (runs/ is re-included in case an enclosing repository ignores folders named runs.)
!runs/
preprocessed/
runs/*/*/*/train/
runs/*/*/*/predictions/
runs/*/*/*/predictions-fixed/
*.lock
.*.tmp*
"""

#: bench.json keys that define the protocol: a folder with other values is refused.
PROTOCOL_KEYS: tuple[str, ...] = ("budget", "overrides", "cohorts", "pool", "test_sets", "unlabeled")


def _check_plan(out: Path, data: BenchData, profile: Profile, overrides: Sequence[str]) -> dict[str, Any]:
    """Write ``bench.json`` on first use; afterwards refuse another protocol (data, budget, test sets).

    Nothing machine-specific is compared (paths differ on another machine): the cohorts by
    their recipe, the data by case ids.
    """
    plan = {
        "version": BENCH_VERSION,
        "profile": profile.name,
        "budget": profile.budget,
        "overrides": list(overrides),
        "data": data.description,
        "cohorts": data.cohorts,
        "pool": [c.case_id for c in data.pool],
        "test": [c.case_id for c in data.test],
        "test_sets": {k: [c.case_id for c in v] for k, v in data.test_sets.items()},
        "unlabeled": data.unlabeled_ids(),
    }
    path = out / "bench.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise MensegError("bench.json is not valid JSON; use a new --out folder", path) from None
        if old.get("version") != BENCH_VERSION:
            raise MensegError(f"this benchmark folder has format version {old.get('version')} (this menseg "
                              f"writes {BENCH_VERSION}); use a new --out", path)
        for k in PROTOCOL_KEYS:
            if _protocol_value(k, old.get(k)) != _protocol_value(k, plan[k], old.get(k)):
                raise MensegError(
                    f"this benchmark folder was made with another protocol ({k}: {_short(old.get(k))} vs "
                    f"now {_short(plan[k])}); continue it with the same profile, data and --set, or use a "
                    "new --out", path)
        return old
    if _foreign(out):
        raise MensegError("output folder is not empty and holds no benchmark (bench.json)", out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, plan)
    return plan


def _protocol_value(key: str, value: Any, older: Any = None) -> Any:
    """A protocol entry as compared: in the budget, a key that an older bench.json (``older``) lacks and
    that pins the value runs had before the key existed (:data:`menseg.config.LEGACY_VALUES`) changes
    nothing, so a benchmark started before such a key can pin it and go on."""
    if key != "budget" or not isinstance(value, dict) or not isinstance(older, dict):
        return value
    return {k: v for k, v in value.items()
            if k in older or k not in LEGACY_VALUES or LEGACY_VALUES[k] != v}


def _short(value: Any, width: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= width else text[: width - 3] + "..."


# ---------------------------------------------------------------- runs


def _read_done(run: RunSpec) -> dict[str, Any] | None:
    path = run.folder / "run.json"
    if not path.is_file():
        return None
    try:
        done = json.loads(path.read_text())
    except ValueError:
        log.warning("%s is unreadable; redoing the run's prediction and evaluation", path)
        return None
    diff = run.differences(done.get("config", {}))
    if diff:
        raise MensegError(
            f"run {run.key} was finished with another config ({', '.join(diff[:3])} differ: the "
            "variant's YAML or the budget changed); use a new --out folder or delete that run's folder", path)
    return done


def _train_seconds(train_dir: Path) -> float:
    """Wall seconds of training, from the last metrics.jsonl line (resumes included), plus the run's
    companion for incomplete scans when it has one (``seqdrop.companion_steps``)."""
    from menseg.checkpoint import COMPANION

    companion = train_dir / COMPANION
    return _metrics_seconds(train_dir) + (_metrics_seconds(companion) if companion.is_dir() else 0.0)


def _metrics_seconds(train_dir: Path) -> float:
    """The ``time`` of the last line of a run folder's metrics.jsonl (0 without one)."""
    last = 0.0
    path = train_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                last = float(json.loads(line).get("time", last))
            except ValueError:
                continue
    return last


def _read_metrics(csv_path: Path) -> dict[str, dict[str, float]]:
    import csv

    with open(csv_path) as f:
        return {r.pop("case_id"): {k: float(v) for k, v in r.items()} for r in csv.DictReader(f)}


def execute_run(
    run: RunSpec, test_sets: Mapping[str, Sequence[CaseFiles]], device: str,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Train (or resume), predict and evaluate every test set; write ``run.json`` last.

    When the run learned its post-processing (``postprocess.learn``), each test set is also
    scored with the fixed rule instead, from the same network output (``metrics_fixed``), so the
    report can show what the learned rules do.
    """
    from menseg.bench.env import environment
    from menseg.checkpoint import load_checkpoint
    from menseg.device import resolve_device
    from menseg.evaluate.runner import evaluate_pairs
    from menseg.infer.predict import predict
    from menseg.train.trainer import train

    train_dir = run.folder / "train"
    latest = train_dir / "latest.pt"
    if train_dir.exists() and not latest.is_file():
        shutil.rmtree(train_dir)  # killed before its first checkpoint: start over
    train(run.cfg, resume=latest.is_file(), progress=True, on_step=on_step)
    rules = (load_checkpoint(latest).get("postprocess") or {}).get("rules")
    metrics: dict[str, dict[str, dict[str, float]]] = {}
    fixed: dict[str, dict[str, dict[str, float]]] = {}
    seconds: dict[str, float] = {}
    for name, cases in test_sets.items():
        t0 = time.perf_counter()
        pred_dir, fixed_dir = run.folder / "predictions" / name, run.folder / "predictions-fixed" / name
        predict(latest, list(cases), pred_dir, device=device, overwrite=True, progress=False,
                fixed_output=fixed_dir if rules else None)
        seconds[name] = round(time.perf_counter() - t0, 3)
        for folder, ev, into in ((pred_dir, "evaluation", metrics), (fixed_dir, "evaluation-fixed", fixed)):
            if folder is fixed_dir and not rules:
                continue
            pairs = {c.case_id: (folder / f"{c.case_id}.nii.gz", c.label) for c in cases}
            evaluate_pairs(pairs, run.folder / ev / name, {"run": run.key, "test_set": name},  # type: ignore[arg-type]
                           progress=False)
            into[name] = _read_metrics(run.folder / ev / name / "metrics.csv")
    done = {
        "version": BENCH_VERSION, "variant": run.variant, "n_labeled": run.n_labeled, "seed": run.seed,
        "train_cases": list(run.train_cases), "unlabeled_from": run.unlabeled_from, "config": run.identity(),
        "train_seconds": _train_seconds(train_dir), "predict_seconds": seconds,
        "postprocess": rules, "metrics": metrics, **({"metrics_fixed": fixed} if rules else {}),
        "environment": environment(resolve_device(device)),
    }
    write_json_atomic(run.folder / "run.json", done)
    return done


def _records(run: RunSpec, done: dict[str, Any]) -> list[Any]:
    """One :class:`~menseg.bench.stats.RunRecord` per test set of a finished run."""
    from menseg.bench.stats import RunRecord

    fixed = done.get("metrics_fixed") or {}
    return [RunRecord(
        variant=run.variant, n_labeled=run.n_labeled, seed=run.seed, train_cases=run.train_cases,
        metrics=m, pred_dir=str(run.folder / "predictions" / name),
        train_seconds=float(done["train_seconds"]), predict_seconds=float(done["predict_seconds"][name]),
        test_set=name, metrics_fixed=fixed.get(name), unlabeled_from=run.unlabeled_from,
    ) for name, m in done["metrics"].items()]


def run_efficiency(
    out: str | Path,
    variants: Sequence[str] = ("baseline",),
    labeled: Sequence[int] | None = None,
    seeds: int | None = None,
    profile: str | Path = "quick",
    data: str | Path | None = None,
    unlabeled: str | Path | None = None,
    test_size: int | None = None,
    overrides: Sequence[str] = (),
    device: str = "auto",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    command: str | None = None,
    away: Sequence[str | Path] = (),
    adapt: Sequence[str] = (),
    report_only: bool = False,
) -> dict[str, Path]:
    """Run (or resume) the data-efficiency benchmark and write ``out/report``.

    Args:
        out: benchmark folder (new, or one made by an earlier call to resume).
        variants: config names or YAML paths; the first is the reference of the paired tests.
        labeled: numbers of labelled cases (default: the profile's).
        seeds: number of seeds 0..seeds-1 (default: the profile's).
        profile: ``quick`` (2 CPU cores, < 1 h for the baseline), ``medium`` (home + away sites),
            ``full`` (GPU) or a YAML path.
        data: labelled dataset (BraTS or nnU-Net layout); None uses the embedded cohort.
        unlabeled: extra scans without labels, passed to the variants as ``data.unlabeled_root``.
        test_size: test cases held out of ``data`` (default: half of them); with the embedded
            cohort, how many of its home test cases to use.
        overrides: extra config overrides applied to every run (part of the budget).
        device: ``auto`` | ``cpu`` | ``cuda``.
        cache_dir: where the embedded cohort is cached (default :func:`default_cache_dir`).
        progress: show progress bars.
        command: the command line, for the report.
        away: labelled folders of other sites: more test sets, nobody trains on them.
        adapt: ``VARIANT@SITE`` runs that use an away site's unlabelled scans (:func:`parse_adapt`).
        report_only: write the report from the finished runs, train nothing (partial results).

    Returns:
        ``{name: path}`` of the report files.
    """
    from tqdm.auto import tqdm

    from menseg.bench.env import environment
    from menseg.bench.report import write_report
    from menseg.device import resolve_device

    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    prof = load_profile(profile)
    labeled = sorted(set(labeled if labeled is not None else prof.labeled))
    n_seeds = seeds if seeds is not None else prof.seeds
    if not labeled or labeled[0] < 0:
        raise MensegError(f"numbers of labelled cases must be at least 0, got {labeled}")
    if n_seeds < 1:
        raise MensegError(f"need at least one seed, got {n_seeds}")
    if not variants:
        raise MensegError("no variants given")
    dev = resolve_device(device)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MensegError("--out is a file, not a folder", out)
    if report_only and not (out / "bench.json").is_file():
        raise MensegError("no benchmark here to report on (bench.json missing)", out)
    if not (out / "bench.json").is_file() and _foreign(out):  # refused before anything is written there
        raise MensegError("output folder is not empty and holds no benchmark (bench.json)", out)
    if not report_only and not (out / ".gitignore").exists():  # before the lock file: never committed
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / ".gitignore", RESULTS_GITIGNORE)
    # two commands must not train the same runs; --report-only only reads the runs (and writes report/,
    # which a running benchmark writes only when it ends), so it may look at a benchmark in progress
    with contextlib.nullcontext() if report_only else folder_lock(out, "benchmark"):
        if not report_only:
            remove_atomic_leftovers(out)
        bench_data = resolve_data(prof, data, unlabeled, test_size, labeled, cache_dir, away)
        runs = plan_runs(out, variants, labeled, range(n_seeds), prof, bench_data, overrides, device, adapt)
        _check_plan(out, bench_data, prof, overrides)

        todo = [r for r in runs if _read_done(r) is None]
        log.info("benchmark %s: %d runs (%d variants x %d N x %d seeds), %d to do; profile %s",
                 out, len(runs), len(variants), len(labeled), n_seeds, len(todo), prof.name)
        if report_only:
            if len(todo) == len(runs):
                raise MensegError("no finished run to report on yet", out)
            log.info("--report-only: %d of %d runs are finished; reporting those",
                     len(runs) - len(todo), len(runs))
            todo = []
        overall = tqdm(total=sum(r.cfg.train.steps for r in todo), desc="benchmark", unit="step",
                       disable=not progress, position=0)
        for i, run in enumerate(todo, 1):
            overall.set_postfix_str(f"run {i}/{len(todo)}: {run.variant} N={run.n_labeled} seed {run.seed}")
            base = overall.n

            def on_step(done_steps: int, total: int, base: int = base) -> None:
                overall.update(base + done_steps - overall.n)

            done = execute_run(run, bench_data.test_sets, device, on_step)
            overall.update(base + run.cfg.train.steps - overall.n)
            wt = ", ".join(f"{k} {np.mean([m['WT_lesion_dice'] for m in v.values()]):.3f}"
                           for k, v in done["metrics"].items())
            log.info("finished %s (%d/%d): mean WT lesion-wise Dice %s; train %.0f s", run.key, i,
                     len(todo), wt, done["train_seconds"])
        overall.close()

        finished = [(r, d) for r in runs if (d := _read_done(r)) is not None]
        records = [rec for r, d in finished for rec in _records(r, d)]
        wall = sum(d["train_seconds"] + sum(d["predict_seconds"].values()) for _, d in finished)
        meta = {
            "title": f"menseg data-efficiency benchmark ({prof.name} profile)",
            "profile": prof.name,
            "profile_settings": {"description": prof.description, **prof.budget,
                                 **({"overrides": list(overrides)} if overrides else {})},
            "variants": [variant_name(v) for v in variants],
            "labeled": labeled,
            **({"ceiling_n": len(bench_data.pool)} if prof.ceiling else {}),
            "seeds": list(range(n_seeds)),
            "data": bench_data.description,
            "unlabeled": ", ".join(f"{k}: {len(v)} scans" for k, v in bench_data.unlabeled_ids().items())
                         or None,
            "n_pool": len(bench_data.pool),
            "test sets": ", ".join(f"{k} ({len(v)} cases)" for k, v in bench_data.test_sets.items()),
            "runs finished": f"{len(finished)} of {len(runs)}",
            "run environments": "; ".join(sorted({_kv_env(d.get("environment")) for _, d in finished})),
            "environment": {**environment(dev), "python": sys.version.split()[0]},
            "started": started,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "wall_seconds": round(wall, 1),
            "command": command or "",
            "menseg_version": _version(),
        }
        test_cases = {k: {c.case_id: c for c in v} for k, v in bench_data.test_sets.items()}
        return write_report(out / "report", records, meta, test_cases)


def _kv_env(env: Any) -> str:
    if not isinstance(env, dict):
        return "not recorded"
    return ", ".join(f"{k}={env[k]}" for k in ("device", "device_name", "threads", "torch") if k in env)



def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("menseg")
    except PackageNotFoundError:
        return "unknown"


__all__ = [
    "BenchData", "CohortSpec", "Profile", "RunSpec", "default_cache_dir", "draw_subsets", "embedded_cohort",
    "execute_run", "load_profile", "plan_runs", "profile_names", "resolve_data", "run_efficiency",
    "split_test", "variant_name",
]
