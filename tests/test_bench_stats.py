"""Exact tests of the benchmark statistics on a hand-made results table.

Values are multiples of 1/64 (Dice) or integers (HD95, mm), so every mean below is exact
in binary floating point and the expected numbers are written out by hand.
"""

from __future__ import annotations

import math

import pytest

from menseg.bench.stats import (
    TABLE_METRICS,
    RunRecord,
    aggregate,
    detectable_difference,
    holm,
    paired_tests,
    per_case_means,
)
from menseg.errors import MensegError

CASES = ("c1", "c2", "c3", "c4", "c5", "c6")
D = "ET_lesion_dice"
H = "ET_lesion_hd95"
L = "ET_dice"  # legacy Dice: identical for both variants -> every difference is zero

# reference "base", N=3, seeds 0 and 1
BASE_DICE = {0: [0.50, 0.25, 0.75, 0.50, 0.25, 0.75],  # sum 3.00 -> run mean 0.5
             1: [0.75, 0.50, 0.75, 0.75, 0.25, 0.75]}  # sum 3.75 -> run mean 0.625
BASE_HD = {0: [10, 20, 30, 40, 50, 60],  # sum 210 -> 35 mm
           1: [12, 22, 28, 40, 54, 66]}  # sum 222 -> 37 mm
# variant "ism": seed 0 = base + 2 * delta, seed 1 = base -> seed mean differs from base by delta
DELTA_DICE = [1 / 64, 2 / 64, 3 / 64, 4 / 64, 5 / 64, 6 / 64]  # all positive, distinct
DELTA_HD = [-1, -2, 3, -4, 0, -6]  # 4 better (lower), 1 worse, 1 tie


def _record(variant: str, n: int, seed: int, dice, hd, legacy=None, cases=CASES) -> RunRecord:
    legacy = dice if legacy is None else legacy
    metrics = {c: {D: float(d), H: float(h), L: float(g)}
               for c, d, h, g in zip(cases, dice, hd, legacy, strict=True)}
    return RunRecord(variant, n, seed, ("t1", "t2", "t3")[:n], metrics, f"/runs/{variant}/{n}/{seed}",
                     train_seconds=10.0 + seed, predict_seconds=1.0)


def _table() -> list[RunRecord]:
    recs = []
    for s in (0, 1):
        recs.append(_record("base", 3, s, BASE_DICE[s], BASE_HD[s]))
    ism_dice = {0: [b + 2 * d for b, d in zip(BASE_DICE[0], DELTA_DICE, strict=True)], 1: BASE_DICE[1]}
    ism_hd = {0: [b + 2 * d for b, d in zip(BASE_HD[0], DELTA_HD, strict=True)], 1: BASE_HD[1]}
    for s in (1, 0):  # out of seed order on purpose
        recs.append(_record("ism", 3, s, ism_dice[s], ism_hd[s], legacy=BASE_DICE[s]))
    return recs


def test_table_metrics_order():
    assert TABLE_METRICS == ("lesion_dice", "lesion_hd95", "dice")


def test_per_case_means_averages_seeds():
    recs = _table()
    assert per_case_means(recs, "base", 3, D) == {
        "c1": 0.625, "c2": 0.375, "c3": 0.75, "c4": 0.625, "c5": 0.25, "c6": 0.75}
    assert per_case_means(recs, "base", 3, H) == {
        "c1": 11.0, "c2": 21.0, "c3": 29.0, "c4": 40.0, "c5": 52.0, "c6": 63.0}
    # ism = base + delta per case
    assert per_case_means(recs, "ism", 3, H) == {
        "c1": 10.0, "c2": 19.0, "c3": 32.0, "c4": 36.0, "c5": 52.0, "c6": 57.0}


