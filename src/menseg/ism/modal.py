"""Modal fusion: encode each MRI sequence separately and fuse them per location.

The U-Net's input block sees all four sequences at once, so a network trained on
complete scans cannot be run on a scan that lacks one. :class:`ModalFusionStem`
replaces that block (it is given to :func:`menseg.nets.unet.encode` as ``stem``):

1. every sequence ``m`` (``MODALITIES`` order: t1c, t1n, t2f, t2w) has its own
   encoder ``E_m`` (conv3x3 -> InstanceNorm -> LeakyReLU, 1 -> ``c`` channels), giving
   ``f_m`` of shape ``(B, c, X, Y, Z)``; the ``M`` encoders run as one grouped convolution
   (``groups = M``: sequence ``m`` owns output channels ``m c .. (m + 1) c - 1`` and sees
   only its own input channel), which is the same function as ``M`` separate convolutions;
2. a per-sequence 1x1 convolution (grouped likewise) scores every location, ``s_m = S_m(f_m)``;
3. the scores go through a softmax over the sequences *present in that sample*;
   absent sequences get the score ``-inf``, hence a weight of exactly 0;
4. the weighted features ``[w_1 f_1, ..., w_M f_M]`` (``M c`` channels: each sequence keeps
   its own channels, scaled by its weight) go through a DynUNet basic block (two conv3x3,
   ``M c`` -> ``C`` channels), which is what the rest of the U-Net receives.

Why not the weighted *sum* ``sum_m w_m f_m`` (HeMIS-style averaging): it maps every sequence
into one ``c``-channel space, so contrasts *between* sequences (enhancement is t1c against t1n,
oedema t2f against t2w) can only survive through the weights, and the summed stem cost Dice in
the ISM pilot (DESIGN.md, ISM: "Pilot that chose the defaults"); the weighted channels keep the
contrasts and still give absent sequences exactly zero input to the block.

Absent sequences never reach the output: their input channel is replaced by 0
*before* their encoder (``torch.where``, so even NaN or inf in a missing channel
is harmless), their features are then finite, and their weight is exactly 0, so
they add exact zeros to the sum. The score convolutions start at zero: a fresh
stem averages the present sequences uniformly and learns to weight them from there.

Training uses random sequence dropout (:func:`sample_presence`): with
probability ``p_drop`` a sample loses ``k`` sequences, ``k`` uniform in
``1..min(max_drop, M - 1)``, the lost ones a uniform random subset of that size.
``k`` is drawn uniformly (rather than the subset uniformly among all non-empty
subsets) so that single-sequence inputs, the hardest case, are trained as often
as any other number of losses.

Cost: one grouped convolution per sequence and ``c = max(4, C // 4)``, because separate
per-sequence modules with more channels made the stem a large share of a training step
(DESIGN.md, Decisions: modal fusion stem cost).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from menseg.config import ModalFusionConfig, SeqDropConfig
from menseg.constants import MODALITIES
from menseg.errors import MensegError

log = logging.getLogger(__name__)

#: Same norm choices as :func:`menseg.nets.build_network` (model.norm).
_NORMS: dict[str, tuple | str] = {"instance": ("INSTANCE", {"affine": True}), "batch": "BATCH"}
#: DynUNet's activation.
_ACT = ("leakyrelu", {"inplace": True, "negative_slope": 0.01})


def default_modality_channels(out_channels: int) -> int:
    """Per-sequence encoder width used when ``ModalFusionConfig.channels`` is None: ``max(4, C // 4)``."""
    return max(4, out_channels // 4)


def presence_from_names(available: Sequence[str]) -> Tensor:
    """Presence mask of the named sequences.

    ``available``: sequence names (``MODALITIES`` spelling, case-insensitive,
    repeats allowed). Returns ``(M,)`` bool in ``MODALITIES`` order.
    Raises :class:`MensegError` when ``available`` is empty or has an unknown name.
    """
    if isinstance(available, str):
        available = [available]
    names = [str(a).strip().lower() for a in available]
    if not names:
        raise MensegError(f"at least one MRI sequence is needed (known: {', '.join(MODALITIES)})")
    unknown = sorted({n for n in names if n not in MODALITIES})
    if unknown:
        raise MensegError(f"unknown MRI sequence(s) {', '.join(unknown)} (known: {', '.join(MODALITIES)})")
    return torch.tensor([m in names for m in MODALITIES], dtype=torch.bool)


def names_from_presence(present: Tensor) -> tuple[str, ...]:
    """Names of the present sequences, ``MODALITIES`` order; ``present`` is ``(M,)`` bool, M = 4."""
    if present.dim() != 1 or present.shape[0] != len(MODALITIES):
        raise MensegError(f"presence mask must have shape ({len(MODALITIES)},), got {tuple(present.shape)}")
    return tuple(m for m, p in zip(MODALITIES, present.tolist(), strict=True) if p)


def sample_presence(
    rng: torch.Generator, batch: int, cfg: ModalFusionConfig | SeqDropConfig,
    n_modalities: int = len(MODALITIES),
) -> Tensor:
    """Random sequence dropout for one training batch.

    Returns ``(batch, n_modalities)`` bool on ``rng.device``; a row is never all
    False. With ``cfg.enabled`` False (or ``p_drop`` 0, or ``max_drop`` 0) every
    sequence is present. The same number of random values is drawn whatever the
    outcome (``3`` draws per call), so the result is a pure function of the
    generator state: replayable from a seed.
    """
    if batch < 0 or n_modalities < 1:
        raise MensegError(f"bad batch/modality count {batch}/{n_modalities}")
    dev = rng.device
    kmax = min(cfg.max_drop, n_modalities - 1)
    if not cfg.enabled or kmax < 1 or cfg.p_drop <= 0.0:
        return torch.ones(batch, n_modalities, dtype=torch.bool, device=dev)
    drop = torch.rand(batch, generator=rng, device=dev) < cfg.p_drop  # (B,) sample loses something
    k = torch.randint(1, kmax + 1, (batch,), generator=rng, device=dev)  # (B,) how many it loses
    order = torch.rand(batch, n_modalities, generator=rng, device=dev).argsort(dim=1)  # random permutation
    rank = order.argsort(dim=1)  # rank[b, m]: position of sequence m in the permutation
    lost = (rank < k[:, None]) & drop[:, None]
    return ~lost


def mask_absent(x: Tensor, present: Tensor) -> Tensor:
    """Replace absent sequences by 0 (never read them): ``x`` (B, M, ...), ``present`` (B, M) bool."""
    shape = present.shape + (1,) * (x.dim() - 2)
    return torch.where(present.reshape(shape), x, torch.zeros((), dtype=x.dtype, device=x.device))


class ModalFusionStem(nn.Module):
    """Per-sequence encoders fused by a learned per-location weighting; replaces the U-Net's input block.

    ``forward(x, present)``: ``x`` (B, M, X, Y, Z) in ``MODALITIES`` channel order,
    ``present`` (B, M) or (M,) bool (None: all present) -> (B, C, X, Y, Z), the
    features of the U-Net's first level. With ``return_weights`` also the fusion
    weights (B, M, X, Y, Z): in [0, 1], summing to 1 over the present sequences,
    exactly 0 for absent ones (for logging which sequence the net relies on where).

    Parameters: ``encoder`` (grouped conv ``M -> M c``), ``encoder_norm``, ``scores`` (grouped
    1x1 conv ``M c -> M``), ``fuse`` (basic block ``M c -> C``); :meth:`sequence_parameters` gives
    the slices that belong to one sequence.
    """

    def __init__(
        self,
        n_modalities: int,
        out_channels: int,
        norm: str = "instance",
        modality_channels: int | None = None,
    ) -> None:
        super().__init__()
        from monai.networks.blocks.dynunet_block import UnetBasicBlock

        if n_modalities < 1 or out_channels < 1:
            raise MensegError(f"bad modal fusion sizes: {n_modalities} sequences, {out_channels} channels")
        if norm not in _NORMS:
            raise MensegError(f"unknown norm '{norm}' (known: {', '.join(_NORMS)})")
        c = modality_channels if modality_channels is not None else default_modality_channels(out_channels)
        if c < 1:
            raise MensegError(f"modality_channels must be at least 1, got {c}")
        self.n_modalities = n_modalities
        self.out_channels = out_channels
        self.modality_channels = c
        m = n_modalities
        self.encoder = nn.Conv3d(m, m * c, kernel_size=3, padding=1, groups=m)
        # per-channel norm, so each sequence's channels are normalised on their own
        self.encoder_norm = (nn.InstanceNorm3d(m * c, affine=True) if norm == "instance"
                             else nn.BatchNorm3d(m * c))
        self.act = nn.LeakyReLU(0.01, inplace=True)
        self.scores = nn.Conv3d(m * c, m, kernel_size=1, groups=m)
        self.fuse = UnetBasicBlock(3, m * c, out_channels, kernel_size=3, stride=1, norm_name=_NORMS[norm],
                                   act_name=_ACT)
        self.apply(_init_like_dynunet)
        nn.init.zeros_(self.scores.weight)  # start as the plain mean of the present sequences
        nn.init.zeros_(self.scores.bias)

    def sequence_parameters(self, m: int) -> dict[str, Tensor]:
        """Views of the parameters that belong to sequence ``m`` only (encoder, norm, score)."""
        c = self.modality_channels
        sl = slice(m * c, (m + 1) * c)
        return {"encoder.weight": self.encoder.weight[sl], "encoder.bias": self.encoder.bias[sl],
                "scores.weight": self.scores.weight[m : m + 1], "scores.bias": self.scores.bias[m : m + 1]}

    def _check_presence(self, x: Tensor, present: Tensor | None) -> Tensor:
        if x.dim() != 5 or x.shape[1] != self.n_modalities:
            raise MensegError(f"modal fusion expects (B, {self.n_modalities}, X, Y, Z), got {tuple(x.shape)}")
        b, m = x.shape[0], x.shape[1]
        if present is None:
            return torch.ones(b, m, dtype=torch.bool, device=x.device)
        present = present.to(device=x.device, dtype=torch.bool)
        if present.dim() == 1:
            present = present.expand(b, -1)
        if tuple(present.shape) != (b, m):
            raise MensegError(f"presence mask must be ({b}, {m}) or ({m},), got {tuple(present.shape)}")
        if not bool(present.any(dim=1).all()):
            raise MensegError("every sample needs at least one present MRI sequence")
        return present

    def forward(
        self, x: Tensor, present: Tensor | None = None, return_weights: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        present = self._check_presence(x, present)
        x = mask_absent(x, present)
        b, m, c = x.shape[0], self.n_modalities, self.modality_channels
        f = self.act(self.encoder_norm(self.encoder(x)))  # (B, M c, X, Y, Z)
        s = self.scores(f)  # (B, M, X, Y, Z)
        s = s.masked_fill(~present[:, :, None, None, None], float("-inf"))
        w = torch.softmax(s, dim=1)  # absent: exp(-inf) = 0 exactly; every row has a finite score
        # each sequence's channels scaled by its weight; absent ones exactly 0
        fused = (f.view(b, m, c, *f.shape[2:]) * w[:, :, None]).reshape(b, m * c, *f.shape[2:])
        out = self.fuse(fused)
        return (out, w) if return_weights else out

    def bind(self, present: Tensor | None) -> nn.Module:
        """This stem with a fixed presence mask, callable as ``stem(x)`` (what ``unet.encode`` calls).

        Shares this stem's parameters; make a new one per batch.
        """
        return _BoundStem(self, present)


class _BoundStem(nn.Module):
    """``stem(x)`` = ``ModalFusionStem(x, present)`` for one fixed presence mask."""

    def __init__(self, stem: ModalFusionStem, present: Tensor | None) -> None:
        super().__init__()
        self.stem = stem
        self.present = present

    def forward(self, x: Tensor) -> Tensor:
        out = self.stem(x, self.present)
        assert isinstance(out, Tensor)
        return out


def _init_like_dynunet(module: nn.Module) -> None:
    """DynUNet's initialisation (kaiming normal, a = 0.01; zero bias), so the stem trains like the block."""
    if isinstance(module, nn.Conv3d):
        nn.init.kaiming_normal_(module.weight, a=0.01)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


__all__ = [
    "ModalFusionConfig",
    "ModalFusionStem",
    "default_modality_channels",
    "mask_absent",
    "names_from_presence",
    "presence_from_names",
    "sample_presence",
]
