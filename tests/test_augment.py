"""Replayable augmentations: replay, reproducibility, label validity, exact cases."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from menseg.config import AugConfig
from menseg.train.augment import (
    TRANSFORMS,
    apply_augment,
    apply_spatial,
    augment_batch,
    sample_augment,
)

SHAPE = (4, 12, 14, 10)
SP = (1.0, 1.0, 1.0)  #: mm
#: Every transform always on, so replay tests exercise the real work.
ALWAYS = AugConfig(
    p_flip=0.5, p_rotate=1, p_scale=1, p_elastic=1, p_gamma=1, p_noise=1, p_bias=1, p_blur=1, p_lowres=1,
    lowres_zoom=(0.5, 0.7), noise_std=(0.05, 0.1),
)


def _sample() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    image = torch.randn(SHAPE, generator=g)
    label = torch.zeros(SHAPE[1:], dtype=torch.uint8)
    label[3:9, 4:10, 2:8] = 2
    label[4:8, 5:9, 3:7] = 1
    label[5:7, 6:8, 4:6] = 3
    return image, label


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_replay_same_params_same_output(name: str) -> None:
    t = TRANSFORMS[name]
    image, label = _sample()
    params = t.sample_params(torch.Generator().manual_seed(5), SHAPE, ALWAYS, SP)
    if name == "flip":
        params = dataclasses.replace(params, axes=(True, False, True))
    assert dataclasses.is_dataclass(params)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.active = False  # type: ignore[misc]
    i1, l1 = t.apply(image.clone(), label.clone(), params)
    i2, l2 = t.apply(image.clone(), label.clone(), params)
    assert torch.equal(i1, i2) and torch.equal(l1, l2)
    assert i1.shape == image.shape and i1.dtype == image.dtype
    assert l1.shape == label.shape and l1.dtype == label.dtype
    assert set(l1.unique().tolist()) <= {0, 1, 2, 3}
    assert not torch.equal(i1, image), f"{name} did nothing although active"
    assert torch.isfinite(i1).all()


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_params_reproducible_from_seed(name: str) -> None:
    t = TRANSFORMS[name]
    a = t.sample_params(torch.Generator().manual_seed(9), SHAPE, ALWAYS, SP)
    b = t.sample_params(torch.Generator().manual_seed(9), SHAPE, ALWAYS, SP)
    c = [t.sample_params(torch.Generator().manual_seed(s), SHAPE, ALWAYS, SP) for s in range(10, 15)]
    assert a == b
    assert any(x != a for x in c)


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_inactive_is_identity(name: str) -> None:
    t = TRANSFORMS[name]
    never = AugConfig(**{f.name: 0.0 for f in dataclasses.fields(AugConfig) if f.name.startswith("p_")})
    image, label = _sample()
    params = t.sample_params(torch.Generator().manual_seed(1), SHAPE, never, SP)
    assert not params.active
    i, lab = t.apply(image, label, params)
    assert torch.equal(i, image) and torch.equal(lab, label)


def test_flip_twice_is_identity() -> None:
    image, label = _sample()
    flip = TRANSFORMS["flip"]
    p = flip.sample_params(torch.Generator().manual_seed(0), SHAPE, AugConfig(p_flip=1.0), SP)
    assert p.axes == (True, True, True)
    i, lab = flip.apply(*flip.apply(image, label, p), p)
    assert torch.equal(i, image) and torch.equal(lab, label)
    i1, l1 = flip.apply(image, label, dataclasses.replace(p, axes=(True, False, False)))
    assert torch.equal(i1, image.flip(1)) and torch.equal(l1, label.flip(0))


def test_spatial_identity_and_exact_rotation() -> None:
    image, label = _sample()
    rot = TRANSFORMS["rotate"]
    p0 = rot.sample_params(torch.Generator().manual_seed(0), SHAPE, ALWAYS, SP)
    # Zero angle: grid hits voxel centres exactly.
    i, lab = rot.apply(image, label, dataclasses.replace(p0, angles=(0.0, 0.0, 0.0)))
    assert torch.allclose(i, image, atol=1e-5) and torch.equal(lab, label)
    # 90 degrees about z on a square X-Y patch is a pure voxel permutation. Output offset p reads
    # the input at R p (R = rotation_matrix(angles)), so the content turns by R^-1: +90 degrees about
    # z moves what was at +x to -y, which is torch.rot90 with k=-1 over (x, y).
    rot90z = dataclasses.replace(p0, angles=(0.0, 0.0, math.pi / 2))
    cube_img = torch.randn(2, 9, 9, 5, generator=torch.Generator().manual_seed(1))
    cube_lab = (cube_img[0] > 0).to(torch.uint8)
    i, lab = rot.apply(cube_img, cube_lab, rot90z)
    assert torch.allclose(i, torch.rot90(cube_img, k=-1, dims=(1, 2)), atol=1e-4)
    assert torch.equal(lab, torch.rot90(cube_lab, k=-1, dims=(0, 1)))
    assert not torch.allclose(i, torch.rot90(cube_img, k=1, dims=(1, 2)), atol=1e-4)
    # One voxel, centre (4, 4) + x -> centre - y, in the image and the label alike.
    dot_img = torch.zeros(1, 9, 9, 5)
    dot_img[0, 5, 4, 2] = 1.0
    dot_lab = (dot_img[0] > 0).to(torch.uint8)
    i, lab = rot.apply(dot_img, dot_lab, rot90z)
    assert (i[0] > 0.5).nonzero().tolist() == [[4, 3, 2]]
    assert lab.nonzero().tolist() == [[4, 3, 2]]


def test_scale_keeps_labels_and_fuses() -> None:
    image, label = _sample()
    sc = TRANSFORMS["scale"]
    p = dataclasses.replace(sc.sample_params(torch.Generator(), SHAPE, ALWAYS, SP), active=True, factor=0.5)
    _, lab = sc.apply(image, label, p)
    # Zooming in (factor 0.5) enlarges the lesion.
    assert (lab > 0).sum() > (label > 0).sum()
    # One fused resampling of rotate+scale equals the pipeline's fused call.
    rp = TRANSFORMS["rotate"].sample_params(torch.Generator().manual_seed(3), SHAPE, ALWAYS, SP)
    fused = apply_spatial(image, label, [(TRANSFORMS["rotate"], rp), (sc, p)])
    from menseg.train.augment import AugParams

    via_pipeline = apply_augment(image, label, AugParams((("rotate", rp), ("scale", p))))
    assert torch.equal(fused[0], via_pipeline[0]) and torch.equal(fused[1], via_pipeline[1])


def test_gamma_preserves_range() -> None:
    image, label = _sample()
    g = TRANSFORMS["gamma"]
    p = g.sample_params(torch.Generator().manual_seed(2), SHAPE, ALWAYS, SP)
    out, _ = g.apply(image, label, p)
    for c in range(SHAPE[0]):
        assert torch.isclose(out[c].min(), image[c].min(), atol=1e-5)
        assert torch.isclose(out[c].max(), image[c].max(), atol=1e-5)


def test_pipeline_replay_and_batch() -> None:
    image, label = _sample()
    p1 = sample_augment(torch.Generator().manual_seed(77), SHAPE, ALWAYS, SP)
    p2 = sample_augment(torch.Generator().manual_seed(77), SHAPE, ALWAYS, SP)
    assert p1 == p2 and [n for n, _ in p1.items] == list(TRANSFORMS)
    a = apply_augment(image, label, p1)
    b = apply_augment(image, label, p2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    imgs, labs = torch.stack([image, image]), torch.stack([label, label])
    bi, bl = augment_batch(imgs, labs, ALWAYS, seeds=[77, 78], spacing=SP)
    assert torch.equal(bi[0], a[0]) and torch.equal(bl[0], a[1])
    assert not torch.equal(bi[1], bi[0])
    assert set(bl.unique().tolist()) <= {0, 1, 2, 3}


def test_elastic_magnitude_is_in_millimetres() -> None:
    """``elastic_magnitude_mm`` is mm: on a grid of (2, 1, 4) mm the same draw moves half as many voxels
    along x and a quarter along z as on a 1 mm grid, i.e. the same distance in mm; at 1 mm the offsets
    are the draws times the magnitude (as before the unit fix)."""
    el = TRANSFORMS["elastic"]
    cfg = AugConfig(p_elastic=1.0, elastic_magnitude_mm=4.0, elastic_grid=3)
    one = el.sample_params(torch.Generator().manual_seed(4), SHAPE, cfg, (1.0, 1.0, 1.0))
    aniso = el.sample_params(torch.Generator().manual_seed(4), SHAPE, cfg, (2.0, 1.0, 4.0))
    raw = torch.Generator().manual_seed(4)
    torch.rand(1, generator=raw, dtype=torch.float64)  # the on/off draw comes first
    want = torch.randn(3 * 27, generator=raw, dtype=torch.float64) * 4.0
    assert torch.equal(torch.tensor(one.offsets, dtype=torch.float64), want)
    o1 = torch.tensor(one.offsets).reshape(3, -1)
    o2 = torch.tensor(aniso.offsets).reshape(3, -1)
    assert torch.allclose(o2 * torch.tensor([[2.0], [1.0], [4.0]]), o1, atol=1e-12)
    d1 = el.displacement(one, SHAPE[1:], torch.device("cpu"))
    d2 = el.displacement(aniso, SHAPE[1:], torch.device("cpu"))
    assert torch.allclose(d2 * torch.tensor([2.0, 1.0, 4.0]), d1, atol=1e-5)  # same field in mm
