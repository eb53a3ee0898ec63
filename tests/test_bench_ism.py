"""ISM evidence commands: `menseg bench missing` and `menseg bench longitudinal` on micro budgets."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from menseg.bench.ism import DROPS, LongitudinalSpec, missing_table, run_longitudinal, run_missing
from menseg.errors import MensegError

MICRO_BUDGET = {
    "data.spacing": [4.0, 4.0, 4.0], "model.filters": [4, 8, 16], "model.deep_supr_num": 1,
    "train.steps": 2, "train.batch_size": 2, "train.patch_size": [16, 16, 16],
    "train.checkpoint_every": 1, "infer.overlap": 0.0,
}
TINY_ISM = {"name": "tinyism", "ism": {
    "spatial": {"enabled": True, "levels": [1], "sources": ["batch", "location"], "p": 1.0},
    "modal": {"enabled": True}, "temporal": {"enabled": True, "level": 1}}}


def _profile(tmp: Path) -> Path:
    spec = {"site": "site-a", "spacing_mm": 4.0, "n_pool": 2, "n_test": 2, "n_unlabeled": 0, "seed": 0}
    path = tmp / "micro.yaml"
    path.write_text(yaml.safe_dump({"name": "micro", "description": "test", "labeled": [2], "seeds": 1,
                                    "cohort": spec, "budget": MICRO_BUDGET}))
    return path


def _ism_variant(tmp: Path) -> Path:
    path = tmp / "tinyism.yaml"
    path.write_text(yaml.safe_dump(TINY_ISM))
    return path


def test_missing_table_means_over_seeds() -> None:
    scores = ((0, "a", 0.2), (0, "b", 0.4), (1, "a", 0.6), (1, "b", 0.8))
    rows = [{"variant": "v", "seed": s, "dropped": "none", "case": c, "ET_lesion_dice": d,
             "TC_lesion_dice": d, "WT_lesion_dice": d} for s, c, d in scores]
    table = missing_table(rows, 3)
    # seed means 0.3 and 0.7 -> 0.5 +- 0.283 (sample std, as the efficiency report)
    assert "| v | none | 0.500 ± 0.283 | 0.500 ± 0.283 | 0.500 ± 0.283 |" in table
    assert "N = 3" in table
    # a condition's share of the complete-scan mean
    rows += [{**r, "dropped": "t1n t2f t2w", "WT_lesion_dice": r["WT_lesion_dice"] / 2} for r in rows]
    table = missing_table(rows, 3)
    assert "| v | t1n t2f t2w | 0.500 ± 0.283 (100%) | 0.500 ± 0.283 (100%) | 0.250 ± 0.141 (50%) |" in table


def test_the_fifteen_subsets() -> None:
    from menseg.bench.ism import conditions

    every = conditions("all")
    assert len(every) == 15 == len(set(every)) and every[0] == ("t1c", "t1n", "t2f", "t2w")
    assert every[-4:] == [("t1c",), ("t1n",), ("t2f",), ("t2w",)]
    assert conditions("single") == [("t1c", "t1n", "t2f", "t2w"), ("t1n", "t2f", "t2w"),
                                    ("t1c", "t2f", "t2w"), ("t1c", "t1n", "t2w"), ("t1c", "t1n", "t2f")]
    with pytest.raises(MensegError, match="--subsets must be 'single' or 'all'"):
        conditions("some")


def test_bench_missing_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    r = subprocess.run(
        [sys.executable, "-m", "menseg", "bench", "efficiency", "--out", str(out), "--profile",
         str(_profile(tmp_path)), "--variants", f"baseline,{_ism_variant(tmp_path)}", "--device", "cpu",
         "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "menseg", "bench", "missing", "--out", str(out), "--variants",
                        "baseline,tinyism", "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| tinyism | t2f |" in r.stdout and "| baseline | t1c |" in r.stdout
    with open(out / "missing" / "missing.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(DROPS) * 2  # variants x conditions x test cases
    assert {r["modal_fusion"] for r in rows if r["variant"] == "tinyism"} == {"True"}
    assert {r["modal_fusion"] for r in rows if r["variant"] == "baseline"} == {"False"}
    assert all(0.0 <= float(r["WT_lesion_dice"]) <= 1.0 for r in rows)
    r = subprocess.run([sys.executable, "-m", "menseg", "bench", "missing", "--out", str(out), "--variants",
                        "baseline,tinyism", "--device", "cpu", "--subsets", "all", "--cases", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "subsets" / "missing.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 15 * 1 and len({r["kept"] for r in rows}) == 15
    assert "| baseline | t1n t2f t2w |" in r.stdout  # t1c alone
    with pytest.raises(MensegError, match="no finished runs"):
        run_missing(out, ["nosuch"], progress=False)
    with pytest.raises(MensegError, match="not a benchmark folder"):
        run_missing(tmp_path, progress=False)


def test_bench_longitudinal(tmp_path: Path) -> None:
    spec = LongitudinalSpec(n_train=2, n_test=1, visits=2, spacing_mm=4.0)
    variant = _ism_variant(tmp_path)
    summary = run_longitudinal(tmp_path / "long", str(variant), str(_profile(tmp_path)), spec, device="cpu",
                               progress=False)
    assert summary["with_prior"]["n"] == summary["without_prior"]["n"] == 1
    saved = json.loads((tmp_path / "long" / "longitudinal-tinyism.json").read_text())
    assert saved["summary"]["with_prior"]["n"] == 1
    table = (tmp_path / "long" / "longitudinal-tinyism.md").read_text()
    assert "with prior" in table and "previous visit's label" in table
    # the third row: the previous visit's label registered onto the last visit, scored like a prediction
    assert summary["prior_label"]["n"] == 1 and 0.0 <= summary["prior_label"]["WT_lesion_dice"] <= 1.0
    assert summary["gate"] is not None and -1.0 <= summary["gate"] <= 1.0 and "Temporal gate" in table
    pairs = list((tmp_path / "long" / "train" / "tinyism" / "preprocessed" / "pairs").glob("*.json"))
    assert len(pairs) == 2  # the second visit of each training patient
    with pytest.raises(MensegError, match="other settings"):
        run_longitudinal(tmp_path / "long", str(variant), str(_profile(tmp_path)),
                         LongitudinalSpec(n_train=3, n_test=1, visits=2, spacing_mm=4.0), device="cpu",
                         progress=False)


def test_registered_prior_label_of_the_same_visit_is_its_label(tmp_path: Path) -> None:
    """The prior-label row's label: a visit registered onto itself gives back its own label."""
    import nibabel as nib

    from menseg.bench.ism import registered_prior_label
    from menseg.data.layouts import discover_cases
    from menseg.data.phantom import write_phantom_dataset

    write_phantom_dataset(tmp_path / "d", n_cases=1, shape=(32, 32, 32), seed=4)
    case = discover_cases(tmp_path / "d")[0]
    out = registered_prior_label(case, case, tmp_path / "p" / "x.nii.gz")
    got, want = nib.load(str(out)), nib.load(str(case.label))
    assert np.array_equal(np.asarray(got.dataobj), np.asarray(want.dataobj).astype(np.uint8))
    assert np.allclose(got.affine, want.affine)


