"""Sliding-window prediction and post-processing (menseg.infer.sliding / postprocess)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from menseg.config import InferConfig, ModelConfig
from menseg.errors import MensegError
from menseg.infer.postprocess import remove_small_components
from menseg.infer.sliding import MIRROR_AXES, predict_probs, resolve_device


class PointwiseNet(nn.Module):
    """1x1x1 convolution: the output at a voxel depends only on that voxel."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv3d(4, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=g))
            self.conv.bias.copy_(torch.randn(self.conv.bias.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PositionNet(nn.Module):
    """Adds a fixed per-position bias: not flip-equivariant, so mirroring changes it."""

    def __init__(self, patch: tuple[int, int, int]) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.bias = nn.Parameter(torch.randn((1, 3, *patch), generator=g) * 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1] * 0 + self.bias


def _image(shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((4, *shape), generator=g)


# --------------------------------------------------------------------------- sliding


def test_mirror_axes_are_the_eight_flip_combinations() -> None:
    assert len(MIRROR_AXES) == 8
    assert MIRROR_AXES[0] == ()
    assert len(set(MIRROR_AXES)) == 8
    assert all(set(a) <= {2, 3, 4} for a in MIRROR_AXES)


@pytest.mark.parametrize("shape", [(20, 24, 18), (40, 17, 33), (8, 8, 8)])
def test_pointwise_model_gives_exact_sigmoid_whatever_the_tiling(shape: tuple[int, int, int]) -> None:
    """Gaussian blending of identical overlapping predictions is the identity; smaller
    volumes than the patch are padded and cropped back."""
    net = PointwiseNet()
    img = _image(shape)
    probs = predict_probs(net, img, (16, 16, 16), InferConfig(overlap=0.5, precision="fp32"), "cpu")
    assert probs.shape == (3, *shape)
    assert probs.dtype == torch.float32
    assert not probs.is_inference(), "callers must be able to modify the result in place"
    with torch.no_grad():
        expected = torch.sigmoid(net(img[None]))[0]
    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-5)


def test_mirroring_averages_the_eight_flipped_predictions() -> None:
    patch = (8, 10, 12)
    net = PositionNet(patch)
    img = _image(patch)
    plain = predict_probs(net, img, patch, InferConfig(mirror=False, precision="fp32"), "cpu")
    mirrored = predict_probs(net, img, patch, InferConfig(mirror=True, precision="fp32"), "cpu")
    p = torch.sigmoid(net.bias.detach())
    expected_plain = p[0]
    expected_mirror = torch.stack([torch.flip(p, a) if a else p for a in MIRROR_AXES]).mean(0)[0]
    torch.testing.assert_close(plain, expected_plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mirrored, expected_mirror, atol=1e-5, rtol=1e-5)
    # Mirrored output is symmetric under every flip; the plain one is not.
    for axes in MIRROR_AXES[1:]:
        dims = tuple(a - 1 for a in axes)
        torch.testing.assert_close(torch.flip(mirrored, dims), mirrored, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(torch.flip(plain, (1,)), plain, atol=1e-3)
    # The explicit argument overrides the config.
    torch.testing.assert_close(
        predict_probs(net, img, patch, InferConfig(mirror=False, precision="fp32"), "cpu", mirror=True),
        mirrored,
    )


def test_dynunet_small_volume_bf16_and_mode_restored() -> None:
    from menseg.nets import build_network

    patch = (32, 32, 32)
    torch.manual_seed(0)
    net = build_network(ModelConfig(filters=(8, 16, 32, 64), deep_supr_num=1), patch_size=patch)
    net.train()
    img = _image((20, 36, 16))  # smaller than the patch on two axes, larger on one
    probs = predict_probs(net, img, patch, InferConfig(overlap=0.25, precision="fp32"), "cpu")
    assert probs.shape == (3, 20, 36, 16)
    assert float(probs.min()) >= 0.0 and float(probs.max()) <= 1.0
    assert net.training, "predict_probs must restore the model's training mode"
    probs_bf16 = predict_probs(net, img, patch, InferConfig(overlap=0.25, precision="bf16"), "cpu")
    assert probs_bf16.dtype == torch.float32
    assert float((probs_bf16 - probs).abs().max()) < 0.1
    assert all(not p.requires_grad or p.grad is None for p in net.parameters())


def test_bad_arguments() -> None:
    net = PointwiseNet()
    with pytest.raises(MensegError, match="precision"):
        predict_probs(net, _image((8, 8, 8)), (8, 8, 8), InferConfig(precision="fp16"), "cpu")
    with pytest.raises(ValueError, match=r"\(C, x, y, z\)"):
        predict_probs(net, torch.zeros(8, 8, 8), (8, 8, 8), InferConfig(), "cpu")
    with pytest.raises(MensegError, match="unknown device"):
        resolve_device("tpu")


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(MensegError, match="CUDA is not available"):
            resolve_device("cuda")


# --------------------------------------------------------------------------- postprocess


def test_remove_small_components_whole_lesions() -> None:
    label = np.zeros((20, 20, 20), np.uint8)
    label[2:5, 2:5, 2:5] = 2  # 27 voxels
    label[10, 10, 10] = 3  # 1 voxel isolated ET (also TC and WT)
    label[15:17, 15:17, 15] = 1  # 4 voxels NETC
    out = remove_small_components(label, (1.0, 1.0, 1.0), 5.0)
    expected = np.zeros_like(label)
    expected[2:5, 2:5, 2:5] = 2
    np.testing.assert_array_equal(out, expected)
    assert label[10, 10, 10] == 3, "input must not be modified"
    # spacing matters: with 2 mm voxels (8 mm^3 each) the 4-voxel lesion is 32 mm^3 and stays
    out2 = remove_small_components(label, (2.0, 2.0, 2.0), 30.0)
    assert out2[15, 15, 15] == 1 and out2[10, 10, 10] == 0
    # anisotropic spacing 0.9 x 0.9 x 3 mm: 1 voxel = 2.43 mm^3
    assert remove_small_components(label, (0.9, 0.9, 3.0), 2.4)[10, 10, 10] == 3
    assert remove_small_components(label, (0.9, 0.9, 3.0), 2.5)[10, 10, 10] == 0
    # a component of exactly the minimum volume stays
    np.testing.assert_array_equal(remove_small_components(label, (1, 1, 1), 4.0)[15:17, 15:17, 15], 1)
    # disabled
    np.testing.assert_array_equal(remove_small_components(label, (1, 1, 1), 0.0), label)


def test_remove_small_components_26_connectivity() -> None:
    label = np.zeros((8, 8, 8), np.uint8)
    # a diagonal chain of 4 voxels: one component with 26-connectivity, four with 6
    for i in range(4):
        label[i, i, i] = 2
    out = remove_small_components(label, (1, 1, 1), 4.0)
    np.testing.assert_array_equal(out, label)
    assert remove_small_components(label, (1, 1, 1), 5.0).sum() == 0


def test_remove_small_components_inner_regions_demoted() -> None:
    label = np.zeros((12, 12, 12), np.uint8)
    label[1:9, 1:9, 1:9] = 2  # large oedema, 512 voxels
    label[2:6, 2:6, 2:6] = 1  # core 64 voxels
    label[3, 3, 3] = 3  # tiny ET speck inside the core -> becomes NETC
    label[7, 7, 7] = 1  # tiny isolated core voxel inside oedema -> becomes SNFH
    out = remove_small_components(label, (1, 1, 1), {"ET": 2.0, "TC": 2.0, "WT": 10.0})
    assert out[3, 3, 3] == 1
    assert out[7, 7, 7] == 2
    assert (out[2:6, 2:6, 2:6] == 1).all()
    assert (out > 0).sum() == (label > 0).sum()
    # per-region minimum as an (ET, TC, WT) sequence: only ET is cleaned
    out2 = remove_small_components(label, (1, 1, 1), (2.0, 0.0, 0.0))
    assert out2[3, 3, 3] == 1 and out2[7, 7, 7] == 1


def test_resolve_precision_auto_and_errors():
    import torch

    from menseg.errors import MensegError
    from menseg.infer.sliding import bf16_is_fast, resolve_precision

    cpu = torch.device("cpu")
    assert resolve_precision(cpu, "fp32") == "fp32"
    assert resolve_precision(cpu, "bf16") == "bf16"
    assert resolve_precision(cpu, "auto") == ("bf16" if bf16_is_fast(cpu) else "fp32")
    with pytest.raises(MensegError, match="unknown infer.precision"):
        resolve_precision(cpu, "fp8")
