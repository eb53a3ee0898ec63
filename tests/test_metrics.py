"""Exact tests of the evaluation metrics on hand-drawn masks (see evaluate/metrics.py)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from menseg.evaluate.metrics import (
    HD95_PENALTY_MM,
    dice,
    evaluate_case,
    hd95,
    lesion_wise,
    metric_names,
    surface_dice,
    volume_mm3,
)

SHAPE = (24, 24, 16)
ISO = (1.0, 1.0, 1.0)


def box(shape=SHAPE, *slices) -> np.ndarray:
    """Boolean mask with the union of the given boxes (each a tuple of 3 slices) set."""
    m = np.zeros(shape, dtype=bool)
    for s in slices:
        m[s] = True
    return m


def cube(x, y, z, size=4):
    return (slice(x, x + size), slice(y, y + size), slice(z, z + size))


# ----------------------------------------------------------------------------- legacy
def test_dice_known_value():
    ref = box(SHAPE, (slice(2, 4), slice(2, 4), slice(2, 6)))  # 16 voxels
    pred = box(SHAPE, (slice(2, 4), slice(2, 4), slice(2, 4)))  # 8 voxels inside
    assert dice(pred, ref) == pytest.approx(2 * 8 / (8 + 16))


def test_dice_empty_policy():
    empty = np.zeros(SHAPE, bool)
    full = box(SHAPE, cube(2, 2, 2))
    assert dice(empty, empty) == 1.0
    assert dice(full, empty) == 0.0
    assert dice(empty, full) == 0.0


def test_hd95_shifted_cube_anisotropic():
    # 4^3 cubes shifted by one voxel along x, x spacing 2 mm: directed distances are
    # 36 x 0, 4 x 1 mm (face x=3 interior: nearest surface is 1 voxel away along y),
    # 16 x 2 mm; the 95th percentile is 2 mm in both directions.
    a = box(SHAPE, cube(2, 2, 2))
    b = box(SHAPE, cube(3, 2, 2))
    assert hd95(a, b, (2.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert hd95(b, a, (2.0, 1.0, 1.0)) == pytest.approx(2.0)
    # surface Dice at 1 mm: 40 of 56 surface voxels within 1 mm, both ways.
    assert surface_dice(a, b, (2.0, 1.0, 1.0), 1.0) == pytest.approx(40 / 56)
    assert surface_dice(a, b, (2.0, 1.0, 1.0), 2.0) == pytest.approx(1.0)


@pytest.mark.parametrize("axis,spacing,expected", [(0, (2.0, 1, 1), 6.0), (1, (1, 3.0, 1), 9.0)])
def test_hd95_shifted_plates(axis, spacing, expected):
    # One-voxel-thick plates 3 voxels apart: every surface distance is 3 voxels.
    sl_a = [slice(4, 12)] * 3
    sl_b = [slice(4, 12)] * 3
    sl_a[axis], sl_b[axis] = slice(5, 6), slice(8, 9)
    a, b = box(SHAPE, tuple(sl_a)), box(SHAPE, tuple(sl_b))
    assert hd95(a, b, spacing) == pytest.approx(expected)
    assert surface_dice(a, b, spacing, 1.0) == 0.0
    assert surface_dice(a, b, spacing, expected) == 1.0


def test_hd95_and_surface_dice_empty_policy():
    empty = np.zeros(SHAPE, bool)
    full = box(SHAPE, cube(2, 2, 2))
    assert hd95(empty, empty, ISO) == 0.0
    assert hd95(full, empty, ISO) == HD95_PENALTY_MM == 374.0
    assert hd95(empty, full, ISO) == 374.0
    assert surface_dice(empty, empty, ISO) == 1.0
    assert surface_dice(full, empty, ISO) == 0.0
    assert hd95(full, full, ISO) == 0.0
    assert surface_dice(full, full, ISO) == 1.0


def test_volume_mm3():
    assert volume_mm3(box(SHAPE, cube(0, 0, 0)), (2.0, 1.0, 0.5)) == 64.0
    assert volume_mm3(np.zeros(SHAPE, bool), (2.0, 1.0, 0.5)) == 0.0


def test_crop_gives_full_volume_distances():
    # Masks touching the volume border, embedded in a larger volume far from its edges:
    # bounding-box cropping must not change distances.
    rng = np.random.default_rng(3)
    a = ndimage.gaussian_filter(rng.random((12, 10, 8)), 1.5) > 0.5
    b = ndimage.gaussian_filter(rng.random((12, 10, 8)), 1.5) > 0.5
    big_a = np.zeros((40, 40, 40), bool)
    big_b = np.zeros((40, 40, 40), bool)
    big_a[10:22, 15:25, 20:28] = a
    big_b[10:22, 15:25, 20:28] = b
    sp = (0.9, 1.1, 3.0)
    # In the small volume the border counts as outside (surface), as in the big one.
    assert hd95(a, b, sp) == pytest.approx(hd95(big_a, big_b, sp))
    assert surface_dice(a, b, sp) == pytest.approx(surface_dice(big_a, big_b, sp))


def test_hd95_and_surface_dice_agree_with_monai():
    torch = pytest.importorskip("torch")
    mm = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(0)
    sp = (1.0, 1.5, 0.7)
    for _ in range(3):
        n = rng.random((20, 18, 16))
        p = ndimage.gaussian_filter(n, 2) > 0.5
        r = ndimage.gaussian_filter(n + 0.3 * rng.random(n.shape), 2) > 0.6

        def onehot(m):
            return torch.from_numpy(np.stack([~m, m])[None].astype(np.float32))

        ref_hd = mm.compute_hausdorff_distance(onehot(p), onehot(r), percentile=95, spacing=sp)
        ref_sd = mm.compute_surface_dice(onehot(p), onehot(r), class_thresholds=[1.0], spacing=sp)
        assert hd95(p, r, sp) == pytest.approx(float(ref_hd), abs=1e-5)
        assert surface_dice(p, r, sp, 1.0) == pytest.approx(float(ref_sd), abs=1e-5)


# ----------------------------------------------------------------------------- lesion-wise
def test_lesion_perfect_and_partial():
    ref = box(SHAPE, cube(2, 2, 2))  # 64 voxels
    lw = lesion_wise(ref, ref, ISO)
    assert (lw["lesion_dice"], lw["lesion_hd95"]) == (1.0, 0.0)
    assert (lw["n_ref_lesions"], lw["n_tp"], lw["n_fn"], lw["n_fp"]) == (1, 1, 0, 0)
    half = box(SHAPE, (slice(2, 6), slice(2, 6), slice(2, 4)))  # 32 voxels inside
    assert lesion_wise(half, ref, ISO)["lesion_dice"] == pytest.approx(2 * 32 / (32 + 64))


def test_lesion_false_positive_halves_score():
    ref = box(SHAPE, cube(2, 2, 2))
    pred = box(SHAPE, cube(2, 2, 2), cube(14, 14, 8, size=2))  # exact + far FP
    lw = lesion_wise(pred, ref, ISO)
    assert lw["n_fp"] == 1 and lw["n_tp"] == 1
    assert lw["lesion_dice"] == pytest.approx(0.5)
    assert lw["lesion_hd95"] == pytest.approx(374.0 / 2)


def test_lesion_false_negative():
    ref = box(SHAPE, cube(2, 2, 2), cube(14, 14, 8))
    pred = box(SHAPE, cube(2, 2, 2))
    lw = lesion_wise(pred, ref, ISO)
    assert (lw["n_ref_lesions"], lw["n_tp"], lw["n_fn"], lw["n_fp"]) == (2, 1, 1, 0)
    assert lw["lesion_dice"] == pytest.approx(0.5)
    assert lw["lesion_hd95"] == pytest.approx(187.0)


def test_lesion_hd95_shifted_cube():
    ref = box(SHAPE, cube(2, 2, 2))
    pred = box(SHAPE, cube(3, 2, 2))
    lw = lesion_wise(pred, ref, (2.0, 1.0, 1.0))
    assert lw["lesion_hd95"] == pytest.approx(2.0)
    assert lw["lesion_dice"] == pytest.approx(2 * 48 / 128)


def test_small_reference_lesion_ignored():
    big = cube(2, 2, 2)
    small = cube(14, 14, 8, size=3)  # 27 voxels <= 50
    ref = box(SHAPE, big, small)
    # missed small lesion: not a false negative
    lw = lesion_wise(box(SHAPE, big), ref, ISO)
    assert (lw["lesion_dice"], lw["lesion_hd95"]) == (1.0, 0.0)
    assert (lw["n_ref_lesions"], lw["n_ignored"], lw["n_fn"]) == (1, 1, 0)
    # a prediction on the small lesion is matched to it, hence not a false positive
    lw = lesion_wise(ref, ref, ISO)
    assert (lw["lesion_dice"], lw["n_fp"]) == (1.0, 0)
    # only small lesions in the reference and nothing predicted: as if both empty
    only_small = box(SHAPE, small)
    lw = lesion_wise(np.zeros(SHAPE, bool), only_small, ISO)
    assert (lw["lesion_dice"], lw["lesion_hd95"], lw["n_ref_lesions"]) == (1.0, 0.0, 0)


def test_lesion_volume_threshold_is_mm3_and_inclusive():
    empty = np.zeros(SHAPE, bool)
    fifty = box(SHAPE, (slice(2, 7), slice(2, 7), slice(2, 4)))  # 50 voxels
    fifty_two = box(SHAPE, (slice(2, 4), slice(2, 4), slice(2, 15)))  # 52 voxels
    assert lesion_wise(empty, fifty, ISO)["lesion_dice"] == 1.0  # <= 50 ignored
    assert lesion_wise(empty, fifty_two, ISO)["lesion_dice"] == 0.0
    # 27 voxels of 2 mm^3 = 54 mm^3 > 50: counted (the official script uses mm^3)
    small = box(SHAPE, cube(2, 2, 2, size=3))
    assert lesion_wise(empty, small, (2.0, 1.0, 1.0))["n_ref_lesions"] == 1


@pytest.mark.parametrize("gap,merged", [(1, True), (2, True), (3, False)])
def test_reference_lesions_grouped_by_dilation(gap, merged):
    # Two 4x4x2 slabs (32 voxels each, under the threshold alone) 'gap' voxels apart
    # along z: one 1-voxel dilation (18-neighbourhood) joins gaps of up to 2 voxels.
    a = (slice(2, 6), slice(2, 6), slice(2, 4))
    b = (slice(2, 6), slice(2, 6), slice(4 + gap, 6 + gap))
    ref = box(SHAPE, a, b)
    assert ndimage.label(ref, np.ones((3, 3, 3)))[1] == 2
    lw = lesion_wise(ref, ref, ISO)
    if merged:
        assert (lw["n_ref_lesions"], lw["n_ignored"], lw["lesion_dice"]) == (1, 0, 1.0)
        # the grouped lesion is scored as one: predicting one slab gives 2*32/(32+64)
        one = lesion_wise(box(SHAPE, a), ref, ISO)
        assert one["lesion_dice"] == pytest.approx(2 * 32 / 96)
        assert (one["n_tp"], one["n_fn"], one["n_fp"]) == (1, 0, 0)
    else:
        assert (lw["n_ref_lesions"], lw["n_ignored"]) == (0, 2)


def test_dilation_uses_18_neighbourhood():
    # Two 27-voxel cubes 2 voxels apart along the diagonal: a 26-neighbourhood dilation
    # would make them touch at a corner (one 54-voxel lesion); the official 18-neighbourhood
    # element does not, so both stay separate and, being <= 50 voxels, are ignored.
    ref = box(SHAPE, cube(3, 3, 3, size=3), cube(8, 8, 8, size=3))
    lw = lesion_wise(np.zeros(SHAPE, bool), ref, ISO)
    assert (lw["n_ref_lesions"], lw["n_ignored"], lw["lesion_dice"]) == (0, 2, 1.0)


def test_prediction_touching_dilated_lesion_is_matched():
    ref = box(SHAPE, cube(2, 2, 2))
    pred = box(SHAPE, cube(6, 2, 2))  # face-adjacent, no overlap
    lw = lesion_wise(pred, ref, ISO)
    assert (lw["n_tp"], lw["n_fp"], lw["lesion_dice"]) == (1, 0, 0.0)
    assert lw["lesion_hd95"] < 374.0
    far = lesion_wise(box(SHAPE, cube(7, 2, 2)), ref, ISO)  # one voxel gap: unmatched
    assert (far["n_tp"], far["n_fn"], far["n_fp"]) == (0, 1, 1)
    assert (far["lesion_dice"], far["lesion_hd95"]) == (0.0, 374.0)


def test_26_connectivity_and_shared_component():
    ref = box(SHAPE, cube(2, 2, 2))
    # a second cube touching the first only at a corner belongs to the same component
    pred = box(SHAPE, cube(2, 2, 2), cube(6, 6, 6))
    lw = lesion_wise(pred, ref, ISO)
    assert (lw["n_fp"], lw["lesions"][0]["n_pred_components"]) == (0, 1)
    assert lw["lesion_dice"] == pytest.approx(2 * 64 / (128 + 64))
    # one predicted component bridging two separate lesions is used whole for both
    ref2 = box(SHAPE, cube(2, 2, 2), cube(10, 2, 2))
    bridge = box(SHAPE, (slice(2, 14), slice(2, 6), slice(2, 6)))  # 192 voxels
    lw = lesion_wise(bridge, ref2, ISO)
    assert (lw["n_ref_lesions"], lw["n_tp"], lw["n_fp"]) == (2, 2, 0)
    assert lw["lesion_dice"] == pytest.approx(2 * 64 / (192 + 64))


def test_lesion_empty_policy():
    empty = np.zeros(SHAPE, bool)
    full = box(SHAPE, cube(2, 2, 2))
    both = lesion_wise(empty, empty, ISO)
    assert (both["lesion_dice"], both["lesion_hd95"]) == (1.0, 0.0)
    no_pred = lesion_wise(empty, full, ISO)
    assert (no_pred["lesion_dice"], no_pred["lesion_hd95"], no_pred["n_fn"]) == (0.0, 374.0, 1)
    no_ref = lesion_wise(box(SHAPE, cube(2, 2, 2), cube(12, 12, 8)), empty, ISO)
    assert (no_ref["lesion_dice"], no_ref["lesion_hd95"], no_ref["n_fp"]) == (0.0, 374.0, 2)


# ----------------------------------------------------------------------------- per case
def test_evaluate_case_keys_and_values():
    ref = np.zeros(SHAPE, np.uint8)
    ref[cube(2, 2, 2, size=6)] = 2  # SNFH shell
    ref[cube(3, 3, 3)] = 1  # NETC core, no ET in the reference
    pred = ref.copy()
    pred[cube(14, 14, 8, size=2)] = 3  # a false-positive ET blob
    m = evaluate_case(pred, ref, (1.0, 1.0, 2.0))
    assert list(m) == metric_names()
    assert m["WT_lesion_dice"] == pytest.approx(0.5)  # FP blob is also WT
    assert m["TC_lesion_dice"] == pytest.approx(0.5)
    assert (m["ET_lesion_dice"], m["ET_lesion_hd95"]) == (0.0, 374.0)
    assert (m["ET_dice"], m["ET_hd95"], m["ET_surface_dice_1mm"]) == (0.0, 374.0, 0.0)
    assert m["ET_ref_volume_mm3"] == 0.0 and m["ET_pred_volume_mm3"] == 16.0
    assert m["WT_ref_volume_mm3"] == 216 * 2.0
    assert m["TC_n_fp"] == 1.0 and m["WT_n_ref_lesions"] == 1.0
    both_empty = evaluate_case(np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8), ISO)
    for r in ("ET", "TC", "WT"):
        assert both_empty[f"{r}_lesion_dice"] == 1.0 and both_empty[f"{r}_lesion_hd95"] == 0.0
        assert both_empty[f"{r}_dice"] == 1.0 and both_empty[f"{r}_hd95"] == 0.0
        assert both_empty[f"{r}_surface_dice_1mm"] == 1.0


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shape"):
        evaluate_case(np.zeros((4, 4, 4), np.uint8), np.zeros((4, 4, 5), np.uint8), ISO)


# ----------------------------------------------------------------------------- panoptica
def _random_cells(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random boxes in separate 12^3 cells: matched pairs, FN-only, FP-only, empty cells.

    Cells keep objects >= 4 voxels apart, so no grouping or matching crosses cells and
    every matched pair overlaps (pred = ref shifted <= 1 voxel, resized by <= 1).
    """
    shape = (36, 36, 12)
    ref = np.zeros(shape, bool)
    pred = np.zeros(shape, bool)
    for cx in range(3):
        for cy in range(3):
            o = np.array([cx * 12, cy * 12, 0])
            kind = rng.choice(["pair", "pair", "fn", "fp", "none"])
            size = rng.integers(4, 7, 3)
            start = o + 2 + rng.integers(0, 8 - size + 1, 3)
            if kind in ("pair", "fn"):
                ref[tuple(slice(s, s + n) for s, n in zip(start, size, strict=True))] = True
            if kind == "pair":
                ps = np.clip(start + rng.integers(-1, 2, 3), o + 2, None)
                pn = np.clip(size + rng.integers(-1, 2, 3), 3, None)
                pred[tuple(slice(s, s + n) for s, n in zip(ps, pn, strict=True))] = True
            if kind == "fp":
                pred[tuple(slice(s, s + n) for s, n in zip(start, size - 2, strict=True))] = True
    return pred, ref


