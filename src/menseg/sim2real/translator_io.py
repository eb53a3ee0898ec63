"""The translator's folders (the method: :mod:`menseg.sim2real.translator`): the fit folder's file
names, reading a fitted translator (settings, generator ``G``, segmenter ``S``), preview mosaics, and
translating a dataset folder.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from menseg.checkpoint import load_checkpoint
from menseg.config import TranslatorConfig, from_dict
from menseg.constants import MODALITIES, SEG_SUFFIX
from menseg.device import resolve_device
from menseg.errors import MensegError
from menseg.sim2real.translator_nets import Generator, build_segmenter, head_mask, translate_image
from menseg.utils import atomic_path

log = logging.getLogger(__name__)

TRANSLATOR_FILE = "translator.pt"
LATEST_FILE = "latest.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
PREVIEW_DIR = "preview"
#: Sub-folder of a fit folder where :func:`~menseg.sim2real.translator_fit.fit_translator_from_folders`
#: keeps its preprocessed cases.
PREPROCESSED_DIR = "preprocessed"
#: Marker of a translator checkpoint (``kind`` entry).
KIND = "menseg-sim2real-translator"
#: Rows of synthetic cases in a preview mosaic.
PREVIEW_ROWS = 3
#: Display range of z-scored intensities in previews.
PREVIEW_RANGE = (-3.0, 3.0)


# ---------------------------------------------------------------- preview


def _lesion_slice(label: np.ndarray | None, image: np.ndarray) -> int:
    """Axial (last axis) index through the lesion centre, else through the head centre."""
    if label is not None and np.any(label > 0):
        return int(np.round(np.argwhere(label > 0)[:, 2].mean()))
    zs = np.argwhere(head_mask(image))[:, 2]
    return int(np.round(zs.mean())) if len(zs) else image.shape[-1] // 2


def write_preview(path: str | Path, rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]],
                  title: str = "") -> Path:
    """PNG mosaic: one row per ``(name, before (4,X,Y,Z), after (4,X,Y,Z), label (X,Y,Z) | None)``.

    Columns: the four sequences before, then after translation, on the axial slice through
    the lesion (or the head centre); the label outline is drawn on the 'after' t1c.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(MODALITIES)
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="black")  # outside the head: black
    fig, axes = plt.subplots(len(rows), 2 * n, figsize=(2 * n * 1.6, len(rows) * 1.7), squeeze=False)
    for r, (name, before, after, label) in enumerate(rows):
        z = _lesion_slice(label, before)
        outside = ~head_mask(before)[:, :, z].T
        for k, (arr, tag) in enumerate(((before, "before"), (after, "after"))):
            for c, m in enumerate(MODALITIES):
                ax = axes[r, k * n + c]
                ax.imshow(np.ma.masked_where(outside, arr[c, :, :, z].T), cmap=cmap, origin="lower",
                          vmin=PREVIEW_RANGE[0], vmax=PREVIEW_RANGE[1], interpolation="nearest")
                if k == 1 and c == 0 and label is not None and np.any(label[:, :, z] > 0):
                    ax.contour((label[:, :, z] > 0).T.astype(float), levels=[0.5], colors="r",
                               linewidths=0.6, origin="lower")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"{m} {tag}", fontsize=7)
                if k == 0 and c == 0:
                    ax.set_ylabel(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return path


def preview_rows(G: nn.Module, synthetic: Sequence[tuple[np.ndarray, np.ndarray]],
                  real: Sequence[np.ndarray]) -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]]:
    rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray | None]] = []
    picked = [i for i, (_, lab) in enumerate(synthetic) if np.any(np.asarray(lab) > 0)][:PREVIEW_ROWS]
    for i in picked:
        img, lab = synthetic[i]
        img = np.asarray(img, np.float32)
        rows.append((f"synthetic {i}", img, translate_image(G, img), np.asarray(lab)))
    rimg = np.asarray(real[0], np.float32)
    rows.append(("real 0 (G)", rimg, translate_image(G, rimg), None))
    return rows


# ---------------------------------------------------------------- loading


def _translator_state(path: str | Path) -> tuple[dict[str, Any], Path]:
    path = Path(path)
    if path.is_dir():
        path = path / TRANSLATOR_FILE
    state = load_checkpoint(path)
    if state.get("kind") != KIND or "generator" not in state or not isinstance(state.get("config"), dict):
        raise MensegError("not a menseg translator (no generator entry)", path)
    return state, path


