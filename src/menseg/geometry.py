"""Small geometry helpers shared by augmentation and synthesis."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def rotation_matrix(angles_rad: Sequence[float]) -> torch.Tensor:
    """3x3 float64 rotation ``Rz @ Ry @ Rx`` for angles (radians) about the x, y and z axes."""
    ax, ay, az = angles_rad
    cx, sx = math.cos(ax), math.sin(ax)
    cy, sy = math.cos(ay), math.sin(ay)
    cz, sz = math.cos(az), math.sin(az)
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    return rz @ ry @ rx
