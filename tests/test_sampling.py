"""Patch sampling: shapes, padding, foreground oversampling, reproducibility."""

from __future__ import annotations

import numpy as np
import pytest

from menseg.data.sampling import PatchSampler, choose_start, crop_pad, foreground_coords, n_foreground


def _case(shape=(20, 24, 16), fg_box=((2, 4), (3, 5), (1, 3))) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.normal(size=(4, *shape)).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    label[fg_box[0][0]:fg_box[0][1], fg_box[1][0]:fg_box[1][1], fg_box[2][0]:fg_box[2][1]] = 3
    return image, label


def test_crop_pad_inside_and_padding() -> None:
    a = np.arange(4 * 5 * 6).reshape(1, 4, 5, 6).astype(np.float32) + 1
    inside = crop_pad(a, (1, 1, 1), (2, 3, 4))
    np.testing.assert_array_equal(inside, a[:, 1:3, 1:4, 1:5])
    padded = crop_pad(a, (-2, 0, 0), (8, 5, 6))
    assert padded.shape == (1, 8, 5, 6)
    assert (padded[:, :2] == 0).all() and (padded[:, 6:] == 0).all()
    np.testing.assert_array_equal(padded[:, 2:6], a)
    assert (crop_pad(a, (10, 0, 0), (2, 2, 2)) == 0).all()


def test_patch_shapes_and_padding_small_volume() -> None:
    image, label = _case(shape=(10, 12, 8))
    sampler = PatchSampler([(image, label)], (16, 16, 16), fg_share=0.5)
    rng = np.random.default_rng(1)
    for _ in range(10):
        img, lab = sampler.batch(rng, 2)
        assert img.shape == (2, 4, 16, 16, 16) and img.dtype == np.float32
        assert lab.shape == (2, 16, 16, 16) and lab.dtype == np.uint8
        # The whole volume fits inside the patch, so all foreground is there.
        assert (lab == 3).sum(axis=(1, 2, 3)).tolist() == [int((label == 3).sum())] * 2
        # Padding is zero: the non-zero region is exactly the volume's size.
        nz = np.argwhere(np.abs(img[0]).sum(0) > 0)
        assert (nz.max(0) - nz.min(0) + 1).tolist() == [10, 12, 8]


def test_foreground_centred_patch_contains_foreground() -> None:
    image, label = _case(shape=(40, 40, 40), fg_box=((30, 32), (2, 4), (35, 37)))
    coords = foreground_coords(label)
    rng = np.random.default_rng(2)
    for _ in range(50):
        s = choose_start(label.shape, (16, 16, 16), rng, coords)
        assert (crop_pad(label, s, (16, 16, 16)) > 0).any()
        assert all(0 <= x <= 24 for x in s)


@pytest.mark.parametrize("share", [0.0, 0.33, 0.5, 1.0])
def test_fg_share_roughly_honoured(share: float) -> None:
    # Tiny lesion in a big volume: uniform patches almost never hit it.
    image, label = _case(shape=(64, 64, 64), fg_box=((60, 62), (1, 3), (60, 62)))
    sampler = PatchSampler([(image, label)], (8, 8, 8), fg_share=share)
    rng = np.random.default_rng(3)
    choices = [c for _ in range(300) for c in sampler.sample(rng, 2)]
    forced = np.mean([c.foreground for c in choices])
    assert abs(forced - share) < 0.06
    hit = np.mean([(sampler.extract(c)[1] > 0).any() for c in choices])
    assert hit >= share - 0.06


def test_n_foreground_expectation_and_no_fg_case() -> None:
    rng = np.random.default_rng(0)
    assert abs(np.mean([n_foreground(2, 0.33, rng) for _ in range(4000)]) - 0.66) < 0.05
    image, _ = _case()
    empty = np.zeros(image.shape[1:], np.uint8)
    sampler = PatchSampler([(image, empty)], (8, 8, 8), fg_share=1.0)
    cs = sampler.sample(np.random.default_rng(0), 4)
    assert not any(c.foreground for c in cs)  # falls back to uniform


def test_sampling_reproducible_from_seed() -> None:
    cases = [_case(), _case(shape=(18, 18, 18))]
    sampler = PatchSampler(cases, (8, 8, 8), fg_share=0.5)
    a = sampler.sample(np.random.default_rng(42), 4)
    b = sampler.sample(np.random.default_rng(42), 4)
    assert a == b
    ia, la = sampler.batch(np.random.default_rng(7), 3)
    ib, lb = sampler.batch(np.random.default_rng(7), 3)
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(la, lb)
