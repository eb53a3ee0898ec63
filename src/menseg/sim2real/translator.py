"""Cycle-consistent 3D sim->real image translator with a lesion-keeping semantic term.

Inputs are *preprocessed* arrays (:mod:`menseg.data.preprocess`): images float32
``(4, X, Y, Z)`` z-scored per sequence inside the head and exactly 0 outside
(MODALITIES order t1c, t1n, t2f, t2w), labels uint8 ``(X, Y, Z)`` (BraTS-MEN 0..3).

Networks (all 3D, fully convolutional, patch-trained):

- generators ``G`` (synthetic -> real) and ``F`` (real -> synthetic), :class:`Generator`:
  a small residual U-Net (two stride-2 downsamplings, residual blocks at 1/4 resolution,
  trilinear upsampling with skips). The output is ``y = x + max_delta * tanh(h)`` kept only
  inside the head mask ``(x != 0).any(channel)``: the background stays exactly 0, no
  intensity can move by more than ``max_delta`` (z-score units) and the geometry (head
  outline, lesion position) is the input's. The last convolution starts at zero, so an
  untrained generator is the identity;
- PatchGAN discriminators ``D_real`` and ``D_syn`` (:class:`PatchDiscriminator`), least-squares
  GAN loss;
- a small segmenter ``S`` (DynUNet, filters 8/16/32) predicting the region logits ET/TC/WT.
  ``S`` learns the synthetic labels on raw synthetic patches *and* on detached ``G(s)``;
  after ``semantic_warmup`` steps ``G`` also minimises ``semantic_weight * (Dice + BCE)(S(G(s)),
  label)`` with ``S`` frozen for that term (CyCADA). A generator that moved, erased or
  invented tumour would be punished by a segmenter that knows where the lesion is.

Loss of the generators per step (``s`` synthetic, ``r`` real patches)::

    LSGAN(D_real(G(s)), 1) + LSGAN(D_syn(F(r)), 1)
    + cycle_weight * (H(F(G(s)) - s) + H(G(F(r)) - r))
    + identity_weight * (H(G(r) - r) + H(F(s) - s))
    + semantic_weight * (Dice + BCE)(S(G(s)), regions(label))     (step >= semantic_warmup)

``H`` is the mean Huber penalty with ``RECON_BETA = 1`` z-score unit (quadratic below, L1 above)
rather than CycleGAN's plain L1. Both generators start at the identity, exactly where L1 has its
kink: there the cycle term's gradient has full size whatever the deviation, flips sign at every
step and dominates Adam's normalisation, so the generators stay pinned to the identity. Measured
(CPU, toy volumes 32^3 with a texture and tissue-contrast gap, patch 16^3, channels 8, 300 steps,
lr 1e-3, other settings default): plain L1 left the per-tissue W1 distance to real
(:mod:`menseg.sim2real.gap`) at 0.885 (raw 0.887: no translation at all); Huber brought it to
0.666, the lesion still found by the segmenter on translated unseen cases (WT Dice 0.57-0.79).
At lr 2e-4 neither moved in 300 steps: the default schedule is short for a GAN.

Why 3D patches rather than 2.5D slices: the gap between synthetic and real scans is partly
3D texture (partial volume, bias fields, through-plane smoothness) and the segmenter that
consumes the translated images is 3D; a slice-wise translator would add slice-to-slice
flicker that the segmenter could learn as a synthetic cue. The price is memory, kept small
with patches and a narrow network (``channels``, default 16).

Sampling: each step draws ``batch_size`` synthetic patches, the first half (at least one)
centred on a lesion voxel, the others on a random head voxel, and ``batch_size`` real patches
centred on random head voxels. Real scans are unlabelled, so their patches hold a lesion only as often as
a lesion fills the head; the lesion-centred synthetic patches serve the semantic, cycle and
identity terms, but the discriminators see only the head-centred ones (with ``batch_size``
1: all). Otherwise 'holds a lesion' would itself be a domain cue and the adversarial terms would
push G to erase lesions and F to invent them (seen on the test's toy data after 40 steps: the
lesion-to-head contrast fell from 1.9 to 0.6 z units and the segmenter's WT Dice on translated
cases to 0.42-0.56; with the split, 1.1 and 0.94-0.96).

Determinism: the batch of step ``t`` is drawn from ``default_rng(derive_seed(seed,
"translator-batch", t))`` and the networks are initialised from ``derive_seed(seed,
"translator-init")`` inside ``torch.random.fork_rng``; nothing else is random, so a resumed
fit equals an uninterrupted one on CPU.

Fit folder::

    config.json      TranslatorConfig (+ seed, spacing)
    metrics.jsonl    one line per step
    latest.pt        full state every checkpoint_every steps (all networks and optimisers)
    translator.pt    final: {"generator", "segmenter", "config", "seed", "spacing", ...}
    preview/step_<nnnnnn>.png
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as fnn
from torch import Tensor, nn

from menseg.checkpoint import load_checkpoint, save_checkpoint
from menseg.config import ModelConfig, TranslatorConfig, flat_config, from_dict, to_dict
from menseg.constants import MODALITIES, REGION_NAMES, SEG_SUFFIX
from menseg.data.sampling import choose_start, crop_pad, foreground_coords
from menseg.device import resolve_device
from menseg.errors import MensegError
from menseg.evaluate.metrics import dice
from menseg.regions import labels_to_regions
from menseg.utils import atomic_path, derive_seed, truncate_jsonl, write_json_atomic

log = logging.getLogger(__name__)

TRANSLATOR_FILE = "translator.pt"
LATEST_FILE = "latest.pt"
METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
PREVIEW_DIR = "preview"
#: Sub-folder of a fit folder where :func:`fit_translator_from_folders` keeps its preprocessed cases.
PREPROCESSED_DIR = "preprocessed"
#: Marker of a translator checkpoint (``kind`` entry).
KIND = "menseg-sim2real-translator"
#: Input sizes of the generator must be divisible by this (two stride-2 stages).
DIVISOR = 4
#: Segmenter of the semantic term (small: it only needs to find the lesion).
SEGMENTER_FILTERS = (8, 16, 32)
#: Rows of synthetic cases in a preview mosaic.
PREVIEW_ROWS = 3
#: Display range of z-scored intensities in previews.
PREVIEW_RANGE = (-3.0, 3.0)
#: Huber threshold of the cycle / identity penalties, z-score units (module docstring: why not L1).
RECON_BETA = 1.0
#: Config fields that do not change the fit (how the segmentation trainer uses the translator).
NOT_FIT = ("enabled", "path")


# ---------------------------------------------------------------- networks


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(cin, cout, 3, stride=stride, padding=1),
        nn.InstanceNorm3d(cout, affine=True),
        nn.LeakyReLU(0.2, inplace=True),
    )


class _ResBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(c, c, 3, padding=1), nn.InstanceNorm3d(c, affine=True), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(c, c, 3, padding=1), nn.InstanceNorm3d(c, affine=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class Generator(nn.Module):
    """Residual 3D U-Net translator, ``(B, 4, X, Y, Z) -> (B, 4, X, Y, Z)``, X, Y, Z divisible by 4.

    Output ``x + max_delta * tanh(h)`` inside the head mask ``(x != 0).any(1)``, exactly 0
    outside and in channels that are all zero in a sample (missing sequences stay missing).
    The last convolution is zero-initialised: a fresh generator is the identity.
    """

    def __init__(self, channels: int = 16, max_delta: float = 3.0, n_res: int = 3,
                 in_channels: int = len(MODALITIES)) -> None:
        super().__init__()
        c = int(channels)
        self.max_delta = float(max_delta)
        self.inc = _conv(in_channels, c)
        self.down1 = _conv(c, 2 * c, stride=2)
        self.down2 = _conv(2 * c, 4 * c, stride=2)
        self.res = nn.Sequential(*[_ResBlock(4 * c) for _ in range(n_res)])
        self.up2 = _conv(4 * c, 2 * c)
        self.fuse2 = _conv(4 * c, 2 * c)
        self.up1 = _conv(2 * c, c)
        self.fuse1 = _conv(2 * c, c)
        self.head = nn.Conv3d(c, in_channels, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x`` ``(B, 4, X, Y, Z)`` preprocessed -> translated, same shape."""
        if any(s % DIVISOR for s in x.shape[2:]):
            raise MensegError(f"generator input size {tuple(x.shape[2:])} is not divisible by {DIVISOR}")
        nonzero = x != 0
        # head voxels, and sequences present in the sample (a missing sequence is an all-zero channel)
        mask = nonzero.any(dim=1, keepdim=True) & nonzero.flatten(2).any(dim=2)[:, :, None, None, None]
        f0 = self.inc(x)
        f1 = self.down1(f0)
        h = self.res(self.down2(f1))
        h = self.up2(fnn.interpolate(h, scale_factor=2, mode="trilinear", align_corners=False))
        h = self.fuse2(torch.cat([h, f1], dim=1))
        h = self.up1(fnn.interpolate(h, scale_factor=2, mode="trilinear", align_corners=False))
        h = self.fuse1(torch.cat([h, f0], dim=1))
        y = x + self.max_delta * torch.tanh(self.head(h))
        return torch.where(mask, y, torch.zeros_like(y))


