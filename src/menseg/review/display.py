"""Volumes as the review page draws them: 8-bit, decimated when too large, in their own world space.

The browser gets each sequence as an 8-bit NIfTI (intensities scaled between the 0.5th and 99.5th
percentiles of the head) and each label map as it is, both with the file's own affine, so NiiVue
places them in world space: LPS, oblique or any voxel order is drawn in the right orientation and a
label always sits on the anatomy it was predicted on. A volume with more than
:data:`DISPLAY_MAX_VOXELS` voxels is decimated by the smallest integer factor that brings it under
(every ``f``-th voxel along each axis, the affine scaled to match, images and labels alike), and the
page says so. Each volume travels as a small script (``menseg.volume(case, name, base64)``) so that
the same pages work from the server and from a static folder opened from disk.
"""

from __future__ import annotations

import base64
import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from menseg.data.io import load_nifti, read_image, read_label

#: Larger volumes are decimated for display (256^3: 64 MiB of 8-bit voxels per volume).
DISPLAY_MAX_VOXELS: int = 256**3
#: Robust intensity window of a displayed sequence (percentiles of its non-background voxels).
WINDOW_PERCENTILES: tuple[float, float] = (0.5, 99.5)
#: Voxels sampled to find the window (enough for stable percentiles, fast on 512^3).
WINDOW_SAMPLE: int = 2_000_000


def display_factor(shape: tuple[int, ...], max_voxels: int | None = None) -> int:
    """The smallest integer decimation factor that brings ``shape`` to at most ``max_voxels`` voxels
    (default :data:`DISPLAY_MAX_VOXELS`)."""
    max_voxels = DISPLAY_MAX_VOXELS if max_voxels is None else max_voxels
    f = 1
    while math.prod(math.ceil(s / f) for s in shape[:3]) > max_voxels:
        f += 1
    return f


@dataclass(frozen=True)
class Geometry:
    """The displayed grid of a case: its file shape, the decimation factor and the displayed shape."""

    shape: tuple[int, int, int]
    factor: int

    @property
    def display_shape(self) -> tuple[int, int, int]:
        return tuple(math.ceil(s / self.factor) for s in self.shape)  # type: ignore[return-value]

    def note(self) -> str | None:
        if self.factor == 1:
            return None
        shown = "x".join(map(str, self.display_shape))
        full = "x".join(map(str, self.shape))
        return (f"downsampled {self.factor}x for display ({full} -> {shown} voxels); "
                "metrics and volumes are from the full-resolution files")

    def as_dict(self) -> dict:
        return {"shape": list(self.shape), "factor": self.factor, "display_shape": list(self.display_shape),
                "note": self.note()}


def geometry(path: Path) -> Geometry:
    """The display geometry of a case from the header of one of its files."""
    shape = tuple(int(s) for s in load_nifti(path).shape[:3])
    return Geometry(shape, display_factor(shape))  # type: ignore[arg-type]


def _nifti_bytes(data: np.ndarray, affine: np.ndarray, factor: int) -> bytes:
    aff = np.array(affine, dtype=np.float64)
    aff[:3, :3] = aff[:3, :3] * factor  # every factor-th voxel: voxel (0,0,0) stays where it was
    img = nib.Nifti1Image(data, aff)
    img.header.set_xyzt_units("mm")
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=1)


def image_for_display(path: Path, factor: int) -> bytes:
    """A sequence as a gzipped 8-bit NIfTI: decimated by ``factor``, robustly windowed to 0..255."""
    data, affine = read_image(path)
    data = np.ascontiguousarray(data[::factor, ::factor, ::factor])
    flat = data.ravel()
    background = flat[0] if np.all(data[0] == flat[0]) else None  # a constant border is not tissue
    fg = flat[flat != background] if background is not None else flat
    if fg.size > WINDOW_SAMPLE:
        fg = fg[:: fg.size // WINDOW_SAMPLE]
    lo, hi = np.percentile(fg, WINDOW_PERCENTILES) if fg.size else (float(flat.min()), float(flat.max()))
    if hi <= lo:
        lo, hi = float(flat.min()), max(float(flat.max()), float(flat.min()) + 1.0)
    scaled = np.clip((data - lo) / (hi - lo) * 255.0, 0, 255).round().astype(np.uint8)
    return _nifti_bytes(scaled, affine, factor)


def label_for_display(path: Path, factor: int) -> bytes:
    """A label map as a gzipped 8-bit NIfTI decimated by ``factor`` (nearest voxel, values kept)."""
    label, affine = read_label(path)
    return _nifti_bytes(np.ascontiguousarray(label[::factor, ::factor, ::factor]), affine, factor)


def volume_script(case_id: str, name: str, nifti_gz: bytes) -> bytes:
    """The script that hands one volume to the page (works from a server and from disk)."""
    b64 = base64.b64encode(nifti_gz).decode("ascii")
    return f"menseg.volume({json.dumps(case_id)},{json.dumps(name)},\"{b64}\");\n".encode()


def data_script(call: str, payload: object) -> bytes:
    """``menseg.<call>(<payload as JSON>);`` (index and case descriptions)."""
    return f"menseg.{call}({json.dumps(payload, allow_nan=False)});\n".encode()