def test_lesion_dice_agrees_with_panoptica():
    pytest.importorskip("panoptica")
    from panoptica import (
        CCABackend,
        ConnectedComponentsInstanceApproximator,
        InputType,
        NaiveThresholdMatching,
        Panoptica_Evaluator,
    )

    # panoptica has no BraTS dilation matching; on one-to-one overlapping instances its
    # IoU>0 matching agrees with it. Then lesion-wise Dice = sum of matched instance Dice
    # / (n_ref + n_fp) = sq_dsc * tp / (n_ref_instances + fp), and legacy Dice = global
    # binary Dice. (panoptica's HD95 pools both directions: not comparable.)
    evaluator = Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC,
        instance_approximator=ConnectedComponentsInstanceApproximator(
            cca_backend=CCABackend.scipy
        ),
        instance_matcher=NaiveThresholdMatching(matching_threshold=0.0, strict_threshold=True),
    )
    rng = np.random.default_rng(2023)
    checked = 0
    while checked < 6:
        pred, ref = _random_cells(rng)
        if not ref.any():
            continue
        res = evaluator.evaluate(pred.astype(np.uint8), ref.astype(np.uint8))["ungrouped"]
        lw = lesion_wise(pred, ref, ISO)
        assert lw["n_ref_lesions"] == res.n_ref_instances
        assert lw["n_tp"] == res.tp and lw["n_fp"] == res.fp and lw["n_fn"] == res.fn
        sum_dsc = res.sq_dsc * res.tp if res.tp else 0.0
        assert lw["lesion_dice"] == pytest.approx(sum_dsc / (res.n_ref_instances + res.fp))
        assert dice(pred, ref) == pytest.approx(res.global_bin_dsc)
        checked += 1
