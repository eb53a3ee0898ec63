"""Sim2Real feature alignment: gradient reversal, schedules, MMD / CORAL, domain classifier."""

import math

import pytest
import torch

from menseg.config import AlignConfig
from menseg.errors import MensegError
from menseg.sim2real.align import (
    MMD_SCALES,
    DomainClassifier,
    FeatureAligner,
    align_weight,
    coral_loss,
    grad_reverse,
    mmd_loss,
    sample_vectors,
)

CHANNELS = [4, 8, 16]


def _feats(gen, batch=2, shift=0.0, scale=1.0, size=8):
    """Fake encoder features for CHANNELS: level l is (batch, C_l, size/2^l, ...)."""
    return [torch.randn(batch, c, *(size >> lv,) * 3, generator=gen) * scale + shift
            for lv, c in enumerate(CHANNELS)]


# ---------------------------------------------------------------- gradient reversal


@pytest.mark.parametrize("lam", [1.0, 0.37])
def test_grad_reverse_is_exact(lam):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=gen, requires_grad=True)
    g = torch.randn(3, 4, 5, generator=gen)
    y = grad_reverse(x, lam)
    assert torch.equal(y, x)
    y.backward(g)
    assert torch.equal(x.grad, g * (-lam))


def test_grad_reverse_zero_blocks_gradient():
    x = torch.randn(5, requires_grad=True)
    grad_reverse(x, 0.0).sum().backward()
    assert torch.equal(x.grad.abs(), torch.zeros(5))


# ---------------------------------------------------------------- schedule


def test_align_weight_schedules():
    w, total = 0.4, 100
    const = AlignConfig(method="mmd", schedule="constant", weight=w)
    assert [align_weight(const, s, total) for s in (0, 50, 100)] == [w, w, w]

    lin = AlignConfig(method="mmd", schedule="linear", weight=w, ramp=0.5)
    assert align_weight(lin, 0, total) == 0.0
    assert align_weight(lin, 25, total) == pytest.approx(w / 2)
    assert align_weight(lin, 50, total) == pytest.approx(w)
    assert align_weight(lin, 100, total) == pytest.approx(w)

    dann = AlignConfig(method="adversarial", schedule="dann", weight=w)
    assert align_weight(dann, 0, total) == 0.0
    assert align_weight(dann, 50, total) == pytest.approx(w * (2 / (1 + math.exp(-5)) - 1))
    end = align_weight(dann, total, total)
    assert end == pytest.approx(w * 0.999909, rel=1e-6) and end < w
    vals = [align_weight(dann, s, total) for s in range(total + 1)]
    assert all(b > a for a, b in zip(vals, vals[1:], strict=False))

    with pytest.raises(MensegError):
        align_weight(dann, 0, 0)


# ---------------------------------------------------------------- distances


@pytest.mark.parametrize("dist", [mmd_loss, coral_loss])
def test_distances_zero_symmetric_and_sensitive(dist):
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(256, 6, generator=gen)
    a2 = torch.randn(256, 6, generator=gen)  # same distribution, other sample
    shifted = a2 + 1.5
    rescaled = a2 * 2.5
    assert abs(float(dist(a, a))) < 1e-6
    same = float(dist(a, a2))
    assert float(dist(a, rescaled)) > 5 * same
    if dist is mmd_loss:  # CORAL only sees covariances, not means
        assert float(dist(a, shifted)) > 5 * same
    assert float(dist(a, rescaled)) == pytest.approx(float(dist(rescaled, a)), rel=1e-5)


@pytest.mark.parametrize("dist", [mmd_loss, coral_loss])
def test_distances_differentiable(dist):
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(64, 5, generator=gen, requires_grad=True)
    b = (torch.randn(64, 5, generator=gen) * 1.5 + 0.5).requires_grad_(True)
    dist(a, b).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    assert a.grad.abs().sum() > 0
    c = torch.randn(32, 5, generator=gen, requires_grad=True)
    dist(c, c).backward()  # zero distances: still a finite gradient
    assert torch.isfinite(c.grad).all()


def test_mmd_equals_hand_computed_value():
    # a = {0, 1}, b = {3} in 1-D: pairwise distances 1, 3, 2 -> median bandwidth 2.
    a, b = torch.tensor([[0.0], [1.0]]), torch.tensor([[3.0]])

    def k(d: float) -> float:
        return sum(math.exp(-d * d / (2 * (2.0 * s) ** 2)) for s in MMD_SCALES) / len(MMD_SCALES)

    want = (2 + 2 * k(1)) / 4 + k(0) - 2 * (k(3) + k(2)) / 2
    assert float(mmd_loss(a, b)) == pytest.approx(want, rel=1e-5)
    assert want > 0.1  # far from 0: a wrong bandwidth or term would show
    assert float(mmd_loss(b, a)) == pytest.approx(want, rel=1e-5)


def test_mmd_different_sizes():
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(40, 3, generator=gen), torch.randn(70, 3, generator=gen) + 2
    assert float(mmd_loss(a, b)) == pytest.approx(float(mmd_loss(b, a)), rel=1e-5)
    with pytest.raises(MensegError):
        mmd_loss(a, torch.randn(5, 4))


# ---------------------------------------------------------------- sampling


