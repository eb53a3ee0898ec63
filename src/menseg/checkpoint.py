"""Checkpoints: atomic save, safe load (``weights_only=True``), model rebuild.

A checkpoint is a plain dict of tensors and builtins::

    {"format": 1, "model": state_dict, "config": to_dict(Config), "step": int,
     "optimizer": state_dict | None, "scaler": state_dict | None,
     "best_metric": float | None, ...}

so it loads with ``torch.load(weights_only=True)`` (no arbitrary pickles).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from menseg.config import Config, from_dict
from menseg.errors import MensegError
from menseg.utils import atomic_path

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temp file + rename).

    ``state`` must hold only tensors, containers and builtins so that it can be
    read back with ``weights_only=True``.
    """
    state = {"format": CHECKPOINT_FORMAT, **state}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely with ``torch.load(weights_only=True)``.

    Raises MensegError naming the file when it is missing, truncated, corrupt,
    holds objects that are not allowed under ``weights_only`` (unsafe pickle),
    or is not a menseg checkpoint dict.
    """
    path = Path(path)
    if not path.is_file():
        raise MensegError("checkpoint not found", path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any load failure is a bad file for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            msg = "holds objects that are unsafe to load (not a plain weights checkpoint)"
        raise MensegError(f"cannot read checkpoint ({msg})", path) from None
    if not isinstance(state, dict) or "model" not in state:
        raise MensegError("not a menseg checkpoint (no 'model' entry)", path)
    return state


def config_from_checkpoint(state: dict[str, Any], path: str | Path | None = None) -> Config:
    """The run's :class:`Config` stored in a checkpoint dict."""
    d = state.get("config")
    if not isinstance(d, dict):
        raise MensegError("checkpoint has no stored config", path)
    try:
        return from_dict(Config, d)
    except MensegError as e:
        raise MensegError(f"stored config is invalid ({e})", path) from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Config]:
    """Rebuild the network from a checkpoint's stored config and load its weights.

    The network is :func:`menseg.ism.model.build_model`'s: the plain DynUNet, or an
    :class:`~menseg.ism.model.ISMNet` when the run switched on an ISM part.

    Returns ``(model, cfg)`` with the model on ``device`` in eval mode.
    """
    from menseg.ism.model import build_model

    state = load_checkpoint(path, map_location="cpu")
    cfg = config_from_checkpoint(state, path)
    model = build_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError) as e:
        first = str(e).strip().splitlines()[0]
        raise MensegError(f"weights do not match the stored model config ({first})", path) from None
    model.to(device).eval()
    log.debug("loaded %s (step %s)", path, state.get("step"))
    return model, cfg


__all__ = ["config_from_checkpoint", "load_checkpoint", "load_model", "save_checkpoint"]
