"""Statistics of the data-efficiency benchmark (pure numpy/scipy, no I/O).

A benchmark is a set of :class:`RunRecord` s, one per (variant, number of labelled
cases N, seed), each evaluated on the same held-out test cases. Two summaries:

* :func:`aggregate`: per run, the mean of a metric over the test cases; then the mean
  and the sample standard deviation (``ddof=1``) of these run scores over seeds.
* :func:`paired_tests`: each variant against the reference variant at each N, paired
  over test cases (same labelled subsets, same seeds, same test cases). The unit of the
  test is the test case, its score averaged over the
  seeds of the run (:func:`per_case_means`), so seeds are not counted as independent
  samples. Two-sided Wilcoxon signed-rank test; p values are Holm-adjusted within one
  family = all metrics tested for one (variant, N) pair.

Power: every paired test also states the smallest mean difference the design detects
with 80% power at two-sided alpha 0.05 (:func:`detectable_difference`), from the observed
spread of the paired differences, so that "no significant gain" can be told apart from "too
small a benchmark".

Metric direction: names containing ``hd95`` are distances in mm (lower is better);
every other tested metric (Dice, surface Dice) is better when higher.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats as sstats

from menseg.errors import MensegError

#: Metrics in the report tables, in this order; combined with REGION_NAMES -> "ET_lesion_dice" ...
TABLE_METRICS: tuple[str, ...] = ("lesion_dice", "lesion_hd95", "dice")


@dataclass(frozen=True)
class RunRecord:
    """One finished benchmark run: a variant trained on ``n_labeled`` cases with one seed,
    evaluated on the test split.

    Attributes:
        variant: variant name (the trainer config it used).
        n_labeled: number of labelled training cases.
        seed: seed of the subset draw and of the training.
        train_cases: ids of the labelled training cases.
        metrics: test case_id -> metric name (``evaluate.metrics.metric_names()``) -> value
            (Dice in [0, 1], distances in mm, volumes in mm^3).
        pred_dir: folder of ``<case_id>.nii.gz`` predictions (native grid of the test case).
        train_seconds: wall-clock training time in s.
        predict_seconds: wall-clock prediction time of the test split in s.
        test_set: which test set ``metrics`` are on (``home``, or an away site).
        metrics_fixed: the same cases scored with the fixed post-processing instead of the
            learned one (None when the run learned none).
        unlabeled_from: whose unlabelled scans the run used (``home``, an away site, None).
    """

    variant: str
    n_labeled: int
    seed: int
    train_cases: tuple[str, ...]
    metrics: dict[str, dict[str, float]]
    pred_dir: str
    train_seconds: float
    predict_seconds: float
    test_set: str = "home"
    metrics_fixed: dict[str, dict[str, float]] | None = None
    unlabeled_from: str | None = None


def higher_is_better(metric: str) -> bool:
    """False for distances (names containing ``hd95``, in mm), True otherwise (Dice-like scores)."""
    return "hd95" not in metric


def group_runs(records: Sequence[RunRecord]) -> dict[tuple[str, int], list[RunRecord]]:
    """(variant, n_labeled) -> its runs sorted by seed; keys in first-seen variant order, then ascending N.

    Raises MensegError if one (variant, N, seed) appears twice.
    """
    variants = list(dict.fromkeys(r.variant for r in records))
    groups: dict[tuple[str, int], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.variant, r.n_labeled), []).append(r)
    out: dict[tuple[str, int], list[RunRecord]] = {}
    for key in sorted(groups, key=lambda k: (variants.index(k[0]), k[1])):
        runs = sorted(groups[key], key=lambda r: r.seed)
        seeds = [r.seed for r in runs]
        if len(set(seeds)) != len(seeds):
            raise MensegError(f"duplicate runs for variant {key[0]!r}, N={key[1]}: seeds {seeds}")
        out[key] = runs
    return out


def _check_case_sets(runs: Sequence[RunRecord]) -> list[str]:
    """Sorted test case ids shared by ``runs``; MensegError if the seeds saw different cases."""
    cases = sorted(runs[0].metrics)
    for r in runs[1:]:
        if sorted(r.metrics) != cases:
            only_a = sorted(set(cases) - set(r.metrics))[:3]
            only_b = sorted(set(r.metrics) - set(cases))[:3]
            raise MensegError(
                f"variant {r.variant!r}, N={r.n_labeled}: seeds {runs[0].seed} and {r.seed} were evaluated "
                f"on different test cases (only in seed {runs[0].seed}: {only_a}, only in seed {r.seed}: "
                f"{only_b})"
            )
    return cases


def _value(r: RunRecord, case_id: str, metric: str) -> float:
    try:
        return float(r.metrics[case_id][metric])
    except KeyError:
        raise MensegError(
            f"variant {r.variant!r}, N={r.n_labeled}, seed {r.seed}: "
            f"no metric {metric!r} for case {case_id!r}"
        ) from None


def per_case_means(
    records: Sequence[RunRecord], variant: str, n_labeled: int, metric: str
) -> dict[str, float]:
    """Test case_id (sorted) -> mean over the seeds of (variant, n_labeled) of that case's ``metric``.

    This seed-averaged per-case score is the unit of the paired tests. Raises MensegError
    if there is no such run, or if its seeds were evaluated on different case sets.
    """
    runs = [r for r in records if r.variant == variant and r.n_labeled == n_labeled]
    if not runs:
        raise MensegError(f"no runs for variant {variant!r} with N={n_labeled}")
    cases = _check_case_sets(runs)
    return {c: float(np.mean([_value(r, c, metric) for r in runs])) for c in cases}


def aggregate(records: Sequence[RunRecord], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (variant, n_labeled), first-seen variant order then ascending N.

    Row keys: ``variant``, ``n_labeled``, ``n_seeds``, ``n_test_cases`` and, per metric m,
    ``f"{m}_mean"`` and ``f"{m}_std"``: the score of a run is its mean over the test cases,
    then mean and sample std (ddof=1; 0.0 for a single seed) of the run scores over seeds.
    Units are the metric's (Dice unitless, HD95 mm).
    """
    rows = []
    for (variant, n), runs in group_runs(records).items():
        cases = _check_case_sets(runs)
        row: dict[str, Any] = {
            "variant": variant, "n_labeled": n, "n_seeds": len(runs), "n_test_cases": len(cases),
        }
        for m in metrics:
            scores = np.array([np.mean([_value(r, c, m) for c in cases]) for r in runs], dtype=float)
            row[f"{m}_mean"] = float(scores.mean())
            row[f"{m}_std"] = float(scores.std(ddof=1)) if len(scores) > 1 else 0.0
        rows.append(row)
    return rows


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p values, in the input order.

    With the m non-NaN p values sorted ascending p_(1) <= ... <= p_(m), the adjusted value
    is ``max_{j<=i} min(1, (m - j + 1) p_(j))`` (monotone in p, capped at 1). NaN entries
    stay NaN and do not count in m.
    """
    p = [float(x) for x in pvalues]
    valid = sorted((i for i, x in enumerate(p) if not math.isnan(x)), key=lambda i: p[i])
    m = len(valid)
    out = [math.nan] * len(p)
    running = 0.0
    for rank, i in enumerate(valid):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def _wilcoxon(d: np.ndarray) -> tuple[float, float, str]:
    """(statistic, two-sided p, note) of the signed-rank test of differences ``d``."""
    nonzero = int(np.count_nonzero(d))
    if len(d) == 0:
        return math.nan, math.nan, "no common test cases"
    if nonzero == 0:
        return math.nan, math.nan, "all differences are zero"
    if nonzero < 2:
        return math.nan, math.nan, "fewer than 2 non-zero differences"
    # method "auto": exact for <= 50 cases without ties or zeros, an exhaustive (hence exact)
    # permutation test for <= 13 cases with ties/zeros, else the normal approximation.
    res = sstats.wilcoxon(d, zero_method="wilcox", alternative="two-sided", method="auto")
    return float(res.statistic), float(res.pvalue), ""


def detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest true mean difference a two-sided paired test at ``alpha`` detects with ``power``.

    ``(t_{1-alpha/2, n-1} + t_{power, n-1}) * sd / sqrt(n)``: the paired t-test's power
    approximation with ``sd`` the standard deviation of the ``n`` paired differences. The
    Wilcoxon signed-rank test used for the p values has an asymptotic relative efficiency of
    0.955 or more against the t-test for normal differences (higher for heavy tails), so this is a
    close guide to it. NaN for ``n < 2`` or a NaN ``sd``; 0 when ``sd`` is 0.
    """
    if n < 2 or math.isnan(sd):
        return math.nan
    df = n - 1
    return float((sstats.t.ppf(1 - alpha / 2, df) + sstats.t.ppf(power, df)) * sd / math.sqrt(n))