def test_sample_vectors_rows_distinct_and_replayable():
    gen = torch.Generator().manual_seed(4)
    feat = torch.arange(2 * 3 * 4 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4, 4)
    rows = feat.movedim(1, -1).reshape(-1, 3)
    v = sample_vectors(feat, 20, gen)
    assert v.shape == (20, 3)
    # every drawn vector is a voxel's feature vector, no voxel twice
    matches = (v[:, None, :] == rows[None]).all(-1)
    assert (matches.sum(1) == 1).all()
    assert len(set(matches.float().argmax(1).tolist())) == 20
    assert sample_vectors(feat, 1000, gen).shape == (128, 3)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(sample_vectors(feat, 7, g1), sample_vectors(feat, 7, g2))


# ---------------------------------------------------------------- adversarial


def test_domain_classifier_shape():
    gen = torch.Generator().manual_seed(5)
    clf = DomainClassifier(CHANNELS, (1, 2))
    assert clf(_feats(gen, batch=3)).shape == (3,)


def test_adversarial_classifier_learns_separated_domains():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(6)
    cfg = AlignConfig(method="adversarial", levels=(0, 2), weight=0.5)
    aligner = FeatureAligner(cfg, CHANNELS)
    src, tgt = _feats(gen, shift=-1.0), _feats(gen, shift=1.0)
    opt = torch.optim.Adam(aligner.parameters(), lr=1e-2)
    for _ in range(100):
        loss, stats = aligner(src, tgt, 0.5, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    loss, stats = aligner(src, tgt, 0.5, gen)
    assert stats["domain_acc"] == 1.0
    assert stats["align_loss"] < 0.1


def test_adversarial_encoder_gets_reversed_gradient():
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(7)
    w = 0.5
    aligner = FeatureAligner(AlignConfig(method="adversarial", levels=(1, 2), weight=w), CHANNELS)
    src = [f.requires_grad_(True) for f in _feats(gen, shift=-0.3)]
    tgt = [f.requires_grad_(True) for f in _feats(gen, shift=0.3)]
    loss, _ = aligner(src, tgt, w, gen)
    got = torch.autograd.grad(loss, [src[1], src[2], tgt[2], *aligner.parameters()])

    # manual BCE on the same classifier without reversal: the classifier's own gradient is the
    # same, the features' gradient is -w times it
    clf = aligner.classifier
    logits = torch.cat([clf(src), clf(tgt)])
    labels = torch.cat([torch.zeros(2), torch.ones(2)])
    manual = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    assert float(manual.detach()) == pytest.approx(float(loss.detach()))
    ref = torch.autograd.grad(manual, [src[1], src[2], tgt[2], *aligner.parameters()])
    for gf, rf in zip(got[:3], ref[:3], strict=True):
        assert rf.abs().sum() > 0
        torch.testing.assert_close(gf, -w * rf, rtol=1e-6, atol=1e-9)
    for gp, rp in zip(got[3:], ref[3:], strict=True):
        torch.testing.assert_close(gp, rp, rtol=1e-6, atol=1e-9)
    assert src[0].grad is None  # level 0 is not aligned


# ---------------------------------------------------------------- mmd / coral / none


def test_mmd_alignment_moves_source_towards_target():
    gen = torch.Generator().manual_seed(8)
    cfg = AlignConfig(method="mmd", levels=(0, 1), weight=1.0, max_voxels=128)
    aligner = FeatureAligner(cfg, CHANNELS)
    base_src = [f.detach() for f in _feats(gen, shift=0.0)]
    tgt = [f.detach() for f in _feats(gen, shift=1.0)]
    # the "encoder": a learnable per-channel shift of the source features
    shifts = [torch.zeros(1, c, 1, 1, 1, requires_grad=True) for c in CHANNELS]
    opt = torch.optim.SGD(shifts, lr=3.0)

    @torch.no_grad()
    def gap(lv):
        return float(((base_src[lv] + shifts[lv]).mean((0, 2, 3, 4)) - tgt[lv].mean((0, 2, 3, 4))).norm())

    before = [gap(lv) for lv in cfg.levels]
    for _ in range(50):
        src = [f + s for f, s in zip(base_src, shifts, strict=True)]
        loss, stats = aligner(src, tgt, 1.0, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = [gap(lv) for lv in cfg.levels]
    assert all(a < 0.2 * b for a, b in zip(after, before, strict=True)), (before, after)
    assert set(stats) == {"align_loss", "align_weight"}


def test_coral_and_none_terms():
    gen = torch.Generator().manual_seed(10)
    src = [f.requires_grad_(True) for f in _feats(gen)]
    tgt = _feats(gen, scale=2.0)
    coral = FeatureAligner(AlignConfig(method="coral", levels=(0, 1), max_voxels=64), CHANNELS)
    loss, stats = coral(src, tgt, 0.25, gen)
    assert stats["align_weight"] == 0.25 and stats["align_loss"] > 0
    assert float(loss.detach()) == pytest.approx(0.25 * stats["align_loss"])
    loss.backward()
    assert torch.isfinite(src[0].grad).all()
    assert len(list(coral.parameters())) == 0

    none = FeatureAligner(AlignConfig(method="none"), CHANNELS)
    loss, _ = none(src, tgt, 1.0, gen)
    assert float(loss) == 0.0


def test_bad_levels_raise():
    with pytest.raises(MensegError, match="levels"):
        FeatureAligner(AlignConfig(method="mmd", levels=(1, 3)), CHANNELS)
    with pytest.raises(MensegError, match="levels"):
        DomainClassifier(CHANNELS, (5,))
    gen = torch.Generator().manual_seed(11)
    aligner = FeatureAligner(AlignConfig(method="mmd", levels=(0, 1)), CHANNELS)
    with pytest.raises(MensegError):
        aligner(_feats(gen)[:2], _feats(gen), 1.0, gen)
