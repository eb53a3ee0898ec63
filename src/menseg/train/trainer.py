"""The one trainer: region-based DynUNet, Dice + BCE, SGD Nesterov + poly LR.

Run folder (``cfg.out_dir``)::

    config.yaml       resolved config, written at start
    metrics.jsonl     one JSON object per line: step, loss, lr, time (s), and
                      val_* metrics on validation steps
    latest.pt         every ``train.checkpoint_every`` steps and at the end (+ ``latest.pt.sha256``;
                      the one before is kept as ``latest.prev.pt``, and ``--resume`` falls back to it
                      with a warning when ``latest.pt`` is damaged)
    best.pt           best validation mean Dice so far (absent when nothing is validated: no
                      validation case, e.g. no labels; prediction then uses latest.pt)
    preprocessed/     preprocessing cache (unless ``data.cache_dir`` is set)

Determinism / resume. Everything random in step ``t`` is derived from
``(train.seed, t)`` alone: the patch choice from
``numpy.random.default_rng(derive_seed(seed, "batch", t))``, each sample's
augmentation from ``torch.Generator().manual_seed(derive_seed(seed, "aug", t, b))``
and the global torch RNG (dropout) is re-seeded from ``(seed, "step", t)``.
The network is initialised from ``(seed, "init")`` and the LR is a pure
function of ``t``. So the full training state is just model + optimizer (+ AMP
scaler), all stored in ``latest.pt``; resuming from it reproduces an
uninterrupted run bit for bit on CPU (on CUDA, with ``train.deterministic``).

Several processes (``torchrun --nproc_per_node=N -m menseg train ...``): DDP, each rank trains on
its shard of the global batch, only rank 0 writes; see :mod:`menseg.train.distributed`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from menseg.checkpoint import load_latest, save_checkpoint
from menseg.config import Config, flat_config, save_config, to_dict
from menseg.constants import REGION_NAMES
from menseg.errors import MensegError
from menseg.train.batches import StepBatches, cache_dir, iter_batches, split_cases
from menseg.train.parts import Part, StepModule, TrainSetup, build_parts
from menseg.utils import LOCK_NAME, derive_seed, folder_lock, remove_atomic_leftovers, truncate_jsonl

log = logging.getLogger(__name__)

NOT_EMPTY = "run folder is not empty; use --resume to continue it or choose another out_dir"
#: Gradient-norm clipping threshold (nnU-Net uses 12).
GRAD_CLIP = 12.0
#: Exponent of the poly learning-rate decay (nnU-Net).
POLY_EXPONENT = 0.9
#: Config keys that may differ between a run and its resumption.
RESUMABLE_CHANGES = {
    "train.steps", "train.val_every", "train.checkpoint_every", "train.num_workers", "train.device",
    "train.compile", "train.channels_last",
}


def poly_lr(base_lr: float, step: int, total: int, exponent: float = POLY_EXPONENT) -> float:
    """Learning rate at (0-based) ``step`` of ``total``: ``base * (1 - step/total)^exponent``."""
    return base_lr * (1.0 - min(step, total) / max(total, 1)) ** exponent


def lr_at(tc: Any, step: int) -> float:
    """Learning rate of (0-based) ``step`` under ``train``: linear warm-up over ``warmup_steps`` (from
    ``lr / warmup_steps``), then the poly decay of the whole run (as without warm-up)."""
    if step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    return poly_lr(tc.lr, step, tc.steps)


# ---------------------------------------------------------------- helpers


def _check_resume_config(cfg: Config, stored: dict[str, Any], path: Path) -> None:
    from menseg.config import from_dict, off_in_both, with_legacy_values

    now = flat_config(to_dict(cfg))
    try:  # options added to menseg after the run started count at their default (or legacy value)
        then = flat_config(to_dict(from_dict(Config, with_legacy_values(stored))))
    except MensegError:
        then = flat_config(stored)
    # keys of a section switched off in both (e.g. the dropout schedule without dropout) change nothing
    changed = sorted(k for k in set(now) | set(then)
                     if now.get(k) != then.get(k) and not off_in_both(k, then, now))
    bad = [k for k in changed if k not in RESUMABLE_CHANGES]
    if bad:
        raise MensegError(
            f"cannot resume: config differs from the run's in {', '.join(bad)} "
            f"(e.g. {bad[0]}: run has {then.get(bad[0])!r}, now {now.get(bad[0])!r})",
            path,
        )
    for k in changed:
        log.warning("resuming with %s changed: %r -> %r", k, then.get(k), now.get(k))


def amp_setup(cfg: Config, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """Autocast dtype (None: fp32) and loss scaler (fp16 only) of ``train.amp`` / ``train.amp_dtype``.

    ``auto``: bf16 where it runs natively (CUDA with bf16, CPUs with AVX512-BF16 / AMX, as prediction's
    ``infer.precision: auto``), fp16 with loss scaling on other CUDA devices, fp32 on other CPUs.
    """
    from menseg.infer.sliding import bf16_is_fast

    tc = cfg.train
    if not tc.amp:
        return None, None
    if tc.amp_dtype == "bf16" or (tc.amp_dtype == "auto" and bf16_is_fast(device)):
        return torch.bfloat16, None
    if tc.amp_dtype == "fp16" or device.type == "cuda":
        return torch.float16, torch.amp.GradScaler(device.type)
    return None, None  # auto on a CPU without native bf16


def prepare_network(model: nn.Module, cfg: Config) -> nn.Module:
    """``train.channels_last`` and ``train.compile`` applied to ``model`` in place (same state-dict keys)."""
    tc = cfg.train
    if tc.channels_last:
        model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
    if tc.compile != "off":
        if tc.compile == "eager":
            model.compile(backend="eager")
        else:
            model.compile(mode=tc.compile)
    return model


def _load_data(cfg: Config, cache: Path, parts: Sequence[Part]) -> tuple[list[Any], list[Any]]:
    """Preprocessed ``(train_cases, val_cases)`` (PreprocessedCase lists) of the labelled cases."""
    from menseg.config import accepts_subsets
    from menseg.data.dataset import preprocess_dataset
    from menseg.data.layouts import discover_cases

    if not cfg.data.root:
        own = [p.name for p in parts if p.trains_without_labels]
        if own:
            log.info("no labelled cases (data.root is not set): training on the cases of %s only",
                     ", ".join(own))
            return [], []
        raise MensegError("data.root is not set (give the dataset folder, e.g. data=DIR)")
    # a network that knows which sequences are present trains on incomplete cases as they are
    found = discover_cases(cfg.data.root, allow_missing=accepts_subsets(cfg))
    cases = [c for c in found if c.label is not None]
    if cfg.data.cases:
        by_id = {c.case_id: c for c in cases}
        unknown = [i for i in cfg.data.cases if i not in by_id]
        if unknown:
            raise MensegError(f"data.cases: no labelled case '{unknown[0]}' in the dataset", cfg.data.root)
        if len(set(cfg.data.cases)) != len(cfg.data.cases):
            raise MensegError("data.cases lists a case id twice", cfg.data.root)
        cases = [by_id[i] for i in sorted(cfg.data.cases)]
    if cfg.data.unlabeled_root and not any(p.uses_unlabelled for p in parts):
        log.info("data.unlabeled_root is set; this trainer configuration does not use unlabelled "
                    "scans (%s)", cfg.data.unlabeled_root)
    if len(cases) < 2 and not (cfg.data.val_fraction == 0 and not cfg.data.val_cases):
        raise MensegError(
            f"need at least 2 labelled cases (training + validation), found {len(cases)}", cfg.data.root
        )
    train_ids, val_ids = split_cases(
        [c.case_id for c in cases], cfg.data.val_fraction, cfg.data.val_cases, cfg.train.seed
    )
    log.info("%d training cases, %d validation cases (%s)", len(train_ids), len(val_ids), ", ".join(val_ids))
    pre = preprocess_dataset(cases, cache, cfg.data.spacing)
    by_id = {p.case_id: p for p in pre}
    return [by_id[i] for i in train_ids], [by_id[i] for i in val_ids]


def validate(
    model: nn.Module, cases: Sequence[Any], cfg: Config, device: torch.device, ctx: Any = None
) -> dict[str, float]:
    """Legacy whole-volume Dice per region on preprocessed validation cases.

    Sliding-window prediction (no mirroring) thresholded at ``infer.threshold``.
    Returns ``{"val_ET_dice", "val_TC_dice", "val_WT_dice", "val_mean_dice"}``,
    each the mean over cases. Under DDP (``ctx``: a :class:`menseg.train.distributed.Context`) every
    rank scores its share of ``cases`` and the sums are all-reduced: all ranks return the same means.
    """
    from menseg.evaluate.metrics import dice, region_masks
    from menseg.infer.sliding import predict_probs
    from menseg.train.distributed import SINGLE, all_reduce_sum, split_items

    ctx = SINGLE if ctx is None else ctx
    sums = torch.zeros(len(REGION_NAMES) + 1, dtype=torch.float64)  # per-region Dice sums, case count
    for case in split_items(cases, ctx):
        image = torch.from_numpy(np.array(case.image, dtype=np.float32))
        probs = predict_probs(model, image, cfg.train.patch_size, cfg.infer, device, mirror=False)
        pred = (probs > cfg.infer.threshold).numpy()
        ref = region_masks(np.asarray(case.label))
        for i, r in enumerate(REGION_NAMES):
            sums[i] += dice(pred[i], ref[r])
        sums[-1] += 1
    if ctx.enabled:
        sums = all_reduce_sum(sums.to(device)).cpu()
    n = max(float(sums[-1]), 1.0)
    out = {f"val_{r}_dice": float(sums[i]) / n for i, r in enumerate(REGION_NAMES)}
    out["val_mean_dice"] = float(np.mean([out[f"val_{r}_dice"] for r in REGION_NAMES]))
    return out


# ---------------------------------------------------------------- train

def _drop_grads(params: Sequence[nn.Parameter]) -> None:
    """Leave ``params`` out of this step's update: SGD skips a parameter without a gradient (its momentum
    and weight decay included), and the clipping norm is then that of the parameters that move."""
    for q in params:
        q.grad = None


def _reduce_stats(loss: torch.Tensor, stats: dict[str, float], world: int, device: torch.device,
                  counts: frozenset[str]) -> tuple[float, dict[str, float]]:
    """The global batch's loss (mean over ranks) and step statistics (``counts`` summed, others averaged)."""
    from menseg.train.distributed import all_reduce_sum

    keys = sorted(stats)  # the same keys on every rank: they follow from the config
    vec = torch.tensor([float(loss.detach())] + [stats[k] for k in keys], dtype=torch.float64, device=device)
    vec = all_reduce_sum(vec).cpu()
    out = {k: float(vec[i + 1]) / (1 if k in counts else world) for i, k in enumerate(keys)}
    return float(vec[0]) / world, out