def paired_tests(
    records: Sequence[RunRecord], reference: str, metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """Wilcoxon signed-rank tests of every other variant against ``reference``, per N and metric.

    For each variant v != reference (first-seen order), each N run by both (ascending) and
    each metric m (given order): x = :func:`per_case_means` of the reference, y = that of v,
    on their common test cases (sorted ids); d = y - x. Row keys: ``variant``,
    ``reference``, ``n_labeled``, ``metric``, ``n_cases``, ``mean_reference``,
    ``mean_variant``, ``mean_diff`` (mean of d), ``median_diff``, ``sd_diff`` (sample std of
    d), ``detectable`` (:func:`detectable_difference` of sd_diff and n_cases), ``statistic``
    (min(W+, W-)), ``p_value`` (two-sided, ``scipy.stats.wilcoxon(y, x,
    zero_method="wilcox", method="auto")``), ``p_holm``, ``wins`` / ``losses`` (cases where
    v is better / worse: higher Dice, lower HD95), ``note`` (why p is NaN, else "").

    p is NaN when every difference is zero or fewer than 2 differences are non-zero.
    ``p_holm`` is Holm-adjusted over the family of all rows of one (variant, N), i.e. the
    metrics tested at one N; different N are separate questions and are not pooled.
    """
    if not any(r.variant == reference for r in records):
        raise MensegError(f"reference variant {reference!r} has no runs")
    groups = group_runs(records)
    ref_ns = {n for (v, n) in groups if v == reference}
    rows: list[dict[str, Any]] = []
    for variant, n in groups:
        if variant == reference or n not in ref_ns:
            continue
        family: list[dict[str, Any]] = []
        for m in metrics:
            xs = per_case_means(records, reference, n, m)
            ys = per_case_means(records, variant, n, m)
            cases = sorted(set(xs) & set(ys))
            x = np.array([xs[c] for c in cases], dtype=float)
            y = np.array([ys[c] for c in cases], dtype=float)
            d = y - x
            stat, p, note = _wilcoxon(d)
            better = d > 0 if higher_is_better(m) else d < 0
            worse = d < 0 if higher_is_better(m) else d > 0
            empty = len(cases) == 0
            family.append({
                "variant": variant, "reference": reference, "n_labeled": n, "metric": m,
                "n_cases": len(cases),
                "mean_reference": math.nan if empty else float(x.mean()),
                "mean_variant": math.nan if empty else float(y.mean()),
                "mean_diff": math.nan if empty else float(d.mean()),
                "median_diff": math.nan if empty else float(np.median(d)),
                "sd_diff": float(d.std(ddof=1)) if len(d) > 1 else math.nan,
                "detectable": detectable_difference(float(d.std(ddof=1)) if len(d) > 1 else math.nan, len(d)),
                "statistic": stat, "p_value": p, "p_holm": math.nan,
                "wins": int(better.sum()), "losses": int(worse.sum()), "note": note,
            })
        for row, ph in zip(family, holm([r["p_value"] for r in family]), strict=True):
            row["p_holm"] = ph
        rows.extend(family)
    return rows


__all__ = [
    "TABLE_METRICS", "RunRecord", "aggregate", "detectable_difference", "group_runs", "higher_is_better",
    "holm", "paired_tests", "per_case_means",
]
