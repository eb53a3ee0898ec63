"""Gaussian blur of channel-first volumes ``(C, X, Y, Z)``, the one implementation.

Two kernels, kept apart because their callers' numbers must not change:

- ``"sampled"`` (training augmentation, :mod:`menseg.train.augment`): ``exp(-x^2 / 2 sigma^2)`` sampled
  at integer offsets up to ``ceil(3 sigma)`` (at least 1), normalised to sum 1, one separable
  ``conv3d`` per axis with replicate padding, computed in float32 and cast back;
- ``"binomial"`` (synthesis, :mod:`menseg.synth.appearance`): per axis a cascade of 3-tap passes
  ``[a, 1 - 2a, a]`` (:func:`binomial_pass`, variance ``2a`` voxel^2 each) whose variances add up to
  ``sigma^2`` exactly (one pass covers sigma <= 0.82 voxel), zero padding, in place in ``x``'s dtype:
  several times faster than a convolution on the CPU, which matters for every rendered case.

A single pass with ``a = 1/4`` is the ``[1/4, 1/2, 1/4]`` partial-volume blur of lesion injection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Kernel = Literal["sampled", "binomial"]


def gaussian_kernel1d(sigma: float, device: torch.device | str | None = None) -> Tensor:
    """Normalised float32 ``exp(-x^2 / 2 sigma^2)`` at ``x = -r..r``, ``r = max(1, ceil(3 sigma))``."""
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def binomial_pass(x: Tensor, a: float | Tensor, dim: int) -> Tensor:
    """One 3-tap pass ``[a, 1 - 2a, a]`` along ``dim`` of ``x``, zero padding; ``a`` a number or a tensor
    broadcastable to ``x`` (e.g. per channel ``(C, 1, 1, 1)``). Adds variance ``2a`` voxel^2. An axis of
    fewer than 2 voxels is left as it is."""
    n = x.shape[dim]
    if n < 2:
        return x
    if not isinstance(a, Tensor):
        a = torch.as_tensor(a, dtype=x.dtype, device=x.device)
    y = x * (1.0 - 2.0 * a)
    y.narrow(dim, 1, n - 1).addcmul_(x.narrow(dim, 0, n - 1), a)
    y.narrow(dim, 0, n - 1).addcmul_(x.narrow(dim, 1, n - 1), a)
    return y


def _sigma_table(sigma: Sequence[float] | Tensor, channels: int) -> Tensor:
    """Sigmas as float64 ``(C, 3)``: per channel ``(C,)`` repeated over the axes, or ``(C, 3)`` as given."""
    s = torch.as_tensor(sigma, dtype=torch.float64).cpu()
    if s.ndim == 1:
        s = s[:, None].expand(-1, 3)
    if s.shape != (channels, 3):
        raise ValueError(f"sigma must be ({channels},) or ({channels}, 3) voxels, got shape {tuple(s.shape)}")
    return s


def _sampled(image: Tensor, sigma: Tensor) -> Tensor:
    out = []
    for c in range(image.shape[0]):
        v = image[c : c + 1].unsqueeze(0).float()  # (1, 1, X, Y, Z)
        for ax in range(3):
            s = float(sigma[c, ax])
            if not s > 0:
                continue
            k = gaussian_kernel1d(s, image.device)
            r = (len(k) - 1) // 2
            shape = [1, 1, 1, 1, 1]
            shape[2 + ax] = len(k)
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - ax)] = pad[2 * (2 - ax) + 1] = r
            v = F.conv3d(F.pad(v, pad, mode="replicate"), k.reshape(shape))
        out.append(v[0, 0])
    return torch.stack(out).to(image.dtype)


def _binomial(x: Tensor, sigma: Tensor) -> Tensor:
    for d in range(3):
        s2 = sigma[:, d] ** 2
        smax = float(s2.max())
        if smax < 0.01:  # below 0.1 voxel on every channel: skip the axis
            continue
        passes = max(1, math.ceil(smax / (2.0 / 3.0)))
        a = (s2 / (2.0 * passes)).to(x.dtype).to(x.device).view(-1, 1, 1, 1)
        for _ in range(passes):
            x = binomial_pass(x, a, d + 1)
    return x


def gaussian_blur(x: Tensor, sigma: Sequence[float] | Tensor, kernel: Kernel = "sampled") -> Tensor:
    """Separable Gaussian blur of ``x`` ``(C, X, Y, Z)``.

    Args:
        x: the volume (not modified).
        sigma: voxels, one per channel ``(C,)`` or one per channel and axis ``(C, 3)``; 0 leaves that
            channel (axis) unblurred.
        kernel: ``"sampled"`` (truncated sampled Gaussian, replicate border, float32 arithmetic) or
            ``"binomial"`` (cascade of 3-tap passes with exact variance, zero border, ``x``'s dtype;
            axes whose largest sigma is below 0.1 voxel are skipped). See the module docstring.

    Returns:
        The blurred volume, ``x``'s shape and dtype.
    """
    s = _sigma_table(sigma, x.shape[0])
    if kernel == "sampled":
        return _sampled(x, s)
    if kernel == "binomial":
        return _binomial(x, s)
    raise ValueError(f"unknown blur kernel {kernel!r} (sampled or binomial)")


__all__ = ["binomial_pass", "gaussian_blur", "gaussian_kernel1d"]