def test_aggregate_exact():
    rows = aggregate(_table(), [D, H])
    assert [(r["variant"], r["n_labeled"], r["n_seeds"], r["n_test_cases"]) for r in rows] == [
        ("base", 3, 2, 6), ("ism", 3, 2, 6)]
    base, ism = rows
    # base Dice: run means 0.5 and 0.625 -> mean 0.5625, sample std sqrt(2 * 0.0625^2 / 1)
    assert base[f"{D}_mean"] == 0.5625
    assert base[f"{D}_std"] == pytest.approx(math.sqrt(0.0625**2 + 0.0625**2), rel=1e-15)
    # base HD95: run means 35 and 37 mm -> 36 +- sqrt(1 + 1)
    assert base[f"{H}_mean"] == 36.0
    assert base[f"{H}_std"] == pytest.approx(math.sqrt(2.0), rel=1e-15)
    # ism Dice: seed 0 = 0.5 + 2 * (21/64) / 6 = 0.5 + 7/64 = 0.609375; seed 1 = 0.625
    assert ism[f"{D}_mean"] == (0.609375 + 0.625) / 2 == 0.6171875
    assert ism[f"{D}_std"] == pytest.approx(math.sqrt(2 * 0.0078125**2), rel=1e-15)
    # ism HD95: seed 0 = 35 + 2 * (-10) / 6 = 35 - 10/3; seed 1 = 37
    s0 = 35.0 - 10.0 / 3.0
    assert ism[f"{H}_mean"] == pytest.approx((s0 + 37.0) / 2, rel=1e-15)
    assert ism[f"{H}_std"] == pytest.approx(abs(37.0 - s0) / math.sqrt(2.0), rel=1e-15)


def test_aggregate_order_and_single_seed():
    recs = [
        _record("b", 5, 0, BASE_DICE[0], BASE_HD[0]),
        _record("a", 3, 0, BASE_DICE[1], BASE_HD[1]),
        _record("b", 3, 0, BASE_DICE[1], BASE_HD[1]),
    ]
    rows = aggregate(recs, [D])
    assert [(r["variant"], r["n_labeled"]) for r in rows] == [("b", 3), ("b", 5), ("a", 3)]
    assert rows[1][f"{D}_mean"] == 0.5 and rows[1][f"{D}_std"] == 0.0
    assert rows[1]["n_seeds"] == 1


def test_paired_tests_exact():
    rows = paired_tests(_table(), "base", [D, H, L])
    assert [(r["variant"], r["reference"], r["n_labeled"], r["metric"]) for r in rows] == [
        ("ism", "base", 3, D), ("ism", "base", 3, H), ("ism", "base", 3, L)]
    dice, hd, legacy = rows
    # 6 positive distinct differences: W- = 0; P(W+ = 21) = 1/2^6 one-sided -> p = 2/64
    assert dice["statistic"] == 0.0
    assert dice["p_value"] == 0.03125
    assert (dice["wins"], dice["losses"], dice["n_cases"]) == (6, 0, 6)
    assert dice["mean_reference"] == (0.625 + 0.375 + 0.75 + 0.625 + 0.25 + 0.75) / 6
    assert dice["mean_diff"] == pytest.approx(21 / 64 / 6, rel=1e-15)
    assert dice["median_diff"] == (3 / 64 + 4 / 64) / 2
    assert dice["note"] == ""
    d = [x / 64 for x in range(1, 7)]  # seed-averaged differences: delta (2 delta + 0) / 2
    sd = math.sqrt(sum((x - sum(d) / 6) ** 2 for x in d) / 5)
    assert dice["sd_diff"] == pytest.approx(sd, rel=1e-12)
    assert dice["detectable"] == pytest.approx(detectable_difference(sd, 6), rel=1e-12)
    # HD95 d = [-1, -2, 3, -4, 0, -6]: lower is better -> 4 wins, 1 loss, 1 tie.
    # zero dropped; |d| ranks 1..5, only +3 (rank 3) positive: W+ = 3, W- = 12, statistic 3.
    # Subsets of ranks {1..5} with sum <= 3: {}, {1}, {2}, {3}, {1,2} -> 5 of 32 -> p = 10/32.
    assert (hd["wins"], hd["losses"]) == (4, 1)
    assert hd["statistic"] == 3.0
    assert hd["p_value"] == pytest.approx(10 / 32, rel=1e-12)
    assert hd["mean_diff"] == pytest.approx(-10 / 6, rel=1e-15)
    assert hd["median_diff"] == -1.5
    # identical legacy Dice: no test
    assert math.isnan(legacy["p_value"]) and math.isnan(legacy["statistic"]) and math.isnan(legacy["p_holm"])
    assert legacy["note"] == "all differences are zero"
    assert (legacy["wins"], legacy["losses"]) == (0, 0)
    # Holm within the family (ism, N=3) of the two testable metrics: 2 * 1/32, max(1 * 10/32, 1/16)
    assert dice["p_holm"] == 0.0625
    assert hd["p_holm"] == pytest.approx(10 / 32, rel=1e-12)


