"""The ``menseg sim2real`` commands end to end on tiny phantoms."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from menseg.cli import app
from menseg.data.phantom import write_phantom_dataset


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("s2r-cli")
    for name, seed in (("syn", 1), ("real", 2)):
        write_phantom_dataset(root / name, n_cases=2, shape=(32, 32, 24), spacing=(2.0, 2.0, 2.0), seed=seed,
                              prefix=name.upper())
    for f in (root / "real").glob("*/*.nii.gz"):
        if f.name.endswith("-seg.nii.gz"):
            f.unlink()
            continue
        img = nib.load(f)
        arr = np.asarray(img.dataobj, dtype=np.float32)
        nib.save(nib.Nifti1Image(arr * 2.5 + 0.3 * (arr > 0), img.affine), f)  # another "scanner"
    return root


def test_fit_translate_and_gap_commands(folders: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    fit = ["sim2real", "fit-translator", "--synthetic", str(folders / "syn"), "--real", str(folders / "real"),
           "--out", str(tmp_path / "tr"), "--set", "steps=3", "--set", "patch_size=[16,16,16]",
           "--set", "channels=4", "--set", "preview_every=2", "--device", "cpu"]
    res = runner.invoke(app, fit)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "tr" / "translator.pt").is_file() and list((tmp_path / "tr" / "preview").glob("*.png"))
    res = runner.invoke(app, ["sim2real", "translate", str(tmp_path / "tr"), str(folders / "syn"),
                              str(tmp_path / "translated")])
    assert res.exit_code == 0, res.output
    cases = sorted(p.name for p in (tmp_path / "translated").iterdir() if p.is_dir())
    assert cases == ["SYN-00000-000", "SYN-00001-000"]
    assert (tmp_path / "translated" / cases[0] / f"{cases[0]}-seg.nii.gz").is_file()
    res = runner.invoke(app, ["sim2real", "gap", "--real", str(folders / "real"), "--synthetic",
                              str(folders / "syn"), "--translator", str(tmp_path / "tr"), "--steps", "5",
                              "--patch", "16", "--out", str(tmp_path / "gap.md")])
    assert res.exit_code == 0, res.output
    table = (tmp_path / "gap.md").read_text()
    assert "raw synthetic" in table and "translated" in table
    # the output folder is never overwritten
    res = runner.invoke(app, ["sim2real", "translate", str(tmp_path / "tr"), str(folders / "syn"),
                              str(tmp_path / "translated")])
    assert res.exit_code != 0
