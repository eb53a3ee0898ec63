"""The opened-up DynUNet forward (menseg.nets.unet) is the network's own forward, bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from menseg.config import ModelConfig
from menseg.errors import MensegError
from menseg.nets import build_network, n_deep_heads
from menseg.nets.unet import decode, encode, encode_from, level_channels, level_strides, n_levels

PATCH = (32, 32, 16)  # anisotropic: z stops halving at 4 voxels


def _net(filters: tuple[int, ...], ds: bool, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(filters=filters, deep_supervision=ds, deep_supr_num=2, dropout=dropout)
    return build_network(cfg, in_channels=2, out_channels=3, patch_size=PATCH)


@pytest.mark.parametrize("filters", [(4, 8, 16), (4, 8, 8, 16)])
@pytest.mark.parametrize("ds", [False, True])
@pytest.mark.parametrize("train", [False, True])
def test_decode_encode_is_forward(filters: tuple[int, ...], ds: bool, train: bool) -> None:
    net = _net(filters, ds)
    net.train(train)
    x = torch.randn(2, 2, *PATCH, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x)
        got = decode(net, encode(net, x))
    heads = n_deep_heads(ModelConfig(filters=filters, deep_supervision=ds, deep_supr_num=2))
    want = (2, 1 + heads, 3, *PATCH) if (train and ds) else (2, 3, *PATCH)
    assert ref.shape == want
    assert torch.equal(got, ref)


def test_dropout_draws_in_the_same_order() -> None:
    net = _net((4, 8, 8, 16), ds=True, dropout=0.2).train()
    x = torch.randn(1, 2, *PATCH, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    ref = net(x)
    torch.manual_seed(5)
    got = decode(net, encode(net, x))
    assert torch.equal(got, ref)
    torch.manual_seed(6)
    assert not torch.equal(decode(net, encode(net, x)), ref)  # dropout is really active


def test_gradients_match_the_forward() -> None:
    net = _net((4, 8, 16), ds=True).train()
    x = torch.randn(1, 2, *PATCH, generator=torch.Generator().manual_seed(3))
    net(x).square().mean().backward()
    ref = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    decode(net, encode(net, x)).square().mean().backward()
    for p, r in zip(net.parameters(), ref, strict=True):
        assert torch.equal(p.grad, r)


def test_level_strides_shapes_and_channels() -> None:
    net = _net((4, 8, 8, 16), ds=False)
    assert n_levels(net) == 4
    assert level_strides(net) == [(1, 1, 1), (2, 2, 2), (4, 4, 4), (8, 8, 4)]
    assert level_channels(net) == [4, 8, 8, 16]
    x = torch.zeros(1, 2, *PATCH)
    with torch.no_grad():
        feats = encode(net, x)
    for f, s, c in zip(feats, level_strides(net), level_channels(net), strict=True):
        assert f.shape == (1, c, *(n // k for n, k in zip(PATCH, s, strict=True)))


def test_partial_encode_and_stem() -> None:
    net = _net((4, 8, 8, 16), ds=False).eval()
    x = torch.randn(1, 2, *PATCH, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = encode(net, x)
        part = encode(net, x, stop=1)
        rest = encode_from(net, part[-1], 1)
        assert len(part) == 2 and len(rest) == 2
        for a, b in zip(full, part + rest, strict=True):
            assert torch.equal(a, b)
        stem = nn.Conv3d(2, 4, 1)
        with_stem = encode(net, x, stem)
        assert torch.equal(with_stem[0], stem(x))
        assert torch.equal(with_stem[1], net.downsamples[0](stem(x)))
    with pytest.raises(MensegError):
        encode(net, x, stop=4)
    with pytest.raises(MensegError):
        decode(net, full[:-1])
