"""NIfTI reading/writing and its one-line errors."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from menseg.data.io import read_image, read_label, write_image, write_label
from menseg.errors import MensegError
from nifti_factory import LPS_FLIP, ras_affine, save, truncate


def _err(fn, path) -> str:
    with pytest.raises(MensegError) as ei:
        fn(path)
    msg = str(ei.value)
    assert "\n" not in msg
    assert path.name in msg, msg
    assert ei.value.path == path
    return msg


def test_read_image_float32_and_affine(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    aff = ras_affine((0.9, 0.9, 3.0))
    p = save(tmp_path / "a.nii.gz", data, aff)
    arr, a = read_image(p)
    assert arr.dtype == np.float32 and arr.shape == (4, 5, 6)
    np.testing.assert_array_equal(arr, data)
    np.testing.assert_allclose(a, aff, atol=1e-6)


def test_read_image_applies_scaling(tmp_path):
    img = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.eye(4))
    img.header.set_slope_inter(2.0, 10.0)
    p = tmp_path / "s.nii.gz"
    nib.save(img, str(p))
    arr, _ = read_image(p)
    assert arr[0, 0, 0] == 10.0 and arr[0, 0, 1] == 12.0


def test_4d_single_volume_is_squeezed(tmp_path):
    p = save(tmp_path / "v.nii.gz", np.random.rand(4, 5, 6, 1).astype(np.float32))
    arr, _ = read_image(p)
    assert arr.shape == (4, 5, 6)


def test_missing_file(tmp_path):
    assert "not found" in _err(read_image, tmp_path / "nope.nii.gz")


def test_truncated_gz(tmp_path):
    p = truncate(save(tmp_path / "t.nii.gz", np.random.rand(16, 16, 12).astype(np.float32)))
    assert "truncated" in _err(read_image, p)
    pl = truncate(save(tmp_path / "tl.nii.gz", np.ones((16, 16, 12), np.uint8)), 0.5)
    assert "truncated" in _err(read_label, pl)


def test_garbage_file(tmp_path):
    p = tmp_path / "g.nii.gz"
    p.write_bytes(b"not a nifti at all" * 20)
    assert "unreadable" in _err(read_image, p)


@pytest.mark.parametrize(
    "shape, word",
    [((16, 16), "2D"), ((8, 8, 8, 1, 2), "5D"), ((8, 8, 8, 2), "4D")],
)
def test_wrong_dimensionality(tmp_path, shape, word):
    p = save(tmp_path / "d.nii.gz", np.random.rand(*shape).astype(np.float32))
    msg = _err(read_image, p)
    assert word in msg and "3D" in msg


def test_nan_and_inf(tmp_path):
    for bad in (np.nan, np.inf):
        data = np.random.rand(6, 6, 6).astype(np.float32)
        data[1, 2, 3] = bad
        msg = _err(read_image, save(tmp_path / f"n{bad}.nii.gz", data))
        assert "NaN/inf" in msg and "1 " in msg


def test_constant_and_empty(tmp_path):
    assert "constant" in _err(read_image, save(tmp_path / "c.nii.gz", np.zeros((6, 6, 6))))
    assert "constant" in _err(read_image, save(tmp_path / "c2.nii.gz", np.full((6, 6, 6), 7.0)))
    assert "empty" in _err(read_image, save(tmp_path / "e.nii.gz", np.zeros((0, 4, 4))))


def test_read_label_ok_and_all_zero_allowed(tmp_path):
    lab = np.zeros((5, 5, 5), np.uint8)
    lab[1:3, 1:3, 1:3] = 3
    lab[0, 0, 0] = 1
    out, _ = read_label(save(tmp_path / "l.nii.gz", lab, dtype=np.uint8))
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, lab)
    zero, _ = read_label(save(tmp_path / "z.nii.gz", np.zeros((5, 5, 5), np.uint8)))
    assert not zero.any()
    # integer-valued floats are accepted
    f, _ = read_label(save(tmp_path / "f.nii.gz", lab.astype(np.float32)))
    np.testing.assert_array_equal(f, lab)


def test_label_errors(tmp_path):
    lab = np.zeros((5, 5, 5), np.float32)
    lab[0, 0, 0] = 4
    assert "outside {0,1,2,3}" in _err(read_label, save(tmp_path / "o.nii.gz", lab))
    lab[0, 0, 0] = -1
    assert "outside" in _err(read_label, save(tmp_path / "n.nii.gz", lab.astype(np.int16)))
    lab[0, 0, 0] = 1.5
    assert "non-integer" in _err(read_label, save(tmp_path / "h.nii.gz", lab))
    lab[0, 0, 0] = np.nan
    assert "NaN/inf" in _err(read_label, save(tmp_path / "x.nii.gz", lab))
    assert "2D" in _err(read_label, save(tmp_path / "2.nii.gz", np.zeros((4, 4), np.uint8)))


def test_write_label_roundtrip_atomic(tmp_path):
    lab = np.random.default_rng(0).integers(0, 4, (6, 7, 8)).astype(np.int64)
    aff = ras_affine((0.9, 0.9, 3.0)) @ LPS_FLIP
    out = tmp_path / "sub" / "pred.nii.gz"
    write_label(out, lab, aff)
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), lab)
    np.testing.assert_allclose(img.affine, aff, atol=1e-5)
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert sorted(p.name for p in out.parent.iterdir()) == ["pred.nii.gz"]


def test_write_label_like_keeps_header_codes(tmp_path):
    ref = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), ras_affine())
    ref.set_qform(ref.affine, code=2)
    ref.set_sform(ref.affine, code=4)
    out = tmp_path / "p.nii.gz"
    write_label(out, np.ones((4, 4, 4), np.uint8), ref.affine, like=ref)
    hdr = nib.load(str(out)).header
    assert int(hdr["qform_code"]) == 2 and int(hdr["sform_code"]) == 4
    with pytest.raises(ValueError):
        write_label(out, np.full((4, 4, 4), 5), ref.affine)


def test_write_image_roundtrip(tmp_path):
    data = np.random.rand(4, 5, 6).astype(np.float32)
    p = tmp_path / "i.nii.gz"
    write_image(p, data, ras_affine())
    arr, _ = read_image(p)
    np.testing.assert_array_equal(arr, data)


def test_voxel_budget_refuses_big_headers_before_reading(tmp_path, monkeypatch):
    import subprocess
    import sys

    from menseg.data.io import DEFAULT_MAX_VOXELS, MAX_VOXELS_ENV

    path = tmp_path / "big.nii"
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.float32), np.eye(4)), str(path))
    raw = bytearray(path.read_bytes())
    raw[40:48] = np.array([3, 2000, 2000, 2000], "<i2").tobytes()  # header claims 2000^3, data is 4^3
    path.write_bytes(bytes(raw))
    msg = _err(read_image, path)
    assert "over the budget" in msg and f"{DEFAULT_MAX_VOXELS:,}" in msg
    small = tmp_path / "small.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(64, dtype=np.float32).reshape(4, 4, 4), np.eye(4)), str(small))
    assert read_image(small)[0].shape == (4, 4, 4)
    monkeypatch.setenv(MAX_VOXELS_ENV, "63")
    assert "63" in _err(read_image, small)
    monkeypatch.setenv(MAX_VOXELS_ENV, "lots")
    with pytest.raises(MensegError, match="whole number"):
        read_image(small)
    monkeypatch.delenv(MAX_VOXELS_ENV)
    from menseg.data.phantom import write_phantom_dataset

    write_phantom_dataset(tmp_path / "ds", n_cases=1, shape=(16, 16, 16))
    r = subprocess.run([sys.executable, "-m", "menseg", "--max-voxels", "100", "data", "check",
                        str(tmp_path / "ds")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "4,096 voxels, over the budget of 100" in r.stderr


def test_full_disk_or_unwritable_output_is_a_clear_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    import errno

    out = tmp_path / "pred.nii.gz"
    write_label(out, np.zeros((4, 4, 4), np.uint8), np.eye(4))
    before = out.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib, "save", full_disk)
    with pytest.raises(MensegError, match="No space left on device"):
        write_label(out, np.ones((4, 4, 4), np.uint8), np.eye(4))
    monkeypatch.undo()
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.nii.gz"]  # no temporary file left
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(MensegError, match="cannot write here"):
        write_label(blocker / "sub" / "pred.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
