"""Modal fusion: per-sequence encoders, presence-masked per-location weighting, sequence dropout."""

from __future__ import annotations

import itertools

import pytest
import torch

from menseg.config import ModelConfig
from menseg.constants import MODALITIES
from menseg.errors import MensegError
from menseg.ism.modal import (
    ModalFusionConfig,
    ModalFusionStem,
    mask_absent,
    names_from_presence,
    presence_from_names,
    sample_presence,
)
from menseg.nets import build_network
from menseg.nets.unet import decode, encode

M = len(MODALITIES)
SIZE = (12, 10, 8)


def _stem(out_channels: int = 8, seed: int = 0, randomise_scores: bool = True, **kw) -> ModalFusionStem:
    torch.manual_seed(seed)
    stem = ModalFusionStem(M, out_channels, **kw)
    if randomise_scores:  # a trained stem: weights differ between sequences and locations
        with torch.no_grad():
            stem.scores.weight.normal_(0.0, 1.0)
            stem.scores.bias.normal_(0.0, 1.0)
    return stem


def _x(batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, M, *SIZE, generator=g)


def _all_subsets() -> list[tuple[int, ...]]:
    return [s for k in range(1, M + 1) for s in itertools.combinations(range(M), k)]


# --- stem


@pytest.mark.parametrize("train", [True, False])
def test_output_shape_and_weights_shape(train: bool) -> None:
    stem = _stem(out_channels=8).train(train)
    x = _x(batch=3)
    out, w = stem(x, return_weights=True)
    assert out.shape == (3, 8, *SIZE)
    assert w.shape == (3, M, *SIZE)
    assert torch.isfinite(out).all()
    assert stem(x).shape == (3, 8, *SIZE)  # without weights: a plain tensor
    assert stem.modality_channels == 4  # default: max(4, C // 4)
    assert ModalFusionStem(M, 16, modality_channels=16).modality_channels == 16


@pytest.mark.parametrize("train", [True, False])
def test_absent_sequences_do_not_influence_output(train: bool) -> None:
    stem = _stem().train(train)
    x = _x(batch=2)
    present = torch.tensor([[True, False, True, True], [False, True, False, False]])
    out_a, w_a = stem(x, present, return_weights=True)
    y = x.clone()
    y[0, 1] = 1000.0 * torch.randn(SIZE)
    y[1, 0] = float("nan")
    y[1, 2] = float("inf")
    y[1, 3] = -5.0
    out_b, w_b = stem(y, present, return_weights=True)
    assert torch.equal(out_a, out_b)
    assert torch.equal(w_a, w_b)
    # a present channel does matter
    z = x.clone()
    z[0, 0] += 1.0
    assert not torch.equal(stem(z, present)[0], out_a[0])


def test_absent_sequences_get_no_gradient() -> None:
    stem = _stem().train()
    x = _x(batch=2).requires_grad_(True)
    present = torch.tensor([[True, False, True, True], [False, True, True, False]])
    stem(x, present).square().mean().backward()
    assert x.grad is not None
    for b in range(2):
        for m in range(M):
            g = x.grad[b, m]
            if present[b, m]:
                assert g.abs().sum() > 0
            else:
                assert torch.equal(g, torch.zeros_like(g))


def test_weights_sum_to_one_over_present_and_zero_for_absent() -> None:
    stem = _stem().eval()
    x = _x(batch=2)
    present = torch.tensor([[True, True, False, True], [False, True, True, False]])
    _, w = stem(x, present, return_weights=True)
    assert (w >= 0).all() and (w <= 1).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(2, *SIZE), atol=1e-6, rtol=0)
    absent = ~present
    assert torch.equal(w[absent], torch.zeros_like(w[absent]))
    # the weighting is learned and per location: not uniform once the score convs are non-zero
    assert w[0, 0].std() > 1e-3
    assert (w[0, 0] - w[0, 1]).abs().max() > 1e-3


