"""``menseg bench reference``: menseg vs MONAI's reference DynUNet training loop, in one run.

Both lanes train the same network (:func:`menseg.nets.build_network` of the run's
``ModelConfig``, planned for the same patch), with the same batch size, patch, device,
precision and number of warm-up and measured steps, on the same generated cohort (4
phantom cases written with :func:`menseg.data.phantom.write_phantom_dataset`):

- **menseg**: the real trainer (:func:`menseg.train.trainer.train`, ``baseline``
  config), no validation. Its ``metrics.jsonl`` holds the wall time of every step since
  the loop started; steps/s is taken over the measured steps after the warm-up.
- **MONAI reference**: the loop as MONAI's DynUNet / BraTS tutorials write it: a
  ``CacheDataset`` over the same NIfTI files (``LoadImaged``, ``EnsureChannelFirstd``,
  labels to the BraTS-MEN regions, ``NormalizeIntensityd(nonzero, channel_wise)``,
  ``SpatialPadd`` and ``FgBgToIndicesd`` cached; ``RandCropByPosNegLabeld`` with pos 1 /
  neg 2, i.e. foreground oversampling 1/3, and ``RandFlipd`` on the three axes per
  step), a ``monai.data.DataLoader``, ``DiceCELoss(sigmoid=True)`` summed over the
  deep-supervision heads with weights 2^-k normalised, SGD Nesterov with poly LR decay,
  and autocast (+ ``GradScaler`` for float16) for mixed precision. Each step is timed
  with ``torch.cuda.synchronize`` on CUDA.

Data loading (patch sampling, augmentation, host-to-device copy) is part of both
lanes' step time: a step is "next batch + forward + backward + optimiser step". What
runs once before the loop (menseg's preprocessing cache, MONAI's ``CacheDataset``
fill) is not timed. The lanes do not do identical work per step: menseg applies its
full nnU-Net augmentation set on the device (rotation, scaling, elastic, intensity)
and clips gradients, the reference flips only; MONAI's ``DiceCELoss`` with several
output channels uses a softmax cross-entropy term where menseg uses per-region BCE
(same cost). The figures are the cost of each loop as written, not of equal work.

Prediction s/case: both lanes predict one volume with the menseg run's final weights
(speed only): :func:`menseg.infer.sliding.predict_probs` (no mirroring) against
``monai.inferers.sliding_window_inference`` (``sw_batch_size=1``, overlap 0.5,
Gaussian blending) followed by a sigmoid, as the tutorials do. Quick mode predicts
one case of the cohort; full mode a random ``4 x 160 x 192 x 160`` brain crop (speed
does not depend on the values). On CUDA each prediction runs once untimed first
(cuDNN autotuning).

Ratios say how much faster menseg is: ``menseg / monai`` steps/s for training and
``monai / menseg`` seconds for prediction (above 1: menseg is faster).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from menseg.bench.env import environment, loadavg
from menseg.bench.speed import cudnn_benchmark, sync
from menseg.config import InferConfig, ModelConfig, TrainConfig, load_config
from menseg.constants import MODALITIES
from menseg.device import resolve_device
from menseg.errors import MensegError
from menseg.nets.losses import deep_supervision_weights
from menseg.regions import labels_to_regions

log = logging.getLogger(__name__)

#: Precision names: fp32, bf16 autocast, or ``amp`` = the trainer's ``train.amp=true`` rule
#: (bf16 where the GPU supports it, else float16 with a gradient scaler).
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "amp")
#: Cases in the generated cohort.
N_CASES = 4
#: The volume full mode predicts: a typical brain bounding-box crop at 1 mm.
CROP_SHAPE: tuple[int, int, int, int] = (4, 160, 192, 160)
#: Foreground share of the reference crops: RandCropByPosNegLabeld(pos=1, neg=2).
POS, NEG = 1.0, 2.0


@dataclass(frozen=True)
class ReferenceSizes:
    """Network, patch (voxels), batch and volume shapes of one benchmark size."""

    model: ModelConfig
    patch_size: tuple[int, int, int]
    batch_size: int
    volume_shape: tuple[int, int, int]  #: shape of the generated training cases, 1 mm
    predict_shape: tuple[int, int, int, int] | None  #: None: predict the first cohort case


def reference_sizes(quick: bool = False) -> ReferenceSizes:
    """Full: ``Config()`` defaults (model, 96^3 patch, batch 2) on 128^3 cases; quick: toy sizes."""
    if quick:
        return ReferenceSizes(ModelConfig(filters=(4, 8, 16), deep_supr_num=1), (16, 16, 16), 2,
                              (24, 24, 24), None)
    tc = TrainConfig()
    return ReferenceSizes(ModelConfig(), tuple(tc.patch_size), tc.batch_size,  # type: ignore[arg-type]
                          (128, 128, 128), CROP_SHAPE)


# ----------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class PrecisionPlan:
    """How one ``precision`` name is run by each lane.

    ``menseg_overrides`` go to the trainer; ``menseg_autocast`` / ``monai_autocast`` are the
    autocast dtypes the lanes train in (None: fp32); ``scaler``: the reference uses a
    ``GradScaler``; ``predict``: ``InferConfig.precision`` of both predictions.
    """

    menseg_overrides: tuple[str, ...]
    menseg_autocast: torch.dtype | None
    monai_autocast: torch.dtype | None
    scaler: bool
    predict: str
    note: str


def _dtype_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def precision_plan(precision: str, device: torch.device) -> PrecisionPlan:
    """Map ``precision`` (see :data:`PRECISIONS`) to each lane's settings on ``device``.

    ``bf16``: bf16 autocast in both lanes on any device (``train.amp_dtype=bf16``). ``amp``: the
    trainer's ``train.amp_dtype=auto`` rule: bf16 on GPUs that have it, else float16 with a loss
    scaler; fp32 on CPU (said in ``note``).
    """
    if precision not in PRECISIONS:
        raise MensegError(f"unknown precision '{precision}' (known: {', '.join(PRECISIONS)})")
    if precision == "fp32":
        return PrecisionPlan(("train.amp=false",), None, None, False, "fp32", "")
    if precision == "bf16":
        bf16 = torch.bfloat16
        return PrecisionPlan(("train.amp=true", "train.amp_dtype=bf16"), bf16, bf16, False, "bf16", "")
    overrides = ("train.amp=true", "train.amp_dtype=auto")
    if device.type != "cuda":
        return PrecisionPlan(overrides, None, None, False, "fp32",
                             f"precision amp on {device.type} is fp32 (train.amp_dtype auto): both lanes "
                             "trained and predicted in fp32")
    if torch.cuda.is_bf16_supported():
        return PrecisionPlan(overrides, torch.bfloat16, torch.bfloat16, False, "bf16", "")
    return PrecisionPlan(overrides, torch.float16, torch.float16, True, "fp32",
                         "menseg predicts in fp32 or bf16 only: both predicted fp32")


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def _quiet_monai() -> Iterator[None]:
    """Silence MONAI's numpy-2 ``__array__(copy=...)`` DeprecationWarning, raised once per transform call."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"monai\.")
        yield