class PatchDiscriminator(nn.Module):
    """3D PatchGAN: ``(B, 4, X, Y, Z) -> (B, 1, X/4, Y/4, Z/4)`` realness scores (least squares)."""

    def __init__(self, channels: int = 16, in_channels: int = len(MODALITIES)) -> None:
        super().__init__()
        c = int(channels)
        self.net = nn.Sequential(
            nn.Conv3d(in_channels, c, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(c, 2 * c, 4, stride=2, padding=1), nn.InstanceNorm3d(2 * c, affine=True),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(2 * c, 4 * c, 3, padding=1), nn.InstanceNorm3d(4 * c, affine=True),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(4 * c, 1, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def build_segmenter() -> nn.Module:
    """The semantic term's segmenter: DynUNet (filters 8/16/32), 4 -> 3 region logits (ET, TC, WT)."""
    from menseg.nets import build_network

    return build_network(ModelConfig(filters=SEGMENTER_FILTERS, deep_supervision=False), 4, len(REGION_NAMES))


class _SegLoss(nn.Module):
    """Dice (sigmoid, batch) + BCE on region logits ``(B, 3, ...)`` vs binary targets."""

    def __init__(self) -> None:
        super().__init__()
        from monai.losses import DiceLoss

        self.dice = DiceLoss(sigmoid=True, batch=True)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return self.dice(logits, target) + fnn.binary_cross_entropy_with_logits(logits, target)


def _recon_loss(x: Tensor, target: Tensor) -> Tensor:
    """Cycle / identity penalty: mean Huber with threshold ``RECON_BETA`` (module docstring: why not L1)."""
    return fnn.smooth_l1_loss(x, target, beta=RECON_BETA)


def _set_grad(nets: Sequence[nn.Module], flag: bool) -> None:
    for n in nets:
        for p in n.parameters():
            p.requires_grad_(flag)


# ---------------------------------------------------------------- checks and sampling


def _check_image(img: np.ndarray, what: str) -> None:
    shape = getattr(img, "shape", None)
    if shape is None or len(shape) != 4 or shape[0] != len(MODALITIES):
        raise MensegError(f"{what}: expected a preprocessed image of shape (4, X, Y, Z), got {shape}")


def _check_inputs(synthetic: Sequence[tuple[np.ndarray, np.ndarray]], real: Sequence[np.ndarray]) -> None:
    if len(synthetic) == 0:
        raise MensegError("the translator needs at least one synthetic case")
    if len(real) == 0:
        raise MensegError("the translator needs at least one real case")
    for i, pair in enumerate(synthetic):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise MensegError(f"synthetic case {i}: expected a pair (image, label)")
        img, lab = pair
        _check_image(img, f"synthetic case {i}")
        if getattr(lab, "shape", None) != tuple(img.shape[1:]):
            raise MensegError(f"synthetic case {i}: label shape {getattr(lab, 'shape', None)} does not "
                              f"match the image's {tuple(img.shape[1:])}")
    for i, img in enumerate(real):
        _check_image(img, f"real case {i}")
    if not any(np.any(np.asarray(lab) > 0) for _, lab in synthetic):
        raise MensegError("no synthetic case has any lesion voxel; the semantic term needs labelled lesions")


def head_mask(image: np.ndarray) -> np.ndarray:
    """Head mask ``(X, Y, Z)`` bool of a preprocessed image ``(4, X, Y, Z)``: any sequence non-zero."""
    return np.any(np.asarray(image) != 0, axis=0)


def n_lesion_patches(batch_size: int) -> int:
    """Synthetic patches per batch centred on a lesion voxel: half (at least one); they come first."""
    return max(1, batch_size // 2)


class _Batches:
    """Per-step patch batches: a pure function of (seed, step).

    Lesion patches come from cases with a lesion, centred on a random lesion voxel; all other
    patches (synthetic and real) are centred on a random head voxel, so that the share of
    background in a patch is no domain cue either.
    """

    def __init__(self, synthetic: Sequence[tuple[np.ndarray, np.ndarray]], real: Sequence[np.ndarray],
                 patch: tuple[int, int, int], batch_size: int, seed: int) -> None:
        self.syn, self.real = list(synthetic), list(real)
        self.patch, self.bs, self.seed = patch, batch_size, seed
        self.syn_fg = [foreground_coords(lab) for _, lab in self.syn]
        self.syn_head = [foreground_coords(head_mask(img)) for img, _ in self.syn]
        self.real_head = [foreground_coords(head_mask(img)) for img in self.real]
        self.with_lesion = [i for i, fg in enumerate(self.syn_fg) if len(fg)]

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(syn image (B,4,*p) f32, syn label (B,*p) u8, real image (B,4,*p) f32)`` of ``step``;
        the first :func:`n_lesion_patches` synthetic patches are centred on a lesion."""
        rng = np.random.default_rng(derive_seed(self.seed, "translator-batch", step))
        n_fg = n_lesion_patches(self.bs)
        imgs, labs, reals = [], [], []
        for b in range(self.bs):
            if b < n_fg:
                ci = self.with_lesion[int(rng.integers(len(self.with_lesion)))]
                centres = self.syn_fg[ci]
            else:
                ci = int(rng.integers(len(self.syn)))
                centres = self.syn_head[ci]
            img, lab = self.syn[ci]
            start = choose_start(lab.shape, self.patch, rng, centres)
            imgs.append(crop_pad(img, start, self.patch).astype(np.float32, copy=False))
            labs.append(crop_pad(lab, start, self.patch).astype(np.uint8, copy=False))
        for _ in range(self.bs):
            ri = int(rng.integers(len(self.real)))
            img = self.real[ri]
            start = choose_start(img.shape[1:], self.patch, rng, self.real_head[ri])
            reals.append(crop_pad(img, start, self.patch).astype(np.float32, copy=False))
        return np.stack(imgs), np.stack(labs), np.stack(reals)


# ---------------------------------------------------------------- translation


@torch.no_grad()
def translate_image(generator: nn.Module, image: np.ndarray) -> np.ndarray:
    """Translate one whole preprocessed volume.

    ``image`` float ``(4, X, Y, Z)`` -> float32 ``(4, X, Y, Z)``: zero padded to a multiple of 4
    (padding is background, so it stays 0), run through ``generator`` on its device, cropped
    back. Voxels outside the head stay exactly 0. ``image`` is not modified.
    """
    _check_image(image, "translate_image")
    shape = image.shape[1:]
    padded = tuple(int(math.ceil(s / DIVISOR) * DIVISOR) for s in shape)
    x = np.zeros((image.shape[0], *padded), np.float32)
    x[:, : shape[0], : shape[1], : shape[2]] = image
    dev = next(generator.parameters()).device
    was_training = generator.training
    generator.eval()
    try:
        y = generator(torch.from_numpy(x)[None].to(dev))[0].float().cpu().numpy()
    finally:
        generator.train(was_training)
    return np.ascontiguousarray(y[:, : shape[0], : shape[1], : shape[2]])


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


def _preview_rows(G: nn.Module, synthetic: Sequence[tuple[np.ndarray, np.ndarray]],
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


# ---------------------------------------------------------------- fit


def _fit_config(cfg: TranslatorConfig, seed: int, spacing: Sequence[float] | None) -> dict[str, Any]:
    d = {k: v for k, v in to_dict(cfg).items() if k not in NOT_FIT}
    return {"translator": d, "seed": int(seed),
            "spacing": [float(s) for s in spacing] if spacing is not None else None}


def _out_is_empty(out: Path) -> bool:
    return not out.exists() or (out.is_dir() and all(p.name == PREPROCESSED_DIR for p in out.iterdir()))


def fit_translator(
    synthetic: Sequence[tuple[np.ndarray, np.ndarray]],
    real: Sequence[np.ndarray],
    cfg: TranslatorConfig,
    out: str | Path,
    *,
    seed: int = 0,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
    spacing: tuple[float, float, float] | None = None,
    stop_at: int | None = None,
) -> Path:
    """Fit the translator; returns ``out/translator.pt`` (not yet written when ``stop_at`` cut the fit short).

    Args:
        synthetic: ``(image (4, X, Y, Z) float32, label (X, Y, Z) uint8)`` preprocessed synthetic cases;
            at least one must hold a lesion.
        real: preprocessed real images ``(4, X, Y, Z)`` (unlabelled).
        cfg: the translator settings (``enabled`` and ``path`` are ignored here).
        out: the fit folder (see the module docstring). A non-empty folder is refused unless
            ``resume`` is set or it holds a finished ``translator.pt`` of the same settings (then
            that file is returned without fitting). A ``preprocessed`` sub-folder is allowed.
        seed: seeds the initialisation and every batch.
        device: ``auto``, ``cpu`` or ``cuda[:n]``.
        resume: continue from ``out/latest.pt`` (refused if the settings differ).
        progress: show a progress bar.
        spacing: voxel size (mm) of the preprocessed arrays, recorded with the translator.
        stop_at: stop after this many completed steps without the final save, as if the
            process had been killed (tests, time-boxed runs); resume continues from ``latest.pt``.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    final, latest = out / TRANSLATOR_FILE, out / LATEST_FILE
    metrics_path = out / METRICS_FILE
    fit_cfg = _fit_config(cfg, seed, spacing)
    if any(p % DIVISOR for p in cfg.patch_size):
        raise MensegError(f"sim2real.translator.patch_size must be divisible by {DIVISOR}, "
                          f"got {list(cfg.patch_size)}")
    state: dict[str, Any] | None = None
    if resume:
        if not latest.is_file():
            if final.is_file():
                _check_stored(load_checkpoint(final), fit_cfg, final)
                log.info("translator already fitted: %s", final)
                return final
            raise MensegError("nothing to resume: no latest.pt in the translator folder", out)
        state = load_checkpoint(latest)
        _check_stored(state, fit_cfg, latest)
    elif not _out_is_empty(out):
        if final.is_file():
            _check_stored(load_checkpoint(final), fit_cfg, final)
            log.info("translator already fitted: %s", final)
            return final
        raise MensegError("translator folder is not empty; use resume to continue it or choose another "
                          "folder", out)
    _check_inputs(synthetic, real)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / CONFIG_FILE, fit_cfg)

    dev = resolve_device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "translator-init"))
        G = Generator(cfg.channels, cfg.max_delta)
        F = Generator(cfg.channels, cfg.max_delta)
        D_real = PatchDiscriminator(cfg.channels)
        D_syn = PatchDiscriminator(cfg.channels)
        S = build_segmenter()
    nets = {"G": G, "F": F, "D_real": D_real, "D_syn": D_syn, "S": S}
    for n in nets.values():
        n.to(dev).train()
    betas = (0.5, 0.999)
    opt_g = torch.optim.Adam([*G.parameters(), *F.parameters()], lr=cfg.lr, betas=betas)
    opt_d = torch.optim.Adam([*D_real.parameters(), *D_syn.parameters()], lr=cfg.lr, betas=betas)
    opt_s = torch.optim.Adam(S.parameters(), lr=cfg.lr, betas=betas)
    opts = {"opt_G": opt_g, "opt_D": opt_d, "opt_S": opt_s}
    seg_loss = _SegLoss()

    start, elapsed = 0, 0.0
    if state is not None:
        try:
            for k, n in nets.items():
                n.load_state_dict(state[k])
            for k, o in opts.items():
                o.load_state_dict(state[k])
        except (KeyError, ValueError, RuntimeError) as e:
            raise MensegError(f"checkpoint does not fit this translator ({str(e).splitlines()[0]})",
                              latest) from None
        start = int(state["step"])
        elapsed = float(state.get("elapsed", 0.0))
        truncate_jsonl(metrics_path, start)
        log.info("resuming translator %s from step %d", out, start)

    def make_state(step: int) -> dict[str, Any]:
        return {"model": G.state_dict(), **{k: n.state_dict() for k, n in nets.items()},
                **{k: o.state_dict() for k, o in opts.items()}, "config": fit_cfg, "step": step,
                "elapsed": elapsed, "kind": KIND}

    batches = _Batches(synthetic, real, tuple(cfg.patch_size), cfg.batch_size, seed)  # type: ignore[arg-type]
    n_fg = n_lesion_patches(cfg.batch_size)
    uni = slice(n_fg, None) if n_fg < cfg.batch_size else slice(None)
    end = cfg.steps if stop_at is None else min(cfg.steps, stop_at)
    n_params = sum(p.numel() for p in G.parameters())
    log.info("translator: generator %.2fM parameters, %d synthetic / %d real cases, on %s",
             n_params / 1e6, len(synthetic), len(real), dev)
    bar = tqdm(total=cfg.steps, initial=start, desc="translator", unit="step", disable=not progress)
    t0 = time.perf_counter() - elapsed
    with open(metrics_path, "a") as mf:
        for step in range(start, end):
            s_np, l_np, r_np = batches(step)
            s = torch.from_numpy(s_np).to(dev)
            r = torch.from_numpy(r_np).to(dev)
            target = labels_to_regions(torch.from_numpy(l_np).to(dev))
            semantic = step >= cfg.semantic_warmup and cfg.semantic_weight > 0

            # generators (discriminators and segmenter frozen for this term)
            _set_grad([D_real, D_syn, S], False)
            opt_g.zero_grad(set_to_none=True)
            fake_r, fake_s = G(s), F(r)
            # the discriminators see only the head-centred synthetic patches (see module docstring)
            adv = ((D_real(fake_r[uni]) - 1) ** 2).mean() + ((D_syn(fake_s) - 1) ** 2).mean()
            cyc = _recon_loss(F(fake_r), s) + _recon_loss(G(fake_s), r)
            idt = _recon_loss(G(r), r) + _recon_loss(F(s), s)
            seg_fake = S(fake_r)
            sem = seg_loss(seg_fake, target)
            loss_g = adv + cfg.cycle_weight * cyc + cfg.identity_weight * idt
            if semantic:
                loss_g = loss_g + cfg.semantic_weight * sem
            loss_g.backward()
            opt_g.step()
            _set_grad([D_real, D_syn, S], True)

            # discriminators (least squares; fakes detached)
            opt_d.zero_grad(set_to_none=True)
            fr, fs = fake_r.detach(), fake_s.detach()
            loss_d = 0.5 * (((D_real(r) - 1) ** 2).mean() + (D_real(fr[uni]) ** 2).mean()
                            + ((D_syn(s[uni]) - 1) ** 2).mean() + (D_syn(fs) ** 2).mean())
            loss_d.backward()
            opt_d.step()

            # segmenter: raw synthetic and translated synthetic patches, synthetic labels
            opt_s.zero_grad(set_to_none=True)
            loss_s = seg_loss(S(s), target) + seg_loss(S(fr), target)
            loss_s.backward()
            opt_s.step()

            done = step + 1
            rec = {"step": done, "loss_G": float(loss_g.detach()), "loss_D": float(loss_d.detach()),
                   "loss_adv": float(adv.detach()), "loss_cycle": float(cyc.detach()),
                   "loss_identity": float(idt.detach()), "loss_semantic": float(sem.detach()),
                   "loss_S": float(loss_s.detach()),
                   "seg_dice": dice((seg_fake.detach()[:, -1] > 0).cpu().numpy(),
                                    (target[:, -1] > 0.5).cpu().numpy())}
            if not all(math.isfinite(v) for v in rec.values()):
                raise MensegError(f"translator diverged at step {done} ({rec}); try a lower lr")
            elapsed = time.perf_counter() - t0
            rec["time"] = round(elapsed, 3)
            mf.write(json.dumps(rec) + "\n")
            mf.flush()
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                save_checkpoint(latest, make_state(done))
            if cfg.preview_every and (done % cfg.preview_every == 0 or done == cfg.steps):
                write_preview(out / PREVIEW_DIR / f"step_{done:06d}.png",
                              _preview_rows(G, synthetic, real), title=f"translator step {done}")
            bar.update(1)
            bar.set_postfix(G=f"{rec['loss_G']:.3f}", D=f"{rec['loss_D']:.3f}", dice=f"{rec['seg_dice']:.2f}")
    bar.close()
    if end < cfg.steps:
        log.info("translator stopped at step %d of %d (resume to continue)", end, cfg.steps)
        return final
    gen = G.state_dict()
    save_checkpoint(final, {"model": gen, "generator": gen, "segmenter": S.state_dict(), "config": fit_cfg,
                            "seed": int(seed), "spacing": fit_cfg["spacing"], "step": cfg.steps,
                            "kind": KIND})
    log.info("translator written to %s", final)
    return final


def _check_stored(state: dict[str, Any], fit_cfg: dict[str, Any], path: Path) -> None:
    stored = state.get("config")
    if state.get("kind") != KIND or not isinstance(stored, dict):
        raise MensegError("not a menseg translator checkpoint", path)
    if stored != fit_cfg:
        now, then = flat_config(fit_cfg), flat_config(stored)
        bad = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
        raise MensegError(f"translator settings differ from the stored fit's in {', '.join(bad)} "
                          f"(stored {then.get(bad[0])!r}, now {now.get(bad[0])!r})", path)


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


def fit_translator_from_folders(
    synthetic: str | Path,
    real: str | Path,
    out: str | Path,
    cfg: TranslatorConfig,
    *,
    spacing: tuple[float, float, float] = (2.0, 2.0, 2.0),
    seed: int = 0,
    device: str = "auto",
    resume: bool = False,
    progress: bool = True,
) -> Path:
    """Discover and preprocess (into ``out/preprocessed``) a synthetic and a real dataset folder, then
    :func:`fit_translator`. Synthetic cases must be labelled; real ones may be unlabelled or lack
    sequences. Returns ``out/translator.pt``."""
    from menseg.data.dataset import preprocess_dataset
    from menseg.data.layouts import discover_cases

    out = Path(out)
    if not resume and not _out_is_empty(out) and not (out / TRANSLATOR_FILE).is_file():
        raise MensegError("translator folder is not empty; use resume to continue it or choose another "
                          "folder", out)
    syn_cases = [c for c in discover_cases(synthetic) if c.label is not None]
    if not syn_cases:
        raise MensegError("the synthetic dataset has no labelled case", synthetic)
    real_cases = discover_cases(real, allow_missing=True)
    syn_ids = {c.case_id for c in syn_cases}
    clash = sorted(syn_ids & {c.case_id for c in real_cases})
    if clash:
        raise MensegError(f"case id '{clash[0]}' is in both the synthetic and the real dataset")
    cache = out / PREPROCESSED_DIR
    syn = preprocess_dataset(syn_cases, cache / "synthetic", spacing, progress=progress)
    rea = preprocess_dataset(real_cases, cache / "real", spacing, progress=progress)
    return fit_translator([(c.image, c.label) for c in syn], [c.image for c in rea], cfg, out, seed=seed,
                          device=device, resume=resume, progress=progress, spacing=spacing)


__all__ = [
    "DIVISOR",
    "Generator",
    "PatchDiscriminator",
    "build_segmenter",
    "fit_translator",
    "fit_translator_from_folders",
    "head_mask",
    "n_lesion_patches",
    "load_segmenter",
    "load_translator",
    "translate_dataset",
    "translate_image",
    "translator_config",
    "write_preview",
]
