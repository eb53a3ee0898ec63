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

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from menseg.config import PACKAGED_CONFIGS, Config, flat_config, load_config, to_dict
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
)

log = logging.getLogger(__name__)

PROFILES_DIR = PACKAGED_CONFIGS / "bench"
#: Version of the bench.json / run.json formats.
BENCH_VERSION = 1
#: Bumped when the embedded cohort's recipe changes (invalidates cached cohorts).
COHORT_VERSION = 1


# ---------------------------------------------------------------- profiles


@dataclass(frozen=True)
class CohortSpec:
    """The embedded synthetic cohort: one scanner site of the engine's MR-physics model."""

    site: str = "site-a"
    spacing_mm: float = 2.0
    n_pool: int = 16
    n_test: int = 12
    n_unlabeled: int = 8
    seed: int = 0


@dataclass(frozen=True)
class Profile:
    """A benchmark budget: defaults for N and seeds, the cohort, and config overrides."""

    name: str
    description: str
    labeled: tuple[int, ...]
    seeds: int
    cohort: CohortSpec
    budget: dict[str, Any]

    def overrides(self) -> list[str]:
        """The budget as ``key=value`` overrides for :func:`menseg.config.load_config`."""
        return [f"{k}={json.dumps(v)}" for k, v in self.budget.items()]


