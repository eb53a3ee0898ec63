"""Checkpoints: atomic save, safe load (``weights_only=True``), model rebuild.

A checkpoint is a plain dict of tensors and builtins::

    {"format": 1, "model": state_dict, "config": to_dict(Config), "step": int,
     "optimizer": state_dict | None, "scaler": state_dict | None,
     "best_metric": float | None, ...}

so it loads with ``torch.load(weights_only=True)`` (no arbitrary pickles).

Integrity: every save writes ``<name>.sha256`` beside the file (SHA-256 of its bytes) and
:func:`load_checkpoint` refuses a file whose bytes do not match (a copy cut short, a disk error).
With ``keep_previous`` the file being replaced is kept as ``<stem>.prev<suffix>`` (with its
checksum), so :func:`load_latest` can fall back to it, with a warning, when the newest is damaged.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from menseg.config import Config, from_dict, with_legacy_values
from menseg.errors import MensegError
from menseg.utils import atomic_path, sha256_file

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def checksum_path(path: str | Path) -> Path:
    """Where the SHA-256 of checkpoint ``path`` is kept: ``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def previous_path(path: str | Path) -> Path:
    """Where :func:`save_checkpoint` keeps the replaced file: ``latest.pt`` -> ``latest.prev.pt``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _keep_as_previous(path: Path) -> None:
    """Make :func:`previous_path` a copy of ``path`` (a hard link where the file system allows),
    with ``path``'s checksum file; ``path`` itself is not touched."""
    prev = previous_path(path)
    with atomic_path(prev) as tmp:
        tmp.unlink()
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
    sums = checksum_path(path)
    if sums.is_file():
        with atomic_path(checksum_path(prev)) as tmp:
            tmp.write_text(sums.read_text())
    else:
        checksum_path(prev).unlink(missing_ok=True)


def save_checkpoint(path: str | Path, state: dict[str, Any], keep_previous: bool = False) -> None:
    """Write ``state`` to ``path`` atomically (temp file + rename) with its checksum file.

    ``state`` must hold only tensors, containers and builtins so that it can be
    read back with ``weights_only=True``. With ``keep_previous`` the file being replaced (and its
    checksum) is kept as :func:`previous_path`. ``path`` is replaced by one rename at the end, so a
    process killed at any point leaves either the old or the new file there, and a checksum that
    matches it or fails (then :func:`load_latest` uses the previous file). A failed write (full disk,
    unwritable folder) raises :class:`MensegError` and leaves the files that were there untouched.
    """
    path = Path(path)
    state = {"format": CHECKPOINT_FORMAT, **state}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
        digest = sha256_file(tmp)
        if keep_previous and path.is_file():
            _keep_as_previous(path)
        with atomic_path(checksum_path(path)) as sums:
            sums.write_text(digest + "\n")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely with ``torch.load(weights_only=True)``.

    Raises MensegError naming the file when it is missing, truncated, corrupt,
    holds objects that are not allowed under ``weights_only`` (unsafe pickle),
    or is not a menseg checkpoint dict.
    """
    path = Path(path)
    if not path.is_file():
        raise MensegError("checkpoint not found", path)
    sums = checksum_path(path)
    if sums.is_file():
        want = sums.read_text().strip()
        if want and sha256_file(path) != want:
            raise MensegError(f"checkpoint is damaged (its bytes do not match {sums.name})", path)
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


def load_latest(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path]:
    """:func:`load_checkpoint` of ``path``, or, when that one is damaged or unreadable, of its
    :func:`previous_path` (logged as a warning). Returns ``(state, the file used)``."""
    path = Path(path)
    try:
        return load_checkpoint(path, map_location), path
    except MensegError as first:
        prev = previous_path(path)
        if not prev.is_file():
            raise
        log.warning("%s; resuming from the previous checkpoint %s instead", first, prev)
        return load_checkpoint(prev, map_location), prev


#: What a run folder may hold for prediction, in the order :func:`run_checkpoint` prefers them.
RUN_CHECKPOINTS: tuple[str, ...] = ("best.pt", "latest.pt")
#: The folder of a run's companion for incomplete scans (``seqdrop.companion_steps``).
COMPANION = "companion"
#: The files of a run folder that the trainer lists when it finishes (those that exist).
RUN_FILES: tuple[str, ...] = (*RUN_CHECKPOINTS, "metrics.jsonl", "config.yaml")


def run_checkpoint(run_dir: str | Path) -> Path:
    """The checkpoint that prediction uses from a run folder: ``best.pt`` (best validation score), or,
    for a run that validated nothing (no validation cases, e.g. trained with no labels), its final
    weights ``latest.pt`` (logged). MensegError when the folder holds neither."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MensegError("run folder not found", run_dir)
    best, latest = (run_dir / n for n in RUN_CHECKPOINTS)
    if best.is_file():
        return best
    if latest.is_file():
        log.info("%s has no best.pt (the run validated nothing): using its final weights, latest.pt", run_dir)
        return latest
    raise MensegError("no checkpoint in this run folder (best.pt or latest.pt)", run_dir)


