"""Sliding-window prediction of region probabilities with optional mirror TTA.

The network is applied to overlapping patches of the (preprocessed) volume;
patch outputs are blended with a Gaussian importance map (nnU-Net / MONAI
``mode="gaussian"``). With mirroring, each patch is also predicted flipped
along every non-empty subset of the three spatial axes and the eight sigmoid
probability maps are averaged (nnU-Net's test-time mirroring, per patch).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from menseg.config import STITCH_MODES, InferConfig
from menseg.constants import REGION_NAMES
from menseg.device import resolve_device
from menseg.errors import MensegError

log = logging.getLogger(__name__)

#: The 8 flip combinations of the spatial axes (2, 3, 4) of a (B, C, X, Y, Z) batch,
#: identity first.
MIRROR_AXES: tuple[tuple[int, ...], ...] = tuple(
    axes for r in range(4) for axes in itertools.combinations((2, 3, 4), r)
)

PRECISIONS = ("fp32", "bf16", "auto")


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 runs natively on ``device`` (CUDA with bf16, or a CPU with AVX512-BF16/AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto`` -> ``bf16`` where it is native on ``device``, else ``fp32``; others unchanged."""
    if precision not in PRECISIONS:
        raise MensegError(f"unknown infer.precision '{precision}' (known: {', '.join(PRECISIONS)})")
    if precision == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    return precision


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in bfloat16 for ``precision="bf16"`` (CPU or CUDA), else a no-op.

    ``auto`` is resolved with :func:`resolve_precision`.
    """
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode for the block and restore its previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _patch_predictor(
    model: nn.Module, mirror: bool, device: torch.device, precision: str
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Patch batch ``(B, C, px, py, pz)`` -> sigmoid probabilities ``(B, 3, px, py, pz)`` float32."""
    flips = MIRROR_AXES if mirror else MIRROR_AXES[:1]

    def predict(batch: torch.Tensor) -> torch.Tensor:
        acc: torch.Tensor | None = None
        for axes in flips:
            x = torch.flip(batch, axes) if axes else batch
            with autocast_context(device, precision):
                logits = model(x)
            if logits.ndim != batch.ndim:
                raise RuntimeError(
                    f"model returned shape {tuple(logits.shape)} for input {tuple(x.shape)}; "
                    "expected (B, C, X, Y, Z) logits in eval mode"
                )
            probs = torch.sigmoid(logits.float())
            if axes:
                probs = torch.flip(probs, axes)
            acc = probs if acc is None else acc.add_(probs)
        assert acc is not None
        return acc / len(flips)

    return predict


#: Share of a GPU's memory the stitching buffers may take before ``infer.stitch: auto`` moves them to the CPU.
STITCH_GPU_SHARE = 0.25


def stitch_device(
    dev: torch.device, shape: Sequence[int], stitch: str = "auto", total_memory: int | None = None
) -> torch.device:
    """Where sliding-window outputs of a ``(C, x, y, z)`` volume are accumulated (``infer.stitch``).

    On a GPU, ``auto`` keeps them there unless input, 3 output channels and the weight map (fp32)
    would take more than :data:`STITCH_GPU_SHARE` of its memory (``total_memory``: bytes, read from
    the device when None); the windows still run on the GPU, one batch at a time.
    """
    if stitch not in STITCH_MODES:
        raise MensegError(f"infer.stitch must be one of {', '.join(STITCH_MODES)}, got '{stitch}'")
    if dev.type == "cpu" or stitch == "device":
        return dev
    if stitch == "cpu":
        return torch.device("cpu")
    need = (int(shape[0]) + len(REGION_NAMES) + 1) * math.prod(int(v) for v in shape[1:]) * 4
    if total_memory is None:
        total_memory = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else need
    return torch.device("cpu") if need > STITCH_GPU_SHARE * total_memory else dev


def predict_probs(
    model: nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    cfg: InferConfig | None = None,
    device: str | torch.device | None = "auto",
    *,
    mirror: bool | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Region probabilities of a whole (preprocessed) volume by sliding-window inference.

    Args:
        model: network mapping ``(B, C, px, py, pz)`` to logits ``(B, 3, px, py, pz)``
            in eval mode (it is switched to eval for the call and restored afterwards)
            and moved to ``device``.
        image: ``(C, x, y, z)`` float tensor (z-scored modalities, RAS+, target spacing).
            Volumes smaller than the patch on any axis are padded (zeros) and cropped back.
        patch_size: window size ``(px, py, pz)`` in voxels (the model's training patch).
        cfg: overlap, sw_batch_size, mirror and precision (``fp32`` | ``bf16``);
            defaults to ``InferConfig()``.
        device: ``"auto"`` | ``"cpu"`` | ``"cuda"`` | a ``torch.device``.
        mirror: overrides ``cfg.mirror`` when given.
        progress: show MONAI's window progress bar.

    Returns:
        ``(3, x, y, z)`` float32 CPU tensor of sigmoid probabilities in
        ``REGION_NAMES`` order (ET, TC, WT).
    """
    cfg = cfg or InferConfig()
    dev = resolve_device(device)
    use_mirror = cfg.mirror if mirror is None else mirror
    if image.ndim != 4:
        raise ValueError(f"image must be (C, x, y, z), got shape {tuple(image.shape)}")
    if len(patch_size) != 3:
        raise ValueError(f"patch_size must have 3 entries, got {patch_size}")
    if not 0.0 <= cfg.overlap < 1.0:
        raise MensegError(f"infer.overlap must be in [0, 1), got {cfg.overlap}")
    autocast_context(dev, cfg.precision)  # validates the precision name early

    from monai.inferers import sliding_window_inference

    model.to(dev)
    predictor = _patch_predictor(model, use_mirror, dev, cfg.precision)
    out_dev = stitch_device(dev, image.shape, cfg.stitch)
    batch = image.to(device=out_dev, dtype=torch.float32).unsqueeze(0)
    log.debug(
        "sliding window: volume %s, patch %s, overlap %.2f, mirror %s, %s on %s, stitched on %s",
        tuple(image.shape[1:]), tuple(patch_size), cfg.overlap, use_mirror, cfg.precision, dev, out_dev,
    )
    with _eval_mode(model), torch.inference_mode():
        out = sliding_window_inference(
            batch,
            roi_size=tuple(int(p) for p in patch_size),
            sw_batch_size=max(1, int(cfg.sw_batch_size)),
            predictor=predictor,
            overlap=cfg.overlap,
            mode="gaussian",
            padding_mode="constant",
            cval=0.0,
            sw_device=dev,
            device=out_dev,
            progress=progress,
        )
    assert isinstance(out, torch.Tensor)
    if hasattr(out, "as_tensor"):  # MONAI MetaTensor -> plain tensor
        out = out.as_tensor()
    probs = out[0].float().cpu()
    if probs.shape[0] != len(REGION_NAMES):
        raise RuntimeError(
            f"model produced {probs.shape[0]} channels, expected {len(REGION_NAMES)} ({REGION_NAMES})"
        )
    # Gaussian blending of values in [0, 1] stays in [0, 1] up to rounding; the
    # out-of-place clamp also turns the inference tensor into an ordinary one.
    return torch.clamp(probs, 0.0, 1.0)


__all__ = [
    "MIRROR_AXES", "PRECISIONS", "STITCH_GPU_SHARE", "autocast_context", "bf16_is_fast", "predict_probs",
    "resolve_device", "resolve_precision", "stitch_device",
]
