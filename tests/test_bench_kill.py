"""A ``menseg bench efficiency`` process killed with SIGKILL mid-way resumes: the same command finishes,
keeps the runs finished before the kill untouched and reports exactly what an uninterrupted benchmark
reports (CPU, ``train.deterministic``)."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from menseg.checkpoint import load_checkpoint, load_latest
from proc_helpers import steps_done, subprocess_env

STEPS = 6
LABELED = (1, 2, 3)  # one seed: three runs, trained in this order (seed-major, then N)
# The micro budget of test_bench_efficiency.py, with a few more steps so a run is caught while training.
BUDGET = {
    "data.spacing": [4.0, 4.0, 4.0],
    "model.filters": [4, 8, 16],
    "model.deep_supr_num": 1,
    "train.steps": STEPS,
    "train.batch_size": 1,
    "train.patch_size": [16, 16, 16],
    "train.checkpoint_every": 1,
    "train.deterministic": True,
    "infer.overlap": 0.0,
}
TIMEOUT_S = 300


def _profile(tmp: Path) -> Path:
    cohort = {"site": "site-a", "spacing_mm": 4.0, "n_pool": 4, "n_test": 2, "n_unlabeled": 0, "seed": 0}
    path = tmp / "micro-kill.yaml"
    path.write_text(yaml.safe_dump({"name": "micro-kill", "description": "test", "labeled": list(LABELED),
                                    "seeds": 1, "cohort": cohort, "budget": BUDGET}))
    return path


def _cmd(tmp: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "menseg", "bench", "efficiency", "--out", str(out),
            "--profile", str(tmp / "micro-kill.yaml"), "--device", "cpu", "--cache-dir", str(tmp / "cache")]


def _run_dirs(out: Path) -> list[Path]:
    return [out / "runs" / "baseline" / f"n{n}" / "seed0" for n in LABELED]


def _snapshot(run: Path) -> dict[str, tuple[int, bytes]]:
    """mtime and bytes of what a finished run wrote: any retraining or re-evaluation changes them."""
    files = [run / "run.json", run / "train" / "latest.pt", run / "train" / "metrics.jsonl",
             run / "evaluation" / "home" / "metrics.csv", *sorted((run / "predictions" / "home").iterdir())]
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, p.read_bytes()) for p in files}


def _table(path: Path) -> list[dict[str, str]]:
    """A report CSV without wall-time columns (none today; kept out should one be added)."""
    rows = list(csv.DictReader(open(path)))
    return [{k: v for k, v in r.items() if "second" not in k and "time" not in k} for r in rows]


def _kill_mid_way(tmp: Path, out: Path, run_index: int, step: int) -> None:
    """Start the benchmark and SIGKILL it once ``run_index`` (0-based, > 0) has trained ``step`` steps."""
    target = _run_dirs(out)[run_index]
    log = open(tmp / f"{out.name}.log", "w")
    proc = subprocess.Popen(_cmd(tmp, out), env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while steps_done(target / "train") < step and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        log.close()
    if proc.returncode not in (-signal.SIGKILL, 0):
        tail = (tmp / f"{out.name}.log").read_text()[-3000:]
        pytest.fail(f"the benchmark failed before the kill (rc {proc.returncode}):\n{tail}")


def test_sigkilled_benchmark_resumes_to_the_uninterrupted_results(tmp_path: Path) -> None:
    _profile(tmp_path)
    ref = tmp_path / "ref"
    r = subprocess.run(_cmd(tmp_path, ref), env=subprocess_env(), capture_output=True, text=True,
                       timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stderr[-3000:]

    rng = np.random.default_rng()  # a different kill point each time: a later run, at some step
    tries = [(int(rng.integers(1, len(LABELED))), int(rng.integers(1, STEPS))), (1, 1)]
    for attempt, (run_index, step) in enumerate(tries):
        out = tmp_path / f"killed{attempt}"
        _kill_mid_way(tmp_path, out, run_index, step)
        done = [d for d in _run_dirs(out) if (d / "run.json").is_file()]
        if done and len(done) < len(LABELED):
            break  # caught with at least one run finished and one not
    else:
        pytest.fail(f"could not kill the benchmark between runs: at the kill points {tries}, "
                    f"{len(done)} of {len(LABELED)} runs were finished "
                    f"(0: slower than {TIMEOUT_S} s; all: too quick to catch)")
    on_disk = [steps_done(d / "train") for d in _run_dirs(out)]
    where = (f"killed at run {run_index + 1}/{len(LABELED)}, step >= {step}: {len(done)} runs finished, "
             f"steps on disk {on_disk}")
    before = {d: _snapshot(d) for d in done}
    cut = _run_dirs(out)[len(done)] / "train"  # the run being trained at the kill
    # load_latest, as the trainer does: a kill between the checksum and the checkpoint renames leaves a
    # latest.pt that fails its checksum, and the resume goes on from latest.prev.pt
    ckpt_step = load_latest(cut / "latest.pt")[0]["step"] if (cut / "latest.pt").is_file() else 0
    lines_at_kill = (cut / "metrics.jsonl").read_text().splitlines()[:ckpt_step] if ckpt_step else []

    resumed = subprocess.run(_cmd(tmp_path, out), env=subprocess_env(), capture_output=True, text=True,
                             timeout=TIMEOUT_S)
    assert resumed.returncode == 0, f"{where}\n{resumed.stderr[-3000:]}"
    assert f"{len(LABELED) - len(done)} to do" in resumed.stderr, where

    # (b) the runs finished before the kill were neither retrained nor re-predicted nor re-evaluated
    for d, snap in before.items():
        assert _snapshot(d) == snap, f"{d.relative_to(out)} was redone; {where}"

    # the cut run went on from its checkpoint: the steps logged before it are kept as they were
    assert (cut / "metrics.jsonl").read_text().splitlines()[:ckpt_step] == lines_at_kill, where

    # every run trained exactly STEPS steps once, to the weights of the uninterrupted run
    for d_ref, d in zip(_run_dirs(ref), _run_dirs(out), strict=True):
        steps = [json.loads(x)["step"] for x in (d / "train" / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, STEPS + 1)), (d.relative_to(out), steps, where)
        a, b = load_checkpoint(d_ref / "train" / "latest.pt"), load_checkpoint(d / "train" / "latest.pt")
        assert a["step"] == b["step"] == STEPS, where
        for k in a["model"]:
            assert torch.equal(a["model"][k], b["model"][k]), (d.relative_to(out), k, where)
        assert json.loads((d / "run.json").read_text())["metrics"] == json.loads(
            (d_ref / "run.json").read_text())["metrics"], (d.relative_to(out), where)

    # (c) the same tables as the uninterrupted benchmark
    for name in ("results.csv", "per_case.csv", "tests.csv"):
        assert _table(out / "report" / name) == _table(ref / "report" / name), (name, where)
    assert len(_table(out / "report" / "results.csv")) == len(LABELED)
