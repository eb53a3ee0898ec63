"""Data-efficiency benchmark: subsets, test split, plan checks, resume, and a micro run end to end."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from menseg.bench import efficiency as eff
from menseg.data.phantom import write_phantom_dataset
from menseg.errors import MensegError

# Two steps on 16^3 patches with a 3-stage net: every stage runs, nothing learns.
MICRO_BUDGET = {
    "data.spacing": [4.0, 4.0, 4.0],
    "model.filters": [4, 8, 16],
    "model.deep_supr_num": 1,
    "train.steps": 2,
    "train.batch_size": 1,
    "train.patch_size": [16, 16, 16],
    "train.checkpoint_every": 1,
    "infer.overlap": 0.0,
}
REPORT_FILES = {"report.html", "report.md", "results.csv", "per_case.csv", "tests.csv",
                "learning_curve.png", "boxplots.png"}


def _profile(tmp: Path, **cohort) -> Path:
    spec = {"site": "site-a", "spacing_mm": 4.0, "n_pool": 3, "n_test": 2, "n_unlabeled": 1, "seed": 0}
    spec.update(cohort)
    path = tmp / "micro.yaml"
    path.write_text(yaml.safe_dump({"name": "micro", "description": "test", "labeled": [1, 2], "seeds": 2,
                                    "cohort": spec, "budget": MICRO_BUDGET}))
    return path


def _variant(tmp: Path) -> Path:
    """A second variant: the baseline with another augmentation setting."""
    path = tmp / "noflip.yaml"
    path.write_text(yaml.safe_dump({"name": "noflip", "aug": {"p_flip": 0.0}}))
    return path


# ---------------------------------------------------------------- subsets and splits


def test_subsets_reproducible_nested_and_seed_dependent() -> None:
    pool = [f"case{i:02d}" for i in range(20)]
    a = eff.draw_subsets(pool, [3, 5, 10], seed=0)
    assert a == eff.draw_subsets(list(reversed(pool)), [3, 5, 10], seed=0)  # order of the pool is irrelevant
    assert [len(a[n]) for n in (3, 5, 10)] == [3, 5, 10]
    assert set(a[3]) <= set(a[5]) <= set(a[10]) <= set(pool)
    assert all(s == sorted(s) for s in a.values())
    b = eff.draw_subsets(pool, [3, 5, 10], seed=1)
    assert b[10] != a[10]
    with pytest.raises(MensegError, match="pool holds 20"):
        eff.draw_subsets(pool, [21], seed=0)


def test_test_split_fixed_and_disjoint() -> None:
    ids = [f"c{i}" for i in range(12)]
    pool, test = eff.split_test(ids, 5)
    assert (pool, test) == eff.split_test(list(reversed(ids)), 5)
    assert len(test) == 5 and len(pool) == 7
    assert not set(pool) & set(test) and set(pool) | set(test) == set(ids)
    for seed in range(4):  # no run of any seed ever trains on a test case
        assert not set(eff.draw_subsets(pool, [3, 7], seed)[7]) & set(test)
    for bad in (0, 12):
        with pytest.raises(MensegError, match="test size"):
            eff.split_test(ids, bad)


def test_packaged_profiles_load() -> None:
    assert {"quick", "full"} <= set(eff.profile_names())
    quick = eff.load_profile("quick")
    assert quick.labeled == (3, 5, 10) and quick.seeds == 3
    assert quick.cohort.n_pool >= max(quick.labeled)
    assert eff.load_profile("full").budget["train.patch_size"] == [128, 128, 128]


def test_profile_errors(tmp_path: Path) -> None:
    with pytest.raises(MensegError, match="no benchmark profile 'nope'"):
        eff.load_profile("nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nbudgte: {}\n")
    with pytest.raises(MensegError, match="unknown profile key 'budgte'"):
        eff.load_profile(bad)
    bad.write_text("name: x\nbudget: {train.stpes: 3}\n")
    with pytest.raises(MensegError, match="stpes"):
        eff.load_profile(bad)


def test_runs_share_subsets_across_variants_and_budget(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_phantom_dataset(root, n_cases=8, shape=(16, 16, 16), seed=0)
    prof = eff.load_profile(_profile(tmp_path))
    data = eff.resolve_data(prof, root, None, 3, [1, 2])
    assert len(data.pool) == 5 and len(data.test) == 3
    runs = eff.plan_runs(tmp_path / "b", ["baseline", str(_variant(tmp_path))], [1, 2], [0, 1], prof, data)
    assert len(runs) == 8
    assert [r.seed for r in runs] == [0] * 4 + [1] * 4  # seed-major
    by = {(r.variant, r.n_labeled, r.seed): r for r in runs}
    test_ids = {c.case_id for c in data.test}
    for n in (1, 2):
        for s in (0, 1):
            a, b = by["baseline", n, s], by["noflip", n, s]
            assert a.train_cases == b.train_cases and not set(a.train_cases) & test_ids
            assert a.cfg.train == b.cfg.train and a.cfg.model == b.cfg.model  # same budget
            assert a.cfg.data.cases == a.train_cases and a.cfg.data.val_fraction == 0
            assert a.cfg.train.seed == s
            assert a.cfg.aug.p_flip == 0.5 and b.cfg.aug.p_flip == 0.0
    with pytest.raises(MensegError, match="only 5 are in the pool"):
        eff.resolve_data(prof, root, None, 3, [6])


def test_zero_labelled_cases_run_only_variants_that_need_no_labels(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_phantom_dataset(root, n_cases=4, shape=(16, 16, 16), seed=0)
    prof = eff.load_profile(_profile(tmp_path))
    data = eff.resolve_data(prof, root, None, 2, [0, 1])
    runs = eff.plan_runs(tmp_path / "b", ["baseline", "sim2real"], [0, 1], [0], prof, data)
    assert [(r.variant, r.n_labeled) for r in runs] == [("sim2real", 0), ("baseline", 1), ("sim2real", 1)]
    zero = runs[0]
    assert zero.train_cases == () and zero.cfg.data.root is None and zero.cfg.sim2real.enabled
    assert runs[2].cfg.data.root == str(root)


# ---------------------------------------------------------------- micro benchmark


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> dict:
    """The whole benchmark through the command line: embedded cohort, 2 variants x 2 N x 2 seeds."""
    tmp = tmp_path_factory.mktemp("micro")
    prof, variant = _profile(tmp), _variant(tmp)
    out = tmp / "bench"
    r = subprocess.run(
        [sys.executable, "-m", "menseg", "bench", "efficiency", "--out", str(out), "--profile", str(prof),
         "--variants", f"baseline,{variant}", "--device", "cpu", "--cache-dir", str(tmp / "cache")],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    files = {Path(line).name: Path(line) for line in r.stdout.split()}
    return {"tmp": tmp, "out": out, "files": files, "profile": prof, "variant": variant, "stderr": r.stderr}


def test_micro_benchmark_writes_every_report_file(micro: dict) -> None:
    out, files = micro["out"], micro["files"]
    report = out / "report"
    written = {p.name for p in report.iterdir()}
    assert REPORT_FILES <= written
    assert {"overlays_baseline.png", "overlays_noflip.png"} <= written
    assert set(files) == {"report.html", "report.md", "results.csv"}  # what the command prints
    assert all(p.is_file() and p.stat().st_size > 0 for p in files.values())
    assert "benchmark" in micro["stderr"] and "run 8/8" in micro["stderr"]  # the progress display
    rows = list(csv.DictReader(open(report / "results.csv")))
    assert [(r["variant"], int(r["n_labeled"])) for r in rows] == [
        ("baseline", 1), ("baseline", 2), ("noflip", 1), ("noflip", 2)]
    assert all(int(r["n_seeds"]) == 2 and int(r["n_test_cases"]) == 2 for r in rows)
    per_case = list(csv.DictReader(open(report / "per_case.csv")))
    assert len(per_case) == 2 * 2 * 2 * 2  # variants x N x seeds x test cases
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    md = (report / "report.md").read_text()
    assert "micro" in md and "learning_curve.png" in md


def test_micro_runs_train_on_their_subset_and_test_on_the_fixed_split(micro: dict) -> None:
    out = micro["out"]
    plan = json.loads((out / "bench.json").read_text())
    assert len(plan["pool"]) == 3 and len(plan["test"]) == 2
    for run_json in (out / "runs").glob("*/n*/seed*/run.json"):
        done = json.loads(run_json.read_text())
        assert len(done["train_cases"]) == done["n_labeled"]
        assert set(done["train_cases"]) <= set(plan["pool"])
        assert sorted(done["metrics"]) == plan["test"]
        ckpt_cfg = yaml.safe_load((run_json.parent / "train" / "config.yaml").read_text())
        assert ckpt_cfg["data"]["cases"] == done["train_cases"]
        assert ckpt_cfg["train"]["steps"] == 2
        assert sorted(p.name for p in (run_json.parent / "predictions").iterdir()) == [
            f"{c}.nii.gz" for c in plan["test"]]


def test_finished_runs_are_never_redone(micro: dict, monkeypatch) -> None:
    calls = []
    monkeypatch.setattr("menseg.train.trainer.train", lambda *a, **k: calls.append(a))
    before = {p: p.stat().st_mtime_ns for p in (micro["out"] / "runs").glob("*/*/*/run.json")}
    eff.run_efficiency(micro["out"], ["baseline", str(micro["variant"])], profile=micro["profile"],
                       device="cpu", cache_dir=micro["tmp"] / "cache", progress=False)
    assert calls == []
    assert before == {p: p.stat().st_mtime_ns for p in before}


def test_user_data_in_the_nnunet_layout(tmp_path: Path) -> None:
    from menseg.data.layouts import convert_dataset

    write_phantom_dataset(tmp_path / "brats", n_cases=6, shape=(16, 16, 16), seed=0)
    convert_dataset(tmp_path / "brats", tmp_path / "nnunet", "nnunet")
    prof = eff.load_profile(_profile(tmp_path))
    a = eff.resolve_data(prof, tmp_path / "brats", None, None, [2])
    b = eff.resolve_data(prof, tmp_path / "nnunet", tmp_path / "brats", None, [2])
    assert len(a.test) == 3  # default: half held out
    assert [c.case_id for c in a.test] == [c.case_id for c in b.test]  # same split whatever the layout
    assert b.n_unlabeled == 6 and b.unlabeled_root == tmp_path / "brats"
    with pytest.raises(MensegError, match="unlabelled scans folder not found"):
        eff.resolve_data(prof, tmp_path / "brats", tmp_path / "nope", None, [2])


def test_config_added_later_at_its_default_is_not_a_change(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_phantom_dataset(root, n_cases=4, shape=(16, 16, 16), seed=0)
    prof = eff.load_profile(_profile(tmp_path))
    (run,) = eff.plan_runs(tmp_path / "b", ["baseline"], [1], [0], prof,
                           eff.resolve_data(prof, root, None, 2, [1]))
    stored = run.identity()
    assert run.differences(stored) == []
    older = {k: v for k, v in stored.items() if k != "aug.p_flip"}  # a run from before aug.p_flip existed
    assert run.differences(older) == []
    assert run.differences({**stored, "train.steps": 999}) == ["train.steps"]
    (changed,) = eff.plan_runs(tmp_path / "b", ["baseline"], [1], [0], prof,
                               eff.resolve_data(prof, root, None, 2, [1]), ["aug.p_flip=0.1"])
    assert changed.differences(older) == ["aug.p_flip"]


def test_changed_budget_or_data_is_refused(micro: dict) -> None:
    with pytest.raises(MensegError, match="another overrides"):
        eff.run_efficiency(micro["out"], ["baseline"], profile=micro["profile"], device="cpu",
                           cache_dir=micro["tmp"] / "cache", progress=False, overrides=["train.lr=0.1"])


def test_interrupted_benchmark_resumes_at_first_unfinished_run(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "data"
    write_phantom_dataset(root, n_cases=5, shape=(24, 24, 24), seed=2)
    prof = _profile(tmp_path)
    kwargs = dict(profile=prof, data=root, test_size=2, labeled=[1, 2], seeds=1, device="cpu", progress=False)
    real = eff.execute_run
    seen: list[str] = []

    def dying(run, *a, **k):
        seen.append(run.key)
        if len(seen) == 2:
            raise KeyboardInterrupt  # the user pressed ^C during the second run
        return real(run, *a, **k)

    monkeypatch.setattr(eff, "execute_run", dying)
    with pytest.raises(KeyboardInterrupt):
        eff.run_efficiency(tmp_path / "b", ["baseline"], **kwargs)
    assert seen == ["baseline/n1/seed0", "baseline/n2/seed0"]
    seen.clear()
    monkeypatch.setattr(eff, "execute_run",
                        lambda run, *a, **k: (seen.append(run.key), real(run, *a, **k))[1])
    files = eff.run_efficiency(tmp_path / "b", ["baseline"], **kwargs)
    assert seen == ["baseline/n2/seed0"]
    assert Path(files["report.html"]).is_file()


def test_unfinished_training_resumes_from_its_checkpoint(tmp_path: Path, monkeypatch) -> None:
    from menseg.train import trainer

    root = tmp_path / "data"
    write_phantom_dataset(root, n_cases=4, shape=(24, 24, 24), seed=3)
    prof = eff.load_profile(_profile(tmp_path))
    data = eff.resolve_data(prof, root, None, 2, [2])
    (run,) = eff.plan_runs(tmp_path / "b", ["baseline"], [2], [0], prof, data, device="cpu")
    trainer.train(run.cfg, stop_at=1, progress=False)  # killed after step 1 (checkpoint every step)
    resumed = []
    real = trainer.train
    monkeypatch.setattr(trainer, "train", lambda cfg, resume=False, **k: (resumed.append(resume),
                                                                          real(cfg, resume, **k))[1])
    done = eff.execute_run(run, data.test, "cpu")
    assert resumed == [True]
    lines = (run.folder / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert sorted(done["metrics"]) == sorted(c.case_id for c in data.test)


def test_bad_arguments(tmp_path: Path) -> None:
    prof = _profile(tmp_path)
    with pytest.raises(MensegError, match="at least 0"):
        eff.run_efficiency(tmp_path / "b", labeled=[-1, 3], profile=prof, cache_dir=tmp_path, progress=False)
    with pytest.raises(MensegError, match="--test-size applies to --data"):
        eff.run_efficiency(tmp_path / "b", profile=prof, test_size=3, cache_dir=tmp_path, progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("mine")
    root = tmp_path / "data"
    write_phantom_dataset(root, n_cases=4, shape=(16, 16, 16), seed=0)
    with pytest.raises(MensegError, match="holds no benchmark"):
        eff.run_efficiency(tmp_path / "full", profile=prof, data=root, test_size=2, labeled=[1],
                           progress=False)
    assert (tmp_path / "full" / "x.txt").read_text() == "mine"


def test_a_foreign_folder_is_left_untouched_and_a_killed_first_write_is_no_obstacle(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(MensegError, match="holds no benchmark"):
        eff.run_efficiency(foreign, profile=_profile(tmp_path), progress=False, device="cpu")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]  # not even a lock file
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / ".bench.json.x1y2z3.tmp.json").write_text("{")  # bench.json's first write, cut short
    (killed / ".lock").write_text("")
    assert not eff._foreign(killed)
    assert eff._foreign(foreign)