def test_paired_tests_one_nonzero_difference_and_missing_n():
    base = _record("base", 3, 0, BASE_DICE[0], BASE_HD[0])
    other = list(BASE_DICE[0])
    other[2] += 0.125
    recs = [base, _record("v", 3, 0, other, BASE_HD[0]), _record("v", 5, 0, other, BASE_HD[0])]
    rows = paired_tests(recs, "base", [D])
    assert len(rows) == 1  # N=5 has no reference run
    assert math.isnan(rows[0]["p_value"])
    assert rows[0]["note"] == "fewer than 2 non-zero differences"
    assert (rows[0]["wins"], rows[0]["losses"]) == (1, 0)
    assert paired_tests([base], "base", [D]) == []
    with pytest.raises(MensegError, match="reference"):
        paired_tests(recs, "nope", [D])


def test_holm_hand_example():
    # sorted: 0.01 * 3 = 0.03; 0.03 * 2 = 0.06; 0.04 * 1 = 0.04 -> monotone max 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06], rel=1e-15)
    out = holm([0.5, math.nan, 0.4])  # m = 2: 0.4 * 2 = 0.8; max(0.5 * 1, 0.8) = 0.8
    assert out[0] == pytest.approx(0.8) and math.isnan(out[1]) and out[2] == pytest.approx(0.8)
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    assert holm([]) == []


def test_mismatched_case_sets_error():
    recs = _table()
    recs[1] = _record("base", 3, 1, BASE_DICE[1][:5], BASE_HD[1][:5], cases=CASES[:5])
    with pytest.raises(MensegError, match="different test cases"):
        per_case_means(recs, "base", 3, D)
    with pytest.raises(MensegError, match="different test cases"):
        aggregate(recs, [D])
    with pytest.raises(MensegError, match="different test cases"):
        paired_tests(recs, "base", [D])


def test_duplicate_seed_and_missing_metric_errors():
    recs = _table()
    with pytest.raises(MensegError, match="duplicate"):
        aggregate([*recs, recs[0]], [D])
    with pytest.raises(MensegError, match="no metric"):
        aggregate(recs, ["WT_lesion_dice"])
    with pytest.raises(MensegError, match="no runs"):
        per_case_means(recs, "base", 7, D)


def test_detectable_difference_has_the_stated_power():
    from scipy import stats

    # hand value: (t_{0.975,9} + t_{0.8,9}) / sqrt(10) = (2.262157 + 0.883404) / 3.162278
    assert detectable_difference(1.0, 10) == pytest.approx(0.994714, abs=1e-5)
    for n, sd in ((6, 0.1), (30, 0.2), (120, 0.15)):
        delta = detectable_difference(sd, n)
        # power of the two-sided paired t-test at that true difference (noncentral t): about 0.8
        df, nc = n - 1, delta / (sd / math.sqrt(n))
        crit = stats.t.ppf(0.975, df)
        power = stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc)
        assert 0.78 < power < 0.82, (n, power)
        assert detectable_difference(sd, 4 * n) < delta / 1.9  # four times the cases: about half
    assert math.isnan(detectable_difference(0.1, 1)) and detectable_difference(0.0, 5) == 0.0
