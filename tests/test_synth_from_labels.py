"""Tests of menseg.synth.from_labels: SynthSeg-style synthesis on user label maps (issue 4, 1c)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from menseg.data.layouts import discover_cases
from menseg.data.validate import check_dataset
from menseg.errors import MensegError
from menseg.synth import from_labels as FL
from menseg.synth.tissues import WM

N = 40


def _label_map() -> np.ndarray:
    """40^3 map with 5 nested (ellipsoidal) classes and a background margin."""
    x, y, z = np.meshgrid(*[np.arange(N) - (N - 1) / 2] * 3, indexing="ij")
    r = np.sqrt(x**2 + y**2 + (1.1 * z) ** 2)
    lm = np.zeros((N, N, N), np.int16)
    for c, rad in zip((7, 2, 41, 4, 5), (17, 15, 11, 6, 3), strict=True):
        lm[r < rad] = c
    return lm


def _affine(flip_x: bool = False) -> np.ndarray:
    a = np.diag([-3.0 if flip_x else 3.0, 3.0, 3.0, 1.0])
    a[:3, 3] = (60.0 if flip_x else -60.0, -58.0, -55.0)
    return a


@pytest.fixture(scope="module")
def maps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("maps")
    nib.save(nib.Nifti1Image(_label_map(), _affine()), d / "head.nii.gz")
    return d


@pytest.fixture(scope="module")
def dataset(maps: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("runs") / "ds"
    sidecars = FL.from_labels_dataset(maps, out, per_map=2, seed=3, mapping={7: WM, 2: WM, 41: 2})
    return out, sidecars


def test_dataset_readable_and_in_map_grid(dataset: tuple[Path, list[Path]], maps: Path) -> None:
    out, sidecars = dataset
    assert len(sidecars) == 2 and all(p.is_file() for p in sidecars)
    cases = discover_cases(out)
    assert [c.case_id for c in cases] == ["head-syn0", "head-syn1"]
    reports = check_dataset(out)
    assert all(r.shape == (N, N, N) for r in reports)
    for c in cases:
        for p in (*c.images.values(), c.label):
            img = nib.load(p)
            assert img.shape == (N, N, N)
            np.testing.assert_allclose(img.affine, _affine())
        lab = np.asarray(nib.load(c.label).dataobj)
        assert (lab == 3).sum() > 0  # ET painted
    side = json.loads(sidecars[0].read_text())
    assert side["kind"] == "from_labels" and side["k"] == 0 and side["seed"] == 3
    assert side["source"]["sha256"] == FL.sha256_file(maps / "head.nii.gz")
    assert side["mapping"] == {"2": "wm", "7": "wm", "41": "gm"}


def test_replay_bit_exact(dataset: tuple[Path, list[Path]]) -> None:
    out, sidecars = dataset
    case = FL.replay_from_labels(sidecars[1])
    c = discover_cases(out)[1]
    for i, p in enumerate(c.images.values()):
        assert np.array_equal(np.asarray(nib.load(p).dataobj, np.float32), case.image[i])
    assert np.array_equal(np.asarray(nib.load(c.label).dataobj), case.label)


def test_seeds_differ_and_orientation_kept(tmp_path: Path) -> None:
    lm = _label_map()
    a = FL.synth_on_label_map(lm, _affine(), case_seed=1)
    b = FL.synth_on_label_map(lm, _affine(), case_seed=2)
    assert not np.array_equal(a.image, b.image)
    assert a.image.shape == (4, N, N, N) and a.image.dtype == np.float32
    # no mapping: no WM, so no oedema; tumour painted
    assert (a.label == 2).sum() == 0 and (a.label == 3).sum() > 0
    assert ((a.label == 3) & (lm > 0)).sum() > 0  # the tumour grows into the (unmapped) classes
    # a flipped (LAS) grid gives the flipped result of the RAS one
    f = FL.synth_on_label_map(lm[::-1].copy(), _affine(flip_x=True), case_seed=1)
    assert np.array_equal(f.label, a.label[::-1])


def test_bad_maps(tmp_path: Path) -> None:
    bad = tmp_path / "float.nii.gz"
    nib.save(nib.Nifti1Image(_label_map().astype(np.float32) + 0.5, _affine()), bad)
    with pytest.raises(MensegError, match="non-integer") as e:
        FL.read_label_map(bad)
    assert "float.nii.gz" in str(e.value)
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(16, dtype=np.int16).reshape(4, 4), np.eye(4)), flat)
    with pytest.raises(MensegError, match="3D"):
        FL.read_label_map(flat)
    one = tmp_path / "one.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.int16), np.eye(4)), one)
    with pytest.raises(MensegError, match="2 classes"):
        FL.read_label_map(one)
    with pytest.raises(MensegError, match="flat.nii.gz"):  # dataset validates every map first
        FL.from_labels_dataset(tmp_path, tmp_path.parent / "never")
    assert not (tmp_path.parent / "never").exists()
    with pytest.raises(MensegError, match="unknown tissue"):
        FL.parse_label_mapping({"3": "bone"})


def test_refuses_non_empty_out(maps: Path, tmp_path: Path) -> None:
    (tmp_path / "x").write_text("")
    with pytest.raises(MensegError, match="not empty"):
        FL.from_labels_dataset(maps, tmp_path)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "menseg.cli", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli(maps: Path, tmp_path: Path) -> None:
    mapping = tmp_path / "map.json"
    mapping.write_text(json.dumps({"7": "wm", "41": "gm"}))
    out = tmp_path / "cli"
    r = _cli("synth", str(out), "--from-labels", str(maps), "--cases", "1", "--layout", "nnunet",
             "--label-mapping", str(mapping), "--seed", "5")
    assert r.returncode == 0, r.stderr
    assert [c.case_id for c in discover_cases(out)] == ["head-syn0"]
    assert (out / "params" / "head-syn0-params.json").is_file()


@pytest.mark.parametrize("extra", [["--site", "site-a"], ["--spacing", "2"], ["--visits", "2"],
                                   ["--inject", "."]])
def test_cli_refuses_mixing(maps: Path, tmp_path: Path, extra: list[str]) -> None:
    from typer.testing import CliRunner

    from menseg.cli import app

    r = CliRunner().invoke(app, ["synth", str(tmp_path / "no"), "--from-labels", str(maps), *extra])
    assert isinstance(r.exception, MensegError)
    assert "cannot be used with --from-labels" in str(r.exception)
    assert not (tmp_path / "no").exists()