def test_a_missing_run_for_one_variant_keeps_the_others_rows(tmp_path: Path) -> None:
    from menseg.bench.ism import _earlier_rows, missing_table

    def row(variant: str, case: str, kept: str = "t1c t1n t2f t2w", dice: float = 0.5) -> dict:
        return {"variant": variant, "seed": 0, "kept": kept, "dropped": "none", "case": case,
                "modal_fusion": False, "ET_lesion_dice": dice, "TC_lesion_dice": dice, "WT_lesion_dice": dice}

    old = [row("a", "C1", dice=0.25), row("a", "C2")]
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(old[0]))
    w.writeheader()
    w.writerows(old)
    (tmp_path / "missing.csv").write_text(buf.getvalue())
    (tmp_path / "missing.md").write_text(missing_table(old, 10))
    new = [row("b", "C1"), row("b", "C2")]
    kept = _earlier_rows(tmp_path, new, 10)
    assert [(r["variant"], r["case"], r["WT_lesion_dice"]) for r in kept] == [("a", "C1", 0.25),
                                                                              ("a", "C2", 0.5)]
    assert _earlier_rows(tmp_path, new, 5) == []  # another N
    assert _earlier_rows(tmp_path, [row("b", "C1")], 10) == []  # other cases
    assert _earlier_rows(tmp_path, [row("a", "C1"), row("a", "C2")], 10) == []  # predicted again: replaced
