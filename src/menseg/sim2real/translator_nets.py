"""Networks of the sim->real translator (the method: :mod:`menseg.sim2real.translator`).

Generators ``G`` / ``F`` (:class:`Generator`), PatchGAN discriminators (:class:`PatchDiscriminator`),
the semantic term's segmenter (:func:`build_segmenter`), and whole-volume translation with a fitted
generator (:func:`translate_image`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as fnn
from torch import Tensor, nn

from menseg.config import ModelConfig
from menseg.constants import MODALITIES, REGION_NAMES
from menseg.errors import MensegError

#: Input sizes of the generator must be divisible by this (two stride-2 stages).
DIVISOR = 4
#: Segmenter of the semantic term (small: it only needs to find the lesion).
SEGMENTER_FILTERS = (8, 16, 32)


# ---------------------------------------------------------------- networks


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=1),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.2, inplace=True),
    )


class _ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(c, c, 3, padding=1), nn.InstanceNorm3d(c, affine=True), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(c, c, 3, padding=1), nn.InstanceNorm3d(c, affine=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Generator(nn.Module):
    """Residual 3D U-Net translator, ``(B, 4, X, Y, Z) -> (B, 4, X, Y, Z)``, X, Y, Z divisible by 4.

    Output ``x + max_delta * tanh(h)`` inside the head mask ``(x != 0).any(1)``, exactly 0
    outside and in channels that are all zero in a sample (missing sequences stay missing).
    The last convolution is zero-initialised: a fresh generator is the identity.
    """

    def __init__(self, channels: int = 16, max_delta: float = 3.0, n_res: int = 3,
                 in_channels: int = len(MODALITIES)) -> None:
        super().__init__()
        c = int(channels)
        self.max_delta = float(max_delta)
        self.inc = _conv(in_channels, c)
        self.down1 = _conv(c, 2 * c, stride=2)
        self.down2 = _conv(2 * c, 4 * c, stride=2)
        self.res = nn.Sequential(*[_ResBlock(4 * c) for _ in range(n_res)])
        self.up2 = _conv(4 * c, 2 * c)
        self.fuse2 = _conv(4 * c, 2 * c)
        self.up1 = _conv(2 * c, c)
        self.fuse1 = _conv(2 * c, c)
        self.head = nn.Conv3d(c, in_channels, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(B, 4, X, Y, Z)`` preprocessed -> translated, same shape."""
        if any(s % DIVISOR for s in x.shape[2:]):
            raise MensegError(f"generator input size {tuple(x.shape[2:])} is not divisible by {DIVISOR}")
        nonzero = x != 0
        # head voxels, and sequences present in the sample (a missing sequence is an all-zero channel)
        mask = nonzero.any(dim=1, keepdim=True) & nonzero.flatten(2).any(dim=2)[:, :, None, None, None]
        f0 = self.inc(x)
        f1 = self.down1(f0)
        h = self.res(self.down2(f1))
        h = self.up2(fnn.interpolate(h, scale_factor=2, mode="trilinear", align_corners=False))
        h = self.fuse2(torch.cat([h, f1], dim=1))
        h = self.up1(fnn.interpolate(h, scale_factor=2, mode="trilinear", align_corners=False))
        h = self.fuse1(torch.cat([h, f0], dim=1))
        y = x + self.max_delta * torch.tanh(self.head(h))
        return torch.where(mask, y, torch.zeros_like(y))


class PatchDiscriminator(nn.Module):
    """3D PatchGAN: ``(B, 4, X, Y, Z) -> (B, 1, X/4, Y/4, Z/4)`` realness scores (least squares)."""

    def __init__(self, channels: int = 16, in_channels: int = len(MODALITIES)) -> None:
        super().__init__()
        c = int(channels)
        self.net = nn.Sequential(
            nn.Conv3d(in_channels, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(c, 2 * c, 4, stride=2, padding=1), nn.InstanceNorm3d(2 * c, affine=True),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(2 * c, 4 * c, 3, padding=1), nn.InstanceNorm3d(4 * c, affine=True),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(4 * c, 1, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def build_segmenter() -> nn.Module:
    """The semantic term's segmenter: DynUNet (filters 8/16/32), 4 -> 3 region logits (ET, TC, WT)."""
    from menseg.nets import build_network

    return build_network(ModelConfig(filters=SEGMENTER_FILTERS, deep_supervision=False), 4, len(REGION_NAMES))


# ---------------------------------------------------------------- inputs


def check_image(img: np.ndarray, what: str) -> None:
    shape = getattr(img, "shape", None)
    if shape is None or len(shape) != 4 or shape[0] != len(MODALITIES):
        raise MensegError(f"{what}: expected a preprocessed image of shape (4, X, Y, Z), got {shape}")


def head_mask(image: np.ndarray) -> np.ndarray:
    """Head mask ``(X, Y, Z)`` bool of a preprocessed image ``(4, X, Y, Z)``: any sequence non-zero."""
    return np.any(np.asarray(image) != 0, axis=0)


# ---------------------------------------------------------------- translation


@torch.no_grad()
def translate_image(generator: nn.Module, image: np.ndarray) -> np.ndarray:
    """Translate one whole preprocessed volume.

    ``image`` float ``(4, X, Y, Z)`` -> float32 ``(4, X, Y, Z)``: zero padded to a multiple of 4
    (padding is background, so it stays 0), run through ``generator`` on its device, cropped
    back. Voxels outside the head stay exactly 0. ``image`` is not modified.
    """
    check_image(image, "translate_image")
    shape = image.shape[1:]
    padded = tuple(int(math.ceil(s / DIVISOR) * DIVISOR) for s in shape)
    x = np.zeros((image.shape[0], *padded), np.float32)
    x[:, : shape[0], : shape[1], : shape[2]] = image
    dev = next(generator.parameters()).device
    was_training = generator.training
    generator.eval()
    try:
        y = generator(torch.from_numpy(x)[None].to(dev))[0].float().cpu().numpy()
    finally:
        generator.train(was_training)
    return np.ascontiguousarray(y[:, : shape[0], : shape[1], : shape[2]])


__all__ = ["DIVISOR", "SEGMENTER_FILTERS", "Generator", "PatchDiscriminator", "build_segmenter",
           "check_image", "head_mask", "translate_image"]