# ----------------------------------------------------------------------------- menseg lane


def _list(values: Sequence[int]) -> str:
    return "[" + ",".join(str(int(v)) for v in values) + "]"


def menseg_overrides(sizes: ReferenceSizes, data: Path, run_dir: Path, device: torch.device, total: int,
                     plan: PrecisionPlan) -> list[str]:
    """``key=value`` overrides of the ``baseline`` config for a menseg run of ``total`` steps."""
    return [
        f"data={data}", f"out_dir={run_dir}", "data.val_fraction=0",
        f"train.steps={total}", f"train.val_every={total + 1}", f"train.checkpoint_every={total + 1}",
        f"train.device={device}", f"train.batch_size={sizes.batch_size}",
        f"train.patch_size={_list(sizes.patch_size)}",
        f"model.filters={_list(sizes.model.filters)}", f"model.deep_supr_num={sizes.model.deep_supr_num}",
        *plan.menseg_overrides,
    ]


def steps_per_second(metrics_path: Path, warmup: int, steps: int) -> float:
    """Steps/s over steps ``warmup+1 .. warmup+steps`` of a trainer's ``metrics.jsonl``.

    Each line's ``time`` is wall seconds since the loop started, written after its step.
    """
    times: dict[int, float] = {0: 0.0}
    with open(metrics_path) as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                times[int(rec["step"])] = float(rec["time"])
    end = warmup + steps
    if end not in times or warmup not in times:
        raise MensegError(f"metrics.jsonl lacks step {warmup} or {end}", metrics_path)
    span = times[end] - times[warmup]
    if not span > 0:
        raise MensegError(f"no measurable time between steps {warmup} and {end} ({span} s)", metrics_path)
    return steps / span


