"""``menseg benchmark speed``: measured training and prediction speed, default vs nnU-Net-sized.

For each network and precision (fp32, bf16 autocast) this measures

- training iterations/s at the network's patch size: forward + backward + SGD
  (Nesterov) step on a batch of 2 random patches, with the deep-supervision heads
  in the loss; warm-up steps are excluded;
- seconds to predict one ``4 x 240 x 240 x 155`` case at 1 mm (the BraTS grid) by
  sliding-window inference at the network's own patch (Gaussian blending, overlap
  0.5), without and with 8-flip mirroring;
- seconds to predict a ``4 x 160 x 192 x 160`` brain crop without mirroring (the
  size the issue's reference figures are for);
- peak memory: on CUDA ``torch.cuda.max_memory_allocated`` per phase; on CPU the
  resident set size sampled during the phase, and the process-wide
  ``resource.getrusage(...).ru_maxrss`` (monotonic: the default model runs first,
  so its figure is its own).

The reference network is the nnU-Net 3d_fullres BraTS configuration: DynUNet
with 6 stages, 32-64-128-256-320-320 filters, 128^3 patch. Timings are of
random inputs (speed does not depend on the values) and of this process only;
other load on the machine inflates them.
"""

from __future__ import annotations

import logging
import os
import platform
import resource
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from menseg.bench.env import environment, loadavg
from menseg.config import InferConfig, ModelConfig, TrainConfig
from menseg.errors import MensegError
from menseg.infer.sliding import autocast_context, predict_probs, resolve_device
from menseg.nets import build_network

log = logging.getLogger(__name__)

#: One BraTS case at 1 mm, and a typical brain bounding-box crop of it.
CASE_SHAPE: tuple[int, int, int, int] = (4, 240, 240, 155)
CROP_SHAPE: tuple[int, int, int, int] = (4, 160, 192, 160)
#: nnU-Net 3d_fullres plan for BraTS: 6 stages, 32..320 filters, 128^3 patch.
NNUNET_FILTERS: tuple[int, ...] = (32, 64, 128, 256, 320, 320)
NNUNET_PATCH: tuple[int, int, int] = (128, 128, 128)
BATCH_SIZE = 2
MIRROR_MODES = ("measure", "estimate", "default-only")


@dataclass(frozen=True)
class BenchModel:
    """A network to benchmark: its config and the patch it trains and predicts with."""

    model: ModelConfig
    patch_size: tuple[int, int, int]


def default_models(quick: bool = False) -> dict[str, BenchModel]:
    """``{"default": ModelConfig defaults + TrainConfig patch, "nnunet": nnU-Net-sized}``.

    ``quick`` shrinks both to toy sizes (a smoke test that runs in seconds).
    """
    if quick:
        return {
            "default": BenchModel(ModelConfig(filters=(4, 8, 16), deep_supr_num=1), (16, 16, 16)),
            "nnunet": BenchModel(ModelConfig(filters=(8, 16, 32), deep_supr_num=1), (16, 16, 16)),
        }
    return {
        "default": BenchModel(ModelConfig(), tuple(TrainConfig().patch_size)),  # type: ignore[arg-type]
        "nnunet": BenchModel(ModelConfig(filters=NNUNET_FILTERS), NNUNET_PATCH),
    }


# ----------------------------------------------------------------------------- helpers


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so wall-clock timings are of finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _maxrss_mb() -> float:
    """Process-wide peak resident set size in MiB (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if platform.system() == "Darwin" else rss / 1024


def _current_rss_mb() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


class _PeakMemory:
    """Peak memory over a block: CUDA allocator peak, or RSS sampled every 20 ms on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb: float = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            rss = _current_rss_mb()
            if rss is not None:
                self.peak_mb = max(self.peak_mb, rss)

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_mb = _current_rss_mb() or 0.0
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / (1024 * 1024)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            rss = _current_rss_mb()
            self.peak_mb = max(self.peak_mb, rss or 0.0)
            if self.peak_mb == 0.0:  # no /proc: fall back to the process peak
                self.peak_mb = _maxrss_mb()


