"""Fitting the sim->real translator (the method: :mod:`menseg.sim2real.translator`): its losses, the
per-step patch batches, the training loop over a resumable fit folder, and fitting from dataset folders.

The fit folder is kept as the trainer keeps a run folder: one writer at a time
(:func:`menseg.utils.folder_lock`, file ``.lock``), each ``latest.pt`` replacing the one before, which is
kept as ``latest.prev.pt``, and a resume that falls back to it (warning) when ``latest.pt`` is damaged.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as fnn
from torch import Tensor, nn

from menseg.checkpoint import load_checkpoint, load_latest, previous_path, save_checkpoint
from menseg.config import TranslatorConfig, flat_config, to_dict
from menseg.data.sampling import choose_start, crop_pad, foreground_coords
from menseg.device import resolve_device
from menseg.errors import MensegError
from menseg.evaluate.metrics import dice
from menseg.nets.losses import RegionDiceBCELoss
from menseg.regions import labels_to_regions
from menseg.sim2real.translator_io import (
    CONFIG_FILE,
    KIND,
    LATEST_FILE,
    METRICS_FILE,
    PREPROCESSED_DIR,
    PREVIEW_DIR,
    TRANSLATOR_FILE,
    preview_rows,
    write_preview,
)
from menseg.sim2real.translator_nets import (
    DIVISOR,
    Generator,
    PatchDiscriminator,
    build_segmenter,
    check_image,
    head_mask,
)
from menseg.utils import (
    LOCK_NAME,
    derive_seed,
    folder_lock,
    remove_atomic_leftovers,
    truncate_jsonl,
    write_json_atomic,
)

log = logging.getLogger(__name__)

#: Huber threshold of the cycle / identity penalties, z-score units (translator docstring: why not L1).
RECON_BETA = 1.0
#: Config fields that do not change the fit (how the segmentation trainer uses the translator).
NOT_FIT = ("enabled", "path")
#: What :func:`menseg.utils.folder_lock` calls a fit folder in its error.
LOCK_WHAT = "translator"


# ---------------------------------------------------------------- losses


def _recon_loss(x: Tensor, target: Tensor) -> Tensor:
    """Cycle / identity penalty: mean Huber, threshold ``RECON_BETA`` (why not L1: translator docstring)."""
    return fnn.smooth_l1_loss(x, target, beta=RECON_BETA)


def _set_grad(nets: Sequence[nn.Module], flag: bool) -> None:
    for n in nets:
        for p in n.parameters():
            p.requires_grad_(flag)


# ---------------------------------------------------------------- checks and sampling


def _check_inputs(synthetic: Sequence[tuple[np.ndarray, np.ndarray]], real: Sequence[np.ndarray]) -> None:
    if len(synthetic) == 0:
        raise MensegError("the translator needs at least one synthetic case")
    if len(real) == 0:
        raise MensegError("the translator needs at least one real case")
    for i, pair in enumerate(synthetic):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise MensegError(f"synthetic case {i}: expected a pair (image, label)")
        img, lab = pair
        check_image(img, f"synthetic case {i}")
        if getattr(lab, "shape", None) != tuple(img.shape[1:]):
            raise MensegError(f"synthetic case {i}: label shape {getattr(lab, 'shape', None)} does not "
                              f"match the image's {tuple(img.shape[1:])}")
    for i, img in enumerate(real):
        check_image(img, f"real case {i}")
    if not any(np.any(np.asarray(lab) > 0) for _, lab in synthetic):
        raise MensegError("no synthetic case has any lesion voxel; the semantic term needs labelled lesions")


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


# ---------------------------------------------------------------- fit


def _fit_config(cfg: TranslatorConfig, seed: int, spacing: Sequence[float] | None) -> dict[str, Any]:
    d = {k: v for k, v in to_dict(cfg).items() if k not in NOT_FIT}
    return {"translator": d, "seed": int(seed),
            "spacing": [float(s) for s in spacing] if spacing is not None else None}


def _out_is_empty(out: Path) -> bool:
    """Nothing in ``out`` but what may precede a fit: the preprocessed cases and the fit lock."""
    return not out.exists() or (out.is_dir() and all(p.name in (PREPROCESSED_DIR, LOCK_NAME)
                                                     for p in out.iterdir()))


def _prepare(cfg: TranslatorConfig, seed: int, spacing: Sequence[float] | None) -> dict[str, Any]:
    """The fit's stored settings, after checking what the networks need of them."""
    if any(p % DIVISOR for p in cfg.patch_size):
        raise MensegError(f"sim2real.translator.patch_size must be divisible by {DIVISOR}, "
                          f"got {list(cfg.patch_size)}")
    return _fit_config(cfg, seed, spacing)