def run_files(run_dir: str | Path) -> list[str]:
    """The :data:`RUN_FILES` that exist in ``run_dir`` (what a finished run wrote), and ``companion/``
    when the run has one."""
    found = [n for n in RUN_FILES if (Path(run_dir) / n).is_file()]
    return found + ([f"{COMPANION}/"] if (Path(run_dir) / COMPANION).is_dir() else [])


def companion_state(path: str | Path, state: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """The companion for incomplete scans of checkpoint ``path`` (its dict ``state``), and how to name it:
    the checkpoint's own ``companion`` entry (an exported model, named ``<path>#companion``), else the
    checkpoint of ``companion/`` beside it (a run folder, named by its path); None when the run trains no
    companion (``config.has_companion``). MensegError when it should have one but its folder is missing
    (the run stopped before its companion finished)."""
    from menseg.config import has_companion

    path = Path(path)
    if not has_companion(config_from_checkpoint(state, path)):
        return None
    own = state.get("companion")
    if isinstance(own, dict):
        return own, f"{path}#companion"
    folder = path.parent / COMPANION
    if not folder.is_dir():
        raise MensegError(f"this run trains a companion for incomplete scans, but {folder} is missing "
                          "(the run stopped before it: continue it with menseg train ... --resume)", path)
    found = run_checkpoint(folder)
    return load_checkpoint(found), str(found)


def config_from_checkpoint(state: dict[str, Any], path: str | Path | None = None) -> Config:
    """The run's :class:`Config` stored in a checkpoint dict."""
    d = state.get("config")
    if not isinstance(d, dict):
        raise MensegError("checkpoint has no stored config", path)
    try:  # keys added later are at their default, unless the default changed what a run does
        return from_dict(Config, with_legacy_values(d))
    except MensegError as e:
        raise MensegError(f"stored config is invalid ({e})", path) from None


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, Config]:
    """Rebuild the network from a checkpoint's stored config and load its weights.

    The network is :func:`menseg.ism.model.build_model`'s: the plain DynUNet, or an
    :class:`~menseg.ism.model.ISMNet` when the run switched on an ISM part.

    Returns ``(model, cfg)`` with the model on ``device`` in eval mode.
    """
    model, cfg, _ = load_model_and_state(path, device)
    return model, cfg


def load_model_and_state(path: str | Path, device: str | torch.device = "cpu"
                         ) -> tuple[nn.Module, Config, dict[str, Any]]:
    """:func:`load_model` and the checkpoint's other entries (e.g. ``postprocess``), weights left out."""
    state = load_checkpoint(path, map_location="cpu")
    model, cfg = model_from_state(state, device, path)
    log.debug("loaded %s (step %s)", path, state.get("step"))
    return model, cfg, {k: v for k, v in state.items() if k not in ("model", "optimizer")}


def model_from_state(state: dict[str, Any], device: str | torch.device = "cpu", path: str | Path | None = None
                     ) -> tuple[nn.Module, Config]:
    """The network of a checkpoint dict (``model`` weights and ``config``; e.g. an exported model's
    ``companion`` entry), on ``device`` in eval mode. ``path`` names the file in errors."""
    from menseg.ism.model import build_model

    cfg = config_from_checkpoint(state, path)
    model = build_model(cfg)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, KeyError) as e:
        first = str(e).strip().splitlines()[0]
        raise MensegError(f"weights do not match the stored model config ({first})", path) from None
    return model.to(device).eval(), cfg


__all__ = [
    "checksum_path", "companion_state", "config_from_checkpoint", "load_checkpoint", "load_latest",
    "load_model",
    "load_model_and_state", "model_from_state",
    "previous_path", "save_checkpoint",
]
