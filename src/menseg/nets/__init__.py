"""Segmentation backbones.

The baseline is MONAI's DynUNet (the nnU-Net 3D full-resolution U-Net):
3x3x3 kernels, stride-2 downsampling per stage (an axis stops being
downsampled once it would drop below ``MIN_FEATURE_SIZE`` voxels, as nnU-Net
plans do), instance norm, leaky ReLU, optional deep supervision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from menseg.config import Config, ModelConfig
from menseg.errors import MensegError

#: Smallest feature-map edge (voxels) the encoder downsamples to on any axis.
MIN_FEATURE_SIZE = 4


def plan_strides(
    n_stages: int, patch_size: Sequence[int] | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """Kernels and strides for ``n_stages`` encoder stages.

    Stage 0 has stride 1. Each later stage halves an axis while the result stays
    at least ``MIN_FEATURE_SIZE`` voxels and the size is even (so the patch is
    exactly divisible); without ``patch_size`` every stage halves every axis.

    Returns ``(kernel_size, strides)``, each a list of ``[kx, ky, kz]`` per stage.
    """
    kernels = [[3, 3, 3] for _ in range(n_stages)]
    strides: list[list[int]] = [[1, 1, 1]]
    size = list(patch_size) if patch_size is not None else None
    for _ in range(1, n_stages):
        s = []
        for ax in range(3):
            if size is None:
                s.append(2)
            elif size[ax] % 2 == 0 and size[ax] // 2 >= MIN_FEATURE_SIZE:
                s.append(2)
                size[ax] //= 2
            else:
                s.append(1)
        strides.append(s)
    return kernels, strides


def required_divisor(cfg: ModelConfig, patch_size: Sequence[int] | None = None) -> tuple[int, int, int]:
    """Per-axis factor that input sizes must be divisible by for ``build_network``."""
    _, strides = plan_strides(len(cfg.filters), patch_size)
    div = [1, 1, 1]
    for s in strides:
        for ax in range(3):
            div[ax] *= s[ax]
    return (div[0], div[1], div[2])


def n_deep_heads(cfg: ModelConfig) -> int:
    """Number of extra deep-supervision heads actually built (0 without deep supervision).

    ``cfg.deep_supr_num`` is capped at ``len(cfg.filters) - 2`` (the number of
    decoder levels below full resolution that DynUNet can tap), so small test
    networks work with the default config.
    """
    if not cfg.deep_supervision:
        return 0
    return max(1, min(cfg.deep_supr_num, len(cfg.filters) - 2))


def present_channels(x: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` bool: which channels of a ``(B, C, ...)`` batch hold anything (not exactly 0 everywhere)."""
    return x.detach().flatten(2).abs().amax(dim=2) > 0


class PresenceStem(nn.Module):
    """The network's first block, told which sequences the input has.

    A sequence is absent from a sample when its channel is exactly 0 over the whole input (what
    preprocessing gives a missing sequence and what sequence dropout does in training; a present
    z-scored sequence is 0 only outside the brain). The ``(B, C)`` presence code is appended as ``C``
    constant channels before ``block`` (which takes ``2 C`` channels), so the same network runs on
    any non-empty subset, in training, sliding-window prediction and ISM's encoder alike.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        present = present_channels(x).to(x.dtype)  # (B, C)
        code = present[(...,) + (None,) * (x.dim() - 2)].expand_as(x)
        return self.block(torch.cat([x, code], dim=1))


def accepts_subsets(model: nn.Module) -> bool:
    """Whether ``model`` predicts from any non-empty subset of the sequences (sequence dropout's
    presence input, or ISM's modal fusion)."""
    if any(isinstance(m, PresenceStem) for m in model.modules()):
        return True
    return getattr(model, "stem", None) is not None  # ISMNet with modal fusion


def encoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``model``'s encoder: a DynUNet's first block (with its presence stem), downsampling
    stages and bottleneck; for an ISM network, those of its backbone plus its modal-fusion stem (what reads
    the images). ``train.freeze_encoder_steps`` holds these still."""
    from menseg.nets.unet import encoder_blocks

    net = getattr(model, "net", model)
    try:
        parts: list[nn.Module] = encoder_blocks(net)  # type: ignore[arg-type]
    except AttributeError:
        raise MensegError(f"cannot find the encoder of {type(net).__name__} (expected a DynUNet)") from None
    stem = getattr(model, "stem", None) if net is not model else None
    if stem is not None:
        parts.append(stem)
    seen: dict[int, nn.Parameter] = {}
    for part in parts:
        for q in part.parameters():
            seen.setdefault(id(q), q)
    return list(seen.values())


def build_network(
    cfg: ModelConfig,
    in_channels: int = 4,
    out_channels: int = 3,
    patch_size: Sequence[int] | None = None,
    presence: bool = False,
) -> nn.Module:
    """Build the segmentation network described by ``cfg``.

    ``presence``: the first block also gets which input channels are present
    (:class:`PresenceStem`; ``seqdrop``), so the network accepts missing sequences.

    Input ``(B, in_channels, X, Y, Z)``; X, Y, Z divisible by
    :func:`required_divisor`. Output logits: in eval mode (or without deep
    supervision) ``(B, out_channels, X, Y, Z)``; in training mode with deep
    supervision ``(B, 1 + n_deep_heads(cfg), out_channels, X, Y, Z)`` where the
    low-resolution heads are upsampled (nearest) to full size, as MONAI does.
    """
    from monai.networks.nets import DynUNet

    if cfg.name != "dynunet":
        raise MensegError(f"unknown model.name '{cfg.name}' (known: dynunet)")
    n = len(cfg.filters)
    if n < 3:
        raise MensegError(f"model.filters needs at least 3 stages, got {list(cfg.filters)}")
    if cfg.deep_supervision and cfg.deep_supr_num < 1:
        raise MensegError(f"model.deep_supr_num must be at least 1, got {cfg.deep_supr_num}")
    norms = {"instance": ("INSTANCE", {"affine": True}), "batch": "BATCH"}
    if cfg.norm not in norms:
        raise MensegError(f"unknown model.norm '{cfg.norm}' (known: {', '.join(norms)})")
    kernels, strides = plan_strides(n, patch_size)
    net = DynUNet(
        spatial_dims=3,
        in_channels=2 * in_channels if presence else in_channels,
        out_channels=out_channels,
        kernel_size=kernels,
        strides=strides,
        upsample_kernel_size=strides[1:],
        filters=list(cfg.filters),
        dropout=cfg.dropout if cfg.dropout > 0 else None,
        norm_name=norms[cfg.norm],
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=cfg.deep_supervision,
        deep_supr_num=n_deep_heads(cfg) if cfg.deep_supervision else 1,
        res_block=False,
    )
    if presence:
        stem = PresenceStem(net.input_block)
        net.input_block = stem
        net.skip_layers.downsample = stem  # DynUNet's forward runs its skip chain, built with the old block
    return net


def build_run_network(cfg: Config) -> nn.Module:
    """The plain network of a run: ``cfg.model`` for its patch size, with the presence input when the run
    trains with sequence dropout (:func:`menseg.config.presence_input`)."""
    from menseg.config import presence_input

    return build_network(cfg.model, patch_size=cfg.train.patch_size, presence=presence_input(cfg))


__all__ = ["MIN_FEATURE_SIZE", "PresenceStem", "accepts_subsets", "build_network", "build_run_network",
           "encoder_parameters",
           "n_deep_heads", "plan_strides", "present_channels", "required_divisor"]
