"""Fault tolerance: a training process (or a whole 2-process DDP run) killed with SIGKILL at a random step
resumes to the weights of an uninterrupted run (CPU, deterministic mode); one writer per folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from menseg.checkpoint import load_checkpoint
from menseg.data.phantom import write_phantom_dataset
from proc_helpers import steps_done, subprocess_env

STEPS = 8


def _cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "menseg", "train", "baseline", f"data={data / 'data'}",
            f"data.cache_dir={data / 'cache'}", f"out_dir={out}", "model.filters=[4,8,16]",
            "model.deep_supr_num=1", "train.patch_size=[16,16,16]", f"train.steps={STEPS}",
            "train.checkpoint_every=1", "train.val_every=100", "data.val_fraction=0", "train.seed=11",
            "train.deterministic=true", "train.device=cpu", *extra]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ft-phantoms")
    write_phantom_dataset(root / "data", n_cases=2, shape=(24, 24, 24), seed=5)
    return root


@pytest.mark.parametrize("nproc", [1, 2])
def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(
    data: Path, tmp_path: Path, nproc: int
) -> None:
    """One process, or a whole 2-process gloo DDP run (launcher and both ranks: a node lost), killed at a
    random step; resumed with the same number of processes, it ends with the uninterrupted run's weights,
    bit for bit."""
    extra = ("--nproc", str(nproc)) if nproc > 1 else ()
    ref = tmp_path / "ref"
    r = subprocess.run(_cmd(data, ref, *extra), env=subprocess_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    kill_after = int(np.random.default_rng().integers(1, STEPS - 1))  # a different step each run
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(data, run, *extra), env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        # a step's metrics line is written before its checkpoint: wait for the first checkpoint too, or a
        # kill between them leaves nothing to resume (and the run is refused, as it should be)
        while ((steps_done(run) < kill_after or not (run / "latest.pt").exists()) and proc.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the process and, under DDP, the launcher and every rank
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill (step {kill_after})"
    resumed = subprocess.run(_cmd(data, run, "--resume", *extra), env=subprocess_env(), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = load_checkpoint(ref / "latest.pt"), load_checkpoint(run / "latest.pt")
    assert a["step"] == b["step"] == STEPS
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), (k, kill_after)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, STEPS + 1))


def test_one_writer_per_folder_and_leftovers_of_killed_writes_are_cleared(data: Path, tmp_path: Path) -> None:
    from menseg.config import load_config
    from menseg.errors import MensegError
    from menseg.train.trainer import train
    from menseg.utils import atomic_leftovers, folder_lock

    with folder_lock(tmp_path / "f", "test"):  # a second holder, even in this process, is refused
        with pytest.raises(MensegError, match="another process is using this test folder"):
            with folder_lock(tmp_path / "f", "test"):
                pass
    with folder_lock(tmp_path / "f", "test"):  # released on exit
        pass

    run = tmp_path / "run"
    cfg = load_config("baseline", _cmd(data, run)[5:])
    train(cfg, progress=False, stop_at=2)
    stale = run / ".latest.pt.k1ll3d.tmp.pt"  # what a kill inside save_checkpoint leaves
    stale.write_bytes(b"\0" * 64)
    assert atomic_leftovers(run) == [stale]
    with folder_lock(run, "training run"):  # e.g. the same run started in another terminal
        with pytest.raises(MensegError, match="another process is using this training run folder"):
            train(cfg, resume=True, progress=False)
    (run / "latest.pt").unlink()  # lost, e.g. deleted by hand: the one before is used (warning)
    train(cfg, resume=True, progress=False)
    assert not stale.exists() and load_checkpoint(run / "latest.pt")["step"] == STEPS

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(MensegError, match="not empty"):
        train(load_config("baseline", [*_cmd(data, foreign)[5:]]), progress=False)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]  # no lock file left in it


def test_a_run_that_failed_before_its_first_step_starts_over(data: Path, tmp_path: Path) -> None:
    from menseg.config import load_config
    from menseg.errors import MensegError
    from menseg.train.trainer import train

    run = tmp_path / "run"
    with pytest.raises(MensegError, match="no labelled case"):  # e.g. a typo in data.cases
        train(load_config("baseline", [*_cmd(data, run)[5:], "data.cases=[NOPE]"]), progress=False)
    assert (run / "config.yaml").is_file()  # what it left: config and lock, no step taken
    train(load_config("baseline", _cmd(data, run)[5:]), progress=False)  # fixed: starts, no --resume
    assert load_checkpoint(run / "latest.pt")["step"] == STEPS
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.yaml").write_text("my: own settings\n")  # not a menseg config: never overwritten
    with pytest.raises(MensegError, match="not empty"):
        train(load_config("baseline", _cmd(data, theirs)[5:]), progress=False)
    assert (theirs / "config.yaml").read_text() == "my: own settings\n"