def test_fresh_stem_weights_present_sequences_uniformly() -> None:
    stem = _stem(randomise_scores=False).eval()
    present = torch.tensor([[True, True, False, True], [False, True, False, False]])
    _, w = stem(_x(batch=2), present, return_weights=True)
    torch.testing.assert_close(w[0, [0, 1, 3]], torch.full((3, *SIZE), 1 / 3), atol=1e-6, rtol=0)
    assert torch.equal(w[1, 1], torch.ones(SIZE))


@pytest.mark.parametrize("train", [True, False])
def test_every_non_empty_subset_works(train: bool) -> None:
    subsets = _all_subsets()
    assert len(subsets) == 15
    stem = _stem().train(train)
    present = torch.zeros(len(subsets), M, dtype=torch.bool)
    for i, s in enumerate(subsets):
        present[i, list(s)] = True
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, M, *SIZE, generator=g).expand(len(subsets), -1, -1, -1, -1).contiguous()
    out, w = stem(x, present, return_weights=True)
    assert out.shape == (15, 8, *SIZE)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(w.sum(dim=1), torch.ones(15, *SIZE), atol=1e-6, rtol=0)
    for i, s in enumerate(subsets):
        for m in range(M):
            if m not in s:
                assert torch.equal(w[i, m], torch.zeros(SIZE))
        if len(s) == 1:
            assert torch.equal(w[i, s[0]], torch.ones(SIZE))
        # the same subset alone (1-sample batch, (M,) mask) gives the same result
        alone = stem(x[i : i + 1], present[i])
        torch.testing.assert_close(alone, out[i : i + 1], atol=1e-5, rtol=1e-5)
    # different subsets give different features (the net sees what is there)
    flat = out.flatten(1)
    for i, j in itertools.combinations(range(15), 2):
        assert not torch.allclose(flat[i], flat[j], atol=1e-4)


def test_sequence_absent_from_whole_batch_changes_nothing() -> None:
    stem = _stem().eval()
    x = _x(batch=2)
    p_mixed = torch.tensor([[True, True, False, True], [True, False, False, True]])  # t2f absent from both
    out = stem(x, p_mixed)
    y = x.clone()
    y[:, 2] = float("inf")
    y[1, 1] = float("nan")
    assert torch.equal(stem(y, p_mixed), out)


def test_gradients_reach_every_sequence_encoder() -> None:
    stem = _stem(randomise_scores=False).train()
    x = _x(batch=2)
    target = torch.randn(2, 8, *SIZE, generator=torch.Generator().manual_seed(5))
    (stem(x) * target).sum().backward()
    c = stem.modality_channels
    for m in range(M):
        sl = slice(m * c, (m + 1) * c)
        g = stem.encoder.weight.grad[sl]
        assert torch.isfinite(g).all() and g.abs().sum() > 0, m
        # zero-initialised score convs still learn
        assert stem.scores.weight.grad[m].abs().sum() > 0, m
    assert stem.fuse.conv2.conv.weight.grad.abs().sum() > 0


def test_grouped_encoder_keeps_sequences_apart() -> None:
    """Sequence m's encoder features depend on input channel m only (the grouped conv is M encoders)."""
    stem = _stem().eval()
    x = _x(batch=1)
    c = stem.modality_channels
    f = stem.encoder(x)
    y = x.clone()
    y[:, 1] = torch.randn_like(y[:, 1])
    g = stem.encoder(y)
    for m in range(M):
        same = torch.equal(f[:, m * c : (m + 1) * c], g[:, m * c : (m + 1) * c])
        assert same == (m != 1), m
    names = {"encoder.weight", "encoder.bias", "scores.weight", "scores.bias"}
    assert set(stem.sequence_parameters(0)) == names