def _menseg_lane(sizes: ReferenceSizes, data: Path, run_dir: Path, device: torch.device, warmup: int,
                 steps: int, plan: PrecisionPlan) -> dict[str, Any]:
    from menseg.train.trainer import train

    cfg = load_config("baseline", menseg_overrides(sizes, data, run_dir, device, warmup + steps, plan))
    log.info("menseg lane: %d warm-up + %d measured steps", warmup, steps)
    out = train(cfg, progress=False)
    sps = steps_per_second(out / "metrics.jsonl", warmup, steps)
    log.info("menseg lane: %.3f steps/s", sps)
    return {"train_steps_per_s": sps, "autocast": _dtype_name(plan.menseg_autocast)}


# ----------------------------------------------------------------------------- MONAI lane


def to_regions(label: torch.Tensor) -> torch.Tensor:
    """``(1, X, Y, Z)`` BraTS-MEN labels -> ``(3, X, Y, Z)`` float region masks (ET, TC, WT)."""
    return labels_to_regions(torch.as_tensor(label))[0]


def _monai_files(data: Path) -> list[dict[str, Any]]:
    from menseg.data.layouts import discover_cases

    return [{"image": [str(c.images[m]) for m in MODALITIES], "label": str(c.label)}
            for c in discover_cases(data) if c.label is not None]


def _cached_transforms(patch: Sequence[int]) -> list[Any]:
    from monai import transforms as mt

    keys = ["image", "label"]
    return [
        mt.LoadImaged(keys=keys),  # the four sequence files stack into one channel axis
        mt.EnsureChannelFirstd(keys=keys),
        mt.Lambdad(keys="label", func=to_regions),
        mt.NormalizeIntensityd(keys="image", nonzero=True, channel_wise=True),
        mt.SpatialPadd(keys=keys, spatial_size=list(patch)),
        # precomputed crop centres: MONAI's documented speed-up of RandCropByPosNegLabeld
        mt.FgBgToIndicesd(keys="label", image_key="image", image_threshold=0.0),
    ]


def _random_transforms(patch: Sequence[int]) -> list[Any]:
    from monai import transforms as mt

    keys = ["image", "label"]
    return [
        mt.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=list(patch), pos=POS, neg=NEG,
                                  num_samples=1, image_key="image", image_threshold=0.0,
                                  fg_indices_key="label_fg_indices", bg_indices_key="label_bg_indices"),
        mt.DeleteItemsd(keys=["label_fg_indices", "label_bg_indices"]),
        mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
        mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
        mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
        # plain tensors into the network: MetaTensor bookkeeping on every op is not training cost
        mt.EnsureTyped(keys=keys, track_meta=False),
    ]


def _monai_lane(sizes: ReferenceSizes, data: Path, device: torch.device, warmup: int, steps: int,
                plan: PrecisionPlan, num_workers: int, seed: int = 0) -> dict[str, Any]:
    from monai import transforms as mt
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceCELoss

    from menseg.nets import build_network

    files = _monai_files(data)
    transform = mt.Compose([*_cached_transforms(sizes.patch_size), *_random_transforms(sizes.patch_size)])
    transform.set_random_state(seed=seed)
    log.info("MONAI lane: caching %d cases", len(files))
    ds = CacheDataset(files, transform=transform, cache_rate=1.0, num_workers=1, progress=False)
    loader = DataLoader(ds, batch_size=sizes.batch_size, shuffle=True, drop_last=True,
                        num_workers=num_workers, generator=torch.Generator().manual_seed(seed))
    if len(loader) == 0:
        raise MensegError(f"{len(files)} cases cannot fill a batch of {sizes.batch_size}", data)

    def batches() -> Iterator[dict[str, Any]]:
        while True:
            yield from loader

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_network(sizes.model, patch_size=sizes.patch_size).to(device)
    total = warmup + steps
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (1 - t / total) ** 0.9)
    scaler = torch.amp.GradScaler(device.type) if plan.scaler else None
    loss_fn = DiceCELoss(sigmoid=True)
    net.train()
    log.info("MONAI lane: %d warm-up + %d measured steps", warmup, steps)
    it = batches()
    ends: list[float] = []
    loss_v = math.nan
    with cudnn_benchmark(device):
        sync(device)
        start = time.perf_counter()
        for _ in range(total):
            batch = next(it)
            img, lab = batch["image"].to(device), batch["label"].to(device)
            opt.zero_grad(set_to_none=True)
            with _autocast(device, plan.monai_autocast):
                out = net(img)
                preds = torch.unbind(out, dim=1) if out.ndim == img.ndim + 1 else (out,)
                weights = deep_supervision_weights(len(preds))
                loss = sum(w * loss_fn(p, lab) for w, p in zip(weights, preds, strict=True))
            assert isinstance(loss, torch.Tensor)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            sched.step()
            sync(device)
            ends.append(time.perf_counter())
            loss_v = float(loss.detach())
    if not math.isfinite(loss_v):
        raise MensegError(f"the MONAI reference loop diverged (loss {loss_v})")
    span = ends[-1] - (ends[warmup - 1] if warmup > 0 else start)
    sps = steps / span
    log.info("MONAI lane: %.3f steps/s", sps)
    return {"train_steps_per_s": sps, "autocast": _dtype_name(plan.monai_autocast), "last_loss": loss_v}


