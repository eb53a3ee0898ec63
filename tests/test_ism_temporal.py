"""Temporal fusion, gap encoding, label interpolation through signed distances, temporal mixing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from menseg.config import ModelConfig
from menseg.errors import MensegError
from menseg.ism.temporal import (
    TemporalConfig,
    TemporalFusion,
    encode_gap,
    interpolate_labels,
    interpolate_regions,
    signed_distances,
    temporal_forward,
    temporal_mix,
    temporal_weight,
)
from menseg.nets import build_network
from menseg.regions import regions_to_labels


def feats(seed: int, shape=(2, 6, 5, 5, 4)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def fusion(channels: int = 6, alpha: float = 0.0, **kw) -> TemporalFusion:
    torch.manual_seed(0)
    m = TemporalFusion(channels, TemporalConfig(enabled=True, **kw))
    with torch.no_grad():
        m.alpha.fill_(alpha)
    return m


# ----------------------------------------------------------------------------- fusion


def test_no_prior_returns_current_features_itself():
    m = fusion()
    f = feats(0)
    assert m(f) is f
    assert m(f, None, torch.tensor([30.0, 60.0])) is f


def test_gate_closed_is_identity_bit_for_bit_even_with_a_prior():
    m = fusion(alpha=0.0)
    f, p = feats(0), feats(1) * 10
    out = m(f, p, torch.tensor([30.0, 400.0]))
    assert torch.equal(out, f)
    m.eval()
    assert torch.equal(m(f, p, 90.0), f)


def test_fresh_module_gives_alpha_a_gradient():
    m = fusion(alpha=0.0)
    f, p = feats(0), feats(1)
    m(f, p, torch.tensor([30.0, 400.0])).square().sum().backward()
    assert m.alpha.grad is not None and m.alpha.grad.abs() > 0


def test_open_gate_uses_prior_and_gap_and_trains_every_part():
    m = fusion(alpha=0.7)
    f, p = feats(0), feats(1)
    gap = torch.tensor([30.0, 400.0])
    out = m(f, p, gap)
    assert out.shape == f.shape
    assert not torch.allclose(out, f)
    assert not torch.allclose(out, m(f, feats(2), gap))  # the prior matters
    assert not torch.allclose(out, m(f, p, torch.tensor([365.0, 1500.0])))  # the gap matters
    out.square().sum().backward()
    assert m.alpha.grad.abs() > 0
    for name, prm in m.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name
    # h is not affine in its input: doubling the prior does not double the change
    d1 = m(f, p, gap) - f
    d2 = m(f, 2 * p, gap) - f
    assert not torch.allclose(d2, 2 * d1, atol=1e-4)


def test_has_prior_mask_keeps_samples_without_prior_exact():
    m = fusion(alpha=1.0)
    f = feats(0)
    p = feats(1)
    p[0] = float("nan")  # ignored entry
    out = m(f, p, torch.tensor([0.0, 200.0]), has_prior=torch.tensor([False, True]))
    assert torch.equal(out[0], f[0])
    assert not torch.allclose(out[1], f[1])


def test_fusion_input_errors():
    m = fusion()
    with pytest.raises(MensegError, match="gap_days"):
        m(feats(0), feats(1))
    with pytest.raises(MensegError, match="register"):
        m(feats(0), feats(1, (2, 6, 4, 4, 4)), 30.0)
    with pytest.raises(MensegError):
        m(feats(0), feats(1), torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(MensegError):
        TemporalConfig(p_mix=1.5)


@pytest.mark.parametrize("deep", [False, True])
def test_temporal_forward_gate_closed_equals_single_visit_network(deep):
    torch.manual_seed(0)
    cfg = ModelConfig(filters=(4, 8, 12, 16), deep_supervision=deep)
    net = build_network(cfg, in_channels=2, out_channels=3, patch_size=(16, 16, 8))
    m = fusion(channels=8, alpha=0.0, level=1)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 16, 16, 8, generator=g)
    xp = torch.randn(2, 2, 16, 16, 8, generator=g)
    for train in (False, True):
        net.train(train)
        m.train(train)
        ref = net(x)
        assert torch.equal(temporal_forward(net, m, x), ref)
        assert torch.equal(temporal_forward(net, m, x, xp, torch.tensor([30.0, 90.0])), ref)
    # once the gate opens the prior changes the prediction and the loss reaches the fusion
    net.eval()
    with torch.no_grad():
        m.alpha.fill_(0.5)
    out = temporal_forward(net, m, x, xp, torch.tensor([30.0, 90.0]))
    assert out.shape == (2, 3, 16, 16, 8) and not torch.allclose(out, net(x))
    out.sum().backward()
    assert m.alpha.grad.abs() > 0
    with pytest.raises(MensegError):
        temporal_forward(net, fusion(channels=8, level=7), x, xp, 30.0)


# ----------------------------------------------------------------------------- gap encoding


def test_gap_encoding_is_continuous_bounded_and_discriminative():
    d = torch.linspace(0.0, 2500.0, 501, dtype=torch.float64)  # float32 would round the 0.1 step
    e = encode_gap(d, 8, 1825.0)
    assert e.shape == (501, 8)
    assert e.abs().max() <= 1.0
    step = (encode_gap(d + 0.1, 8, 1825.0) - e).abs().max()
    assert step < 0.1 * 2 * math.pi * 64 / 1825.0 + 1e-5  # Lipschitz bound of the docstring
    assert step < 0.03
    e30, e365 = encode_gap(torch.tensor([30.0, 365.0]), 8, 1825.0)
    assert (e30 - e365).norm() > 0.5
    e30b = encode_gap(torch.tensor([31.0]), 8, 1825.0)[0]
    assert (e30 - e30b).norm() < 0.2 * (e30 - e365).norm()


def test_gap_encoding_odd_size_and_errors():
    e = encode_gap(torch.tensor([0.0, 1825.0]), 5, 1825.0)
    assert e.shape == (2, 5)
    assert torch.allclose(e[:, -1], torch.tanh(torch.tensor([0.0, 1.0])))
    assert encode_gap(torch.tensor([100]), 1, 1825.0).shape == (1, 1)  # integer days work
    with pytest.raises(MensegError):
        encode_gap(torch.tensor([1.0]), 0, 1825.0)


# ----------------------------------------------------------------------------- label interpolation


def sphere_labels(shape, centre, r_wt, r_tc, r_et, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Nested spheres (radii in mm): 2 in WT, 3 (ET) in TC shell, 1 (NETC) at the centre."""
    idx = np.indices(shape).astype(np.float64)
    d = np.sqrt(sum(((idx[i] - centre[i]) * spacing[i]) ** 2 for i in range(3)))
    lab = np.zeros(shape, np.uint8)
    for r, v in ((r_wt, 2), (r_tc, 3), (r_et, 1)):
        if r > 0:
            lab[d <= r] = v
    return lab


