"""Generated cases for the review tests (not a test module).

A head-sized ellipsoid 'brain' with one lesion off-centre (right, anterior, superior of the centre in
world space), so that a picture of the page can tell orientation: the lesion must be drawn at the
same place whatever the voxel order on disk.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from menseg.constants import MODALITIES
from nifti_factory import save, to_lps

#: Headless Chromium as the browser tests and tools/review_load_time.py start it: no sandbox (root), no
#: network of its own (this machine has none), WebGL by the software renderer.
CHROME_ARGS: tuple[str, ...] = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--enable-unsafe-swiftshader", "--use-angle=swiftshader",
    "--window-size=1400,900", "--force-device-scale-factor=1")

#: Lesion centre, as a fraction of the volume along each (RAS) axis.
LESION_AT = (0.68, 0.62, 0.6)


def head(shape: tuple[int, int, int], spacing: float = 1.0, seed: int = 0,
         lesion_at: tuple[float, float, float] = LESION_AT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images (4, X, Y, Z) float32, label uint8, affine)`` in RAS voxel order."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    centre = (np.asarray(shape, np.float32) - 1) / 2
    r = np.sqrt((((grid - centre[:, None, None, None]) / (centre[:, None, None, None] * 0.85)) ** 2).sum(0))
    brain = r < 1
    at = np.asarray(lesion_at, np.float32) * (np.asarray(shape) - 1)
    d = np.sqrt(((grid - at[:, None, None, None]) ** 2).sum(0))
    rad = max(2.0, min(shape) * 0.12)
    label = np.zeros(shape, np.uint8)
    label[d < rad * 1.5] = 2
    label[d < rad] = 3
    label[d < rad * 0.5] = 1
    label[~brain] = 0
    images = np.zeros((4, *shape), np.float32)
    for c in range(4):
        images[c][brain] = 300 + 60 * c + rng.normal(0, 15, int(brain.sum()))
        images[c][(label == 3)] += 500 if c == 0 else 100
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = -centre * spacing
    return images, label, affine


def write_case(root: Path, case_id: str, shape=(48, 56, 40), spacing: float = 1.0, *, lps: bool = False,
               missing: tuple[str, ...] = (), pred_shift: int = 0, seed: int = 0,
               rotate_deg: float = 0.0, speck: bool = False) -> None:
    """Write ``root/images/<case>/`` (BraTS layout, reference label inside), ``root/pred/<case>.nii.gz``
    (the reference moved ``pred_shift`` voxels along x) and ``root/ref/<case>.nii.gz``. ``rotate_deg``:
    an oblique affine, the voxel grid turned about the world z axis. ``speck``: a one-voxel false positive
    in the prediction, near the centre."""
    images, label, affine = head(shape, spacing, seed)
    if rotate_deg:
        t = np.deg2rad(rotate_deg)
        rot = np.eye(4)
        rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
        affine = rot @ affine
    pred = np.roll(label, pred_shift, axis=0)
    if speck:
        pred[tuple(np.asarray(shape) // 2 - 3)] = 3
    if lps:
        images, aff = to_lps(images, affine)
        label, _ = to_lps(label, affine)
        pred, _ = to_lps(pred, affine)
        affine = aff
    d = root / "images" / case_id
    for c, m in enumerate(MODALITIES):
        if m not in missing:
            save(d / f"{case_id}-{m}.nii.gz", images[c], affine)
    save(d / f"{case_id}-seg.nii.gz", label, affine, np.uint8)
    save(root / "ref" / f"{case_id}.nii.gz", label, affine, np.uint8)
    save(root / "pred" / f"{case_id}.nii.gz", pred, affine, np.uint8)


def write_review_set(root: Path) -> Path:
    """Four cases: a good one, a shifted (bad) one, an LPS copy of the good one without t2f, and one whose
    prediction does not fit its images. Returns ``root``."""
    write_case(root, "CASE-GOOD")
    write_case(root, "CASE-BAD", pred_shift=-12)
    write_case(root, "CASE-LPS", lps=True, missing=("t2f",))
    write_case(root, "CASE-WRONG")
    images, label, affine = head((40, 40, 40))
    save(root / "pred" / "CASE-WRONG.nii.gz", label, affine, np.uint8)  # another grid than its images
    return root
