"""Preprocessing: RAS reorientation, crop, resampling, z-score, and its exact inverse."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from menseg.data.layouts import discover_cases
from menseg.data.preprocess import invert, load_case, preprocess
from menseg.data.validate import check_dataset
from nifti_factory import blob_case, ras_affine, to_lps
from shared_data import REAL_UNLABELED, needs_real_unlabeled


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _padded_case(shape=(24, 22, 20), seed=0):
    """Blob case with an empty margin so the crop is a real crop."""
    image, label = blob_case(shape, np.random.default_rng(seed))
    return image, label


@pytest.mark.parametrize("lps", [False, True])
def test_invert_label_exact_when_spacing_matches(lps):
    image, label = _padded_case()
    affine = ras_affine()
    if lps:
        image, affine = to_lps(image, affine)
        label, _ = to_lps(label, ras_affine())
    img_pp, lab_pp, props = preprocess(image, label, affine, (1.0, 1.0, 1.0))
    assert not props["resampled"]
    assert props["original_orientation"] == ("LPS" if lps else "RAS")
    assert img_pp.shape[1:] == lab_pp.shape == tuple(props["shape"])
    assert tuple(props["shape"]) < image.shape[1:]  # cropped
    back = invert(lab_pp, props, order=0)
    assert back.dtype == lab_pp.dtype
    np.testing.assert_array_equal(back, label)
    back_c = invert(lab_pp[None], props, order=0)
    assert back_c.shape == (1, *label.shape)
    probs = invert(np.stack([lab_pp == 3, lab_pp > 0]).astype(np.float32), props, order=1)
    assert probs.shape == (2, *label.shape) and probs.dtype == np.float32
    np.testing.assert_array_equal(probs[0] > 0.5, label == 3)


def test_lps_and_ras_give_same_preprocessed_arrays():
    image, label = _padded_case()
    for spacing, aff in (((1.0, 1.0, 1.0), ras_affine()),
                         ((1.0, 1.0, 1.0), ras_affine((0.9, 0.9, 3.0)))):
        a, la, pa = preprocess(image, label, aff, spacing)
        img_l, aff_l = to_lps(image, aff)
        lab_l, _ = to_lps(label, aff)
        b, lb, pb = preprocess(img_l, lab_l, aff_l, spacing)
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-5)
        np.testing.assert_array_equal(la, lb)
        np.testing.assert_allclose(pa["affine"], pb["affine"], atol=1e-9)


def test_permuted_axes_roundtrip():
    image, label = _padded_case((20, 16, 12))
    perm = np.zeros((4, 4))
    perm[0, 1] = perm[1, 2] = perm[2, 0] = perm[3, 3] = 1  # voxel axes (z, x, y) -> "SRA"
    aff = ras_affine() @ perm
    img_t, lab_t = image.transpose(0, 3, 1, 2), label.transpose(2, 0, 1)
    a, la, props = preprocess(img_t, lab_t, aff)
    a0, la0, _ = preprocess(image, label, ras_affine())
    assert props["original_orientation"] == "SRA"
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(invert(la, props, 0), lab_t)


@pytest.mark.parametrize("lps", [False, True])
def test_anisotropic_resampling_inverts_to_original_grid(lps):
    shape, sp = (40, 40, 14), (0.9, 0.9, 3.0)
    image, label = blob_case(shape, np.random.default_rng(3), spacing=sp)
    affine = ras_affine(sp)
    if lps:
        image, affine = to_lps(image, affine)
        label, _ = to_lps(label, ras_affine(sp))
    img_pp, lab_pp, props = preprocess(image, label, affine, (1.0, 1.0, 1.0))
    assert props["resampled"]
    np.testing.assert_allclose(props["spacing"], 1.0, atol=0.05)
    crop = np.asarray(props["cropped_shape"])
    np.testing.assert_array_equal(props["shape"], np.round(crop * np.asarray(sp)).astype(int))
    back = invert(lab_pp, props, order=0)
    assert back.shape == label.shape
    for k in (1, 2, 3):
        assert _dice(back == k, label == k) > 0.8, k
    assert _dice(back > 0, label > 0) > 0.9
    probs = invert((lab_pp > 0)[None].astype(np.float32), props, order=1)
    assert probs.shape == (1, *shape)
    assert _dice(probs[0] > 0.5, label > 0) > 0.9


def test_zscore_inside_brain_and_zero_background():
    image, label = _padded_case()
    inside = image[2] != 0
    image[2][inside] = image[2][inside] * 7.0 + 1000.0
    img_pp, _, props = preprocess(image, None, ras_affine())
    brain = (img_pp != 0).any(0)
    for c in range(4):
        v = img_pp[c][brain]
        assert abs(v.mean()) < 1e-4 and abs(v.std() - 1.0) < 1e-3
    assert props["norm"]["t2f"]["mean"] > 1000.0
    assert img_pp.dtype == np.float32
    bg = ~(image != 0).any(0)
    assert bg.any()
    # background in the cropped box stays exactly zero
    sl = tuple(slice(lo, hi) for lo, hi in props["crop_bbox"])
    np.testing.assert_array_equal(img_pp[:, bg[sl]], 0.0)


def test_crop_is_union_over_modalities():
    image, _ = _padded_case((24, 22, 20))
    image[3, 0, 0, 0] = 5.0  # only t2w is non-zero in the corner
    _, _, props = preprocess(image, None, ras_affine())
    assert props["crop_bbox"][0][0] == 0 and props["crop_bbox"][1][0] == 0


def test_props_json_roundtrip_and_shape_check():
    image, label = _padded_case()
    _, lab_pp, props = preprocess(image, label, ras_affine((1.2, 1.0, 1.5)) @ np.diag([-1, 1, 1, 1]))
    loaded = json.loads(json.dumps(props))
    np.testing.assert_array_equal(invert(lab_pp, loaded, 0), invert(lab_pp, props, 0))
    with pytest.raises(ValueError, match="does not match"):
        invert(lab_pp[:-1], props, 0)


def test_full_size_case_is_fast():
    rng = np.random.default_rng(0)
    image = np.zeros((4, 240, 240, 155), np.float32)
    image[:, 40:200, 30:210, 10:150] = rng.random((4, 160, 180, 140), dtype=np.float32) + 0.1
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    t0 = time.perf_counter()
    img_pp, _, props = preprocess(image, None, affine, (1.0, 1.0, 1.0))
    dt = time.perf_counter() - t0
    assert img_pp.shape == (4, 160, 180, 140)
    assert dt < 8.0, f"preprocessing a 240x240x155 case took {dt:.1f} s"


@needs_real_unlabeled
def test_real_unlabelled_cases():
    reports = check_dataset(REAL_UNLABELED, progress=False)
    assert len(reports) >= 3
    by_id = {r.case_id: r for r in reports}
    assert all(r.shape == (240, 240, 155) and r.label_volumes is None for r in reports)
    assert {r.orientation for r in reports} >= {"LPS", "RAS"}
    lps_id = next(r.case_id for r in reports if r.orientation == "LPS")
    assert by_id[lps_id].dtype == "int16"
    case = next(c for c in discover_cases(REAL_UNLABELED) if c.case_id == lps_id)
    image, label, affine = load_case(case)
    assert label is None and image.shape == (4, 240, 240, 155)
    t0 = time.perf_counter()
    img_pp, _, props = preprocess(image, None, affine, (1.0, 1.0, 1.0))
    dt = time.perf_counter() - t0
    assert dt < 8.0, f"preprocessing took {dt:.1f} s"
    assert np.isfinite(img_pp).all()
    brain_pp = (img_pp != 0).any(0).astype(np.uint8)
    brain = (image != 0).any(0)
    np.testing.assert_array_equal(invert(brain_pp, props, 0).astype(bool), brain)


def test_a_constant_background_is_outside_the_brain(caplog):
    """Scans that were already z-scored have a constant such as -4.8 outside the head: the crop, the
    z-score and the result must be those of the same scans with 0 there, and the log says so."""
    image, label = _padded_case()
    outside = ~(image != 0).any(0)
    shifted = image.copy()
    for c in range(4):  # z-scored inside, a constant outside (another constant per sequence)
        inside = shifted[c][~outside]
        shifted[c][~outside] = (inside - inside.mean()) / inside.std()
        shifted[c][outside] = -4.8 - 0.1 * c
    plain = shifted.copy()
    plain[:, outside] = 0.0
    with caplog.at_level("INFO", logger="menseg.data.preprocess"):
        a, la, pa = preprocess(shifted, label, ras_affine(), name="ZS-1")
    b, lb, pb = preprocess(plain, label, ras_affine())
    assert pa["crop_bbox"] == pb["crop_bbox"] != [[0, n] for n in image.shape[1:]]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert pa["background"] == {"t1c": pytest.approx(-4.8), "t1n": pytest.approx(-4.9),
                                "t2f": pytest.approx(-5.0), "t2w": pytest.approx(-5.1)}
    assert "background" not in pb
    assert "ZS-1: constant background outside the head" in caplog.text
    assert (shifted[:, outside] < -4).all()  # the caller's array is untouched


def test_a_scan_that_is_not_skull_stripped_gets_a_one_line_warning(caplog):
    image, _ = _padded_case((24, 22, 20))
    with caplog.at_level("WARNING", logger="menseg.data.preprocess"):
        preprocess(image, None, ras_affine(), name="STRIPPED")
    assert "skull-stripped" not in caplog.text  # a brain inside its volume: no warning
    head = image + np.random.default_rng(0).rayleigh(3.0, image.shape).astype(np.float32)  # air noise
    with caplog.at_level("WARNING", logger="menseg.data.preprocess"):
        preprocess(head, None, ras_affine(), name="HEAD-1")
    lines = [r.getMessage() for r in caplog.records if "HEAD-1" in r.getMessage()]
    assert len(lines) == 1 and "expect skull-stripped, co-registered sequences" in lines[0]
    assert "covers 100% of the volume's border" in lines[0]
    big = np.zeros((4, 40, 40, 40), np.float32)
    big[:, 2:-2, 2:-2, 2:-2] = 1.0  # 36^3 voxels of 5 mm: a head-sized foreground (5.8 l)
    with caplog.at_level("WARNING", logger="menseg.data.preprocess"):
        preprocess(big, None, np.diag([5.0, 5.0, 5.0, 1.0]), spacing=(5.0, 5.0, 5.0), name="HEAD-2")
    assert any("HEAD-2: its foreground is head-sized (5832 cm3)" in r.getMessage() for r in caplog.records)


@needs_real_unlabeled
def test_real_skull_stripped_scans_raise_no_warning(caplog):
    for case in discover_cases(REAL_UNLABELED, allow_missing=True):
        image, _, affine = load_case(case)
        with caplog.at_level("INFO", logger="menseg.data.preprocess"):
            preprocess(image, None, affine, spacing=(2.0, 2.0, 2.0), name=case.case_id)
    assert "skull-stripped" not in caplog.text and "constant background" not in caplog.text