def test_interpolation_ends_are_exact_for_arrays_and_tensors():
    l0 = sphere_labels((24, 24, 20), (10, 11, 9), 6, 4, 2)
    l1 = sphere_labels((24, 24, 20), (13, 12, 10), 9, 6, 3)
    l1[2:4, 2:4, 2:4] = 2  # a second, separate oedema-only region
    assert np.array_equal(interpolate_labels(l0, l1, 0.0), l0)
    assert np.array_equal(interpolate_labels(l0, l1, 1.0), l1)
    out = interpolate_labels(torch.from_numpy(l0).long(), torch.from_numpy(l1).long(), 1.0)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.long
    assert torch.equal(out, torch.from_numpy(l1).long())
    # an empty visit (lesion appears) also has exact ends
    empty = np.zeros_like(l0)
    assert np.array_equal(interpolate_labels(empty, l1, 0.0), empty)
    assert np.array_equal(interpolate_labels(empty, l1, 1.0), l1)


def test_growing_sphere_midpoint_volume():
    shape, c = (32, 32, 32), (15.5, 15.5, 15.5)
    r0, r1 = 5.0, 11.0
    l0 = sphere_labels(shape, c, r0, 0, 0)
    l1 = sphere_labels(shape, c, r1, 0, 0)
    mid = interpolate_labels(l0, l1, 0.5)
    v0, v1, vm = (int((x > 0).sum()) for x in (l0, l1, mid))
    assert v0 < vm < v1
    ref = int((sphere_labels(shape, c, (r0 + r1) / 2, 0, 0) > 0).sum())
    assert abs(vm - ref) < 0.06 * ref, (vm, ref)
    # monotone in s for a growing lesion
    vols = [int((interpolate_labels(l0, l1, s) > 0).sum()) for s in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert vols == sorted(vols) and len(set(vols)) == 5


def test_spacing_is_used():
    sp = (1.0, 1.0, 2.0)
    shape, c = (32, 32, 16), (15.3, 15.6, 7.4)  # off-lattice centre: no distance ties
    l0 = sphere_labels(shape, c, 5.0, 0, 0, sp)
    l1 = sphere_labels(shape, c, 11.0, 0, 0, sp)
    mid = interpolate_labels(l0, l1, 0.5, spacing_mm=sp) > 0
    ref = sphere_labels(shape, c, 8.0, 0, 0, sp) > 0
    analytic = 4 / 3 * math.pi * 8.0**3 / 2.0  # voxels of 2 mm^3
    # voxel-centre distances on a 2 mm axis bias the midpoint low by a few % (measured -8 %)
    assert abs(int(mid.sum()) - analytic) < 0.1 * analytic
    # ignoring the spacing gives a state further from the true midpoint sphere
    wrong = interpolate_labels(l0, l1, 0.5, spacing_mm=1.0) > 0
    assert (mid ^ ref).sum() < 0.6 * (wrong ^ ref).sum()


def test_nesting_holds_without_the_guard():
    l0 = sphere_labels((24, 24, 24), (9, 10, 11), 7, 5, 2)
    l1 = sphere_labels((24, 24, 24), (13, 12, 12), 9, 6, 2)
    d0 = torch.from_numpy(signed_distances(l0))
    d1 = torch.from_numpy(signed_distances(l1))
    for s in (0.2, 0.5, 0.8):
        raw = (1 - s) * d0 + s * d1  # before re-nesting
        et, tc, wt = raw < 0
        assert not (et & ~tc).any() and not (tc & ~wt).any()
        regions = interpolate_regions(d0, d1, s)
        assert torch.equal(regions.bool(), torch.stack([et, tc, wt]))
        lab = interpolate_labels(l0, l1, s)
        assert torch.equal(regions_to_labels(regions, axis=-4), torch.from_numpy(lab))
        assert set(np.unique(lab).tolist()) == {0, 1, 2, 3}


def test_spatially_varying_fraction_and_batched_regions():
    shape, c = (24, 24, 24), (11.5, 11.5, 11.5)
    l0 = sphere_labels(shape, c, 4.0, 0, 0)
    l1 = sphere_labels(shape, c, 10.0, 0, 0)
    w = np.zeros(shape, np.float32)
    w[12:] = 1.0  # one half already at visit 1, the other still at visit 0
    out = interpolate_labels(l0, l1, w)
    assert np.array_equal(out[12:], l1[12:]) and np.array_equal(out[:12], l0[:12])
    with pytest.raises(MensegError):
        interpolate_labels(l0, l1, w + 2)
    d0 = torch.from_numpy(signed_distances(l0))[None].repeat(2, 1, 1, 1, 1)
    d1 = torch.from_numpy(signed_distances(l1))[None].repeat(2, 1, 1, 1, 1)
    wb = torch.tensor([0.0, 1.0]).view(2, 1, 1, 1, 1)
    reg = interpolate_regions(d0, d1, wb)
    assert reg.shape == (2, 3, *shape) and reg.dtype == torch.float32
    assert torch.equal(regions_to_labels(reg[1], axis=-4), torch.from_numpy(l1))


def test_label_errors():
    a = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(MensegError):
        interpolate_labels(a, np.zeros((4, 4, 5), np.uint8), 0.5)
    with pytest.raises(MensegError):
        interpolate_labels(a, a + 4, 0.5)
    with pytest.raises(MensegError):
        interpolate_labels(a, a, 1.5)


# ----------------------------------------------------------------------------- temporal mixing


class RecordingField:
    """A smooth stand-in field lambda(p, t) that remembers the times it was evaluated at."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, p: torch.Tensor, t: float = 0.0) -> torch.Tensor:
        self.times.append(float(t))
        return torch.sigmoid(torch.sin(p[..., 0] / 7.0 + p[..., 1] / 11.0 + t / 100.0) * 3)


def test_temporal_mix_ends_shape_and_time():
    from menseg.ism.fields import grid_points

    f0, f1 = feats(0), feats(1)
    pts = grid_points((20, 20, 16), (1.0, 1.0, 1.0), stride=(4, 4, 4))
    field = RecordingField()
    assert torch.equal(temporal_mix(f0, f1, field, pts, 100.0, 500.0, 0.0), f0)
    assert torch.equal(temporal_mix(f0, f1, field, pts, 100.0, 500.0, 1.0), f1)
    mid = temporal_mix(f0, f1, field, pts, 100.0, 500.0, 0.25)
    assert mid.shape == f0.shape
    assert field.times == [100.0, 500.0, 200.0]  # lambda at t = t0 + s (t1 - t0)
    w = temporal_weight(field, pts, 100.0, 500.0, 0.25)
    assert w.min() >= 0.25**2 - 1e-6 and w.max() <= 2 * 0.25 - 0.25**2 + 1e-6
    assert w.max() - w.min() > 0.05  # spatially varying progression
    torch.testing.assert_close(mid, (1 - w) * f0 + w * f1)
    # the same s at another time gives another spatial pattern (the field depends on t)
    assert not torch.allclose(w, temporal_weight(field, pts, 100.0, 2500.0, 0.25))
    # w is non-decreasing in s everywhere
    ws = [temporal_weight(field, pts, 0.0, 300.0, s) for s in (0.0, 0.3, 0.6, 1.0)]
    for a, b in zip(ws, ws[1:], strict=False):
        assert (b >= a - 1e-6).all()


def test_temporal_mix_with_a_sampled_field_and_a_fusion():
    from menseg.ism.fields import FieldConfig, grid_points, sample_field

    cfg = FieldConfig(wavelength_mm=(48.0, 96.0), period_days=(90.0, 90.0), sharpness=(2.0, 2.0))
    field = sample_field(torch.Generator().manual_seed(0), cfg, (20, 20, 16), (1.0, 1.0, 1.0))
    f0, f1 = feats(0), feats(1)
    pts = grid_points((20, 20, 16), (1.0, 1.0, 1.0), stride=(4, 4, 4))
    seen = {}

    def fuse(fa, fb, lam):
        seen["lam"] = lam
        return lam * fa + (1 - lam) * fb

    out = temporal_mix(f0, f1, field, pts, 0.0, 365.0, 0.5, fusion=fuse)
    w = temporal_weight(field, pts, 0.0, 365.0, 0.5)
    assert seen["lam"].shape == (2, 1, 5, 5, 4)
    torch.testing.assert_close(seen["lam"][0, 0], 1 - w)
    torch.testing.assert_close(out, temporal_mix(f0, f1, field, pts, 0.0, 365.0, 0.5))
    # label-grid and feature-grid weights are one function of (p, t): a feature voxel sits at the
    # centre of its 4^3 block of label voxels, so for a smooth field it matches the block average
    fine = temporal_weight(field, grid_points((20, 20, 16), (1.0, 1.0, 1.0)), 0.0, 365.0, 0.5)
    pooled = torch.nn.functional.avg_pool3d(fine[None, None], 4)[0, 0]
    assert (pooled - w).abs().max() < 0.02
    with pytest.raises(MensegError):
        temporal_mix(f0, f1, field, pts, 0.0, 365.0, 1.5)
    with pytest.raises(MensegError):
        temporal_mix(f0, f1[:, :, :4], field, pts, 0.0, 365.0, 0.5)
