"""Spatial feature mixing: identity without a mix, cut-and-paste targets, non-linear fusion, replay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from menseg.config import ModelConfig
from menseg.errors import MensegError
from menseg.ism.fields import FieldConfig, MixField, field_on_grid
from menseg.ism.spatial import (
    FeatureFusion,
    FieldBatch,
    SpatialMixConfig,
    SpatialMixer,
    batch_partner,
    gather_partner,
    mix_targets,
    sample_field_batch,
)
from menseg.nets import build_network
from menseg.nets.unet import encode, level_channels
from menseg.regions import labels_to_regions

PATCH = (32, 32, 16)
SPACING = (1.0, 1.0, 1.0)
FIELD = FieldConfig(wavelength_mm=(8.0, 16.0))  # structure inside a 32 mm patch
CFG = SpatialMixConfig(enabled=True, p=1.0, levels=(2,), field=FIELD)


def _net() -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(filters=(4, 8, 8, 16), deep_supervision=True, deep_supr_num=2)
    return build_network(cfg, in_channels=2, out_channels=3, patch_size=PATCH).train()


def _mixer(net: nn.Module, cfg: SpatialMixConfig = CFG) -> SpatialMixer:
    torch.manual_seed(1)
    return SpatialMixer(cfg, level_channels(net)).train()


def _x(seed: int, b: int = 2) -> torch.Tensor:
    return torch.randn(b, 2, *PATCH, generator=torch.Generator().manual_seed(seed))


def _batch(seed: int, cfg: SpatialMixConfig = CFG, b: int = 2) -> FieldBatch:
    return sample_field_batch(torch.Generator().manual_seed(seed), cfg, b, PATCH, SPACING)


def _unit_field() -> MixField:
    """A field that is 1 everywhere (all from source a)."""
    z = torch.zeros(1)
    return MixField(torch.zeros(1, 3), z, z, z, threshold=-1e9, sharpness=1.0, ratio=1.0)


def _perturb_g(mixer: SpatialMixer, seed: int = 9) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for fusion in mixer.fusions.values():
            last = fusion.g[-1]
            last.weight.copy_(0.5 * torch.randn(last.weight.shape, generator=gen))
            last.bias.copy_(0.1 * torch.randn(last.bias.shape, generator=gen))


def test_no_mix_is_exactly_the_plain_forward() -> None:
    net = _net()
    mixer = _mixer(net)
    _perturb_g(mixer)  # even a trained fusion leaves unmixed samples alone
    xa, xb = _x(0), _x(1)
    plain = net(xa)
    for fb in (
        FieldBatch((None, None), (None, None), SPACING),
        FieldBatch((_unit_field(), _unit_field()), ("location", "synthetic"), SPACING),
        _batch(0, SpatialMixConfig(enabled=True, p=0.0, field=FIELD)),
        _batch(0, SpatialMixConfig(enabled=False, p=1.0, field=FIELD)),
    ):
        if not fb.needs_partner_input:
            assert torch.equal(mixer.mix_forward(net, xa, None, fb), plain)
        assert torch.equal(mixer.mix_forward(net, xa, xb, fb), plain)


def test_fusion_at_init_is_the_exact_blend() -> None:
    gen = torch.Generator().manual_seed(2)
    fa, fb = torch.randn(2, 8, 8, 8, 4, generator=gen), torch.randn(2, 8, 8, 8, 4, generator=gen)
    fusion = FeatureFusion(8)
    ones, zeros = torch.ones(2, 1, 8, 8, 4), torch.zeros(2, 1, 8, 8, 4)
    assert torch.equal(fusion(fa, fb, ones), fa)  # 1 * fa + 0 * fb + 0
    assert torch.equal(fusion(fa, fb, zeros), fb)
    lam = torch.rand(2, 1, 8, 8, 4, generator=gen)
    assert torch.equal(fusion(fa, fb, lam), lam * fa + (1 - lam) * fb)
    # a mixed sample whose field is 1 everywhere also reproduces the plain forward at init
    net = _net()
    mixer = _mixer(net)
    fbatch = FieldBatch((_unit_field(), None), ("batch", None), SPACING)
    assert torch.equal(mixer.mix_forward(net, _x(0), None, fbatch), net(_x(0)))


def test_mixed_forward_shapes_and_effect() -> None:
    net = _net()
    mixer = _mixer(net)
    xa, xb = _x(0), _x(1)
    fb = _batch(3)
    assert fb.any_mixed and all(f is not None for f in fb.fields)
    xb_full = gather_partner(xa, fb, xb)
    out = mixer.mix_forward(net, xa, xb_full if fb.needs_partner_input else None, fb)
    assert out.shape == net(xa).shape == (2, 3, 3, *PATCH)
    assert not torch.allclose(out, net(xa))
    net.eval()
    with torch.no_grad():
        assert net(xa).shape == (2, 3, *PATCH)  # evaluation never involves the mixer


def test_batch_partner_without_second_encoder_pass() -> None:
    net = _net()
    mixer = _mixer(net)
    xa = _x(0, b=3)
    fb = FieldBatch(_batch(4, b=3).fields, ("batch",) * 3, SPACING)
    rolled = mixer.mix_forward(net, xa, None, fb)
    encoded = mixer.mix_forward(net, xa, batch_partner(xa), fb)
    assert torch.allclose(rolled, encoded, atol=1e-5)


def test_skips_blended_and_fused_levels() -> None:
    net = _net()
    cfg = SpatialMixConfig(enabled=True, p=1.0, levels=(1, 2), field=FIELD)
    mixer = _mixer(net, cfg)
    assert sorted(mixer.fusions) == ["1", "2"] and mixer.depth == 2
    _perturb_g(mixer)
    xa, xb = _x(0), _x(1)
    fb = _batch(5, cfg)
    with torch.no_grad():
        fa_, fb_ = encode(net, xa, stop=2), encode(net, xb, stop=2)
        lams = mixer.level_fields(net, PATCH, fb, "cpu")
        mixed = mixer(fa_, fb_, lams)
    assert len(mixed) == 3
    assert [tuple(lam.shape[2:]) for lam in lams] == [(32, 32, 16), (16, 16, 8), (8, 8, 4)]
    assert torch.equal(mixed[0], lams[0] * fa_[0] + (1 - lams[0]) * fb_[0])  # plain blend of the skip
    for lv in (1, 2):
        blend = lams[lv] * fa_[lv] + (1 - lams[lv]) * fb_[lv]
        assert not torch.allclose(mixed[lv], blend, atol=1e-4)  # learned fusion


def test_mix_targets_binary_field_is_cut_and_paste() -> None:
    gen = torch.Generator().manual_seed(6)
    ya = torch.randint(0, 4, (2, *PATCH), generator=gen)
    yb = torch.randint(0, 4, (2, *PATCH), generator=gen)
    f = _batch(7).fields[0]
    lam = (field_on_grid(f, PATCH, SPACING) > 0.5).float()
    lam = torch.stack([lam, 1 - lam])[:, None]
    soft = mix_targets(labels_to_regions(ya), labels_to_regions(yb), lam)
    pasted = torch.where(lam[:, 0] > 0.5, ya, yb)
    assert torch.equal(soft, labels_to_regions(pasted))
    # a soft field gives targets in [0, 1] with the calibrated mean share from a
    lam_soft = _batch(7).on_grid(PATCH)
    soft = mix_targets(labels_to_regions(ya), labels_to_regions(yb), lam_soft)
    assert soft.min() >= 0 and soft.max() <= 1
    with pytest.raises(MensegError):
        mix_targets(labels_to_regions(ya), labels_to_regions(yb)[:1], lam_soft)


def test_gradient_flows_into_the_fusion() -> None:
    net = _net()
    mixer = _mixer(net)
    xa, xb = _x(0), _x(1)
    fb = _batch(3)
    g0, g_last = mixer.fusions["2"].g[0], mixer.fusions["2"].g[-1]
    mixer.mix_forward(net, xa, gather_partner(xa, fb, xb), fb).square().mean().backward()
    assert g_last.weight.grad.abs().sum() > 0 and g_last.bias.grad.abs().sum() > 0
    assert g0.weight.grad.abs().sum() == 0  # behind a zero conv at init
    assert all(p.grad is not None for p in net.parameters())
    mixer.zero_grad()
    _perturb_g(mixer)
    mixer.mix_forward(net, xa, gather_partner(xa, fb, xb), fb).square().mean().backward()
    assert g0.weight.grad.abs().sum() > 0


def test_fusion_is_non_linear_once_trained() -> None:
    gen = torch.Generator().manual_seed(8)
    fa, fb = torch.randn(1, 8, 8, 8, 4, generator=gen), torch.randn(1, 8, 8, 8, 4, generator=gen)
    m = field_on_grid(_batch(7).fields[0], (32, 32, 16), SPACING, stride=(4, 4, 4))[None, None]
    fusion = FeatureFusion(8)

    def affine_gap() -> float:
        with torch.no_grad():
            mid = fusion(fa, fb, 0.5 * m)
            ends = 0.5 * (fusion(fa, fb, 0 * m) + fusion(fa, fb, m))
        return float((mid - ends).abs().max())

    assert affine_gap() < 1e-5  # at init: the linear blend, affine in lambda
    with torch.no_grad():
        fusion.g[-1].weight.normal_(generator=gen)
    assert affine_gap() > 1e-2


def test_replay_from_seed() -> None:
    net = _net()
    mixer = _mixer(net)
    xa, xb = _x(0), _x(1)

    def run(seed: int) -> torch.Tensor:
        fb = _batch(seed)
        return mixer.mix_forward(net, xa, gather_partner(xa, fb, xb), fb)

    assert torch.equal(run(11), run(11))
    assert not torch.allclose(run(11), run(12))


def test_sample_field_batch() -> None:
    cfg = SpatialMixConfig(enabled=True, p=0.5, sources=("batch", "location", "synthetic"), field=FIELD)
    fbs = [_batch(s, cfg, b=4) for s in range(10)]
    flags = [f is not None for fb in fbs for f in fb.fields]
    assert 0 < sum(flags) < len(flags)
    srcs = {s for fb in fbs for s in fb.sources}
    assert srcs == {None, "batch", "location", "synthetic"}
    for fb in fbs:
        assert all((f is None) == (s is None) for f, s in zip(fb.fields, fb.sources, strict=True))
        lam = fb.on_grid(PATCH, (2, 2, 2))
        assert lam.shape == (4, 1, 16, 16, 8)
        for b, f in enumerate(fb.fields):
            if f is None:
                assert torch.equal(lam[b], torch.ones_like(lam[b]))
    one = _batch(0, SpatialMixConfig(enabled=True, p=1.0, field=FIELD), b=1)
    assert one.sources[0] in ("location", "synthetic")  # no batch partner for a batch of one
    only_batch = SpatialMixConfig(enabled=True, p=1.0, sources=("batch",), field=FIELD)
    assert not _batch(0, only_batch, b=1).any_mixed


def test_gather_partner_rows() -> None:
    x = torch.arange(4.0)[:, None]
    other = 10 + x  # each non-batch partner's own row, whatever its source
    fb = FieldBatch((None,) * 4, (None, "location", "synthetic", "unlabelled"), SPACING)
    assert gather_partner(x, fb, other)[:, 0].tolist() == [0.0, 11.0, 12.0, 13.0]
    fb = FieldBatch((None,) * 4, ("batch", "batch", None, None), SPACING)
    assert gather_partner(x, fb)[:, 0].tolist() == [3.0, 0.0, 2.0, 3.0]
    with pytest.raises(MensegError):
        gather_partner(x, FieldBatch((None,) * 4, (None, "location", None, None), SPACING))


def test_config_validation() -> None:
    for bad in ({"p": 1.5}, {"levels": ()}, {"levels": (-1,)}, {"sources": ("elsewhere",)}, {"sources": ()}):
        with pytest.raises(MensegError):
            SpatialMixConfig(**bad)
    with pytest.raises(MensegError):
        SpatialMixer(SpatialMixConfig(levels=(4,)), [4, 8, 8, 16])
    net = _net()
    with pytest.raises(MensegError):
        fb = FieldBatch((_unit_field(), None), ("location", None), SPACING)
        _mixer(net).mix_forward(net, _x(0), None, fb)
    with pytest.raises(MensegError):
        _mixer(net).mix_forward(net, _x(0), None, FieldBatch((None,), (None,), SPACING))


def test_keep_mask_holds_the_field_at_one_on_every_level() -> None:
    from menseg.ism.spatial import keep_own
    from menseg.nets.unet import level_strides

    net = _net()
    mixer = _mixer(net)
    fb = _batch(3)
    keep = torch.zeros(2, 1, *PATCH)
    keep[:, :, 8:16, 8:16, 4:8] = 1.0
    lams = mixer.level_fields(net, PATCH, fb, "cpu", keep)
    plain = mixer.level_fields(net, PATCH, fb, "cpu")
    for lam, lam0, s in zip(lams, plain, level_strides(net), strict=False):
        k = nn.functional.max_pool3d(keep, s, s) if s != (1, 1, 1) else keep
        assert torch.equal(lam[k > 0], torch.ones_like(lam[k > 0]))  # kept where the mask is
        assert torch.equal(lam[k == 0], lam0[k == 0])  # the field elsewhere
    full = keep_own(fb.on_grid(PATCH), keep)
    assert torch.equal(full[keep > 0], torch.ones_like(full[keep > 0]))
    assert torch.equal(keep_own(full, None), full)