def _finished(out: Path, fit_cfg: dict[str, Any], resume: bool) -> Path | None:
    """``out/translator.pt`` when it is a finished fit of these settings (None: fit); refuses a folder that
    holds something else (settings that differ, files of another kind, resume without a checkpoint)."""
    final, latest = out / TRANSLATOR_FILE, out / LATEST_FILE
    if resume:
        if latest.is_file() or previous_path(latest).is_file():
            return None
        if not final.is_file():
            raise MensegError("nothing to resume: no latest.pt in the translator folder", out)
    elif _out_is_empty(out):
        return None
    elif not final.is_file():
        raise MensegError("translator folder is not empty; use resume to continue it or choose another "
                          "folder", out)
    _check_stored(load_checkpoint(final), fit_cfg, final)
    log.info("translator already fitted: %s", final)
    return final


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
        out: the fit folder (see :mod:`menseg.sim2real.translator`). A non-empty folder is refused unless
            ``resume`` is set or it holds a finished ``translator.pt`` of the same settings (then
            that file is returned without fitting). A ``preprocessed`` sub-folder is allowed.
        seed: seeds the initialisation and every batch.
        device: ``auto``, ``cpu`` or ``cuda[:n]``.
        resume: continue from ``out/latest.pt`` (refused if the settings differ); when that file is
            damaged or unreadable, from the checkpoint before it, ``latest.prev.pt`` (with a warning).
        progress: show a progress bar.
        spacing: voxel size (mm) of the preprocessed arrays, recorded with the translator.
        stop_at: stop after this many completed steps without the final save, as if the
            process had been killed (tests, time-boxed runs); resume continues from ``latest.pt``.

    One process fits in a folder at a time (:func:`menseg.utils.folder_lock` on ``out``): a second one
    fails at once with a one-line error; the lock goes with its holder, even when it is killed.
    """
    out = Path(out)
    fit_cfg = _prepare(cfg, seed, spacing)
    done = _finished(out, fit_cfg, resume)  # before the lock: nothing is written into a folder not ours
    if done is not None:
        return done
    _check_inputs(synthetic, real)
    with folder_lock(out, LOCK_WHAT):
        return _fit_locked(synthetic, real, cfg, out, fit_cfg, seed=seed, device=device, resume=resume,
                           progress=progress, stop_at=stop_at)


def _fit_locked(
    synthetic: Sequence[tuple[np.ndarray, np.ndarray]],
    real: Sequence[np.ndarray],
    cfg: TranslatorConfig,
    out: Path,
    fit_cfg: dict[str, Any],
    *,
    seed: int,
    device: str,
    resume: bool,
    progress: bool,
    stop_at: int | None,
) -> Path:
    """:func:`fit_translator`'s work once it holds the folder's lock (inputs checked)."""
    from tqdm.auto import tqdm

    final, latest = out / TRANSLATOR_FILE, out / LATEST_FILE
    metrics_path = out / METRICS_FILE
    done = _finished(out, fit_cfg, resume)  # again under the lock: another process may have finished it
    if done is not None:
        return done
    state: dict[str, Any] | None = None
    if resume:
        gone = remove_atomic_leftovers(out)  # temporary files of writes a kill interrupted
        if gone:
            log.info("removed %d unfinished temporary file(s) from %s", gone, out)
        state, used = load_latest(latest)
        _check_stored(state, fit_cfg, used)
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
    seg_loss = RegionDiceBCELoss()  # the segmentation trainer's loss: batch Dice + BCE on the regions

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
            # the discriminators see only the head-centred synthetic patches (see the translator docstring)
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
                save_checkpoint(latest, make_state(done), keep_previous=True)
            if cfg.preview_every and (done % cfg.preview_every == 0 or done == cfg.steps):
                write_preview(out / PREVIEW_DIR / f"step_{done:06d}.png",
                              preview_rows(G, synthetic, real), title=f"translator step {done}")
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


# ---------------------------------------------------------------- from folders


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
    fit_cfg = _prepare(cfg, seed, spacing)
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
    with folder_lock(out, LOCK_WHAT):  # the preprocessing writes into the folder too
        syn = preprocess_dataset(syn_cases, cache / "synthetic", spacing, progress=progress)
        rea = preprocess_dataset(real_cases, cache / "real", spacing, progress=progress)
        pairs, images = [(c.image, c.label) for c in syn], [c.image for c in rea]
        done = _finished(out, fit_cfg, resume)
        if done is not None:
            return done
        _check_inputs(pairs, images)
        return _fit_locked(pairs, images, cfg, out, fit_cfg, seed=seed, device=device, resume=resume,
                           progress=progress, stop_at=None)


__all__ = ["NOT_FIT", "RECON_BETA", "fit_translator", "fit_translator_from_folders", "n_lesion_patches"]
