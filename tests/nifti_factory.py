"""Tiny generated NIfTI cases for the data tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from menseg.constants import MODALITIES

LPS_FLIP = np.diag([-1.0, -1.0, 1.0, 1.0])


def ras_affine(spacing=(1.0, 1.0, 1.0), origin=(-10.0, -12.0, -8.0)) -> np.ndarray:
    """A RAS affine with the given spacing (mm) and origin."""
    a = np.diag([*spacing, 1.0])
    a[:3, 3] = origin
    return a


def to_lps(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same physical image stored with L-P-S voxel axes (last 3 axes of ``data``)."""
    shape = data.shape[-3:]
    flip = np.eye(4)
    flip[0, 0] = flip[1, 1] = -1.0
    flip[0, 3] = shape[0] - 1
    flip[1, 3] = shape[1] - 1
    return np.ascontiguousarray(data[..., ::-1, ::-1, :]), affine @ flip


def blob_case(
    shape=(20, 18, 16), rng: np.random.Generator | None = None, spacing=(1.0, 1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Image float32 (4, X, Y, Z): an ellipsoidal 'brain' (zero outside) and a label inside it."""
    rng = rng if rng is not None else np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s
                                  for n, s in zip(shape, spacing, strict=True)], indexing="ij"))
    half = np.asarray(shape) * np.asarray(spacing) / 2
    r = np.sqrt(((grid / (half[:, None, None, None] * 0.8)) ** 2).sum(0))
    brain = r < 1
    image = np.zeros((4, *shape), np.float32)
    for c in range(4):
        image[c][brain] = rng.uniform(50 * (c + 1), 100 * (c + 1), int(brain.sum()))
    label = np.zeros(shape, np.uint8)
    label[r < 0.6] = 2
    label[r < 0.4] = 3
    label[r < 0.2] = 1
    return image, label


def save(path: Path, data: np.ndarray, affine: np.ndarray | None = None, dtype=None) -> Path:
    """Save ``data`` as NIfTI at ``path`` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(data, affine if affine is not None else np.eye(4))
    if dtype is not None:
        img.set_data_dtype(dtype)
    nib.save(img, str(path))
    return path


def write_brats_case(
    root: Path,
    case_id: str,
    shape=(16, 16, 12),
    affine: np.ndarray | None = None,
    labelled: bool = True,
    seed: int = 0,
    folder: str | None = None,
) -> Path:
    """Write one BraTS-layout case folder ``root/<folder or case_id>``; returns it."""
    affine = affine if affine is not None else ras_affine()
    image, label = blob_case(shape, np.random.default_rng(seed))
    d = root / (folder or case_id)
    for c, m in enumerate(MODALITIES):
        save(d / f"{case_id}-{m}.nii.gz", image[c], affine)
    if labelled:
        save(d / f"{case_id}-seg.nii.gz", label, affine, np.uint8)
    return d


def write_nnunet_case(root: Path, case_id: str, shape=(16, 16, 12), labelled=True, seed=0,
                      images: str = "imagesTr") -> None:
    """Write one case in the nnU-Net raw layout under ``root``."""
    image, label = blob_case(shape, np.random.default_rng(seed))
    for c in range(4):
        save(root / images / f"{case_id}_{c:04d}.nii.gz", image[c], ras_affine())
    if labelled:
        save(root / "labelsTr" / f"{case_id}.nii.gz", label, ras_affine(), np.uint8)


def truncate(path: Path, keep_fraction: float = 0.6) -> Path:
    """Cut the end off a file (a truncated download)."""
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep_fraction)])
    return path


def write_phantom_pools(root: Path, n_labelled: int) -> Path:
    """``root/labeled`` (``n_labelled`` phantoms, 2 mm, 32x32x24) and ``root/unlabeled`` (2 phantoms of
    another seed, their labels removed): the real cases of a small Sim2Real run."""
    from menseg.data.phantom import write_phantom_dataset

    write_phantom_dataset(root / "labeled", n_cases=n_labelled, shape=(32, 32, 24), spacing=(2.0, 2.0, 2.0),
                          seed=4)
    write_phantom_dataset(root / "unlabeled", n_cases=2, shape=(32, 32, 24), spacing=(2.0, 2.0, 2.0), seed=9,
                          prefix="UNLAB")
    for seg in (root / "unlabeled").glob("*/*-seg.nii.gz"):
        seg.unlink()
    return root