def train(
    cfg: Config,
    resume: bool = False,
    *,
    stop_at: int | None = None,
    progress: bool = True,
    on_step: Callable[[int, int], None] | None = None,
) -> Path:
    """Train the segmentation network described by ``cfg``; returns the run folder.

    Args:
        cfg: the resolved configuration (saved as ``config.yaml``).
        resume: continue the run in ``cfg.out_dir`` from ``latest.pt``. Without
            it, a non-empty ``cfg.out_dir`` is refused.
        stop_at: stop after this many completed steps *without* a final
            checkpoint, as if the process had been killed (for tests and
            time-boxed runs); the run can then be resumed.
        progress: show a progress bar.
        on_step: called as ``on_step(done, total)`` after every completed step (e.g. by a
            benchmark's overall progress display).
    """
    from menseg.infer.sliding import resolve_device
    from menseg.train import distributed as ddp

    tc = cfg.train
    if tc.steps < 1 or tc.batch_size < 1 or tc.val_every < 1 or tc.checkpoint_every < 1:
        raise MensegError("train.steps, batch_size, val_every and checkpoint_every must be at least 1")
    env = ddp.context_from_env()
    ddp.shard(tc.batch_size, env)  # a batch that does not split over the processes fails before any work
    device = resolve_device(ddp.device_for(env, tc.device))
    owns_group = env.enabled and not ddp.current().enabled
    ctx = ddp.setup(env, device)
    if ctx.main:
        preflight(cfg, resume)  # before the lock file is written into the folder
    # one process (rank 0 of one run) writes a run folder at a time; a killed one leaves no lock
    with folder_lock(cfg.out_dir, "training run") if ctx.main else contextlib.nullcontext():
        out = _train(cfg, resume, ctx, device, stop_at=stop_at, progress=progress and ctx.main,
                     on_step=on_step)
    from menseg.config import has_companion

    if has_companion(cfg) and (stop_at is None or stop_at >= tc.steps):
        ddp.barrier(ctx)  # the companion starts from the network's final files
        comp = companion_config(cfg, out)
        again = _resumable(Path(comp.out_dir))
        log.info("training the companion for incomplete scans (%d steps with sequence dropout) in %s",
                 comp.train.steps, comp.out_dir)
        train(comp, resume=again, progress=progress)
    if owns_group:
        # leave together, once rank 0 has written its last checkpoint: a rank that tears the group down
        # while another still uses it aborts the process (gloo). After an error the group is left to
        # the process's exit and torchrun, as a barrier then could wait for a rank that is gone.
        ddp.barrier(ctx)
        ddp.teardown()
    return out