# ----------------------------------------------------------------------------- prediction


def _predict_input(sizes: ReferenceSizes, data: Path, seed: int = 0) -> torch.Tensor:
    """``(4, X, Y, Z)`` float32: the first cohort case (quick) or a random brain crop (full)."""
    if sizes.predict_shape is not None:
        return torch.randn(sizes.predict_shape, generator=torch.Generator().manual_seed(seed))
    from monai import transforms as mt

    pre = mt.Compose(_cached_transforms(sizes.patch_size)[:4])
    d = pre(_monai_files(data)[0])
    return torch.as_tensor(d["image"]).float().contiguous()


def _time_predict(fn: Any, device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        fn()  # cuDNN autotuning and allocator warm-up, untimed
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def _predict_both(model: torch.nn.Module, image: torch.Tensor, sizes: ReferenceSizes, device: torch.device,
                  plan: PrecisionPlan) -> tuple[float, float, float]:
    """``(menseg s, monai s, max |p_menseg - p_monai|)`` for one volume."""
    from monai.inferers import sliding_window_inference

    from menseg.infer.sliding import autocast_context, predict_probs

    patch = tuple(int(p) for p in sizes.patch_size)
    icfg = InferConfig(precision=plan.predict)

    def menseg_predict() -> torch.Tensor:
        return predict_probs(model, image, patch, icfg, device, mirror=False)

    def monai_predict() -> torch.Tensor:
        model.eval()
        with torch.inference_mode(), autocast_context(device, plan.predict):
            logits = sliding_window_inference(image.unsqueeze(0).to(device), roi_size=patch, sw_batch_size=1,
                                              predictor=model, overlap=0.5, mode="gaussian")
            assert isinstance(logits, torch.Tensor)
            probs = torch.sigmoid(logits.float())
        return torch.as_tensor(probs)[0].cpu()

    model.to(device)
    with cudnn_benchmark(device):
        log.info("predicting a %s volume: menseg", "x".join(map(str, image.shape)))
        t_menseg, p_menseg = _time_predict(menseg_predict, device)
        log.info("predicting a %s volume: MONAI", "x".join(map(str, image.shape)))
        t_monai, p_monai = _time_predict(monai_predict, device)
    diff = float((p_menseg - p_monai.float()).abs().max())
    return t_menseg, t_monai, diff


# ----------------------------------------------------------------------------- benchmark


def benchmark_reference(*, device: str = "auto", quick: bool = False, steps: int = 20, warmup: int = 5,
                        precision: str = "fp32", out_dir: Path | None = None,
                        menseg_set: Sequence[str] = ()) -> dict[str, Any]:
    """Measure menseg's trainer and predictor against MONAI's reference loop (module docstring).

    Args:
        device: ``auto`` | ``cpu`` | ``cuda[:n]``.
        quick: toy sizes (24^3 cases, 16^3 patch, filters 4-8-16), a smoke test in seconds.
        steps: measured training steps per lane.
        warmup: untimed training steps before them, per lane.
        precision: ``fp32`` | ``bf16`` | ``amp`` (see :func:`precision_plan`).
        out_dir: keep the cohort (``data/``), the menseg run (``menseg-run/``) and
            ``reference.json`` here (must be empty or absent); default a temporary folder.
        menseg_set: extra ``key=value`` overrides of the menseg lane only, e.g.
            ``train.channels_last=true``, ``train.compile=default`` (checked before anything runs).

    Returns:
        ``{"device", "environment", "precision", "note", "quick", "patch", "batch", "steps", "warmup",
        "model", "predict_shape", "menseg": {...}, "monai": {...}, "ratio": {...},
        "predict_max_abs_diff", "load_average_end"}``; lanes hold ``train_steps_per_s`` and
        ``predict_s``; ratios are menseg's speed-up (above 1: menseg is faster).
    """
    if steps < 1 or warmup < 0:
        raise MensegError(f"steps must be at least 1 and warmup at least 0, got {steps} and {warmup}")
    dev = resolve_device(device)
    plan = precision_plan(precision, dev)
    if menseg_set:
        load_config("baseline", list(menseg_set))  # a bad key or value fails now, not after the cohort
        plan = replace(plan, menseg_overrides=(*plan.menseg_overrides, *menseg_set))
    sizes = reference_sizes(quick)
    env = environment(dev)
    if out_dir is not None:
        out_dir = Path(out_dir)
        if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise MensegError("benchmark folder must be empty or not exist", out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        root = out_dir if out_dir is not None else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="menseg-reference-")))
        res = _run(sizes, root, dev, warmup, steps, plan)
    res = {
        "device": str(dev), "environment": env, "precision": precision, "note": plan.note, "quick": quick,
        "patch": list(sizes.patch_size), "batch": sizes.batch_size, "steps": steps, "warmup": warmup,
        "model": {"filters": list(sizes.model.filters), "deep_supr_num": sizes.model.deep_supr_num},
        "menseg_set": list(menseg_set),
        **res, "load_average_end": loadavg(),
    }
    if out_dir is not None:
        from menseg.utils import write_json_atomic

        write_json_atomic(out_dir / "reference.json", res)
    return res