@contextmanager
def cudnn_benchmark(device: torch.device) -> Iterator[None]:
    """cuDNN autotuning on CUDA for the block, as the trainer switches it on."""
    old = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


def n_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def measure_training(
    model: nn.Module,
    patch_size: Sequence[int],
    device: torch.device,
    precision: str,
    warmup: int = 2,
    steps: int = 3,
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
) -> float:
    """Training iterations/s: forward + backward + SGD step on ``(batch, 4, *patch)`` inputs.

    The loss is BCE-with-logits over every deep-supervision head against a random
    region target ``(batch, 3, *patch)`` (cost of the real Dice+BCE is negligible
    next to the network). ``warmup`` steps are run first and not timed.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, 4, *patch_size), generator=g).to(device)
    y = (torch.rand((batch_size, 3, *patch_size), generator=g) > 0.8).float().to(device)
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.99, nesterov=True)
    loss_fn = nn.BCEWithLogitsLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with autocast_context(device, precision):
            out = model(x)
        out = out.float()
        target = y.unsqueeze(1).expand_as(out) if out.ndim == y.ndim + 1 else y
        loss = loss_fn(out, target)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps / (time.perf_counter() - t0)


def measure_prediction(
    model: nn.Module,
    shape: Sequence[int],
    patch_size: Sequence[int],
    device: torch.device,
    precision: str,
    mirror: bool = False,
    overlap: float = 0.5,
    seed: int = 0,
) -> float:
    """Seconds for :func:`menseg.infer.sliding.predict_probs` on a random ``shape`` volume."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(tuple(shape), generator=g)
    cfg = InferConfig(overlap=overlap, mirror=mirror, precision=precision, sw_batch_size=1)
    sync(device)
    t0 = time.perf_counter()
    predict_probs(model, image, patch_size, cfg, device)
    sync(device)
    return time.perf_counter() - t0


def _warm_up_inference(model: nn.Module, patch_size: Sequence[int], device: torch.device,
                       precision: str) -> None:
    """One untimed eval forward (allocator, oneDNN/cuDNN kernel selection)."""
    model.eval()
    with torch.inference_mode(), autocast_context(device, precision):
        model(torch.zeros((1, 4, *patch_size), device=device))
    sync(device)


def _global_warm_up(device: torch.device, precisions: Sequence[str]) -> None:
    """Pay one-time costs (lazy imports, thread pools, kernel caches) before any timing."""
    net = build_network(ModelConfig(filters=(4, 8, 16), deep_supr_num=1), patch_size=(16, 16, 16))
    for prec in precisions:
        measure_training(net, (16, 16, 16), device, prec, warmup=1, steps=1)
        measure_prediction(net, (4, 20, 20, 20), (16, 16, 16), device, prec, mirror=True)


# ----------------------------------------------------------------------------- benchmark


