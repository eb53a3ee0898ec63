"""``menseg.infer.predict``: labels written in the input's own space, safe outputs."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from menseg.checkpoint import save_checkpoint
from menseg.config import Config, from_dict, to_dict
from menseg.data.phantom import make_phantom_case
from menseg.errors import MensegError
from menseg.infer import predict as predict_module
from menseg.infer.predict import predict
from menseg.nets import build_network

MODS = ("t1c", "t1n", "t2f", "t2w")
TINY = {  # a model trained without sequence dropout: it needs all four sequences
    "seqdrop": {"enabled": False},
    "model": {"filters": [4, 8, 16], "deep_supr_num": 1},
    "train": {"patch_size": [16, 16, 16]},
    "infer": {"overlap": 0.25, "min_component_mm3": 0.0},
}


def _config(**extra: dict) -> Config:
    d = {k: dict(v) for k, v in TINY.items()}
    for k, v in extra.items():
        d.setdefault(k, {}).update(v)
    return from_dict(Config, d)


def _write_case(root: Path, case_id: str, image: np.ndarray, affine: np.ndarray,
                label: np.ndarray | None = None) -> Path:
    folder = root / case_id
    folder.mkdir(parents=True)
    for c, m in enumerate(MODS):
        nib.save(nib.Nifti1Image(image[c], affine), str(folder / f"{case_id}-{m}.nii.gz"))
    if label is not None:
        nib.save(nib.Nifti1Image(label, affine), str(folder / f"{case_id}-seg.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight model saved with the real save_checkpoint."""
    cfg = _config()
    torch.manual_seed(0)
    net = build_network(cfg.model, patch_size=cfg.train.patch_size)
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    save_checkpoint(path, {"model": net.state_dict(), "config": to_dict(cfg), "step": 0})
    return path