def companion_config(cfg: Config, run_dir: str | Path) -> Config:
    """The config of a run's companion for incomplete scans: the run's, fine-tuned from the network's
    checkpoint (:func:`~menseg.checkpoint.run_checkpoint`) for :func:`~menseg.config.companion_steps` at
    ``seqdrop.companion_lr`` (warm-up over a tenth of them) with sequence dropout and the presence input,
    in ``<run>/companion``, on the run's preprocessing cache."""
    from menseg.checkpoint import COMPANION, run_checkpoint
    from menseg.config import companion_steps

    sd, tc = cfg.seqdrop, cfg.train
    run_dir = Path(run_dir)
    k = companion_steps(cfg)
    return replace(
        cfg, out_dir=str(run_dir / COMPANION),
        data=replace(cfg.data, cache_dir=str(cache_dir(cfg, run_dir))),
        model=replace(cfg.model, init=str(run_checkpoint(run_dir))),
        train=replace(tc, steps=k, lr=sd.companion_lr, warmup_steps=max(1, k // 10), freeze_encoder_steps=0,
                      val_every=min(tc.val_every, k), checkpoint_every=min(tc.checkpoint_every, k)),
        seqdrop=replace(sd, companion_steps=0, companion_fraction=0.0))


def _occupied(out: Path) -> bool:
    """``out`` is a file, or a folder holding more than a run that stopped before its first step left (its
    lock, its ``config.yaml`` and preprocessing cache: e.g. after a wrong data path), which may start over."""
    if not out.exists():
        return False
    if not out.is_dir():
        return True
    names = {p.name for p in out.iterdir()} - {LOCK_NAME}
    if not names:
        return False
    if names <= {"config.yaml", "preprocessed"} and "config.yaml" in names:
        import yaml

        from menseg.config import from_dict

        try:  # ours, not a user's file of the same name
            from_dict(Config, yaml.safe_load((out / "config.yaml").read_text()))
            return False
        except (MensegError, ValueError, TypeError, AttributeError, yaml.YAMLError):
            return True
    return True


def _resumable(out: Path) -> bool:
    """Whether run folder ``out`` holds a checkpoint ``--resume`` can continue from."""
    return (out / "latest.pt").is_file() or (out / "latest.prev.pt").is_file()


def preflight(cfg: Config, resume: bool) -> None:
    """The checks worth failing on before any process starts or anything is written: a run folder that
    holds another run (or is not ours), ``--resume`` without a checkpoint, a dataset that is not there."""
    out = Path(cfg.out_dir)
    if resume:
        if not _resumable(out):
            raise MensegError("nothing to resume: no latest.pt in the run folder", out)
    elif _occupied(out):
        raise MensegError(NOT_EMPTY, out)
    if cfg.data.root and not Path(cfg.data.root).is_dir():
        raise MensegError("dataset folder not found", cfg.data.root)


def _train(
    cfg: Config,
    resume: bool,
    ctx: Any,
    device: torch.device,
    *,
    stop_at: int | None,
    progress: bool,
    on_step: Callable[[int, int], None] | None,
) -> Path:
    from menseg.nets import build_run_network
    from menseg.train import distributed as ddp
    from menseg.train.augment import augment_batch
    from menseg.train.losses import RegionDiceBCELoss

    tc = cfg.train
    out = Path(cfg.out_dir)
    latest, best_path = out / "latest.pt", out / "best.pt"
    metrics_path = out / "metrics.jsonl"
    state: dict[str, Any] | None = None
    if ctx.main:  # the other ranks wait at the broadcast below
        preflight(cfg, resume)  # again, now under the lock
        if resume:
            gone = remove_atomic_leftovers(out)  # temporary files of writes a kill interrupted
            if gone:
                log.info("removed %d unfinished temporary file(s) from %s", gone, out)
            state, used = load_latest(latest)
            _check_resume_config(cfg, state.get("config", {}), used)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    state = ddp.broadcast(ctx, state)
    if tc.deterministic:
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True, warn_only=True)
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    parts = build_parts(cfg)  # the training ideas the config switches on, checked to run together
    # What each rank draws on its own (dropout, and the random draws of parts) uses its rank seed;
    # data, augmentation and pools use the run seed.
    rseed = ddp.rank_seed(tc.seed, ctx.rank)
    run = TrainSetup(cfg, cfg if rseed == tc.seed else replace(cfg, train=replace(tc, seed=rseed)), out,
                     cache_dir(cfg, out), device, progress, shard=ddp.shard(tc.batch_size, ctx))
    with ddp.main_first(ctx):  # rank 0 fills the caches (preprocessing, pools, translator), then the others
        data = next((d for p in parts if (d := p.load_data(run)) is not None), None)
        run.train_cases, run.val_cases = data if data is not None else _load_data(cfg, run.cache, parts)
        train_cases, val_cases = run.train_cases, run.val_cases
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(tc.seed, "init"))
            nets = [n for p in parts if (n := p.network()) is not None]
            model = nets[0] if nets else build_run_network(cfg)
        if cfg.model.init and state is None:  # a resumed run has its own weights
            from menseg.models import init_weights

            init_weights(model, cfg.model.init)
        model.to(device)
        run.model = model
        for p in parts:
            p.setup(run)
    extra = {k: m for p in parts for k, m in p.modules().items()}  # trained beside the network
    if ctx.enabled:
        model = ddp.sync_batch_norm(model, device)
    for p in parts:
        p.bind(model)
    prepare_network(model, cfg)
    params = list(model.parameters()) + [q for m in extra.values() for q in m.parameters()]
    frozen: list[nn.Parameter] = []
    if tc.freeze_encoder_steps:
        from menseg.nets import encoder_parameters

        frozen = encoder_parameters(model)
        log.info("encoder (%.2fM parameters) held still for the first %d steps",
                 sum(q.numel() for q in frozen) / 1e6, tc.freeze_encoder_steps)
    opt = torch.optim.SGD(
        params, lr=tc.lr, momentum=tc.momentum, nesterov=True, weight_decay=tc.weight_decay
    )
    amp_dtype, scaler = amp_setup(cfg, device)
    loss_fn = RegionDiceBCELoss(across_ranks=ctx.enabled)
    counts = frozenset().union(*(p.count_stats for p in parts))
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters on %s%s%s", getattr(model, "describe", lambda: cfg.model.name)(),
             n_params / 1e6, device,
             f", autocast {amp_dtype}" if amp_dtype else "",
             f", {ctx.world} processes (global batch {tc.batch_size})" if ctx.enabled else "")

    start, best_metric, best_step, elapsed = 0, -math.inf, -1, 0.0
    if state is not None:
        try:
            model.load_state_dict(state["model"])
            for key, m in extra.items():
                m.load_state_dict(state[key])
            opt.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise MensegError(f"checkpoint does not fit this run ({e})", latest) from None
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start = int(state["step"])
        best_metric = float(state.get("best_metric") if state.get("best_metric") is not None else -math.inf)
        best_step = int(state.get("best_step", -1))
        elapsed = float(state.get("elapsed", 0.0))
        if ctx.main:
            truncate_jsonl(metrics_path, start)
        log.info("resuming %s from step %d", out, start)
    if start >= tc.steps:
        log.info("run already complete (%d/%d steps)", start, tc.steps)
        return out

    def make_state(step: int) -> dict[str, Any]:
        return {
            "model": model.state_dict(),
            **{key: m.state_dict() for key, m in extra.items()},
            "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "config": to_dict(cfg),
            "step": step,
            "best_metric": best_metric if best_metric > -math.inf else None,
            "best_step": best_step,
            "elapsed": elapsed,
            "train_cases": [c.case_id for c in train_cases],
            "val_cases": [c.case_id for c in val_cases],
        }

    part = run.shard
    ds = (run.batches or StepBatches)(run.sampler, tc.batch_size, tc.seed, part)
    end = tc.steps if stop_at is None else min(tc.steps, stop_at)
    batches = iter_batches(ds, start, end, tc.num_workers, pin=device.type == "cuda")
    from tqdm.auto import tqdm

    def compute(step: int, img: torch.Tensor, lab: torch.Tensor, meta: torch.Tensor) -> tuple[Any, ...]:
        """The step's ``(outputs, target, the parts' extra loss or None, stats)``."""
        stats: dict[str, float] = {}
        out = next((o for p in parts if (o := p.forward(step, img, lab, meta)) is not None), None)
        if out is None:
            outputs, target = model(img), lab
        else:
            outputs, target, part_stats = out
            stats.update(part_stats)
        extra_loss = None
        for p in parts:
            term = p.extra_loss(step, device)
            if term is not None:
                extra_loss = term[0] if extra_loss is None else extra_loss + term[0]
                stats.update(term[1])
        return outputs, target, extra_loss, stats

    forward: Callable[..., tuple[Any, ...]] = compute
    if ctx.enabled:  # the whole step's forward runs inside DDP, so every parameter it uses is reduced
        forward = nn.parallel.DistributedDataParallel(
            StepModule(compute, model, extra), device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=any(p.unused_parameters for p in parts))

    bar = tqdm(total=tc.steps, initial=start, desc="training", unit="step", disable=not progress,
               leave=on_step is None)
    t0 = time.perf_counter() - elapsed
    model.train()
    with open(metrics_path, "a") if ctx.main else contextlib.nullcontext() as mf:
        for step, (img, lab, meta) in zip(range(start, end), batches, strict=True):
            torch.manual_seed(derive_seed(rseed, "step", step))  # dropout etc.
            img = img.to(device, non_blocking=True)
            lab = lab.to(device, non_blocking=True)
            seeds = [derive_seed(tc.seed, "aug", step, b) for b in part]  # global sample index
            img, lab = augment_batch(img, lab, cfg.aug, seeds, cfg.data.spacing)
            for p in parts:
                img, lab = p.mix_batch(step, img, lab, meta)
            if tc.channels_last:
                img = img.contiguous(memory_format=torch.channels_last_3d)
            known = None
            for p in parts:  # under DDP every rank takes the masked path, so all run the same collectives
                lab, mask = p.label_mask(lab, ctx.enabled)
                if mask is not None:
                    known = mask if known is None else known & mask
            regions = None
            for p in parts:
                r = p.supervised_regions(lab)
                if r is not None:
                    regions = r if regions is None else regions & r
            lr = lr_at(tc, step)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            autocast = (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
                        else contextlib.nullcontext())
            stats: dict[str, float] = {}
            for p in parts:
                stats.update(p.batch_stats(meta))
            with autocast:
                outputs, target, extra_loss, step_stats = forward(step, img, lab, meta)
            stats.update(step_stats)
            loss = loss_fn(outputs, target, known, regions)
            if extra_loss is not None:
                loss = loss + extra_loss
            (scaler.scale(loss) if scaler is not None else loss).backward()
            _drop_grads(frozen if step < tc.freeze_encoder_steps else [])
            if scaler is not None:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(params, GRAD_CLIP)
                scaler.step(opt)
                scaler.update()
            else:
                nn.utils.clip_grad_norm_(params, GRAD_CLIP)
                opt.step()
            done = step + 1
            if ctx.enabled:
                loss_v, stats = _reduce_stats(loss, stats, ctx.world, device, counts)
            else:
                loss_v = float(loss.detach())
            if not math.isfinite(loss_v):
                raise MensegError(f"training diverged at step {done} (loss {loss_v}); try a lower train.lr")
            rec: dict[str, Any] = {"step": done, "loss": loss_v, "lr": lr, **stats}
            if val_cases and (done % tc.val_every == 0 or done == tc.steps):
                rec.update(validate(model, val_cases, cfg, device, ctx))
                model.train()
                if rec["val_mean_dice"] > best_metric:  # the same all-reduced figure on every rank
                    best_metric, best_step = rec["val_mean_dice"], done
                    if ctx.main:
                        save_checkpoint(best_path, make_state(done))
                    log.info("step %d: new best val mean Dice %.4f", done, best_metric)
            elapsed = time.perf_counter() - t0
            rec["time"] = round(elapsed, 3)  # wall seconds since the run started, resumes included
            if mf is not None:
                mf.write(json.dumps(rec) + "\n")
                mf.flush()
            if done % tc.checkpoint_every == 0 or done == tc.steps:
                ddp.check_in_sync(ctx, params, device)
                # the final checkpoint also holds the parts' additions (e.g. learned post-processing), in
                # the same atomic write: a run is either not finished or finished with them
                added = ({k: v for p in parts for k, v in p.finish(run, model).items()} if done == tc.steps
                         else {})
                if ctx.main:
                    save_checkpoint(latest, {**make_state(done), **added}, keep_previous=True)
            bar.update(1)
            if on_step is not None:
                on_step(done, tc.steps)
            bar.set_postfix(loss=f"{loss_v:.4f}", **({"val": f"{rec['val_mean_dice']:.3f}"}
                                                       if "val_mean_dice" in rec else {}))
    bar.close()
    if end == tc.steps:
        from menseg.checkpoint import run_files

        if best_metric > -math.inf:
            log.info("finished %d steps in %.1f s; best val mean Dice %.4f at step %d; run folder %s (%s)",
                     tc.steps, elapsed, best_metric, best_step, out, ", ".join(run_files(out)))
        else:  # nothing validated: no best.pt, prediction uses the final weights
            log.info("finished %d steps in %.1f s (no validation cases: prediction uses latest.pt); run "
                     "folder %s (%s)", tc.steps, elapsed, out, ", ".join(run_files(out)))
    return out


__all__ = ["StepBatches", "amp_setup", "companion_config", "lr_at", "poly_lr", "prepare_network",
           "split_cases", "train", "validate"]