def _run(sizes: ReferenceSizes, root: Path, dev: torch.device, warmup: int, steps: int,
         plan: PrecisionPlan) -> dict[str, Any]:
    from menseg.checkpoint import load_model
    from menseg.data.phantom import write_phantom_dataset

    data, run_dir = root / "data", root / "menseg-run"
    log.info("writing %d phantom cases of %s voxels", N_CASES, "x".join(map(str, sizes.volume_shape)))
    write_phantom_dataset(data, n_cases=N_CASES, shape=sizes.volume_shape, seed=0)
    menseg = _menseg_lane(sizes, data, run_dir, dev, warmup, steps, plan)
    with _quiet_monai():
        # batch-building workers as the menseg lane's config has them (0: in the training process)
        workers = load_config("baseline").train.num_workers
        monai = _monai_lane(sizes, data, dev, warmup, steps, plan, workers)
        image = _predict_input(sizes, data)
    model, _ = load_model(run_dir / "latest.pt", dev)
    t_menseg, t_monai, diff = _predict_both(model, image, sizes, dev, plan)
    menseg["predict_s"], monai["predict_s"] = t_menseg, t_monai
    return {
        "predict_shape": list(image.shape),
        "menseg": menseg, "monai": monai,
        "ratio": {
            "train_steps_per_s": menseg["train_steps_per_s"] / monai["train_steps_per_s"],
            "predict_s": t_monai / t_menseg,
        },
        # the tutorial applies the sigmoid after blending, menseg per window: not 0, speed is the point
        "predict_max_abs_diff": diff,
    }


def reference_table(res: dict[str, Any]) -> str:
    """A markdown table of :func:`benchmark_reference`'s figures, with a header line."""
    env = res.get("environment", {})
    m, r, q = res["menseg"], res["monai"], res["ratio"]
    head = (f"menseg vs MONAI reference loop on {res['device']} ({env.get('device_name', '?')}, "
            f"{env.get('threads', '?')} threads), {res['precision']}, patch "
            f"{'x'.join(map(str, res['patch']))}, batch {res['batch']}, {res['steps']} measured steps after "
            f"{res['warmup']} warm-up; predicted volume {'x'.join(map(str, res['predict_shape']))}")
    lines = [
        head, "",
        "| figure | menseg | MONAI reference | menseg speed-up |",
        "|---|---:|---:|---:|",
        f"| training steps/s | {m['train_steps_per_s']:.3f} | {r['train_steps_per_s']:.3f} | "
        f"{q['train_steps_per_s']:.2f}x |",
        f"| prediction s/case | {m['predict_s']:.2f} | {r['predict_s']:.2f} | {q['predict_s']:.2f}x |",
        f"| training autocast | {m['autocast']} | {r['autocast']} | |",
    ]
    if res.get("note"):
        lines += ["", f"Note: {res['note']}"]
    return "\n".join(lines)


__all__ = [
    "PRECISIONS", "PrecisionPlan", "ReferenceSizes", "benchmark_reference", "deep_supervision_weights",
    "menseg_overrides", "precision_plan", "reference_sizes", "reference_table", "steps_per_second",
    "to_regions",
]