def _flip_xy(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Same physical image stored L-P-S instead of R-A-S."""
    n = image.shape[1:]
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:3, 3] = [n[0] - 1, n[1] - 1, 0]
    return np.ascontiguousarray(image[:, ::-1, ::-1, :]), affine @ flip


def _permute(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Same physical image with voxel axes stored in (z, x, y) order."""
    perm = np.zeros((4, 4))
    perm[0, 1] = perm[1, 2] = perm[2, 0] = perm[3, 3] = 1.0  # new (k, i, j) -> old (i, j, k)
    return np.ascontiguousarray(np.transpose(image, (0, 3, 1, 2))), affine @ perm


def _geometry_case(kind: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    if kind == "ras_1mm":
        image, _, affine = make_phantom_case((24, 26, 20), (1.0, 1.0, 1.0), rng)
    elif kind == "lps":
        image, _, affine = make_phantom_case((24, 26, 20), (1.0, 1.0, 1.0), rng)
        image, affine = _flip_xy(image, affine)
    elif kind == "anisotropic_permuted":
        image, _, affine = make_phantom_case((22, 18, 14), (0.8, 1.3, 2.0), rng)
        image, affine = _permute(image, affine)
    elif kind == "0.9x0.9x3mm":
        image, _, affine = make_phantom_case((30, 28, 10), (0.9, 0.9, 3.0), rng)
    else:  # pragma: no cover
        raise AssertionError(kind)
    return image, affine


@pytest.mark.parametrize("kind", ["ras_1mm", "lps", "anisotropic_permuted", "0.9x0.9x3mm"])
def test_output_in_input_space(kind: str, checkpoint: Path, tmp_path: Path) -> None:
    image, affine = _geometry_case(kind)
    folder = _write_case(tmp_path / "in", "CASE1", image, affine)
    written = predict(checkpoint, folder, tmp_path / "out", device="cpu", progress=False)
    assert written == [tmp_path / "out" / "CASE1.nii.gz"]
    ref = nib.load(str(folder / "CASE1-t1c.nii.gz"))
    out = nib.load(str(written[0]))
    assert out.shape == ref.shape == image.shape[1:]
    np.testing.assert_allclose(out.affine, ref.affine, atol=1e-5)
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(ref.affine)
    np.testing.assert_allclose(out.header.get_zooms(), ref.header.get_zooms(), atol=1e-5)
    assert out.get_data_dtype() == np.uint8
    data = np.asanyarray(out.dataobj)
    assert set(np.unique(data)) <= {0, 1, 2, 3}
    # nothing predicted outside the brain's bounding box (the crop)
    nz = np.nonzero((image != 0).any(axis=0))
    outside = np.ones(data.shape, bool)
    outside[tuple(slice(ix.min(), ix.max() + 1) for ix in nz)] = False
    assert not data[outside].any()


class BrightIsTumour(nn.Module):
    """Pointwise stand-in network: all three regions where the z-scored t1c exceeds 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (20.0 * (x[:, :1] - 2.0)).expand(-1, 3, -1, -1, -1)


def _bright_case(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Ellipsoid 'brain' of intensity ~100 with an off-centre bright block (t1c 1000)."""
    rng = np.random.default_rng(1)
    idx = np.indices(shape).astype(float)
    centre = (np.asarray(shape) - 1) / 2
    half = (0.45 * np.asarray(shape))[:, None, None, None]
    r = np.sqrt((((idx - centre[:, None, None, None]) / half) ** 2).sum(0))
    brain = r < 1.0
    image = np.where(brain, 100.0 + rng.normal(0, 1, (4, *shape)), 0.0).astype(np.float32)
    tumour = np.zeros(shape, bool)
    x0, y0, z0 = (int(s * 0.25) for s in shape)
    tumour[x0 : x0 + shape[0] // 4, y0 : y0 + shape[1] // 3, z0 : z0 + max(2, shape[2] // 3)] = True
    tumour &= brain
    image[0][tumour] = 1000.0
    return image, tumour


@pytest.mark.parametrize("kind", ["ras_1mm", "lps", "anisotropic_permuted", "0.9x0.9x3mm"])
def test_prediction_lands_on_the_right_voxels(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a network that marks bright t1c voxels, the written label must coincide with the
    bright block in the input's own voxel grid (catches flips, permutations, shifts)."""
    spacing = {"0.9x0.9x3mm": (0.9, 0.9, 3.0), "anisotropic_permuted": (0.8, 1.3, 2.0)}.get(
        kind, (1.0, 1.0, 1.0)
    )
    shape = {"0.9x0.9x3mm": (36, 32, 12), "anisotropic_permuted": (30, 22, 14)}.get(kind, (28, 24, 20))
    image, tumour = _bright_case(shape)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 2.0]
    if kind == "lps":
        image, affine = _flip_xy(image, affine)
        tumour = tumour[::-1, ::-1, :]
    elif kind == "anisotropic_permuted":
        image, affine = _permute(image, affine)
        tumour = np.transpose(tumour, (2, 0, 1))
    folder = _write_case(tmp_path / "in", "BRIGHT", image, affine)
    cfg = _config()
    monkeypatch.setattr(predict_module, "load_model_and_state",
                        lambda path, device: (BrightIsTumour(), cfg, {}))
    (out_path,) = predict(tmp_path / "unused.pt", folder, tmp_path / "pred.nii.gz",
                          device="cpu", progress=False)
    pred = np.asanyarray(nib.load(str(out_path)).dataobj)
    assert pred.shape == tumour.shape
    assert set(np.unique(pred)) == {0, 3}
    if kind in ("ras_1mm", "lps"):  # no resampling: voxel-exact
        np.testing.assert_array_equal(pred == 3, tumour)
    else:
        inter = np.logical_and(pred == 3, tumour).sum()
        dice = 2 * inter / ((pred == 3).sum() + tumour.sum())
        assert dice > 0.85, dice


def test_four_files_dataset_folder_and_mirror(checkpoint: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cid in ("B", "A"):
        image, label, affine = make_phantom_case((20, 20, 16), (1.0, 1.0, 1.0), rng)
        _write_case(tmp_path / "data", cid, image, affine, label)
    written = predict(checkpoint, tmp_path / "data", tmp_path / "out", device="cpu",
                      mirror=True, progress=False)
    assert [p.name for p in written] == ["A.nii.gz", "B.nii.gz"]
    files = [tmp_path / "data" / "A" / f"A-{m}.nii.gz" for m in MODS]
    (single,) = predict(checkpoint, files, tmp_path / "single" / "a_pred.nii.gz",
                        device="cpu", progress=False)
    assert single == tmp_path / "single" / "a_pred.nii.gz"
    assert nib.load(str(single)).shape == (20, 20, 16)


def test_refuses_to_overwrite(checkpoint: Path, tmp_path: Path) -> None:
    image, label, affine = make_phantom_case((16, 16, 16), (1.0, 1.0, 1.0), np.random.default_rng(0))
    folder = _write_case(tmp_path / "in", "C", image, affine, label)
    t1c = folder / "C-t1c.nii.gz"
    before = t1c.read_bytes()
    with pytest.raises(MensegError, match="refusing to write onto input file"):
        predict(checkpoint, folder, t1c, device="cpu", overwrite=True, progress=False)
    assert t1c.read_bytes() == before
    with pytest.raises(MensegError, match="refusing to write onto input file"):
        predict(checkpoint, folder, folder / "C-seg.nii.gz", device="cpu", overwrite=True,
                progress=False)
    with pytest.raises(MensegError, match="must be a folder"):
        predict(checkpoint, folder, checkpoint, device="cpu", overwrite=True, progress=False)

    out = tmp_path / "out"
    (first,) = predict(checkpoint, folder, out, device="cpu", progress=False)
    stamp = first.stat().st_mtime_ns
    assert predict(checkpoint, folder, out, device="cpu", progress=False) == []  # already written: skipped
    assert first.stat().st_mtime_ns == stamp
    predict(checkpoint, folder, out, device="cpu", overwrite=True, progress=False)
    assert first.stat().st_mtime_ns != stamp
    assert nib.load(str(first)).shape == (16, 16, 16)
    assert sorted(p.name for p in out.iterdir()) == ["C.json", "C.nii.gz"], "no temp files left behind"
    assert t1c.read_bytes() == before


def test_existing_outputs_are_kept_and_bad_outputs_refused(checkpoint: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for cid in ("A", "B"):
        image, _, affine = make_phantom_case((16, 16, 16), (1.0, 1.0, 1.0), rng)
        _write_case(tmp_path / "data", cid, image, affine)
    out = tmp_path / "out"
    out.mkdir()
    (out / "B.nii.gz").write_bytes(b"keep me")
    written = predict(checkpoint, tmp_path / "data", out, device="cpu", progress=False)
    assert written == [out / "A.nii.gz"]  # B exists: kept as it is, not predicted again
    assert (out / "B.nii.gz").read_bytes() == b"keep me"
    with pytest.raises(MensegError, match="single file but the input holds 2 cases"):
        predict(checkpoint, tmp_path / "data", tmp_path / "one.nii.gz", device="cpu", progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(MensegError, match="CUDA is not available"):
        predict(checkpoint, tmp_path, tmp_path / "out", device="cuda", progress=False)


def test_bad_checkpoint_is_a_user_error(tmp_path: Path) -> None:
    image, _, affine = make_phantom_case((16, 16, 16), (1.0, 1.0, 1.0), np.random.default_rng(0))
    folder = _write_case(tmp_path / "in", "D", image, affine)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(MensegError, match="bad.pt"):
        predict(bad, folder, tmp_path / "out", device="cpu", progress=False)
    assert not (tmp_path / "out").exists()


def _archive(root: Path) -> None:
    """Five case folders: A and C good; B's sequences disagree in shape, D's t1c is not a NIfTI file,
    E holds files of two cases."""
    rng = np.random.default_rng(1)
    for cid in ("A", "B", "C", "D"):
        image, _, affine = make_phantom_case((16, 16, 16), (1.0, 1.0, 1.0), rng)
        _write_case(root, cid, image, affine)
    nib.save(nib.Nifti1Image(np.zeros((12, 16, 16), np.float32), np.eye(4)), str(root / "B" / "B-t2w.nii.gz"))
    (root / "D" / "D-t1c.nii.gz").write_bytes(b"not a nifti file")
    (root / "E").mkdir()
    for cid in ("E", "F"):
        (root / "E" / f"{cid}-t1c.nii.gz").write_bytes((root / "A" / "A-t1c.nii.gz").read_bytes())


def test_an_archive_with_bad_cases(checkpoint: Path, tmp_path: Path) -> None:
    import csv

    data = tmp_path / "data"
    _archive(data)
    # without --keep-going: discovery refuses the folder of two cases before anything is written
    with pytest.raises(MensegError, match="two files for .t1c."):
        predict(checkpoint, data, tmp_path / "strict", device="cpu", progress=False)
    assert not (tmp_path / "strict").exists()
    import shutil

    shutil.rmtree(data / "E")
    # the first bad case (B) stops the run, after A was written
    with pytest.raises(MensegError, match="B-t2w"):
        predict(checkpoint, data, tmp_path / "strict", device="cpu", progress=False)
    assert sorted(p.name for p in (tmp_path / "strict").glob("*.nii.gz")) == ["A.nii.gz"]
    _archive_e = data / "E"
    _archive_e.mkdir()
    for cid in ("E", "F"):
        (_archive_e / f"{cid}-t1c.nii.gz").write_bytes((data / "A" / "A-t1c.nii.gz").read_bytes())
    out = tmp_path / "out"
    with pytest.raises(MensegError, match=r"3 of 5 case\(s\) failed \(see .*errors.csv\)"):
        predict(checkpoint, data, out, device="cpu", progress=False, keep_going=True)
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["A.nii.gz", "C.nii.gz"]
    rows = list(csv.DictReader(open(out / "errors.csv")))
    assert [r["case_id"] for r in rows] == ["E", "B", "D"]  # discovery first, then in case order
    assert all("\n" not in r["error"] and r["error"] for r in rows)
    assert "two files for" in rows[0]["error"] and "B-t2w" in rows[1]["error"]
    # a rerun skips what was written and reports the same failures
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    with pytest.raises(MensegError, match="3 of 5"):
        predict(checkpoint, data, out, device="cpu", progress=False, keep_going=True)
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_keep_going_through_the_cli(checkpoint: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    data = tmp_path / "data"
    _archive(data)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "menseg", "predict", str(checkpoint), str(data), str(out),
                        "--device", "cpu", "--keep-going"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2  # non-zero: some cases failed (menseg's exit code for a user error)
    assert "predicted 2 case(s), 3 failed, 0 skipped because already written" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: 3 of 5 case(s) failed")
    (out / "C.nii.gz").unlink()
    r = subprocess.run([sys.executable, "-m", "menseg", "predict", str(checkpoint), str(data), str(out),
                        "--device", "cpu", "--keep-going"], capture_output=True, text=True, timeout=300)
    assert "predicted 1 case(s), 3 failed, 1 skipped because already written" in r.stderr


def test_sidecar_says_what_the_label_was_predicted_from(checkpoint: Path, tmp_path: Path) -> None:
    import json

    from menseg import __version__
    from menseg.infer.predict import sidecar_path

    image, _, affine = make_phantom_case((16, 16, 16), (1.0, 1.0, 1.0), np.random.default_rng(0))
    folder = _write_case(tmp_path / "in", "S", image, affine)
    (label,) = predict(checkpoint, folder, tmp_path / "one.nii.gz", device="cpu", progress=False)
    side = json.loads(sidecar_path(label).read_text())
    assert sidecar_path(label) == tmp_path / "one.json"
    assert side == {"model": str(checkpoint), "sequences_used": list(MODS), "sequences_missing": [],
                    "sequences_ignored": [], "postprocess": {"fixed": {"min_component_mm3": 0.0}},
                    "menseg_version": __version__}
    with pytest.raises(MensegError, match="lacks t1n, t2w; this model needs all four sequences"):
        predict(checkpoint, folder, tmp_path / "two.nii.gz", device="cpu", progress=False,
                sequences=["t1c", "t2f"])
    with pytest.raises(MensegError, match="--sequences takes names among t1c, t1n, t2f, t2w, got 't1,flair'"):
        predict(checkpoint, folder, tmp_path / "two.nii.gz", device="cpu", progress=False,
                sequences=["t1", "flair"])
    assert not (tmp_path / "two.nii.gz").exists()
