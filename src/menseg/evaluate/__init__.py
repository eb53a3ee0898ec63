"""Evaluation: BraTS 2023+ lesion-wise and legacy metrics, per-case tables, summaries."""

from menseg.evaluate.metrics import (
    HD95_PENALTY_MM,
    dice,
    evaluate_case,
    hd95,
    lesion_wise,
    metric_names,
    region_masks,
    surface_dice,
    volume_mm3,
)
from menseg.evaluate.runner import evaluate_folders

__all__ = [
    "HD95_PENALTY_MM",
    "dice",
    "evaluate_case",
    "evaluate_folders",
    "hd95",
    "lesion_wise",
    "metric_names",
    "region_masks",
    "surface_dice",
    "volume_mm3",
]
