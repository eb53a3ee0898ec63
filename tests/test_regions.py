"""Label <-> region conversion (menseg.regions): nesting, painting order, thresholds, both array kinds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from menseg.regions import labels_to_regions, region_masks, regions_to_labels
from test_losses import label_batch


def test_region_masks_nested():
    lab = np.array([0, 1, 2, 3], dtype=np.uint8).reshape(4, 1, 1)
    m = region_masks(lab)
    assert list(m) == ["ET", "TC", "WT"]
    assert m["ET"].ravel().tolist() == [False, False, False, True]
    assert m["TC"].ravel().tolist() == [False, True, False, True]
    assert m["WT"].ravel().tolist() == [False, True, True, True]


def test_labels_to_regions_nested() -> None:
    r = labels_to_regions(label_batch())
    assert r.shape == (2, 3, 8, 8, 8) and r.dtype == torch.float32
    et, tc, wt = r[:, 0], r[:, 1], r[:, 2]
    assert (et <= tc).all() and (tc <= wt).all()
    lab = label_batch()
    assert torch.equal(et.bool(), lab == 3)
    assert torch.equal(tc.bool(), (lab == 1) | (lab == 3))
    assert torch.equal(wt.bool(), lab > 0)
    # the torch and numpy conversions agree
    m = region_masks(lab.numpy())
    assert torch.equal(r.bool(), torch.from_numpy(np.stack(list(m.values()), axis=1)))


def test_regions_to_labels_nested_painting() -> None:
    # ET, TC, WT probabilities for five voxels along x.
    et = [0.1, 0.1, 0.1, 0.9, 0.9]
    tc = [0.1, 0.1, 0.9, 0.9, 0.1]
    wt = [0.1, 0.9, 0.9, 0.9, 0.1]
    probs = np.array([et, tc, wt], dtype=np.float32).reshape(3, 5, 1, 1)
    label = regions_to_labels(probs, 0.5)
    assert label.dtype == np.uint8
    # background, oedema, NETC, ET, ET even where WT/TC are low (inner region wins)
    assert label[:, 0, 0].tolist() == [0, 2, 1, 3, 3]
    # exactly at the threshold is outside
    assert regions_to_labels(np.full((3, 1, 1, 1), 0.5, np.float32), 0.5).item() == 0
    # per-region thresholds (ET, TC, WT)
    assert regions_to_labels(probs, (0.95, 0.5, 0.5))[:, 0, 0].tolist() == [0, 2, 1, 1, 0]
    assert regions_to_labels(torch.from_numpy(probs), {"ET": 0.5, "TC": 0.5, "WT": 0.95}).max() == 3
    with pytest.raises(ValueError):
        regions_to_labels(np.zeros((2, 3, 3, 3)), 0.5)
    with pytest.raises(ValueError):
        regions_to_labels(probs, {"ET": 0.5})


def test_regions_to_labels_keeps_the_array_kind_and_axis() -> None:
    lab = label_batch()
    back = regions_to_labels(labels_to_regions(lab), axis=1)
    assert isinstance(back, torch.Tensor) and back.dtype == torch.uint8
    assert torch.equal(back, lab)
    assert torch.equal(regions_to_labels(labels_to_regions(lab), axis=-4), lab)
    np_back = regions_to_labels(labels_to_regions(lab).numpy(), axis=1)
    assert isinstance(np_back, np.ndarray)
    np.testing.assert_array_equal(np_back, lab.numpy())


def test_region_masks_roundtrip() -> None:
    rng = np.random.default_rng(0)
    label = rng.integers(0, 4, size=(6, 5, 4)).astype(np.uint8)
    regions = np.stack(list(region_masks(label).values()))
    assert regions.shape == (3, 6, 5, 4)
    np.testing.assert_array_equal(regions_to_labels(regions.astype(np.float32), 0.5), label)
