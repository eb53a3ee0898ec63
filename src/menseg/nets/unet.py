"""MONAI's DynUNet forward pass, opened up into encoder levels and decoder.

:class:`monai.networks.nets.DynUNet` runs recursively (``DynUNetSkipLayer``), so
nothing can reach the features between encoder and decoder. The functions here
call the *same modules in the same order* as ``DynUNet.forward``, so
``decode(net, encode(net, x))`` is ``net(x)`` bit for bit (train and eval mode,
with or without deep supervision; dropout draws the same random numbers), while
ISM can change the per-level features in between.

Levels. A net with ``n = len(net.filters)`` stages has ``n`` feature levels::

    level 0       input_block(x)          (B, filters[0], X/s0, ...)      s0 = strides[0] (1 here)
    level 1..n-2  downsamples[l-1](...)   (B, filters[l], X/S_l, ...)     the decoder's skips
    level n-1     bottleneck(...)         (B, filters[-1], X/S_{n-1}, ...)

where ``S_l`` (:func:`level_strides`) is the cumulative stride of level ``l``'s
grid against the input grid. The decoder joins level ``n-1`` with the skip of
level ``n-2``, then ``n-3``, ... up to level 0, and ``output_block`` maps the
result to logits at full resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn.functional import interpolate

from menseg.errors import MensegError

if TYPE_CHECKING:
    from monai.networks.nets import DynUNet

Tensor = torch.Tensor


def encoder_blocks(net: DynUNet) -> list[nn.Module]:
    """The encoder's modules in order: ``[input_block, *downsamples, bottleneck]`` (one per level)."""
    return [net.input_block, *net.downsamples, net.bottleneck]


def n_levels(net: DynUNet) -> int:
    """Number of feature levels (= encoder stages, ``len(net.filters)``)."""
    return len(net.downsamples) + 2


def level_channels(net: DynUNet) -> list[int]:
    """Channel count of each level's features (``net.filters``)."""
    return [int(c) for c in net.filters[: n_levels(net)]]


def _as3(s: int | Sequence[int]) -> tuple[int, int, int]:
    if isinstance(s, int):
        return (s, s, s)
    t = tuple(int(v) for v in s)
    if len(t) != 3:
        raise MensegError(f"expected a 3D stride, got {list(t)}")
    return (t[0], t[1], t[2])


def level_strides(net: DynUNet) -> list[tuple[int, int, int]]:
    """Cumulative stride ``(sx, sy, sz)`` of each level's grid against the input grid.

    Level ``l`` has ``X // sx`` x ``Y // sy`` x ``Z // sz`` voxels for an input of
    ``X x Y x Z`` (sizes divisible by :func:`menseg.nets.required_divisor`); its
    voxel ``i`` covers input voxels ``i*s .. i*s + s - 1`` on each axis.
    """
    out: list[tuple[int, int, int]] = []
    cum = (1, 1, 1)
    for s in net.strides[: n_levels(net)]:
        s3 = _as3(s)
        cum = (cum[0] * s3[0], cum[1] * s3[1], cum[2] * s3[2])
        out.append(cum)
    return out


def encode(
    net: DynUNet, x: Tensor, stem: nn.Module | None = None, *, stop: int | None = None
) -> list[Tensor]:
    """Encoder features of every level, ``[level 0, level 1, ..., bottleneck]``.

    Args:
        net: a MONAI DynUNet (as :func:`menseg.nets.build_network` returns).
        x: input ``(B, C_in, X, Y, Z)``.
        stem: when given, level 0 is ``stem(x)`` instead of ``net.input_block(x)``
            (e.g. a modality-fusion stem); it must return ``(B, filters[0], X, Y, Z)``.
        stop: compute levels ``0..stop`` only (``None``: all levels). Continue
            later with :func:`encode_from`.

    Returns:
        list of ``stop + 1`` (default ``n_levels(net)``) tensors; level ``l`` is
        ``(B, filters[l], X/S_l, Y/S_l, Z/S_l)`` with ``S_l`` from :func:`level_strides`.
    """
    blocks = encoder_blocks(net)
    last = len(blocks) - 1 if stop is None else stop
    if not 0 <= last < len(blocks):
        raise MensegError(f"encode: stop must be in 0..{len(blocks) - 1}, got {stop}")
    h = (stem if stem is not None else blocks[0])(x)
    feats = [h]
    for block in blocks[1 : last + 1]:
        h = block(h)
        feats.append(h)
    return feats


def encode_from(net: DynUNet, feat: Tensor, level: int) -> list[Tensor]:
    """Deeper encoder features from level ``level``'s features: levels ``level+1 .. n-1``.

    ``encode(net, x, stop=l) + encode_from(net, f_l, l)`` equals ``encode(net, x)``
    when ``f_l`` is level ``l`` of ``x``; with a *changed* ``f_l`` (e.g. mixed
    features) it is what the encoder computes from that change.
    """
    blocks = encoder_blocks(net)
    if not 0 <= level < len(blocks):
        raise MensegError(f"encode_from: level must be in 0..{len(blocks) - 1}, got {level}")
    feats = []
    h = feat
    for block in blocks[level + 1 :]:
        h = block(h)
        feats.append(h)
    return feats


def decode(net: DynUNet, feats: Sequence[Tensor]) -> Tensor:
    """Decoder: exactly what ``net(x)`` returns given ``feats = encode(net, x)``.

    Args:
        net: the DynUNet the features came from.
        feats: ``n_levels(net)`` tensors as :func:`encode` returns them.

    Returns:
        eval mode, or training without deep supervision: logits ``(B, C_out, X, Y, Z)``;
        training with deep supervision: ``(B, 1 + net.deep_supr_num, C_out, X, Y, Z)``,
        the full-resolution output first, then the heads from high to low resolution,
        each upsampled (nearest) to full size, as ``DynUNet.forward`` stacks them.
    """
    n = n_levels(net)
    if len(feats) != n:
        raise MensegError(f"decode: expected {n} feature levels, got {len(feats)}")
    # DynUNetSkipLayer i (i = 0 .. n-2) uses upsamples[n-2-i]; layer i >= 1 carries deep
    # supervision head i-1 while heads remain (create_skips in monai.networks.nets.dynunet).
    with_heads = bool(net.training and net.deep_supervision)
    heads: list[Tensor] = []
    h = feats[-1]
    for i in range(n - 2, -1, -1):
        h = net.upsamples[n - 2 - i](h, feats[i])
        if with_heads and 1 <= i <= net.deep_supr_num:
            heads.append(net.deep_supervision_heads[i - 1](h))
    out = net.output_block(h)
    if not with_heads:
        return out
    heads.reverse()  # heads[k] belongs to skip layer k+1 (highest resolution first)
    return torch.stack([out, *(interpolate(m, out.shape[2:]) for m in heads)], dim=1)


__all__ = [
    "decode", "encode", "encode_from", "encoder_blocks", "level_channels", "level_strides", "n_levels",
]
