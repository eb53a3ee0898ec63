"""Data-efficiency benchmark: subsets, test split, plan checks, resume, and a micro run end to end."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from menseg.bench import efficiency as eff
from menseg.data.phantom import write_phantom_dataset
from menseg.errors import MensegError
from menseg.utils import folder_lock

# Two steps on 16^3 patches with a 3-stage net: every stage runs, nothing learns.
MICRO_BUDGET = {
    "data.spacing": [4.0, 4.0, 4.0],
    "model.filters": [4, 8, 16],
    "model.deep_supr_num": 1,
    "train.steps": 2,
    "train.batch_size": 1,
    "train.patch_size": [16, 16, 16],
    "train.checkpoint_every": 1,
    "seqdrop.enabled": False,  # as the packaged profiles: the variants compared without dropout
    "infer.overlap": 0.0,
}
REPORT_FILES = {"report.html", "report.md", "results.csv", "per_case.csv", "tests.csv",
                "learning_curve.png", "boxplots.png"}


def _profile(tmp: Path, away: list | None = None, budget: dict | None = None, **cohort) -> Path:
    spec = {"site": "site-a", "spacing_mm": 4.0, "n_pool": 3, "n_test": 2, "n_unlabeled": 1, "seed": 0}
    spec.update(cohort)
    path = tmp / "micro.yaml"
    d = {"name": "micro", "description": "test", "labeled": [1, 2], "seeds": 2, "cohort": spec,
         "budget": {**MICRO_BUDGET, **(budget or {})}}
    if away is not None:
        d["away"] = away
    path.write_text(yaml.safe_dump(d))
    return path


#: An away site for the micro protocol: another scanner (1.5 T, 5 mm slices) and other patients.
MICRO_AWAY = {"site": "site-b", "spacing_mm": 4.0, "n_test": 2, "n_unlabeled": 1, "seed": 1,
              "lesion": {"volume_median_cm3": 30.0, "site_weights": [["skull_base", 1.0]]}}


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
    with pytest.raises(MensegError, match="unknown site 'site-x'"):
        eff.load_profile(_profile(tmp_path, away=[{"site": "site-x"}]))
    with pytest.raises(MensegError, match="unknown key 'SynthConfig.lesion.volume_mediam_cm3'"):
        eff.load_profile(_profile(tmp_path, away=[{"site": "site-b", "lesion": {"volume_mediam_cm3": 3}}]))
    with pytest.raises(MensegError, match="site 'site-a' appears twice"):
        eff.load_profile(_profile(tmp_path, away=[{"site": "site-a"}]))
    with pytest.raises(MensegError, match="n_test must be >= 1"):
        eff.load_profile(_profile(tmp_path, away=[{"site": "site-b", "n_test": 0}]))


def test_packaged_medium_profile_has_home_and_two_away_sites_that_differ_beyond_colour() -> None:
    from menseg.synth.site import site_profile

    med = eff.load_profile("medium")
    home, away = med.cohort, med.away
    assert len(away) >= 2 and med.ceiling
    assert home.n_test >= 30 and home.n_pool >= 40 and all(a.n_test >= 20 for a in away)
    sites = [site_profile(c.site) for c in (home, *away)]
    assert len({s.field_t for s in sites}) == 2  # 1.5 T and 3 T
    thick = [max(s.t2w.voxel_mm) for s in sites]
    assert thick[0] < min(thick[1:])  # the away sites acquire thicker slices
    planes = {int(max(range(3), key=lambda i: s.t2f.voxel_mm[i])) for s in sites[1:]}
    assert len(planes) == 2  # one away site axial, one coronal
    for a in away:  # other patient populations: location mix, sizes, en plaque, oedema
        cfg, base = a.synth_config().lesion, home.synth_config().lesion
        assert cfg.site_weights != base.site_weights and cfg.volume_median_cm3 != base.volume_median_cm3
        assert cfg.shape_probs != base.shape_probs and cfg.oedema_p_range != base.oedema_p_range


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


def test_away_sites_adaptation_ceiling_and_bad_requests(tmp_path: Path) -> None:
    prof_path = _profile(tmp_path, away=[MICRO_AWAY])
    prof_path.write_text(prof_path.read_text() + "ceiling: true\n")
    prof = eff.load_profile(prof_path)
    cache = tmp_path / "cache"
    data = eff.resolve_data(prof, None, None, None, [1, 2], cache)
    assert list(data.test_sets) == ["home", "site-b"] and len(data.test_sets["site-b"]) == 2
    assert all(c.case_id.startswith("SITEB-TEST") for c in data.test_sets["site-b"])
    assert set(data.unlabeled) == {"home", "site-b"}
    runs = eff.plan_runs(tmp_path / "b", ["baseline", "sim2real"], [1, 2], [0], prof, data,
                         adapt=["sim2real@site-b"])
    assert [(r.variant, r.n_labeled, r.unlabeled_from) for r in runs] == [
        ("baseline", 1, None), ("sim2real", 1, "home"), ("sim2real@site-b", 1, "site-b"),
        ("baseline", 2, None), ("sim2real", 2, "home"), ("sim2real@site-b", 2, "site-b"),
        ("baseline", 3, None)]  # the ceiling: the reference on the whole pool (3 cases)
    assert runs[2].cfg.data.unlabeled_root == str(data.unlabeled["site-b"])
    assert runs[1].cfg.data.unlabeled_root == str(data.unlabeled["home"])
    assert runs[2].train_cases == runs[1].train_cases  # same labelled subset, other unlabelled scans
    with pytest.raises(MensegError, match="unknown away site 'site-q'"):
        eff.plan_runs(tmp_path / "b", ["baseline"], [1], [0], prof, data, adapt=["sim2real@site-q"])
    with pytest.raises(MensegError, match="takes VARIANT@SITE"):
        eff.plan_runs(tmp_path / "b", ["baseline"], [1], [0], prof, data, adapt=["sim2real"])
    with pytest.raises(MensegError, match="baseline uses no unlabelled scans"):
        eff.plan_runs(tmp_path / "b", ["baseline"], [1], [0], prof, data, adapt=["baseline@site-b"])
    with pytest.raises(MensegError, match="--test-size 5 is outside 1..2"):
        eff.resolve_data(prof, None, None, 5, [1], cache)
    assert len(eff.resolve_data(prof, None, None, 1, [1], cache).test) == 1


# ---------------------------------------------------------------- micro benchmark


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> dict:
    """The whole benchmark through the command line: embedded cohort with a home and an away site,
    2 variants x 2 N x 2 seeds, learned post-processing."""
    tmp = tmp_path_factory.mktemp("micro")
    prof, variant = _profile(tmp, away=[MICRO_AWAY], budget={"postprocess.learn": True}), _variant(tmp)
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
    assert {"overlays_baseline.png", "overlays_noflip.png", "learning_curve_site-b.png"} <= written
    assert set(files) == {"report.html", "report.md", "results.csv"}  # what the command prints
    assert all(p.is_file() and p.stat().st_size > 0 for p in files.values())
    assert "benchmark" in micro["stderr"] and "run 8/8" in micro["stderr"]  # the progress display
    rows = list(csv.DictReader(open(report / "results.csv")))
    assert {r["test_set"] for r in rows} == {"home", "site-b"}
    rows = [r for r in rows if r["test_set"] == "home"]
    assert [(r["variant"], int(r["n_labeled"])) for r in rows] == [
        ("baseline", 1), ("baseline", 2), ("noflip", 1), ("noflip", 2)]
    assert all(int(r["n_seeds"]) == 2 and int(r["n_test_cases"]) == 2 for r in rows)
    per_case = list(csv.DictReader(open(report / "per_case.csv")))
    assert len(per_case) == 2 * 2 * 2 * 2 * 2  # test sets x variants x N x seeds x test cases
    html = (report / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 4
    md = (report / "report.md").read_text()
    assert "micro" in md and "learning_curve.png" in md
    for heading in ("Headline: WT lesion-wise Dice by test set", "away test set site-b",
                    "Learned post-processing", "Detectable difference per N and test set",
                    "Differences from baseline"):
        assert heading in md, heading


def test_micro_runs_train_on_their_subset_and_test_on_the_fixed_split(micro: dict) -> None:
    out = micro["out"]
    plan = json.loads((out / "bench.json").read_text())
    assert len(plan["pool"]) == 3 and len(plan["test"]) == 2
    for run_json in (out / "runs").glob("*/n*/seed*/run.json"):
        done = json.loads(run_json.read_text())
        assert len(done["train_cases"]) == done["n_labeled"]
        assert set(done["train_cases"]) <= set(plan["pool"])
        assert list(done["metrics"]) == ["home", "site-b"] == list(plan["test_sets"])
        assert sorted(done["metrics"]["home"]) == plan["test"] == plan["test_sets"]["home"]
        assert sorted(done["metrics"]["site-b"]) == plan["test_sets"]["site-b"]
        assert set(done["postprocess"]) == {"ET", "TC", "WT"}  # learned, and scored without it too
        assert sorted(done["metrics_fixed"]["home"]) == plan["test"]
        ckpt_cfg = yaml.safe_load((run_json.parent / "train" / "config.yaml").read_text())
        assert ckpt_cfg["data"]["cases"] == done["train_cases"]
        assert ckpt_cfg["train"]["steps"] == 2
        for name, ids in plan["test_sets"].items():
            assert sorted(p.name for p in (run_json.parent / "predictions" / name).glob("*.nii.gz")) == [
                f"{c}.nii.gz" for c in ids]


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
    with pytest.raises(MensegError, match=r"another protocol \(overrides"):
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
    done = eff.execute_run(run, data.test_sets, "cpu")
    assert resumed == [True]
    lines = (run.folder / "train" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
    assert sorted(done["metrics"]["home"]) == sorted(c.case_id for c in data.test)


def test_bad_arguments(tmp_path: Path) -> None:
    prof = _profile(tmp_path)
    with pytest.raises(MensegError, match="at least 0"):
        eff.run_efficiency(tmp_path / "b", labeled=[-1, 3], profile=prof, cache_dir=tmp_path, progress=False)
    with pytest.raises(MensegError, match="--test-size 3 is outside 1..2"):
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


def test_a_committed_results_folder_continues_on_another_machine(micro: dict, tmp_path: Path,
                                                                 monkeypatch) -> None:
    """Commit the micro benchmark's results folder, clone it elsewhere (other paths, a cold cohort
    cache), drop one run: only that run is trained; another protocol is refused."""
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    repo = tmp_path / "repo"
    shutil.copytree(micro["out"], repo / "bench")
    (repo / ".gitignore").write_text("runs/\n")  # a repository that ignores its training runs
    subprocess.run([*git, "init", "-q", str(repo)], check=True)
    subprocess.run([*git, "-C", str(repo), "add", "-A"], check=True)
    subprocess.run([*git, "-C", str(repo), "commit", "-qm", "results"], check=True)
    tracked = subprocess.run([*git, "-C", str(repo), "ls-files"], check=True, capture_output=True,
                             text=True).stdout.split()
    assert "bench/bench.json" in tracked and "bench/runs/noflip/n2/seed1/run.json" in tracked
    assert not [f for f in tracked if "/train/" in f or "/predictions" in f or "preprocessed/" in f
                or f.endswith(".lock")]
    clone = tmp_path / "elsewhere"
    subprocess.run([*git, "clone", "-q", str(repo), str(clone)], check=True)
    out = clone / "bench"
    shutil.rmtree(out / "runs" / "noflip" / "n2" / "seed1")  # the run that did not finish there
    kept = {p: p.read_bytes() for p in (out / "runs").glob("*/*/*/run.json")}
    trained: list[str] = []
    real = eff.execute_run
    monkeypatch.setattr(eff, "execute_run",
                        lambda run, *a, **k: (trained.append(run.key), real(run, *a, **k))[1])
    files = eff.run_efficiency(out, ["baseline", str(micro["variant"])], profile=micro["profile"],
                               device="cpu", cache_dir=tmp_path / "cold-cache", progress=False)
    assert trained == ["noflip/n2/seed1"]
    assert {p: p.read_bytes() for p in kept} == kept  # finished runs untouched
    assert (out / "runs" / "noflip" / "n2" / "seed1" / "run.json").is_file()
    rows = list(csv.DictReader(open(files["results.csv"])))
    assert all(int(r["n_seeds"]) == 2 for r in rows)  # the report covers every run, old and new
    other = yaml.safe_load(micro["profile"].read_text())
    other["away"][0]["seed"] = 7  # another away cohort: another protocol
    moved = tmp_path / "other.yaml"
    moved.write_text(yaml.safe_dump(other))
    with pytest.raises(MensegError, match=r"another protocol \(cohorts"):
        eff.run_efficiency(out, ["baseline"], profile=moved, device="cpu", cache_dir=tmp_path / "cold-cache",
                           progress=False)


def test_report_only_writes_the_report_of_finished_runs_and_trains_nothing(micro: dict, tmp_path: Path,
                                                                         monkeypatch) -> None:
    out = tmp_path / "partial"
    shutil.copytree(micro["out"], out)
    shutil.rmtree(out / "report")
    shutil.rmtree(out / "runs" / "noflip")
    monkeypatch.setattr(eff, "execute_run", lambda *a, **k: pytest.fail("--report-only trained"))
    with folder_lock(out, "benchmark"):  # a benchmark still running there: reporting is still possible
        files = eff.run_efficiency(out, ["baseline", str(micro["variant"])], profile=micro["profile"],
                                   device="cpu", cache_dir=micro["tmp"] / "cache", progress=False,
                                   report_only=True)
    rows = list(csv.DictReader(open(files["results.csv"])))
    assert {r["variant"] for r in rows} == {"baseline"}
    assert "runs finished: 4 of 8" in files["report.md"].read_text()
    with pytest.raises(MensegError, match="no benchmark here"):
        eff.run_efficiency(tmp_path / "empty", profile=micro["profile"], report_only=True, progress=False)
    assert not (tmp_path / "empty").exists()


def test_training_time_counts_the_companion(tmp_path: Path) -> None:
    from menseg.bench.efficiency import _train_seconds

    (tmp_path / "companion").mkdir()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "time": 2.5}\n{"step": 2, "time": 10.0}\n')
    assert _train_seconds(tmp_path) == 10.0  # no companion run yet: its folder holds no metrics
    (tmp_path / "companion" / "metrics.jsonl").write_text('{"step": 1, "time": 3.0}\n')
    assert _train_seconds(tmp_path) == 13.0
