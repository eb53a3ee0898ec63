"""Gaussian blur (menseg.filters): both kernels keep constants and mass and add the asked variance."""

from __future__ import annotations

import pytest
import torch

from menseg.filters import binomial_pass, gaussian_blur


def test_sampled_blur_preserves_constant_and_mean() -> None:
    x = torch.full((2, 8, 8, 8), 3.0)
    assert torch.allclose(gaussian_blur(x, (1.0, 0.0)), x, atol=1e-5)
    spike = torch.zeros(1, 15, 15, 15)
    spike[0, 7, 7, 7] = 1.0
    out = gaussian_blur(spike, (1.0,))
    assert abs(out.sum().item() - 1.0) < 1e-4 and out.max() < 0.1


def test_binomial_blur_variance() -> None:
    x = torch.zeros(1, 31, 31, 31)
    x[0, 15, 15, 15] = 1.0
    for s in (0.5, 0.8, 1.5):
        y = gaussian_blur(x, torch.tensor([[s, 0.0, s]]), "binomial")
        assert y.sum().item() == pytest.approx(1.0, abs=1e-5)
        pos = torch.arange(31.0) - 15
        var_x = (y.sum(dim=(0, 2, 3)) * pos**2).sum().item()
        var_y = (y.sum(dim=(0, 1, 3)) * pos**2).sum().item()
        assert var_x == pytest.approx(s * s, rel=1e-4) and var_y == pytest.approx(0.0, abs=1e-9)


def test_both_kernels_approximate_the_same_gaussian_and_keep_the_input() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 20, 20, 20, generator=g)
    before = x.clone()
    a = gaussian_blur(x, (1.0, 1.0), "sampled")
    b = gaussian_blur(x, (1.0, 1.0), "binomial")
    inner = (slice(None), *(slice(5, 15),) * 3)
    assert (a[inner] - b[inner]).abs().max() < 0.03
    assert torch.equal(x, before)
    with pytest.raises(ValueError, match="unknown blur kernel"):
        gaussian_blur(x, (1.0, 1.0), "box")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigma must be"):
        gaussian_blur(x, (1.0,))


def test_binomial_pass_quarter_is_the_121_filter() -> None:
    x = torch.tensor([[0.0, 4.0, 0.0, 8.0]])
    assert binomial_pass(x, 0.25, 1).tolist() == [[1.0, 2.0, 3.0, 4.0]]
