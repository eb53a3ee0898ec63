"""Cases with missing MRI sequences: discovery with allow_missing, zero channels, preprocessing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from menseg.constants import MODALITIES
from menseg.data.layouts import (
    CaseFiles,
    case_from_files,
    discover_cases,
    discover_inputs,
    discover_series,
)
from menseg.data.preprocess import load_case, preprocess, preprocess_case, present_mask
from menseg.errors import MensegError
from nifti_factory import blob_case, ras_affine, save, write_brats_case, write_nnunet_case


def _drop(folder: Path, case_id: str, *mods: str) -> None:
    for m in mods:
        (folder / f"{case_id}-{m}.nii.gz").unlink()


@pytest.fixture
def partial(tmp_path: Path) -> Path:
    """BraTS dataset: a full case, a case without t2f/t2w, a case without t1c/t2w (unlabelled)."""
    root = tmp_path / "brats"
    write_brats_case(root, "CASE-FULL", seed=1)
    _drop(write_brats_case(root, "CASE-TWO", seed=2), "CASE-TWO", "t2f", "t2w")
    _drop(write_brats_case(root, "CASE-NOT1C", seed=3, labelled=False), "CASE-NOT1C", "t1c", "t2w")
    return root


# ---------------------------------------------------------------- CaseFiles


def test_casefiles_present_reference_files(tmp_path: Path):
    full = CaseFiles("a", {m: tmp_path / f"a-{m}.nii.gz" for m in MODALITIES}, tmp_path / "a-seg.nii.gz")
    assert full.present == MODALITIES and full.missing == () and full.complete
    assert full.reference == tmp_path / "a-t1c.nii.gz"
    assert full.files == [full.images[m] for m in MODALITIES] + [full.label]
    # keys given out of order: present is still MODALITIES order
    sub = CaseFiles("b", {"t2w": tmp_path / "b-t2w.nii.gz", "t1n": tmp_path / "b-t1n.nii.gz"})
    assert sub.present == ("t1n", "t2w") and sub.missing == ("t1c", "t2f") and not sub.complete
    assert sub.reference == tmp_path / "b-t1n.nii.gz"
    assert sub.files == [tmp_path / "b-t1n.nii.gz", tmp_path / "b-t2w.nii.gz"]
    with pytest.raises(MensegError, match="no image"):
        _ = CaseFiles("c", {}).reference


# ---------------------------------------------------------------- discovery


def test_brats_without_allow_missing_unchanged(partial: Path):
    with pytest.raises(MensegError, match="missing modality t1c") as ei:
        discover_cases(partial)  # CASE-NOT1C is the first folder lacking something
    assert "CASE-NOT1C-t1c.nii.gz" in str(ei.value)
    with pytest.raises(MensegError, match="missing modality"):
        discover_inputs(partial)
    with pytest.raises(MensegError, match="missing modality t2f"):
        discover_inputs(partial / "CASE-TWO")


def test_brats_allow_missing(partial: Path):
    cases = {c.case_id: c for c in discover_cases(partial, allow_missing=True)}
    assert sorted(cases) == ["CASE-FULL", "CASE-NOT1C", "CASE-TWO"]
    assert cases["CASE-FULL"].present == MODALITIES
    two = cases["CASE-TWO"]
    assert two.present == ("t1c", "t1n") and set(two.images) == {"t1c", "t1n"}
    assert two.reference.name == "CASE-TWO-t1c.nii.gz"
    assert [p.name for p in two.files] == [
        "CASE-TWO-t1c.nii.gz", "CASE-TWO-t1n.nii.gz", "CASE-TWO-seg.nii.gz"]
    not1c = cases["CASE-NOT1C"]
    assert not1c.present == ("t1n", "t2f") and not1c.label is None
    assert not1c.reference.name == "CASE-NOT1C-t1n.nii.gz"
    assert [c.case_id for c in discover_inputs(partial, allow_missing=True)] == sorted(cases)
    one = discover_inputs(partial / "CASE-TWO", allow_missing=True)
    assert len(one) == 1 and one[0] == two


def test_nnunet_allow_missing(tmp_path: Path):
    root = tmp_path / "Dataset001_MEN"
    write_nnunet_case(root, "c1")
    write_nnunet_case(root, "c2", labelled=False, images="imagesTs")
    (root / "imagesTr" / "c1_0000.nii.gz").unlink()
    (root / "imagesTr" / "c1_0002.nii.gz").unlink()
    with pytest.raises(MensegError, match="missing modality t1c") as ei:
        discover_cases(root)
    assert "c1_0000.nii.gz" in str(ei.value)
    c1, c2 = discover_cases(root, allow_missing=True)
    assert c1.case_id == "c1" and c1.present == ("t1n", "t2w")
    assert c1.reference.name == "c1_0001.nii.gz" and c1.label is not None
    assert c2.present == MODALITIES
    # a flat folder of nnU-Net channel files
    (root / "imagesTs" / "c2_0003.nii.gz").unlink()
    with pytest.raises(MensegError, match="missing modality t2w"):
        discover_inputs(root / "imagesTs")
    (flat,) = discover_inputs(root / "imagesTs", allow_missing=True)
    assert flat.present == ("t1c", "t1n", "t2f")


def test_listed_files_allow_missing(partial: Path, tmp_path: Path):
    folder = partial / "CASE-FULL"
    images = [folder / f"CASE-FULL-{m}.nii.gz" for m in MODALITIES]
    for k in range(1, 5):
        given = [str(p) for p in images[-k:]]
        (case,) = discover_inputs(given, allow_missing=True)
        assert case.case_id == "CASE-FULL" and case.present == MODALITIES[-k:]
    with pytest.raises(MensegError, match="missing modality t1c"):
        discover_inputs([str(p) for p in images[1:]])
    c = case_from_files([images[2], folder / "CASE-FULL-seg.nii.gz"], allow_missing=True)
    assert c.present == ("t2f",) and c.label is not None
    # nnU-Net channel names
    root = tmp_path / "nn"
    write_nnunet_case(root, "x1", labelled=False)
    c = case_from_files([root / "imagesTr" / "x1_0003.nii.gz"], allow_missing=True)
    assert c.case_id == "x1" and c.present == ("t2w",)


def test_longitudinal_allow_missing(tmp_path: Path):
    pat = tmp_path / "longi" / "PAT-1"
    write_brats_case(pat, "PAT-1-000", seed=0)
    _drop(write_brats_case(pat, "PAT-1-001", seed=1), "PAT-1-001", "t1n")
    (pat / "timepoints.json").write_text(json.dumps({"PAT-1-000": {"day": 0}, "PAT-1-001": {"day": 90}}))
    with pytest.raises(MensegError, match="missing modality t1n"):
        discover_series(tmp_path / "longi")
    series = discover_series(tmp_path / "longi", allow_missing=True)
    (v0, d0), (v1, d1) = series["PAT-1"]
    assert (d0, d1) == (0, 90) and v0.complete and v1.present == ("t1c", "t2f", "t2w")
    assert [c.present for c in discover_cases(tmp_path / "longi", allow_missing=True)] == [
        MODALITIES, ("t1c", "t2f", "t2w")]


def test_case_without_any_sequence_is_an_error(tmp_path: Path):
    # BraTS folder holding only a label
    root = tmp_path / "brats"
    write_brats_case(root, "OK", seed=0)
    _drop(write_brats_case(root, "EMPTY", seed=1), "EMPTY", *MODALITIES)
    for allow in (False, True):
        with pytest.raises(MensegError, match="missing modality|no image") as ei:
            discover_cases(root, allow_missing=allow)
        assert "EMPTY" in str(ei.value)
        with pytest.raises(MensegError, match="missing modality|no image"):
            discover_inputs(root / "EMPTY", allow_missing=allow)
    # only a label file given on the command line
    with pytest.raises(MensegError, match="no image file"):
        discover_inputs([str(root / "EMPTY" / "EMPTY-seg.nii.gz")], allow_missing=True)
    with pytest.raises(MensegError, match="no image files given"):
        case_from_files([], allow_missing=True)
    # nnU-Net: a label whose images are all gone
    nn = tmp_path / "nn"
    write_nnunet_case(nn, "c1")
    write_nnunet_case(nn, "c2")
    for c in range(4):
        (nn / "imagesTr" / f"c2_{c:04d}.nii.gz").unlink()
    with pytest.raises(MensegError, match="label of case 'c2' has no images"):
        discover_cases(nn, allow_missing=True)


# ---------------------------------------------------------------- reading


def test_load_case_zero_channels(partial: Path):
    cases = {c.case_id: c for c in discover_cases(partial, allow_missing=True)}
    two = cases["CASE-TWO"]
    image, label, affine = load_case(two)
    expected, expected_label = blob_case((16, 16, 12), np.random.default_rng(2))
    assert image.shape == (4, 16, 16, 12) and image.dtype == np.float32
    np.testing.assert_array_equal(image[:2], expected[:2])
    assert not image[2:].any()
    np.testing.assert_array_equal(label, expected_label)
    np.testing.assert_allclose(affine, ras_affine())
    assert present_mask(two) == [True, True, False, False]
    # grid of the first present sequence when t1c is absent
    image, label, _ = load_case(cases["CASE-NOT1C"])
    assert label is None and not image[0].any() and not image[3].any()
    assert image[1].any() and image[2].any()


def test_load_case_checks_geometry_across_present(partial: Path):
    folder = partial / "CASE-TWO"
    data = np.ones((16, 16, 12), np.float32)
    data[0] = 2.0
    save(folder / "CASE-TWO-t1n.nii.gz", data, ras_affine(origin=(0.0, 0.0, 0.0)))
    (two,) = discover_inputs(folder, allow_missing=True)
    with pytest.raises(MensegError, match="t1n affine differs from t1c"):
        load_case(two)
    save(folder / "CASE-TWO-t1n.nii.gz", data[:8], ras_affine())
    with pytest.raises(MensegError, match="t1n shape"):
        load_case(two)


# ---------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.5, 1.5, 2.0)])
@pytest.mark.parametrize("keep", [(True, True, False, False), (False, True, False, True),
                                  (False, False, True, False)])
def test_preprocess_partial_equals_full_in_present_channels(spacing, keep):
    image, label = blob_case((24, 22, 20), np.random.default_rng(5))
    full_pp, full_lab, full_props = preprocess(image, label, ras_affine(), spacing)
    part = image.copy()
    part[~np.asarray(keep)] = 0.0
    pp, lab, props = preprocess(part, label, ras_affine(), spacing, present=keep)
    assert np.isfinite(pp).all()
    assert props["crop_bbox"] == full_props["crop_bbox"] and props["shape"] == full_props["shape"]
    idx = np.flatnonzero(keep)
    np.testing.assert_allclose(pp[idx], full_pp[idx], rtol=1e-5, atol=1e-5)
    assert (pp[~np.asarray(keep)] == 0.0).all()
    np.testing.assert_array_equal(lab, full_lab)
    names = [m for m, k in zip(MODALITIES, keep, strict=True) if k]
    assert props["present"] == names and sorted(props["norm"]) == sorted(names)
    assert full_props["present"] == list(MODALITIES)
    for m in names:
        assert props["norm"][m] == pytest.approx(full_props["norm"][m])


def test_preprocess_absent_channel_ignored_for_mask_and_zeroed():
    image, _ = blob_case((24, 22, 20), np.random.default_rng(6))
    keep = (True, False, True, True)
    ref, _, ref_props = preprocess(image, None, ras_affine(), present=keep)
    junk = image.copy()
    junk[1] = 7.0  # an "absent" channel full of junk: must not widen the crop or leak through
    pp, _, props = preprocess(junk, None, ras_affine(), present=keep)
    assert props["crop_bbox"] == ref_props["crop_bbox"]
    np.testing.assert_array_equal(pp, ref)
    assert (pp[1] == 0.0).all() and np.isfinite(pp).all()
    # absent channel all zero without a present mask: still no NaN
    zero = image.copy()
    zero[1] = 0.0
    pp2, _, _ = preprocess(zero, None, ras_affine())
    assert np.isfinite(pp2).all() and (pp2[1] == 0.0).all()


def test_preprocess_present_errors():
    image, _ = blob_case((12, 12, 10))
    with pytest.raises(MensegError, match="no sequence present"):
        preprocess(image, None, ras_affine(), present=[False] * 4)
    with pytest.raises(ValueError, match="present has 3 entries"):
        preprocess(image, None, ras_affine(), present=[True] * 3)
    only = image.copy()
    only[1:] = 0.0
    only[0] = 0.0
    with pytest.raises(MensegError, match="zero everywhere"):
        preprocess(only, None, ras_affine(), present=[True, False, False, False])


def test_preprocess_case_partial_matches_full(partial: Path, tmp_path: Path):
    # same voxels as CASE-FULL, with t2f/t2w removed
    src = partial / "CASE-FULL"
    dst = tmp_path / "CASE-FULL"
    dst.mkdir()
    for m in ("t1c", "t1n"):
        (dst / f"CASE-FULL-{m}.nii.gz").write_bytes((src / f"CASE-FULL-{m}.nii.gz").read_bytes())
    (full,) = discover_inputs(src)
    (part,) = discover_inputs(dst, allow_missing=True)
    full_pp, full_lab, full_props = preprocess_case(full)
    pp, lab, props = preprocess_case(part)
    assert lab is None and full_lab is not None
    assert props["present"] == ["t1c", "t1n"] and props["files"] == [str(p) for p in part.files]
    assert props["crop_bbox"] == full_props["crop_bbox"]
    np.testing.assert_allclose(pp[:2], full_pp[:2], rtol=1e-5, atol=1e-5)
    assert not pp[2:].any() and np.isfinite(pp).all()


# ---------------------------------------------------------------- menseg data check


def test_data_check_lists_incomplete_cases_and_refuses_only_unusable_ones(partial: Path, tmp_path: Path):
    import subprocess
    import sys

    from menseg.data.validate import check_dataset

    reports = {r.case_id: r for r in check_dataset(partial, progress=False)}
    assert reports["CASE-FULL"].sequences == MODALITIES and reports["CASE-FULL"].missing == ()
    assert reports["CASE-TWO"].sequences == ("t1c", "t1n") and reports["CASE-TWO"].labelled
    assert reports["CASE-NOT1C"].missing == ("t1c", "t2w") and not reports["CASE-NOT1C"].labelled
    assert reports["CASE-NOT1C"].spacing == reports["CASE-FULL"].spacing
    r = subprocess.run([sys.executable, "-m", "menseg", "data", "check", str(partial)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "3 case(s), all valid; 2 incomplete" in r.stdout
    assert "t1c t1n (no t2f, t2w)" in r.stdout and "t1n t2f (no t1c, t2w)" in r.stdout
    # a label without any image is what no model can use: refused, naming the case
    only_label = partial / "CASE-LABEL"
    only_label.mkdir()
    seg = (partial / "CASE-FULL" / "CASE-FULL-seg.nii.gz").read_bytes()
    (only_label / "CASE-LABEL-seg.nii.gz").write_bytes(seg)
    r = subprocess.run([sys.executable, "-m", "menseg", "data", "check", str(partial)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "case 'CASE-LABEL' has no image file" in r.stderr
