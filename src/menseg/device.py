"""Choosing the compute device, one rule for every command."""

from __future__ import annotations

import torch

from menseg.errors import MensegError


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> CUDA when available else CPU; ``"cuda"`` without CUDA is a MensegError."""
    if isinstance(device, torch.device):
        if device.type == "cuda" and not torch.cuda.is_available():
            raise MensegError("device 'cuda' requested but CUDA is not available")
        return device
    name = "auto" if device is None else str(device).lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MensegError(
                f"device '{device}' requested but CUDA is not available "
                "(use --device cpu or --device auto)"
            )
        return torch.device(name)
    raise MensegError(f"unknown device '{device}' (use auto, cpu or cuda)")
