"""A simple generated brain-and-meningioma phantom for the demo and tests.

Not a simulator (that is ``menseg.synth``): an ellipsoidal "brain" with a
WM/GM/CSF-like layering, and one extra-axial lesion touching the brain surface
with an enhancing rim (ET, 3), an optional non-enhancing core (NETC, 1) and
oedema (SNFH, 2) spreading into the adjacent brain. Four sequences with
plausible contrast order, bias field and Rician-like noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from menseg.constants import MODALITIES

# Relative intensities per tissue (bg, wm, gm, csf, et, netc, snfh) per sequence.
# Order of contrasts follows the usual appearance: T1c/T1n WM>GM>CSF, T2w/FLAIR
# lesion and oedema bright, CSF bright on T2w and dark on FLAIR.
_TISSUE_INTENSITY = {
    "t1c": (0.0, 0.80, 0.60, 0.20, 1.30, 0.35, 0.55),
    "t1n": (0.0, 0.80, 0.60, 0.20, 0.55, 0.40, 0.50),
    "t2f": (0.0, 0.45, 0.60, 0.15, 0.70, 0.50, 1.10),
    "t2w": (0.0, 0.40, 0.60, 1.10, 0.70, 0.95, 0.95),
}


def make_phantom_case(
    shape: tuple[int, int, int] = (64, 64, 48),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    rng: np.random.Generator | None = None,
    lesion: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Make one phantom case.

    Returns ``(image, label, affine)``: image float32 ``(4, X, Y, Z)`` in
    modality order, label uint8 ``(X, Y, Z)`` with BraTS-MEN labels, and a RAS
    affine with the given spacing (mm).
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    sp = np.asarray(spacing, float)
    grid = np.stack(
        np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, sp, strict=True)],
                    indexing="ij")
    )  # (3, X, Y, Z) mm from centre
    radii = np.asarray(shape, float) * sp * rng.uniform(0.36, 0.44, size=3)
    r = np.sqrt(((grid / radii[:, None, None, None]) ** 2).sum(0))  # 1 at brain surface
    tissue = np.zeros(shape, np.uint8)
    tissue[r < 1.0] = 2  # gm
    tissue[r < 0.78] = 1  # wm
    tissue[r < 0.18] = 3  # ventricle-like csf
    label = np.zeros(shape, np.uint8)
    if lesion:
        # Lesion centre on the brain surface, in a random direction.
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        centre = d * radii * rng.uniform(0.85, 0.98)
        lr = rng.uniform(0.25, 0.45) * radii.min()
        dist = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
        inside_head = r < 1.08
        et = (dist < lr) & inside_head
        oedema_r = lr * rng.uniform(1.3, 2.2)
        snfh = (dist < oedema_r) & (r < 0.97) & ~et
        if rng.uniform() < 0.6:
            snfh &= ndimage.binary_dilation(tissue == 1, iterations=2)
        label[snfh] = 2
        label[et] = 3
        if rng.uniform() < 0.5:
            label[(dist < lr * rng.uniform(0.35, 0.6)) & et] = 1
        tissue[et & (tissue == 0)] = 2  # lesion displaces background at the surface
    image = np.zeros((len(MODALITIES), *shape), np.float32)
    zz = grid / (np.abs(grid).max() + 1e-6)
    for c, m in enumerate(MODALITIES):
        lut = np.asarray(_TISSUE_INTENSITY[m], np.float32) * rng.uniform(0.85, 1.15)
        vol = lut[tissue].astype(np.float32)
        vol[label == 3] = lut[4]
        vol[label == 1] = lut[5]
        vol[label == 2] = lut[6]
        vol = ndimage.gaussian_filter(vol, 0.7)
        bias = np.exp(sum(rng.normal(0, 0.1) * zz[i] for i in range(3)))
        noise = rng.normal(0, 0.04, (2, *shape))
        vol = np.sqrt((vol * bias + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude
        vol[r >= 1.08] = 0.0  # skull-stripped
        image[c] = (vol * 1000).astype(np.float32)
    affine = np.diag([*sp, 1.0])
    affine[:3, 3] = -(np.asarray(shape) - 1) / 2 * sp
    return image, label, affine


def write_phantom_dataset(
    out: str | Path,
    n_cases: int = 6,
    shape: tuple[int, int, int] = (64, 64, 48),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    seed: int = 0,
    prefix: str = "PHANTOM",
) -> list[Path]:
    """Write ``n_cases`` phantom cases in the BraTS folder layout; returns case folders."""
    import nibabel as nib

    out = Path(out)
    rng = np.random.default_rng(seed)
    folders = []
    for i in range(n_cases):
        cid = f"{prefix}-{i:05d}-000"
        folder = out / cid
        folder.mkdir(parents=True, exist_ok=True)
        image, label, affine = make_phantom_case(shape, spacing, rng)
        for c, m in enumerate(MODALITIES):
            nib.save(nib.Nifti1Image(image[c], affine), folder / f"{cid}-{m}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / f"{cid}-seg.nii.gz")
        folders.append(folder)
    return folders