def test_bad_inputs_raise() -> None:
    stem = _stem()
    x = _x(batch=2)
    with pytest.raises(MensegError, match="at least one"):
        stem(x, torch.tensor([[True, True, True, True], [False, False, False, False]]))
    with pytest.raises(MensegError, match="presence mask"):
        stem(x, torch.ones(3, M, dtype=torch.bool))
    with pytest.raises(MensegError, match="expects"):
        stem(x[:, :3])
    with pytest.raises(MensegError, match="norm"):
        ModalFusionStem(M, 8, norm="group")


def test_bind_is_the_stem_with_a_fixed_mask() -> None:
    stem = _stem().eval()
    x = _x(batch=2)
    present = torch.tensor([[True, False, True, True], [False, True, True, True]])
    assert torch.equal(stem.bind(present)(x), stem(x, present))
    assert torch.equal(stem.bind(None)(x), stem(x))
    assert {n for n, _ in stem.bind(present).named_parameters()} == {
        f"stem.{n}" for n, _ in stem.named_parameters()
    }


def test_batch_norm_variant_runs() -> None:
    stem = _stem(norm="batch").train()
    present = torch.tensor([[True, False, True, True], [False, True, True, True]])
    x = _x(batch=2)
    y = x.clone()
    y[0, 1] = 7.0
    assert torch.equal(stem(x, present), stem(y, present))


def test_mask_absent() -> None:
    x = torch.full((2, M, 2, 2, 2), float("nan"))
    x[0, 0] = 1.0
    present = torch.tensor([[True, False, False, False], [False, False, False, False]])
    y = mask_absent(x, present)
    assert torch.equal(y[0, 0], torch.ones(2, 2, 2))
    assert torch.equal(y[0, 1:], torch.zeros(M - 1, 2, 2, 2))
    assert torch.equal(y[1], torch.zeros(M, 2, 2, 2))
    assert torch.isnan(x).any()  # input untouched


# --- config / names


def test_config_validation() -> None:
    assert ModalFusionConfig().enabled is False
    with pytest.raises(MensegError):
        ModalFusionConfig(p_drop=1.5)
    with pytest.raises(MensegError):
        ModalFusionConfig(max_drop=-1)
    with pytest.raises(MensegError):
        ModalFusionConfig(channels=0)


def test_presence_from_names() -> None:
    assert presence_from_names(["t2w", "t1c"]).tolist() == [True, False, False, True]
    assert presence_from_names(list(MODALITIES)).tolist() == [True] * M
    assert presence_from_names(["T2F", "t2f "]).tolist() == [False, False, True, False]
    assert presence_from_names("t1n").tolist() == [False, True, False, False]
    assert presence_from_names(("t1c",)).dtype == torch.bool
    with pytest.raises(MensegError, match="at least one"):
        presence_from_names([])
    with pytest.raises(MensegError, match="flair"):
        presence_from_names(["t1c", "flair"])


def test_names_from_presence_round_trip() -> None:
    for s in _all_subsets():
        names = tuple(MODALITIES[i] for i in s)
        assert names_from_presence(presence_from_names(names)) == names
    with pytest.raises(MensegError):
        names_from_presence(torch.ones(2, M, dtype=torch.bool))


# --- dropout


def test_sample_presence_replayable() -> None:
    cfg = ModalFusionConfig(enabled=True, p_drop=0.5)
    a = sample_presence(torch.Generator().manual_seed(7), 64, cfg)
    b = sample_presence(torch.Generator().manual_seed(7), 64, cfg)
    c = sample_presence(torch.Generator().manual_seed(8), 64, cfg)
    assert a.dtype == torch.bool and a.shape == (64, M)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # successive calls on one generator differ but replay as a sequence
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    s1 = [sample_presence(g1, 8, cfg) for _ in range(3)]
    s2 = [sample_presence(g2, 8, cfg) for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(s1, s2, strict=True))
    assert not torch.equal(s1[0], s1[1])