def benchmark_speed(
    device: str = "auto",
    quick: bool = False,
    *,
    precisions: Sequence[str] = ("fp32", "bf16"),
    mirror: str = "measure",
    models: Mapping[str, BenchModel] | None = None,
    train_warmup: int | None = None,
    train_steps: int | None = None,
    case_shape: Sequence[int] | None = None,
    crop_shape: Sequence[int] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure training and prediction speed and memory of the default vs the nnU-Net-sized net.

    Args:
        device: ``auto`` | ``cpu`` | ``cuda``.
        quick: toy networks and volumes (seconds; for tests and smoke checks).
        precisions: subset of ``("fp32", "bf16")``; bf16 is autocast (CPU or CUDA).
        mirror: ``"measure"`` times mirrored prediction of the case for every network;
            ``"estimate"`` reports 8 x the unmirrored time (recorded as estimated);
            ``"default-only"`` measures it for the first network and estimates the rest.
        models: networks to compare, ``name -> BenchModel``; the first is the one the
            ratios are relative to (default: :func:`default_models`).
        train_warmup, train_steps: untimed and timed training steps (default 2 and 3;
            1 and 1 in quick mode).
        case_shape, crop_shape: ``(4, X, Y, Z)`` volumes to predict (default
            ``CASE_SHAPE`` / ``CROP_SHAPE``; tiny in quick mode).
        seed: for the random inputs and weights.

    Returns:
        JSON-serialisable dict: environment, shapes, and ``models[name][precision]`` with
        ``train_it_per_s``, ``predict_crop_s``, ``predict_case_s``,
        ``predict_case_mirror_s``, ``predict_case_mirror_measured``, ``peak_memory_mb``,
        plus ``ratio[precision][metric]`` = speed-up of the first network over each other
        one (>1 means the first is faster; memory ratio = other / first).
    """
    dev = resolve_device(device)
    if mirror not in MIRROR_MODES:
        raise MensegError(f"unknown mirror mode '{mirror}' (known: {', '.join(MIRROR_MODES)})")
    for p in precisions:
        autocast_context(dev, p)  # validates
    models = dict(models) if models is not None else default_models(quick)
    if not models:
        raise MensegError("no models to benchmark")
    warmup = train_warmup if train_warmup is not None else (1 if quick else 2)
    steps = train_steps if train_steps is not None else (1 if quick else 3)
    case = tuple(case_shape) if case_shape is not None else ((4, 24, 24, 20) if quick else CASE_SHAPE)
    crop = tuple(crop_shape) if crop_shape is not None else ((4, 20, 24, 18) if quick else CROP_SHAPE)

    res: dict[str, Any] = {
        **environment(dev),
        "quick": quick,
        "case_shape": list(case),
        "crop_shape": list(crop),
        "overlap": 0.5,
        "train_batch_size": BATCH_SIZE,
        "train_warmup_steps": warmup,
        "train_timed_steps": steps,
        "precisions": list(precisions),
        "mirror_mode": mirror,
        "memory_kind": (
            "torch.cuda.max_memory_allocated per phase"
            if dev.type == "cuda"
            else "resident set size sampled during the phase (MiB)"
        ),
        # Other processes on the machine inflate every figure: record the load around the run.
        "models": {},
    }
    names = list(models)
    with cudnn_benchmark(dev):
        _global_warm_up(dev, precisions)
        for i, name in enumerate(names):
            spec = models[name]
            torch.manual_seed(seed)
            net = build_network(spec.model, patch_size=spec.patch_size).to(dev)
            entry: dict[str, Any] = {
                "filters": list(spec.model.filters),
                "patch_size": list(spec.patch_size),
                "deep_supr_num": spec.model.deep_supr_num,
                "params_m": n_parameters(net) / 1e6,
            }
            measure_mirror = mirror == "measure" or (mirror == "default-only" and i == 0)
            for prec in precisions:
                log.info("benchmark %s %s: training", name, prec)
                with _PeakMemory(dev) as mem:
                    it_s = measure_training(net, spec.patch_size, dev, prec, warmup, steps, seed=seed)
                    _warm_up_inference(net, spec.patch_size, dev, prec)
                    log.info("benchmark %s %s: predicting crop %s", name, prec, crop)
                    crop_s = measure_prediction(net, crop, spec.patch_size, dev, prec, seed=seed)
                    log.info("benchmark %s %s: predicting case %s", name, prec, case)
                    case_s = measure_prediction(net, case, spec.patch_size, dev, prec, seed=seed)
                    if measure_mirror:
                        log.info("benchmark %s %s: predicting case with mirroring", name, prec)
                        mirror_s = measure_prediction(
                            net, case, spec.patch_size, dev, prec, mirror=True, seed=seed
                        )
                    else:
                        mirror_s = 8.0 * case_s
                entry[prec] = {
                    "train_it_per_s": it_s,
                    "predict_crop_s": crop_s,
                    "predict_case_s": case_s,
                    "predict_case_mirror_s": mirror_s,
                    "predict_case_mirror_measured": measure_mirror,
                    "peak_memory_mb": mem.peak_mb,
                }
                log.info("benchmark %s %s: %s", name, prec, entry[prec])
            entry["process_maxrss_mb"] = _maxrss_mb()
            res["models"][name] = entry
            del net
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    res["process_maxrss_mb"] = _maxrss_mb()
    res["load_average_end"] = loadavg()
    res["ratio"] = _ratios(res, names, precisions)
    return res


def _ratios(res: dict[str, Any], names: list[str], precisions: Sequence[str]) -> dict[str, Any]:
    """``ratio[other][precision][metric]``: how much better the first network is than ``other``."""
    base = res["models"][names[0]]
    out: dict[str, Any] = {}
    for other in names[1:]:
        o = res["models"][other]
        out[other] = {}
        for p in precisions:
            b, x = base[p], o[p]
            out[other][p] = {
                "train_it_per_s": b["train_it_per_s"] / x["train_it_per_s"],
                "predict_crop_s": x["predict_crop_s"] / b["predict_crop_s"],
                "predict_case_s": x["predict_case_s"] / b["predict_case_s"],
                "predict_case_mirror_s": x["predict_case_mirror_s"] / b["predict_case_mirror_s"],
                "peak_memory_mb": x["peak_memory_mb"] / b["peak_memory_mb"],
            }
    return out


# ----------------------------------------------------------------------------- rendering

_ROWS: tuple[tuple[str, str, str], ...] = (
    ("train_it_per_s", "training it/s (batch 2, own patch)", "{:.3f}"),
    ("predict_crop_s", "predict crop s (no mirror)", "{:.1f}"),
    ("predict_case_s", "predict case s (no mirror)", "{:.1f}"),
    ("predict_case_mirror_s", "predict case s (8-flip mirror)", "{:.1f}"),
    ("peak_memory_mb", "peak memory MiB", "{:.0f}"),
)


def speed_table(res: dict[str, Any]) -> Any:
    """A ``rich.table.Table`` of :func:`benchmark_speed`'s result."""
    from rich.table import Table

    names = list(res["models"])
    precisions = res["precisions"]
    crop = "x".join(str(s) for s in res["crop_shape"])
    case = "x".join(str(s) for s in res["case_shape"])
    table = Table(
        title=f"menseg speed on {res['device']} ({res['device_name']}, {res['threads']} threads); "
        f"case {case}, crop {crop}",
        caption=f"load average (1/5/15 min) at start {res.get('load_average_start')}, "
        f"end {res.get('load_average_end')}; above {res['threads']} means other work inflated "
        "the figures.\nratio = speed-up of the first network (time_other / time_first, "
        "it/s_first / it/s_other; memory other / first); ~ = mirroring estimated as 8 x one pass",
    )
    table.add_column("metric")
    for n in names:
        m = res["models"][n]
        label = f"{n}\n{'-'.join(map(str, m['filters']))}\npatch {'x'.join(map(str, m['patch_size']))}"
        for p in precisions:
            table.add_column(f"{label}\n{p}", justify="right")
    for other in names[1:]:
        for p in precisions:
            table.add_column(f"ratio vs {other}\n{p}", justify="right")
    table.add_row("parameters (M)", *[
        f"{res['models'][n]['params_m']:.2f}" for n in names for _ in precisions
    ], *["" for _ in names[1:] for _ in precisions])
    for key, title, fmt in _ROWS:
        cells = []
        for n in names:
            for p in precisions:
                e = res["models"][n][p]
                txt = fmt.format(e[key]) if e[key] >= 10 else f"{e[key]:.3g}"
                if key == "predict_case_mirror_s" and not e["predict_case_mirror_measured"]:
                    txt = "~" + txt
                cells.append(txt)
        for other in names[1:]:
            for p in precisions:
                cells.append(f"{res['ratio'][other][p][key]:.2f}x")
        table.add_row(title, *cells)
    return table


def render_speed(res: dict[str, Any], console: Any = None) -> None:
    """Print :func:`speed_table` with rich (to ``console`` or stdout)."""
    from rich.console import Console

    (console or Console()).print(speed_table(res))


__all__ = [
    "CASE_SHAPE",
    "CROP_SHAPE",
    "NNUNET_FILTERS",
    "NNUNET_PATCH",
    "BenchModel",
    "benchmark_speed",
    "default_models",
    "measure_prediction",
    "measure_training",
    "render_speed",
    "speed_table",
]
