"""Case/dataset validation: reports and one-line errors naming the bad file."""

from __future__ import annotations

import json

import numpy as np
import pytest

from menseg.data.layouts import discover_cases
from menseg.data.validate import check_case, check_dataset, read_case
from menseg.errors import MensegError
from nifti_factory import blob_case, ras_affine, save, to_lps, truncate, write_brats_case

CID = "BraTS-MEN-00001-000"


@pytest.fixture
def ds(tmp_path):
    root = tmp_path / "ds"
    write_brats_case(root, CID, shape=(16, 16, 12), affine=ras_affine((1.0, 1.0, 2.0)))
    return root


def _file(root, key):
    return root / CID / f"{CID}-{key}.nii.gz"


def test_report_fields(ds):
    (rep,) = check_dataset(ds, progress=False)
    assert rep.case_id == CID
    assert rep.shape == (16, 16, 12)
    assert rep.spacing == pytest.approx((1.0, 1.0, 2.0))
    assert rep.orientation == "RAS"
    assert rep.dtype == "float32"
    _, label = blob_case((16, 16, 12), np.random.default_rng(0))
    for k in (1, 2, 3):
        assert rep.label_volumes[k] == pytest.approx(2.0 * np.count_nonzero(label == k))
    assert rep.labelled and rep.label_volumes_mm3 == rep.label_volumes
    json.dumps(rep.as_dict())


def test_report_lps_int16_unlabelled(tmp_path):
    image, _ = blob_case((12, 10, 8))
    img_l, aff_l = to_lps(image, ras_affine())
    d = tmp_path / "ds" / "C"
    for c, m in enumerate(("t1c", "t1n", "t2f", "t2w")):
        save(d / f"C-{m}.nii.gz", img_l[c].astype(np.int16), aff_l, np.int16)
    (rep,) = check_dataset(tmp_path / "ds", progress=False)
    assert rep.orientation == "LPS" and rep.dtype == "int16" and rep.label_volumes is None
    image2, label, affine, _ = read_case(discover_cases(tmp_path / "ds")[0])
    assert image2.shape == (4, 12, 10, 8) and image2.dtype == np.float32 and label is None
    np.testing.assert_allclose(affine, aff_l)


def _assert_error(ds, path, *words):
    with pytest.raises(MensegError) as ei:
        check_dataset(ds, progress=False)
    msg = str(ei.value)
    assert "\n" not in msg and path.name in msg, msg
    for w in words:
        assert w in msg, msg


def test_shape_mismatch(ds):
    p = save(_file(ds, "t2f"), np.random.rand(16, 16, 11).astype(np.float32), ras_affine())
    _assert_error(ds, p, "shape (16, 16, 11)", "t1c")


def test_affine_mismatch_beyond_tolerance(ds):
    data = np.random.rand(16, 16, 12).astype(np.float32)
    p = save(_file(ds, "t1n"), data, ras_affine((1.0, 1.0, 2.0), origin=(-10, -12, -7.5)))
    _assert_error(ds, p, "affine differs")
    # a tiny difference (float32 rounding in headers) is fine
    save(p, data, ras_affine((1.0, 1.0, 2.0), origin=(-10, -12, -8.0 + 1e-5)))
    assert len(check_dataset(ds, progress=False)) == 1


def test_label_affine_mismatch(ds):
    _, label = blob_case((16, 16, 12))
    p = save(_file(ds, "seg"), label, ras_affine((1.0, 1.0, 2.0)) @ np.diag([-1, 1, 1, 1]))
    _assert_error(ds, p, "label affine differs", "LAS")


@pytest.mark.parametrize("key", ["t1c", "t2w", "seg"])
def test_truncated_file(ds, key):
    p = truncate(_file(ds, key))
    _assert_error(ds, p, "truncated")


def test_nan_voxel(ds):
    data = np.random.rand(16, 16, 12).astype(np.float32)
    data[3, 3, 3] = np.nan
    p = save(_file(ds, "t2w"), data, ras_affine((1.0, 1.0, 2.0)))
    _assert_error(ds, p, "NaN/inf")


def test_constant_image(ds):
    p = save(_file(ds, "t1c"), np.zeros((16, 16, 12), np.float32), ras_affine((1.0, 1.0, 2.0)))
    _assert_error(ds, p, "constant")


def test_bad_label_values(ds):
    label = np.zeros((16, 16, 12), np.uint8)
    label[2, 2, 2] = 5
    p = save(_file(ds, "seg"), label, ras_affine((1.0, 1.0, 2.0)))
    _assert_error(ds, p, "outside {0,1,2,3}", "5")
    p = save(_file(ds, "seg"), label * 0.3, ras_affine((1.0, 1.0, 2.0)))
    _assert_error(ds, p, "non-integer")


@pytest.mark.parametrize("shape, word", [((16, 16), "2D"), ((16, 16, 12, 1, 2), "5D")])
def test_wrong_dimensionality(ds, shape, word):
    p = save(_file(ds, "t2f"), np.random.rand(*shape).astype(np.float32))
    _assert_error(ds, p, word)


def test_check_case_direct(ds):
    case = discover_cases(ds)[0]
    assert check_case(case).case_id == CID
