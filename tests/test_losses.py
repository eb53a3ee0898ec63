"""Region Dice + BCE loss (menseg.nets.losses; menseg.train.losses adds the DDP switch)."""

from __future__ import annotations

import pytest
import torch

from menseg.nets.losses import (
    RegionDiceBCELoss,
    deep_supervision_weights,
    soft_dice_loss,
)
from menseg.regions import labels_to_regions


def label_batch() -> torch.Tensor:
    """Two 8^3 label maps with every label, nested (also used by test_regions)."""
    lab = torch.zeros(2, 8, 8, 8, dtype=torch.uint8)
    lab[0, 1:5, 1:5, 1:5] = 2
    lab[0, 2:4, 2:4, 2:4] = 3
    lab[0, 2, 2, 2] = 1
    lab[1, 4:8, 4:8, 0:3] = 1
    return lab


def test_perfect_logits_near_zero_and_wrong_high() -> None:
    target = labels_to_regions(label_batch())
    perfect = (target * 2 - 1) * 30
    assert soft_dice_loss(perfect, target).item() < 1e-6
    loss = RegionDiceBCELoss()
    assert loss(perfect, label_batch()).item() < 1e-6
    assert loss(-perfect, label_batch()).item() > 1.0
    # Sample-wise Dice: sample 1 has no ET, a perfect prediction still scores ~0.
    assert soft_dice_loss(perfect, target, batch_dice=False).item() < 1e-6


def test_dice_value_hand_computed() -> None:
    target = torch.zeros(1, 1, 4)
    target[0, 0, :2] = 1
    logits = torch.full((1, 1, 4), -50.0)
    logits[0, 0, 1:3] = 50.0  # tp=1, fp=1, fn=1 -> dice 0.5
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.5, abs=1e-4)


def test_deep_supervision_weights() -> None:
    w = deep_supervision_weights(3)
    assert w == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert deep_supervision_weights(1) == [1.0]


def test_deep_supervision_stacked_and_list() -> None:
    lab = label_batch()
    target = labels_to_regions(lab)
    perfect = (target * 2 - 1) * 30
    loss = RegionDiceBCELoss()
    # Stacked like DynUNet (B, K, C, X, Y, Z): one perfect head + one bad head.
    stacked = torch.stack([perfect, -perfect], dim=1)
    bad_only = loss(-perfect, lab).item()
    assert loss(stacked, lab).item() == pytest.approx(bad_only / 3, rel=1e-4)
    # Multi-resolution list: low-res heads get nearest-downsampled targets.
    low = torch.nn.functional.interpolate(perfect, size=(4, 4, 4), mode="nearest")
    val = loss([perfect, low], lab)
    assert val.ndim == 0 and val.item() < 1e-5
    # Gradients flow to every head.
    heads = [perfect.clone().requires_grad_(), torch.zeros(2, 3, 4, 4, 4, requires_grad=True)]
    loss(heads, lab).backward()
    assert all(h.grad is not None and h.grad.abs().sum() > 0 for h in heads)


def test_trainer_loss_is_the_nets_loss_with_its_ddp_switch() -> None:
    from menseg.nets import losses as nets_losses
    from menseg.train import losses as train_losses

    logits = torch.randn(2, 3, 8, 8, 8, generator=torch.Generator().manual_seed(0))
    lab = label_batch()
    trainer_loss = train_losses.RegionDiceBCELoss(across_ranks=False)
    assert isinstance(trainer_loss, nets_losses.RegionDiceBCELoss) and trainer_loss._pool is None
    assert torch.equal(trainer_loss(logits, lab), nets_losses.RegionDiceBCELoss()(logits, lab))
    assert train_losses.RegionDiceBCELoss(across_ranks=True)._pool is not None
