"""Models by name: the ones shipped in the package, and folders of exported models.

A model is three files in one folder::

    <name>.pt     weights-only checkpoint (network weights, the run's config, learned post-processing;
                  no optimiser state), read with ``torch.load(weights_only=True)``
    <name>.json   manifest: sha256 and size of <name>.pt, a one-line summary, whether it is the default
    <name>.md     model card: what it was trained on and how, its measured figures, its licence and
                  what it must not be used for

Folders searched, in order: the package's own (``menseg/models/``: the shipped models), then each folder
named in the environment variable ``MENSEG_MODELS_DIR`` (``os.pathsep``-separated), e.g. a lab's shared
folder of fine-tuned models (``menseg models export``). The first folder holding a name wins.

Every use of a model by name checks its file against the manifest's sha256, so a damaged or replaced
file fails with one line instead of predicting with wrong weights.

:func:`resolve_model` turns what a user typed (a name, a checkpoint file or a run folder) into the
checkpoint to load; :func:`init_weights` starts a network from one (``model.init``, fine-tuning).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from menseg.errors import MensegError

log = logging.getLogger(__name__)

#: The package's own models (the shipped ones).
SHIPPED_DIR = Path(__file__).parent
#: Environment variable naming more folders of models (``os.pathsep``-separated).
MODELS_ENV = "MENSEG_MODELS_DIR"
#: Largest shipped weights file the package accepts (MB), so the wheel stays installable anywhere.
MAX_SHIPPED_MB = 25.0
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class ModelEntry:
    """One named model: its files and manifest."""

    name: str
    weights: Path
    card: Path
    sha256: str
    bytes: int
    summary: str
    default: bool
    shipped: bool  #: in the package (not from ``MENSEG_MODELS_DIR``)


def search_dirs() -> list[Path]:
    """The folders searched for named models, in order (the package's first)."""
    extra = [Path(p) for p in os.environ.get(MODELS_ENV, "").split(os.pathsep) if p.strip()]
    return [SHIPPED_DIR, *extra]


def _read_manifest(path: Path) -> ModelEntry:
    try:
        m = json.loads(path.read_text())
        name = path.name.removesuffix(".json")
        if m.get("format") != MANIFEST_FORMAT or m.get("name") != name:
            raise ValueError("not a menseg model manifest")
        return ModelEntry(name=name, weights=path.with_name(f"{name}.pt"), card=path.with_name(f"{name}.md"),
                          sha256=str(m["sha256"]), bytes=int(m["bytes"]), summary=str(m.get("summary", "")),
                          default=bool(m.get("default", False)), shipped=path.parent == SHIPPED_DIR)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MensegError(f"unreadable model manifest ({e})", path) from None


def list_models() -> list[ModelEntry]:
    """Every named model, first folder first; a name found again in a later folder is shadowed (logged)."""
    seen: dict[str, ModelEntry] = {}
    for folder in search_dirs():
        if not folder.is_dir():
            if folder != SHIPPED_DIR:
                log.warning("%s names %s, which is not a folder", MODELS_ENV, folder)
            continue
        for manifest in sorted(folder.glob("*.json")):
            if not manifest.with_suffix(".pt").is_file():
                continue  # a JSON file that is not a model's manifest
            entry = _read_manifest(manifest)
            if entry.name in seen:
                log.warning("model %s in %s is shadowed by the one in %s", entry.name, folder,
                            seen[entry.name].weights.parent)
                continue
            seen[entry.name] = entry
    return list(seen.values())


def _known(entries: list[ModelEntry]) -> str:
    return ", ".join(e.name for e in entries) if entries else "none"


def default_model() -> ModelEntry | None:
    """The shipped model ``menseg predict`` uses when given none (None when none is shipped)."""
    shipped = [e for e in list_models() if e.shipped]
    return next((e for e in shipped if e.default), shipped[0] if shipped else None)


def find_model(name: str) -> ModelEntry:
    """The model called ``name``, its weights checked against its manifest. MensegError naming the known
    models when there is none of that name, or saying the file is damaged when its bytes do not match."""
    from menseg.utils import sha256_file

    entries = list_models()
    entry = next((e for e in entries if e.name == name), None)
    if entry is None:
        raise MensegError(f"unknown model '{name}' (known models: {_known(entries)}; or give a checkpoint "
                          "file or run folder)")
    if not entry.weights.is_file():
        raise MensegError(f"model '{name}' has no weights file", entry.weights)
    if entry.weights.stat().st_size != entry.bytes or sha256_file(entry.weights) != entry.sha256:
        raise MensegError(f"model '{name}' is damaged: its weights do not match the checksum in its manifest "
                          "(reinstall menseg, or export the model again)", entry.weights)
    return entry


def looks_like_model(spec: str | os.PathLike[str]) -> bool:
    """Whether a command-line word names a model rather than an input: a ``.pt`` file, a run folder
    (holding ``best.pt`` or ``latest.pt``), or no existing path at all (then a model name, checked by
    :func:`resolve_model`)."""
    from menseg.checkpoint import RUN_CHECKPOINTS

    p = Path(spec)
    if p.is_file():
        return p.suffix == ".pt"
    if p.is_dir():
        return any((p / n).is_file() for n in RUN_CHECKPOINTS)
    return True


def resolve_model(spec: str | os.PathLike[str] | None) -> tuple[Path, str]:
    """The checkpoint file a model spec names, and how to call it in logs and sidecars (the model's name,
    or the checkpoint's path).

    ``spec``: a checkpoint file; a run folder (:func:`~menseg.checkpoint.run_checkpoint`); the name of a
    model (:func:`find_model`, checksum checked); or None for the default shipped model (logged in one
    line). A word with a path separator or a suffix is a path (loading it says when it is missing);
    another word that names no model is a MensegError listing the known ones, as is None when no model
    is shipped.
    """
    from menseg.checkpoint import run_checkpoint

    if spec is None:
        entry = default_model()
        if entry is None:
            raise MensegError("no model given, and this menseg ships none yet: give a checkpoint or run "
                              "folder (menseg predict MODEL INPUT OUTPUT) or --model NAME|PATH")
        find_model(entry.name)  # checksum
        log.info("using the shipped model %s (%s); --model picks another", entry.name, entry.summary)
        return entry.weights, entry.name
    p = Path(spec)
    if p.is_dir():
        ckpt = run_checkpoint(p)
        return ckpt, str(ckpt)
    if p.is_file() or os.sep in str(spec) or p.suffix:  # a path (loading says when it is not there)
        return p, str(p)
    return find_model(str(spec)).weights, str(spec)


def init_digest(spec: str) -> str:
    """sha256 of the weights ``model.init`` names (:func:`resolve_model`), so that a benchmark run started
    from a model counts as another run when that model's weights change under the same name or path."""
    from menseg.utils import sha256_file

    path, _ = resolve_model(spec)
    if not Path(path).is_file():
        raise MensegError("model.init: no such checkpoint", path)
    return sha256_file(path)


def _first_difference(have: dict[str, Any], want: dict[str, Any]) -> str | None:
    """The first layer (in the network's order) whose name or shape differs between two state dicts."""
    for key, tensor in want.items():
        if key not in have:
            return f"{key} (not in the init weights)"
        if tuple(have[key].shape) != tuple(tensor.shape):
            return (f"{key} (shape {tuple(tensor.shape)} in this network, {tuple(have[key].shape)} in the "
                    "init weights)")
    extra = [k for k in have if k not in want]
    return f"{extra[0]} (in the init weights, not in this network)" if extra else None


#: Where a plain network's first block sits in one with the presence input (``nets.PresenceStem``).
_STEM_PREFIXES = (("input_block.", "input_block.block."),
                  ("skip_layers.downsample.", "skip_layers.downsample.block."))


def _with_presence(state: dict[str, Any], want: dict[str, Any]) -> dict[str, Any] | None:
    """A plain network's weights laid out for the same network with the presence input: the first block
    moves under its stem, and the input convolution gets zero weights for the presence channels, so the
    network computes exactly what the plain one did on complete scans. None when ``want`` has no stem or
    ``state`` already has one. Keys may carry a prefix (an ISM network's backbone is ``net.``)."""
    import torch

    def stem_prefix(keys: Any) -> str | None:
        return next((k[: k.index("input_block.block.")] for k in keys if "input_block.block." in k), None)

    prefix = stem_prefix(want)
    if prefix is None or stem_prefix(state) is not None:
        return None
    out: dict[str, Any] = {}
    for key, tensor in state.items():
        for old, new in _STEM_PREFIXES:
            if key.startswith(prefix + old):
                key = prefix + new + key[len(prefix + old):]
                break
        target = want.get(key)
        if (target is not None and tensor.dim() >= 2 and tuple(target.shape[:1]) == tuple(tensor.shape[:1])
                and target.shape[1] == 2 * tensor.shape[1] and target.shape[2:] == tensor.shape[2:]):
            tensor = torch.cat([tensor, torch.zeros_like(tensor)], dim=1)  # presence channels: weight 0
        out[key] = tensor
    return out


def init_weights(model: Any, spec: str) -> str:
    """Load ``model.init`` weights (:func:`resolve_model`'s spec) into ``model`` in place.

    The network must match the init weights layer for layer (names and shapes): otherwise MensegError
    names the first differing layer. An :class:`~menseg.ism.model.ISMNet` may start from a plain network's
    weights: they go into its backbone (``model.net``) and the ISM modules keep their fresh start. A network
    with the presence input (sequence dropout) may start from one without: the presence channels get zero
    weights, so it starts as the same function on complete scans.
    Returns what was loaded, for the log.
    """
    from menseg.checkpoint import load_checkpoint

    path, label = resolve_model(spec)
    state = load_checkpoint(path)["model"]
    target = model
    if hasattr(model, "net") and not any(k.startswith("net.") for k in state):
        target = model.net  # ISM network from a plain one
    want = target.state_dict()
    expanded = _with_presence(state, want)
    if expanded is not None:
        log.info("the init weights have no presence input: added, with zero weights")
        state = expanded
    diff = _first_difference(state, want)
    if diff is not None:
        raise MensegError(f"model.init: this network differs from {label}'s at {diff}; the run's model "
                          "config (filters, sequence dropout, ISM) must match the one it starts from")
    target.load_state_dict(state)
    what = f"{label} ({path})" if label != str(path) else label
    log.info("network initialised from %s%s", what, "; ISM modules start from scratch" if target is not model
             else "")
    return what


def _weights(state: dict[str, Any], half: bool) -> dict[str, Any]:
    """A state dict, in fp16 with ``half``; tensors shared under two names stay shared."""
    out: dict[str, Any] = {}
    converted: dict[tuple[int, tuple[int, ...]], Any] = {}
    for k, v in state.items():
        if half and v.is_floating_point():
            v = converted.setdefault((v.data_ptr(), tuple(v.shape)), v.half())
        out[k] = v
    return out


def export_model(
    source: str | os.PathLike[str],
    name: str,
    out_dir: str | os.PathLike[str],
    *,
    summary: str = "",
    card: str | os.PathLike[str] | None = None,
    default: bool = False,
    half: bool = False,
    overwrite: bool = False,
) -> ModelEntry:
    """Write a checkpoint or run folder as the named model ``name`` in ``out_dir`` (weights, manifest, card).

    Only what prediction and fine-tuning need is kept: the network weights (fp16 with ``half``, which halves
    the file; prediction computes in the precision it is asked for), the run's config, its learned
    post-processing and its step count. ``card``: a Markdown model card to copy; without one a short card is
    written from the run (config, steps, cases, source) for its owner to complete. An existing model of that
    name in ``out_dir`` is refused unless ``overwrite``.
    """
    import shutil

    import torch

    from menseg.checkpoint import companion_state, config_from_checkpoint, load_checkpoint
    from menseg.utils import atomic_path, sha256_file

    if not name or not all(c.isalnum() or c in "-_." for c in name) or name.startswith("."):
        raise MensegError(f"model name '{name}' must be letters, digits, '-', '_' or '.'")
    src_path, _ = resolve_model(source)
    state = load_checkpoint(src_path)
    cfg = config_from_checkpoint(state, src_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights, manifest, card_path = (out / f"{name}{ext}" for ext in (".pt", ".json", ".md"))
    if not overwrite and any(p.exists() for p in (weights, manifest, card_path)):
        raise MensegError(f"a model called '{name}' is already there; use --overwrite to replace it", out)
    kept = {"format": state.get("format", 1), "model": _weights(state["model"], half),
            "config": state["config"], "step": state.get("step"), "postprocess": state.get("postprocess")}
    found = companion_state(src_path, state)
    if found is not None:  # the network for incomplete scans travels in the same file
        companion = found[0]
        kept["companion"] = {"model": _weights(companion["model"], half), "config": companion["config"],
                             "step": companion.get("step"), "postprocess": companion.get("postprocess")}
    with atomic_path(weights) as tmp:
        torch.save(kept, tmp)
    size = weights.stat().st_size
    if card is not None:
        if not Path(card).is_file():
            raise MensegError("model card not found", card)
        with atomic_path(card_path) as tmp:
            shutil.copyfile(card, tmp)
    else:
        rules = (state.get("postprocess") or {}).get("rules")
        lines = [
            f"# {name}", "", summary or "A menseg model.", "",
            f"- Exported from: `{src_path}`",
            f"- Config: `{cfg.name}`, {cfg.train.steps} steps, patch {list(cfg.train.patch_size)}, spacing "
            f"{list(cfg.data.spacing)} mm, filters {list(cfg.model.filters)}",
            f"- Training cases: {len(state.get('train_cases') or [])}, validation cases: "
            f"{len(state.get('val_cases') or [])}",
            f"- Post-processing: {'learned' if rules else 'fixed'}",
            f"- Weights: {'fp16' if half else 'fp32'}, {size / 1e6:.1f} MB", "",
            "Complete this card: the data it was trained on, its measured figures, its licence and what it "
            "must not be used for.", ""]
        text = "\n".join(lines)
        with atomic_path(card_path) as tmp:
            tmp.write_text(text)
    entry = {"format": MANIFEST_FORMAT, "name": name, "sha256": sha256_file(weights), "bytes": size,
             "summary": summary, "default": default}
    with atomic_path(manifest) as tmp:
        tmp.write_text(json.dumps(entry, indent=2) + "\n")
    log.info("exported %s as model %s in %s (%.1f MB)", src_path, name, out, size / 1e6)
    return _read_manifest(manifest)


__all__ = ["MAX_SHIPPED_MB", "MODELS_ENV", "ModelEntry", "SHIPPED_DIR", "default_model", "export_model",
           "find_model", "init_weights", "list_models", "looks_like_model", "resolve_model", "search_dirs"]
