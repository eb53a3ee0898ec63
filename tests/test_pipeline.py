"""End to end through the CLI on a tiny phantom dataset: check, convert, train, resume, predict, evaluate."""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from menseg.data.phantom import write_phantom_dataset


def _menseg(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "menseg", *map(str, args)], capture_output=True,
                       text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pipeline")
    write_phantom_dataset(d / "train", n_cases=4, shape=(40, 40, 32), seed=0, prefix="TR")
    write_phantom_dataset(d / "test", n_cases=2, shape=(40, 40, 32), seed=1, prefix="TE")
    return d


def test_cli_pipeline(workdir: Path):
    r = _menseg("data", "check", workdir / "train")
    assert "TR-00000-000" in r.stdout and "TR-00003-000" in r.stdout

    _menseg("data", "convert", workdir / "train", workdir / "nnunet", "--to", "nnunet")
    assert (workdir / "nnunet" / "dataset.json").is_file()
    assert len(list((workdir / "nnunet" / "imagesTr").glob("*_0003.nii.gz"))) == 4

    run = workdir / "run"
    common = [f"data={workdir / 'nnunet'}", f"out_dir={run}", "train.patch_size=[24,24,24]",
              "train.batch_size=1", "model.filters=[8,16,32]", "model.deep_supr_num=1",
              "train.val_every=2", "train.checkpoint_every=2"]
    _menseg("train", "demo", *common, "train.steps=2")
    # a killed/finished run is continued, not overwritten
    again = _menseg("train", "demo", *common, "train.steps=4", check=False)
    assert again.returncode == 2 and "resume" in again.stderr
    _menseg("train", "demo", *common, "train.steps=4", "--resume")
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert max(x["step"] for x in lines) == 4
    for f in ("config.yaml", "latest.pt", "best.pt"):
        assert (run / f).is_file(), f

    out = workdir / "pred"
    r = _menseg("predict", run / "best.pt", workdir / "test", out)
    for case in ("TE-00000-000", "TE-00001-000"):
        pred = nib.load(out / f"{case}.nii.gz")
        ref = nib.load(workdir / "test" / case / f"{case}-t1c.nii.gz")
        assert pred.shape == ref.shape
        np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-5)
        assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}

    _menseg("evaluate", out, workdir / "test", "--out", workdir / "eval")
    summary = json.loads((workdir / "eval" / "summary.json").read_text())
    assert summary["n_cases"] == 2
    assert "WT_lesion_dice" in summary["mean"]
    csv = (workdir / "eval" / "metrics.csv").read_text().splitlines()
    assert len(csv) == 3  # header + 2 cases