def profile_names() -> list[str]:
    """Names of the packaged profiles."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """A packaged profile (``quick``, ``full``) or a profile YAML file."""
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
    known = {"name", "description", "labeled", "seeds", "cohort", "budget"}
    if not isinstance(d, dict) or set(d) - known:
        bad = sorted(set(d) - known) if isinstance(d, dict) else ["(not a mapping)"]
        raise MensegError(f"unknown profile key '{bad[0]}' (known: {', '.join(sorted(known))})", p)
    try:
        cohort = CohortSpec(**(d.get("cohort") or {}))
    except TypeError as e:
        raise MensegError(f"bad cohort section ({e})", p) from None
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
    )
    load_config("baseline", prof.overrides())  # every budget key must be a valid config key
    return prof


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
    from menseg.synth.engine import SIDECAR_VERSION, SynthConfig, synth_dataset, with_spacing

    key = {"cohort": dataclasses.asdict(spec), "version": COHORT_VERSION, "sidecar": SIDECAR_VERSION}
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / "cohorts" / f"{spec.site}-{spec.spacing_mm:g}mm-{json_digest(key)[:12]}"
    if (folder / "cohort.json").is_file():
        return folder
    if min(spec.n_pool, spec.n_test) < 1 or spec.n_unlabeled < 0:
        raise MensegError(f"cohort sizes must be positive, got {spec}")
    log.info("generating the embedded %s cohort (%d pool, %d test, %d unlabelled cases at %g mm) in %s",
             spec.site, spec.n_pool, spec.n_test, spec.n_unlabeled, spec.spacing_mm, folder)
    cfg = dataclasses.replace(with_spacing(SynthConfig(), spec.spacing_mm), site=spec.site)
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
            synth_dataset(tmp / sub, n, "brats", seed=seed, cfg=cfg, prefix=f"BENCH-{tag}", device="cpu",
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


@dataclass(frozen=True)
class BenchData:
    """The labelled pool, the fixed test split and the optional unlabelled scans."""

    description: str
    pool: tuple[CaseFiles, ...]
    test: tuple[CaseFiles, ...]
    unlabeled_root: Path | None
    n_unlabeled: int
    roots: tuple[Path, ...]  #: data.root of the runs (the pool's folder)


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
) -> BenchData:
    """The benchmark's data: the embedded cohort (``data`` None) or the user's dataset."""
    unl = Path(unlabeled) if unlabeled is not None else None
    if data is None:
        if test_size is not None:
            raise MensegError("--test-size applies to --data; the embedded cohort has a fixed test split")
        folder = embedded_cohort(profile.cohort, cache_dir)
        pool, test = _labelled(folder / "labeled"), _labelled(folder / "test")
        if unl is None and profile.cohort.n_unlabeled > 0:
            unl = folder / "unlabeled"
        c = profile.cohort
        desc = (f"embedded synthetic cohort ({c.site} MR-physics model, {c.spacing_mm:g} mm): "
                f"{len(pool)} labelled pool, {len(test)} test cases ({folder})")
        roots = (folder / "labeled",)
    else:
        root = Path(data)
        cases = _labelled(root)
        n_test = test_size if test_size is not None else len(cases) // 2
        pool_ids, test_ids = split_test([c.case_id for c in cases], n_test)
        by_id = {c.case_id: c for c in cases}
        pool, test = [by_id[i] for i in pool_ids], [by_id[i] for i in test_ids]
        desc = f"{root}: {len(cases)} labelled cases, {len(pool)} in the pool, {len(test)} held out for test"
        roots = (root,)
    if max(labeled) > len(pool):
        raise MensegError(
            f"{max(labeled)} labelled cases asked for, but only {len(pool)} are in the pool "
            f"(lower --labeled or --test-size)", roots[0]
        )
    if max(labeled) == len(pool):
        log.warning("the largest N uses the whole pool: its runs differ only in the seed, not the cases")
    return BenchData(desc, tuple(pool), tuple(test), unl, _count_unlabeled(unl), roots)


# ---------------------------------------------------------------- plan


@dataclass(frozen=True)
class RunSpec:
    """One (variant, N, seed) run and its resolved config."""

    variant: str
    n_labeled: int
    seed: int
    train_cases: tuple[str, ...]
    folder: Path
    cfg: Config

    @property
    def key(self) -> str:
        return f"{self.variant}/n{self.n_labeled}/seed{self.seed}"

    def identity(self) -> dict[str, Any]:
        """The flattened config that defines the run (not where it is written or run)."""
        d = flat_config(to_dict(self.cfg))
        for k in ("out_dir", "data.cache_dir", "train.device"):
            d.pop(k)
        return d

    def differences(self, stored: dict[str, Any]) -> list[str]:
        """Keys where ``stored`` (a finished run's identity) differs from this run's.

        A key the stored run did not have (a config option added to menseg later) counts
        as equal when this run leaves it at its default.
        """
        now, default = self.identity(), flat_config(to_dict(Config()))
        return sorted(k for k in set(now) | set(stored)
                      if (stored[k] if k in stored else default.get(k)) != now.get(k))


def variant_name(variant: str) -> str:
    """The name a variant is reported under: the config's stem (``configs/ism.yaml`` -> ``ism``)."""
    return Path(variant).name.removesuffix(".yaml").removesuffix(".yml")


def plan_runs(
    out: Path,
    variants: Sequence[str],
    labeled: Sequence[int],
    seeds: Sequence[int],
    profile: Profile,
    data: BenchData,
    overrides: Sequence[str] = (),
    device: str = "auto",
) -> list[RunSpec]:
    """Every run, seed-major (a complete learning curve exists after the first seed)."""
    names = [variant_name(v) for v in variants]
    if len(set(names)) != len(names):
        raise MensegError(f"two variants share the name '{next(n for n in names if names.count(n) > 1)}'")
    unl = str(data.unlabeled_root) if data.unlabeled_root else None
    if min(labeled, default=1) < 0:
        raise MensegError(f"numbers of labelled cases must be >= 0, got {list(labeled)}")
    runs, skipped = [], set()
    for seed in seeds:
        subsets = draw_subsets([c.case_id for c in data.pool], labeled, seed)
        for n in labeled:
            for variant, name in zip(variants, names, strict=True):
                folder = out / "runs" / name / f"n{n}" / f"seed{seed}"
                # N = 0: no labelled case at all (data.root unset); only variants that train without
                # labels (sim2real: synthetic + unlabelled scans) run there
                root = json.dumps(str(data.roots[0])) if n > 0 else "null"
                ov = [
                    *profile.overrides(), *overrides,
                    f"data.root={root}",
                    f"data.cases={json.dumps(subsets[n])}",
                    "data.val_fraction=0", "data.val_cases=[]",
                    f"data.cache_dir={json.dumps(str(out / 'preprocessed'))}",
                    f"data.unlabeled_root={json.dumps(unl)}",
                    f"train.seed={seed}",
                    f"train.device={device}",
                    f"out_dir={json.dumps(str(folder / 'train'))}",
                ]
                cfg = load_config(variant, ov)
                if n == 0 and not cfg.sim2real.enabled:
                    if name not in skipped:
                        log.info("variant %s needs labelled cases: no N = 0 runs for it", name)
                        skipped.add(name)
                    continue
                runs.append(RunSpec(name, n, seed, tuple(subsets[n]), folder, cfg))
    return runs


def _foreign(out: Path) -> bool:
    """``out`` holds something besides our lock and the temporary files of a killed first write."""
    if not out.is_dir():
        return False
    leftovers = set(atomic_leftovers(out))
    return any(p.name != LOCK_NAME and p not in leftovers for p in out.iterdir())


def _check_plan(out: Path, data: BenchData, profile: Profile, overrides: Sequence[str]) -> dict[str, Any]:
    """Write ``bench.json`` on first use; afterwards refuse other data or another budget."""
    plan = {
        "version": BENCH_VERSION,
        "profile": profile.name,
        "budget": profile.budget,
        "overrides": list(overrides),
        "data": data.description,
        "pool": [c.case_id for c in data.pool],
        "test": [c.case_id for c in data.test],
        "unlabeled_root": str(data.unlabeled_root) if data.unlabeled_root else None,
    }
    path = out / "bench.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise MensegError("bench.json is not valid JSON; use a new --out folder", path) from None
        for k in ("version", "budget", "overrides", "pool", "test", "unlabeled_root"):
            if old.get(k) != plan[k]:
                raise MensegError(
                    f"this benchmark folder was made with another {k} ({old.get(k)!r} vs now "
                    f"{plan[k]!r}); resume with the same data and profile, or use a new --out", path)
        return old
    if _foreign(out):
        raise MensegError("output folder is not empty and holds no benchmark (bench.json)", out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, plan)
    return plan


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
    """Wall seconds of training, from the last metrics.jsonl line (resumes included)."""
    last = 0.0
    path = train_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                last = float(json.loads(line).get("time", last))
            except ValueError:
                continue
    return last


def execute_run(
    run: RunSpec, test: Sequence[CaseFiles], device: str, on_step: Callable[[int, int], None] | None = None
) -> dict[str, Any]:
    """Train (or resume), predict the test split, evaluate; write ``run.json`` last."""
    from menseg.evaluate.runner import evaluate_pairs
    from menseg.infer.predict import predict
    from menseg.train.trainer import train

    train_dir = run.folder / "train"
    latest = train_dir / "latest.pt"
    if train_dir.exists() and not latest.is_file():
        shutil.rmtree(train_dir)  # killed before its first checkpoint: start over
    train(run.cfg, resume=latest.is_file(), progress=True, on_step=on_step)
    t0 = time.perf_counter()
    pred_dir = run.folder / "predictions"
    predict(latest, list(test), pred_dir, device=device, overwrite=True, progress=False)
    predict_seconds = time.perf_counter() - t0
    pairs = {c.case_id: (pred_dir / f"{c.case_id}.nii.gz", c.label) for c in test}
    evaluate_pairs(pairs, run.folder / "evaluation", {"run": run.key}, progress=False)  # type: ignore[arg-type]
    import csv

    with open(run.folder / "evaluation" / "metrics.csv") as f:
        metrics = {r.pop("case_id"): {k: float(v) for k, v in r.items()} for r in csv.DictReader(f)}
    done = {
        "version": BENCH_VERSION, "variant": run.variant, "n_labeled": run.n_labeled, "seed": run.seed,
        "train_cases": list(run.train_cases), "config": run.identity(),
        "train_seconds": _train_seconds(train_dir), "predict_seconds": round(predict_seconds, 3),
        "metrics": metrics,
    }
    write_json_atomic(run.folder / "run.json", done)
    return done


def _record(run: RunSpec, done: dict[str, Any]) -> Any:
    from menseg.bench.stats import RunRecord

    return RunRecord(
        variant=run.variant, n_labeled=run.n_labeled, seed=run.seed, train_cases=run.train_cases,
        metrics=done["metrics"], pred_dir=str(run.folder / "predictions"),
        train_seconds=float(done["train_seconds"]), predict_seconds=float(done["predict_seconds"]),
    )


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
) -> dict[str, Path]:
    """Run (or resume) the data-efficiency benchmark and write ``out/report``.

    Args:
        out: benchmark folder (new, or one made by an earlier call to resume).
        variants: config names or YAML paths; the first is the reference of the paired tests.
        labeled: numbers of labelled cases (default: the profile's).
        seeds: number of seeds 0..seeds-1 (default: the profile's).
        profile: ``quick`` (2 CPU cores, < 1 h for the baseline), ``full`` (GPU) or a YAML path.
        data: labelled dataset (BraTS or nnU-Net layout); None uses the embedded cohort.
        unlabeled: extra scans without labels, passed to the variants as ``data.unlabeled_root``.
        test_size: test cases held out of ``data`` (default: half of them).
        overrides: extra config overrides applied to every run (part of the budget).
        device: ``auto`` | ``cpu`` | ``cuda``.
        cache_dir: where the embedded cohort is cached (default :func:`default_cache_dir`).
        progress: show progress bars.
        command: the command line, for the report.

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
    if not (out / "bench.json").is_file() and _foreign(out):  # refused before anything is written there
        raise MensegError("output folder is not empty and holds no benchmark (bench.json)", out)
    with folder_lock(out, "benchmark"):  # two commands must not train the same runs
        remove_atomic_leftovers(out)
        bench_data = resolve_data(prof, data, unlabeled, test_size, labeled, cache_dir)
        runs = plan_runs(out, variants, labeled, range(n_seeds), prof, bench_data, overrides, device)
        _check_plan(out, bench_data, prof, overrides)

        todo = [r for r in runs if _read_done(r) is None]
        log.info("benchmark %s: %d runs (%d variants x %d N x %d seeds), %d to do; profile %s",
                 out, len(runs), len(variants), len(labeled), n_seeds, len(todo), prof.name)
        overall = tqdm(total=sum(r.cfg.train.steps for r in todo), desc="benchmark", unit="step",
                       disable=not progress, position=0)
        for i, run in enumerate(todo, 1):
            overall.set_postfix_str(f"run {i}/{len(todo)}: {run.variant} N={run.n_labeled} seed {run.seed}")
            base = overall.n

            def on_step(done_steps: int, total: int, base: int = base) -> None:
                overall.update(base + done_steps - overall.n)

            done = execute_run(run, bench_data.test, device, on_step)
            overall.update(base + run.cfg.train.steps - overall.n)
            wt = np.mean([m["WT_lesion_dice"] for m in done["metrics"].values()])
            log.info("finished %s (%d/%d): mean WT lesion-wise Dice %.3f, train %.0f s", run.key, i,
                     len(todo), wt, done["train_seconds"])
        overall.close()

        records = [_record(r, _read_done(r) or {}) for r in runs]
        wall = sum(rec.train_seconds + rec.predict_seconds for rec in records)
        meta = {
            "title": f"menseg data-efficiency benchmark ({prof.name} profile)",
            "profile": prof.name,
            "profile_settings": {"description": prof.description, **prof.budget,
                                 **({"overrides": list(overrides)} if overrides else {})},
            "variants": [variant_name(v) for v in variants],
            "labeled": labeled,
            "seeds": list(range(n_seeds)),
            "data": bench_data.description,
            "unlabeled": (f"{bench_data.unlabeled_root} ({bench_data.n_unlabeled} scans)"
                          if bench_data.unlabeled_root else None),
            "n_pool": len(bench_data.pool),
            "n_test": len(bench_data.test),
            "environment": {**environment(dev), "python": sys.version.split()[0]},
            "started": started,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "wall_seconds": round(wall, 1),
            "command": command or "",
            "menseg_version": _version(),
        }
        test_cases = {c.case_id: c for c in bench_data.test}
        return write_report(out / "report", records, meta, test_cases)



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