def test_sample_presence_rates() -> None:
    n = 20000
    cfg = ModalFusionConfig(enabled=True, p_drop=0.3, max_drop=3)
    p = sample_presence(torch.Generator().manual_seed(0), n, cfg)
    assert p.any(dim=1).all()  # never empty
    n_lost = (~p).sum(dim=1)
    assert n_lost.max() <= 3
    rate = (n_lost > 0).float().mean().item()
    sd = (0.3 * 0.7 / n) ** 0.5  # ~0.0032
    assert abs(rate - 0.3) < 5 * sd
    dropped = n_lost[n_lost > 0]
    for k in (1, 2, 3):  # k uniform in 1..3 among dropped samples
        assert abs((dropped == k).float().mean().item() - 1 / 3) < 0.03
    per_seq = (~p).float().mean(dim=0)  # every sequence lost equally often: 0.3 * 2 / 4 = 0.15
    torch.testing.assert_close(per_seq, torch.full((M,), 0.15), atol=0.015, rtol=0)


def test_sample_presence_limits() -> None:
    g = torch.Generator().manual_seed(1)
    p = sample_presence(g, 2000, ModalFusionConfig(enabled=True, p_drop=1.0, max_drop=1))
    assert ((~p).sum(dim=1) == 1).all()
    p = sample_presence(g, 2000, ModalFusionConfig(enabled=True, p_drop=1.0, max_drop=10))
    assert p.any(dim=1).all() and ((~p).sum(dim=1) == 3).any()
    assert sample_presence(g, 50, ModalFusionConfig(enabled=True, p_drop=0.0)).all()
    assert sample_presence(g, 50, ModalFusionConfig(enabled=True, max_drop=0)).all()
    assert sample_presence(g, 50, ModalFusionConfig(enabled=False, p_drop=1.0)).all()
    assert sample_presence(g, 50, ModalFusionConfig(enabled=True, p_drop=1.0), n_modalities=1).all()
    assert sample_presence(g, 0, ModalFusionConfig(enabled=True)).shape == (0, M)


def test_sampled_presence_trains_the_stem() -> None:
    """Sequence dropout end to end: sampled masks into the stem, loss backpropagates."""
    cfg = ModalFusionConfig(enabled=True, p_drop=1.0)
    present = sample_presence(torch.Generator().manual_seed(2), 4, cfg)
    stem = _stem().train()
    out = stem(_x(batch=4), present)
    out.mean().backward()
    assert out.shape == (4, 8, *SIZE)
    assert not present.all()


# --- with the U-Net


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_composes_with_dynunet_encode_decode(deep_supervision: bool) -> None:
    patch = (16, 16, 8)
    mcfg = ModelConfig(filters=(8, 16, 32), deep_supervision=deep_supervision, deep_supr_num=1)
    torch.manual_seed(0)
    net = build_network(mcfg, in_channels=M, out_channels=3, patch_size=patch)
    stem = _stem(out_channels=mcfg.filters[0])
    x = torch.randn(2, M, *patch, generator=torch.Generator().manual_seed(4))
    present = torch.tensor([[True, False, True, True], [False, False, True, False]])
    for train in (True, False):
        net.train(train)
        stem.train(train)
        feats = encode(net, x, stem=stem.bind(present))
        assert feats[0].shape == (2, mcfg.filters[0], *patch)
        out = decode(net, feats)
        expect = (2, 2, 3, *patch) if (train and deep_supervision) else (2, 3, *patch)
        assert out.shape == expect
        y = x.clone()
        y[0, 1] = 3.0
        y[1, 0] = float("nan")
        assert torch.equal(decode(net, encode(net, y, stem=stem.bind(present))), out)
    net.train()
    stem.train()
    decode(net, encode(net, x, stem=stem.bind(None))).float().mean().backward()
    for m in range(M):
        c = stem.modality_channels
        assert stem.encoder.weight.grad[m * c : (m + 1) * c].abs().sum() > 0
