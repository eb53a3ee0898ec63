"""Rigid registration of visits (SimpleITK) and resampling onto the fixed grid."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from menseg.errors import MensegError
from menseg.geometry import rotation_matrix
from menseg.ism.register import (
    RAS_TO_LPS,
    RigidTransform,
    register_rigid,
    resample_to_fixed,
    rotation_angle_deg,
    to_sitk_image,
    voxel_map,
)
from nifti_factory import to_lps

SHAPE = (32, 32, 32)
SPACING = 2.0


def grid_affine(shape=SHAPE, spacing=SPACING) -> np.ndarray:
    """RAS affine of a grid centred on the world origin."""
    a = np.diag([spacing, spacing, spacing, 1.0])
    a[:3, 3] = -(np.asarray(shape) - 1) / 2 * spacing
    return a


def world_coords(shape=SHAPE, spacing=SPACING) -> np.ndarray:
    """(3, X, Y, Z) RAS mm of the voxel centres of :func:`grid_affine`."""
    idx = np.indices(shape).astype(np.float64)
    c = (np.asarray(shape) - 1) / 2
    return (idx - c[:, None, None, None]) * spacing


def phantom(shape=SHAPE, spacing=SPACING) -> np.ndarray:
    """Smooth asymmetric 'head': a soft ellipsoid plus Gaussian blobs of different contrasts (float32)."""
    x = world_coords(shape, spacing)
    r = np.sqrt((x[0] / 25) ** 2 + (x[1] / 21) ** 2 + (x[2] / 18) ** 2)
    img = 1.0 / (1.0 + np.exp((r - 1.0) * 8.0))
    for centre, sigma, amp in [
        ((8.0, -6.0, 4.0), (5.0, 3.5, 4.0), 1.5),
        ((-10.0, 5.0, -6.0), (4.0, 6.0, 3.0), -0.6),
        ((3.0, 12.0, 8.0), (3.0, 3.0, 5.0), 0.9),
        ((-5.0, -11.0, -7.0), (6.0, 3.0, 3.0), 1.2),
    ]:
        d2 = sum(((x[i] - centre[i]) / sigma[i]) ** 2 for i in range(3))
        img = img + amp * np.exp(-0.5 * d2)
    return img.astype(np.float32)


def blob_label(shape=SHAPE, spacing=SPACING) -> np.ndarray:
    """Nested BraTS labels (uint8): oedema 2 around a core 1 with an enhancing rim 3."""
    x = world_coords(shape, spacing)
    d = np.sqrt((x[0] - 6) ** 2 + (x[1] + 4) ** 2 + (x[2] - 2) ** 2)
    lab = np.zeros(shape, np.uint8)
    lab[d < 14] = 2
    lab[d < 9] = 3
    lab[d < 5] = 1
    return lab


def true_transform() -> np.ndarray:
    """Fixed RAS mm -> moving RAS mm: rotations about all axes (deg) and a shift on all axes (mm)."""
    t = np.eye(4)
    t[:3, :3] = rotation_matrix(np.radians([3.0, -2.5, 4.0])).numpy()
    t[:3, 3] = (2.5, -3.0, 2.0)
    return t


def make_moving(fixed: np.ndarray, t_fixed_to_moving: np.ndarray, order: int) -> np.ndarray:
    """The moving visit on the same grid: M(T x) = F(x), i.e. M(y) = F(T^-1 y)."""
    a = grid_affine()
    m = np.linalg.inv(a) @ np.linalg.inv(t_fixed_to_moving) @ a
    return ndimage.affine_transform(fixed, m[:3, :3], offset=m[:3, 3], order=order, mode="constant")


def errors_mm_deg(est: RigidTransform, truth: np.ndarray) -> tuple[float, float]:
    """(largest displacement error over points within 24 mm of the centre, rotation error in deg)."""
    pts = world_coords().reshape(3, -1).T
    pts = pts[np.linalg.norm(pts, axis=1) <= 24.0]
    ref = pts @ truth[:3, :3].T + truth[:3, 3]
    err = float(np.linalg.norm(est.apply(pts) - ref, axis=1).max())
    rot = rotation_angle_deg(est.rotation.T @ truth[:3, :3])
    return err, rot


@pytest.fixture(scope="module")
def case():
    fixed = phantom()
    truth = true_transform()
    moving = make_moving(fixed, truth, order=3).astype(np.float32)
    # the moving visit is stored with L-P-S voxel axes (same physical image): exercises RAS <-> LPS
    moving_lps, moving_affine = to_lps(moving, grid_affine())
    est = register_rigid(moving_lps, moving_affine, fixed, grid_affine(), seed=0)
    return fixed, truth, moving_lps, moving_affine, est


def test_sitk_image_places_voxels_at_their_lps_point():
    a = np.array([[0.0, -1.5, 0.0, 10.0], [2.0, 0.0, 0.0, -20.0], [0.0, 0.0, -1.2, 5.0], [0, 0, 0, 1]])
    arr = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    img = to_sitk_image(arr, a)
    assert img.GetSize() == (4, 5, 6)
    for ijk in [(0, 0, 0), (3, 1, 2), (1, 4, 5)]:
        lps = np.asarray(img.TransformIndexToPhysicalPoint(ijk))
        ras = (a @ np.array([*ijk, 1.0]))[:3]
        np.testing.assert_allclose(lps, RAS_TO_LPS @ ras, atol=1e-9)
        assert img[ijk] == arr[ijk]


def test_recovers_known_rotation_and_shift(case):
    _, truth, _, _, est = case
    err_mm, err_deg = errors_mm_deg(est, truth)
    assert err_mm < 1.0, (err_mm, est.to_dict())
    assert err_deg < 1.0, (err_deg, est.to_dict())
    # the recovered motion is the true one, not something near identity
    assert abs(est.rotation_angle_deg() - rotation_angle_deg(truth[:3, :3])) < 1.0
    assert np.linalg.norm(est.translation_mm) > 1.0
    np.testing.assert_allclose(est.rotation @ est.rotation.T, np.eye(3), atol=1e-9)


def test_registration_is_deterministic(case):
    fixed, _, moving, moving_affine, est = case
    again = register_rigid(moving, moving_affine, fixed, grid_affine(), seed=0)
    assert again.matrix == est.matrix
    assert again.metric == est.metric


def test_identity_stays_identity():
    fixed = phantom()
    est = register_rigid(fixed, grid_affine(), fixed, grid_affine(), seed=3)
    err_mm, err_deg = errors_mm_deg(est, np.eye(4))
    assert err_mm < 0.2 and err_deg < 0.2, est.to_dict()


def test_resample_with_estimate_aligns_the_visits(case):
    fixed, _, moving, moving_affine, est = case
    back = resample_to_fixed(moving[None], moving_affine, est, fixed.shape, grid_affine(), order=1)
    assert back.shape == (1, *fixed.shape) and back.dtype == np.float32
    inner = np.linalg.norm(world_coords(), axis=0) <= 24.0
    before = np.abs(moving[::-1, ::-1] - fixed)[inner].mean()  # undo the storage flip only
    after = np.abs(back[0] - fixed)[inner].mean()
    assert after < 0.25 * before
    assert np.corrcoef(back[0][inner], fixed[inner])[0, 1] > 0.995


def test_resample_identity_is_exact_and_flips_are_exact_for_labels():
    fixed = phantom()
    lab = blob_label()
    a = grid_affine()
    same = resample_to_fixed(fixed[None], a, RigidTransform.identity(), SHAPE, a, order=1)
    assert np.array_equal(same[0], fixed)
    # same physical label stored L-P-S: nearest-neighbour resampling gives it back exactly
    lab_lps, a_lps = to_lps(lab, a)
    np.testing.assert_allclose(voxel_map(a_lps, RigidTransform.identity(), a)[:3, :3],
                               np.diag([-1.0, -1.0, 1.0]), atol=1e-12)
    back = resample_to_fixed(lab_lps, a_lps, RigidTransform.identity(), SHAPE, a, order=0)
    assert back.dtype == np.uint8 and np.array_equal(back, lab)
    img_lps, _ = to_lps(fixed, a)
    back_img = resample_to_fixed(img_lps[None], a_lps, RigidTransform.identity(), SHAPE, a, order=1)
    np.testing.assert_allclose(back_img[0], fixed, atol=1e-5)


def test_labels_stay_integer_and_follow_the_transform():
    lab = blob_label()
    truth = true_transform()
    moving_lab = make_moving(lab, truth, order=0)
    assert moving_lab.dtype == np.uint8
    out = resample_to_fixed(moving_lab[None], grid_affine(), RigidTransform.from_array(truth), SHAPE,
                            grid_affine(), order=0)
    assert out.dtype == np.uint8
    assert set(np.unique(out).tolist()) <= {0, 1, 2, 3}
    for v in (1, 2, 3):
        a, b = out[0] == v, lab == v
        dice = 2 * (a & b).sum() / (a.sum() + b.sum())
        assert dice > 0.85, (v, dice)


def test_resample_other_grid_shape_and_outside_is_zero():
    fixed = phantom()
    a = grid_affine()
    shift = np.eye(4)
    shift[0, 3] = 100.0  # sample 100 mm away: entirely outside the moving field of view
    out = resample_to_fixed(fixed, a, RigidTransform.from_array(shift), (8, 9, 10), a, order=1)
    assert out.shape == (8, 9, 10) and not out.any()


def test_rigid_transform_helpers():
    t = RigidTransform.from_array(true_transform(), metric=-0.5, iterations=7, stop="done")
    np.testing.assert_allclose(t.inverse().as_array() @ t.as_array(), np.eye(4), atol=1e-12)
    assert RigidTransform.from_dict(t.to_dict()) == t
    assert abs(t.to_dict()["rotation_deg"] - rotation_angle_deg(true_transform()[:3, :3])) < 1e-9
    p = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_allclose(t.apply(p)[0], (true_transform() @ [1.0, 2.0, 3.0, 1.0])[:3])
    with pytest.raises(MensegError):
        RigidTransform.from_array(np.eye(3))
    with pytest.raises(MensegError):
        resample_to_fixed(np.zeros((2, 2)), np.eye(4), t, (2, 2, 2), np.eye(4))
    with pytest.raises(MensegError):
        register_rigid(np.ones(SHAPE), grid_affine(), phantom(), grid_affine())