def translator_config(path: str | Path) -> tuple[TranslatorConfig, int, tuple[float, float, float] | None]:
    """``(config, seed, spacing mm or None)`` stored with a fitted translator (file or fit folder)."""
    state, p = _translator_state(path)
    try:
        cfg = from_dict(TranslatorConfig, state["config"]["translator"])
    except (MensegError, KeyError) as e:
        raise MensegError(f"stored translator config is invalid ({e})", p) from None
    sp = state.get("spacing")
    return cfg, int(state.get("seed", 0)), (tuple(float(s) for s in sp) if sp is not None else None)  # type: ignore[return-value]


def load_translator(path: str | Path, device: str = "cpu") -> nn.Module:
    """The fitted generator G (synthetic -> real) in eval mode, from ``translator.pt`` or a fit folder.

    Loaded with ``weights_only=True``; MensegError if the file is missing or not a translator.
    """
    state, p = _translator_state(path)
    cfg, _, _ = translator_config(p)
    G = Generator(cfg.channels, cfg.max_delta)
    try:
        G.load_state_dict(state["generator"])
    except (RuntimeError, TypeError) as e:
        raise MensegError(f"generator weights do not match the stored config ({str(e).splitlines()[0]})",
                          p) from None
    return G.to(resolve_device(device)).eval()


def load_segmenter(path: str | Path, device: str = "cpu") -> nn.Module:
    """The semantic term's segmenter S (region logits ET, TC, WT) of a fitted translator, eval mode."""
    state, p = _translator_state(path)
    if "segmenter" not in state:
        raise MensegError("translator checkpoint holds no segmenter", p)
    S = build_segmenter()
    try:
        S.load_state_dict(state["segmenter"])
    except (RuntimeError, TypeError) as e:
        raise MensegError(f"segmenter weights do not match ({str(e).splitlines()[0]})", p) from None
    return S.to(resolve_device(device)).eval()


# ---------------------------------------------------------------- datasets


def translate_dataset(
    translator: str | Path,
    src: str | Path,
    out: str | Path,
    *,
    spacing: Sequence[float] | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> list[str]:
    """Translate every case of a dataset folder (BraTS or nnU-Net layout) into a BraTS-layout folder.

    Each case is preprocessed at ``spacing`` (mm; default: the translator's), translated
    with :func:`translate_image`, and written as ``out/<case>/<case>-{t1c,t1n,t2f,t2w}.nii.gz``
    (+ ``-seg.nii.gz`` for labelled cases: the preprocessed label, unchanged) on the
    preprocessed grid (its affine). The dataset is written into a temporary folder beside
    ``out`` and renamed at the end; a non-empty ``out`` is refused. Returns the case ids.
    """
    from tqdm.auto import tqdm

    from menseg.data.dataset import preprocess_dataset
    from menseg.data.io import write_image, write_label
    from menseg.data.layouts import discover_cases
    from menseg.synth.writer import DatasetWriter, case_paths

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MensegError("output exists and is not empty; refusing to write into it", out)
    G = load_translator(translator, device)
    _, _, stored_spacing = translator_config(translator)
    sp = tuple(float(s) for s in spacing) if spacing is not None else stored_spacing
    if sp is None:
        raise MensegError("the translator has no stored spacing; give spacing", translator)
    cases = discover_cases(src, allow_missing=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix=f".{out.name}.cache.", dir=out.parent))
    written: list[str] = []
    try:
        pre = preprocess_dataset(cases, cache, sp, progress=progress)
        with DatasetWriter(out, "brats") as w:
            assert w.tmp is not None
            for case in tqdm(pre, desc="translating", unit="case", disable=not progress):
                image = translate_image(G, np.asarray(case.image, np.float32))
                affine = np.asarray(case.props["affine"], np.float64)
                paths = {k: w.tmp / p for k, p in case_paths(case.case_id, "brats").items()}
                for c, m in enumerate(MODALITIES):
                    write_image(paths[m], image[c], affine)
                if case.label is not None:
                    write_label(paths[SEG_SUFFIX], np.asarray(case.label), affine)
                w.n_cases += 1
                written.append(case.case_id)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    log.info("translated %d case(s) into %s", len(written), out)
    return written


__all__ = [
    "CONFIG_FILE", "KIND", "LATEST_FILE", "METRICS_FILE", "PREPROCESSED_DIR", "PREVIEW_DIR",
    "TRANSLATOR_FILE", "load_segmenter", "load_translator", "preview_rows", "translate_dataset",
    "translator_config", "write_preview",
]
