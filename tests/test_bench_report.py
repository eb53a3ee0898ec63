"""The benchmark report: every file written, numbers consistent with the statistics, HTML self-contained."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from menseg.bench.report import TEST_COLUMNS, table_metrics, write_report
from menseg.bench.stats import RunRecord, aggregate
from menseg.constants import MODALITIES
from menseg.data.io import read_label
from menseg.data.layouts import CaseFiles
from menseg.errors import MensegError
from menseg.evaluate.metrics import metric_names
from nifti_factory import blob_case, ras_affine, save, to_lps, write_brats_case

META = {
    "title": "Test benchmark", "profile": "quick",
    "profile_settings": {"steps": 2, "patch": [16, 16, 12], "spacing": [2.0, 2.0, 2.0]},
    "variants": ["baseline", "ism"], "labeled": [2, 3], "seeds": [0, 1], "data": "tiny blobs",
    "unlabeled": None, "n_pool": 5, "n_test": 4, "environment": {"device": "cpu", "threads": 2},
    "started": "2025-01-01T00:00:00", "finished": "2025-01-01T00:01:00", "wall_seconds": 3725.0,
    "command": "menseg bench efficiency --profile quick", "menseg_version": "0.0.test", "extra_key": 7,
}


def _test_cases(root: Path, n: int = 4) -> dict[str, CaseFiles]:
    cases = {}
    for i in range(n):
        cid = f"case{i}"
        d = write_brats_case(root, cid, seed=i)
        cases[cid] = CaseFiles(cid, {m: d / f"{cid}-{m}.nii.gz" for m in MODALITIES}, d / f"{cid}-seg.nii.gz")
    if n < 4:
        return cases
    # case3: empty reference (overlay falls back to the centre slice)
    save(cases["case3"].label, np.zeros((16, 16, 12), np.uint8), ras_affine(), np.uint8)
    # case2 stored L-P-S on disk: shown reoriented
    image, label = blob_case((16, 16, 12), np.random.default_rng(2))
    image_lps, affine_lps = to_lps(image, ras_affine())
    label_lps, _ = to_lps(label, ras_affine())
    for c, m in enumerate(MODALITIES):
        save(cases["case2"].images[m], image_lps[c], affine_lps)
    save(cases["case2"].label, label_lps, affine_lps, np.uint8)
    return cases


def _records(tmp: Path, cases: dict[str, CaseFiles], variants, ns, seeds) -> list[RunRecord]:
    rng = np.random.default_rng(0)
    names = metric_names()
    recs = []
    for v in variants:
        for n in ns:
            for s in seeds:
                pred_dir = tmp / "runs" / f"{v}_n{n}_s{s}"
                metrics = {}
                for k, (cid, cf) in enumerate(cases.items()):
                    metrics[cid] = {m: float(rng.uniform(0, 1) if "hd95" not in m else rng.uniform(0, 40))
                                    for m in names}
                    label, affine = read_label(cf.label)
                    pred = np.roll(label, k % 2, axis=0)  # imperfect prediction
                    if cid != "case1" or v != "ism":  # one missing prediction: shown as such
                        save(pred_dir / f"{cid}.nii.gz", pred, affine, np.uint8)
                recs.append(RunRecord(v, n, s, tuple(f"p{i}" for i in range(n)), metrics, str(pred_dir),
                                      train_seconds=12.5 * n, predict_seconds=0.5))
    return recs


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _check_pngs(written: dict[str, Path]) -> None:
    for name, p in written.items():
        assert p.is_file() and p.stat().st_size > 0, name
        if name.endswith(".png"):
            img = imread(p)
            assert img.ndim == 3 and img.shape[2] in (3, 4) and min(img.shape[:2]) > 100, name


def _check_html_self_contained(text: str, n_images: int) -> None:
    assert text.count('src="data:image/png;base64,') == n_images
    assert 'src="http' not in text and "href=" not in text
    without_uris = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert ".png" not in without_uris


def test_report_two_variants(tmp_path):
    cases = _test_cases(tmp_path / "data")
    recs = _records(tmp_path, cases, ["ism", "baseline"], [3, 2], [1, 0])  # meta order must win
    written = write_report(tmp_path / "report", recs, META, cases)
    expected = {"results.csv", "per_case.csv", "tests.csv", "learning_curve.png", "boxplots.png",
                "overlays_baseline.png", "overlays_ism.png", "report.md", "report.html"}
    assert set(written) == expected
    assert all(p.parent == tmp_path / "report" for p in written.values())
    _check_pngs(written)

    # results.csv == aggregate(), baseline first, ascending N
    agg = aggregate(sorted(recs, key=lambda r: r.variant != "baseline"), table_metrics())
    rows = _csv(written["results.csv"])
    assert [(r["variant"], r["n_labeled"]) for r in rows] == [
        ("baseline", "2"), ("baseline", "3"), ("ism", "2"), ("ism", "3")]
    assert len(rows) == len(agg)
    for got, want in zip(rows, agg, strict=True):
        assert list(got) == ["test_set", *want] and got["test_set"] == "home"
        for m in table_metrics():
            for k in (f"{m}_mean", f"{m}_std"):
                assert float(got[k]) == want[k]
    per_case = _csv(written["per_case.csv"])
    assert len(per_case) == len(recs) * len(cases)
    assert list(per_case[0]) == ["test_set", "variant", "n_labeled", "seed", "case_id", *metric_names()]
    r0 = next(r for r in recs if (r.variant, r.n_labeled, r.seed) == ("baseline", 2, 0))
    assert float(per_case[0]["WT_lesion_dice"]) == r0.metrics["case0"]["WT_lesion_dice"]
    tests = _csv(written["tests.csv"])
    assert len(tests) == 2 * len(table_metrics())  # ism vs baseline at N = 2, 3
    assert list(tests[0]) == ["test_set", *TEST_COLUMNS]
    assert {t["variant"] for t in tests} == {"ism"} and {t["reference"] for t in tests} == {"baseline"}

    md = written["report.md"].read_text()
    assert md.startswith("# Test benchmark")
    for link in ("(learning_curve.png)", "(boxplots.png)", "(overlays_baseline.png)", "(overlays_ism.png)"):
        assert link in md
    a = agg[0]
    assert f"{a['WT_lesion_dice_mean']:.3f} ± {a['WT_lesion_dice_std']:.3f}" in md
    assert f"{a['ET_lesion_hd95_mean']:.1f} ± {a['ET_lesion_hd95_std']:.1f}" in md
    for s in ("menseg bench efficiency --profile quick", "quick", "steps=2", "device=cpu", "tiny blobs",
              "1 h 02 min 05 s", "extra_key: 7", "0.0.test", "Wilcoxon", "Holm", "nested", "final checkpoint",
              "| ism | 3 | 1 | 37.5 | 0.5 |"):
        assert s in md, s
    assert "no paired tests" not in md

    text = written["report.html"].read_text()
    _check_html_self_contained(text, n_images=4)
    assert "<table>" in text and "Test benchmark" in text
    assert f"{a['WT_lesion_dice_mean']:.3f} ± {a['WT_lesion_dice_std']:.3f}" in text


def test_report_one_variant_one_seed_minimal_meta(tmp_path):
    cases = _test_cases(tmp_path / "data", n=2)
    recs = _records(tmp_path, cases, ["solo"], [2], [5])
    written = write_report(tmp_path / "out" / "report", recs, {}, cases)
    _check_pngs(written)
    assert "overlays_solo.png" in written
    (row,) = _csv(written["results.csv"])
    assert row["n_seeds"] == "1" and float(row["WT_lesion_dice_std"]) == 0.0
    assert written["tests.csv"].read_text().strip() == ",".join(["test_set", *TEST_COLUMNS])
    md = written["report.md"].read_text()
    assert "one variant only: no paired tests" in md
    _check_html_self_contained(written["report.html"].read_text(), n_images=3)


def test_report_needs_records(tmp_path):
    with pytest.raises(MensegError, match="no finished runs"):
        write_report(tmp_path, [], {}, {})


def test_report_home_and_away_with_drop_ceiling_power_and_postprocessing(tmp_path):
    """Two test sets, an adapted variant, the ceiling and learned post-processing: the headline
    numbers are the means the records hold."""
    cases = _test_cases(tmp_path / "data", n=2)
    names = metric_names()

    def rec(variant, n, seed, test_set, wt, fixed=None, unl=None, fp=(0.0, 0.0)):
        def table(wt):
            return {c: {m: (wt[i] if m == "WT_lesion_dice" else fp[i] if m == "WT_n_fp" else 0.5)
                        for m in names} for i, c in enumerate(cases)}

        metrics, mf = table(wt), (table(fixed) if fixed else None)
        return RunRecord(variant, n, seed, (), metrics, str(tmp_path / "none"), 10.0, 1.0, test_set, mf, unl)

    recs = []
    for s in (0, 1):
        recs += [rec("baseline", 3, s, "home", [0.75, 0.25], fixed=[0.5, 0.25]),
                 rec("baseline", 3, s, "site-b", [0.25, 0.25]),
                 rec("baseline", 8, s, "home", [1.0, 0.6]),  # the ceiling: whole pool
                 rec("baseline", 8, s, "site-b", [0.5, 0.5]),
                 rec("sim2real@site-b", 3, s, "home", [0.75, 0.25 + 0.125 * s], unl="site-b", fp=(s, 2.0)),
                 rec("sim2real@site-b", 3, s, "site-b", [0.5, 0.5 + 0.0625 * s], unl="site-b")]
    meta = {"variants": ["baseline", "sim2real@site-b"], "ceiling_n": 8}
    written = write_report(tmp_path / "report", recs, meta, {"home": cases})
    assert "learning_curve_site-b.png" in written and "boxplots_site-b.png" in written
    md = written["report.md"].read_text()
    head = md.split("## Headline")[1].split("\n## ")[0]
    # baseline N=3: home 0.5, site-b 0.25 -> drop +0.250; ceiling home 0.8 -> 62%
    assert "| baseline | none | 3 | 2 | 0.500 ± 0.000 | 0.250 ± 0.000 | +0.250 | 62% |" in head
    # adapted variant: home per seed 0.5, 0.5625 -> 0.531 ± 0.044; site-b 0.5, 0.53125
    assert "| sim2real@site-b | site-b | 3 | 2 | 0.531 ± 0.044 | 0.516 ± 0.022 | +0.016 | 66% |" in head
    errs = md.split("## Where lesion-wise Dice is lost")[1].split("\n## ")[0]
    # FP per 100 cases, mean over seeds: seed 0 (0 + 2) / 2 = 1, seed 1 (1 + 2) / 2 = 1.5 -> 125
    assert "| sim2real@site-b | 3 | 0.500; 125 FP, 50 FN | 0.500; 0 FP, 50 FN |" in errs
    assert "| baseline | 3 | 0.500; 0 FP, 50 FN | 0.500; 0 FP, 50 FN |" in errs
    pp = md.split("## Learned post-processing")[1].split("\n## ")[0]
    assert "| baseline | 3 | 0.500 vs 0.375 (+0.125) | n/a |" in pp
    diffs = md.split("## Differences from baseline")[1].split("\n## ")[0]
    assert "| sim2real@site-b | 3 | +0.031 (detectable" in diffs
    assert "## Detectable difference per N and test set" in md
    tests = _csv(written["tests.csv"])
    assert {t["test_set"] for t in tests} == {"home", "site-b"}
    wt_home = next(t for t in tests if t["test_set"] == "home" and t["metric"] == "WT_lesion_dice")
    assert float(wt_home["mean_diff"]) == pytest.approx(0.03125) and float(wt_home["detectable"]) > 0
