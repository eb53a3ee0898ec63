"""Synthetic meningiomas on the user's own label maps, SynthSeg-style (issue 4, point 1c).

::

    sidecars = from_labels_dataset("parcellations/", "synth_out/", per_map=3, seed=0)
    case = replay_from_labels(sidecars[0])      # bit-exact re-creation from the sidecar

``src`` is a flat folder of integer label maps (``*.nii.gz`` / ``*.nii``, e.g. brain
parcellations; any class ids, 0 = background). For each map, ``per_map`` cases are made:

1. :func:`menseg.synth.anatomy.anatomy_from_label_map` turns the map into an anatomy. A one-voxel
   DURA shell is added in the background just outside the labelled region (unless a class is
   mapped to ``dura``), so the map needs a background margin around its classes. Dural seed
   regions are ``convexity`` and ``skull_base`` only.
2. :func:`menseg.synth.lesion.sample_lesion_params` + :func:`~menseg.synth.lesion.apply_lesions`
   draw and paint the meningioma(s) (mass effect, core, dural tail, oedema).
3. :func:`menseg.synth.appearance.render_random_intensities`: every class present (user
   classes, dura, and all lesion tissues) gets a uniform random mean per sequence, with no
   contrast order, then the randomised artefacts; all four sequences.

An optional *label mapping* ``{class: tissue name}`` (``wm``, ``gm``, ``csf``, ``ventricle``,
``dura`` or ``background``) tells the lesion stage which classes are which tissue.
**Without it** every class is an anonymous tissue: tumours still grow inward from the added dura
shell into any class and displace it (mass effect), cores and dural tails are painted (the tail
stays on the dura), but **no oedema (SNFH) is painted**, since oedema only spreads into white
matter; lesion sites are drawn among the convexity / skull-base dura only. Map the white-matter
classes to ``wm`` (and cortex to ``gm``) to get oedema.

Geometry: the map is reoriented to RAS+ for the synthesis (site regions use the superior axis)
and the result is reoriented back, so every output file has the label map's own grid and affine.
Case ids are ``<map stem>-syn<k>``. Case ``k`` of map ``stem`` uses ``case_seed =
derive_seed(seed, "from_labels", stem, k)``; the lesion and appearance draws use generators seeded
with ``derive_seed(case_seed, "lesion")`` / ``derive_seed(case_seed, "appearance")``. Each case
has a JSON sidecar (``-params.json``, placed as :mod:`menseg.synth.writer` says) with the source
file (path + SHA-256), seed, k, mapping and the sampled lesion and appearance params;
:func:`replay_from_labels` re-renders the case from it bit-exactly (same torch version, CPU).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
from nibabel import orientations as nio

from menseg.constants import MODALITIES, SEG_SUFFIX
from menseg.data.io import is_nifti, load_nifti, nifti_ending
from menseg.data.validate import spacing_of
from menseg.errors import MensegError
from menseg.synth import tissues as T
from menseg.synth.anatomy import anatomy_from_label_map
from menseg.synth.appearance import AppearanceConfig, AppearanceParams, render, render_random_intensities
from menseg.synth.inject import file_entry, sha256_file
from menseg.synth.lesion import LesionConfig, LesionParams, apply_lesions, sample_lesion_params
from menseg.synth.serial import from_dict, to_plain
from menseg.utils import derive_seed

log = logging.getLogger(__name__)

#: Version of the from-labels sidecar format (bump when its keys change).
FROM_LABELS_SIDECAR_VERSION = 1
#: Value of the sidecar's ``kind`` key.
KIND = "from_labels"
#: Tissue names a label mapping may use (healthy tissues, or background to drop a class).
MAPPABLE: dict[str, int] = {"background": T.BACKGROUND, **{T.TISSUE_NAMES[t]: t for t in T.HEALTHY}}

_RAS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)


@dataclass
class LabelMapCase:
    """One synthetic case made on a label map, in the label map's own grid.

    Attributes:
        image: ``(4, X, Y, Z)`` float32, MODALITIES order, 0 outside the labelled region + dura.
        label: ``(X, Y, Z)`` uint8 BraTS-MEN labels (1 NETC, 2 SNFH, 3 ET).
        tissue: ``(X, Y, Z)`` int64 class map that was rendered (tissue ids of
            :mod:`menseg.synth.tissues`, unmapped user class ``c`` as ``100 + c``).
        affine: ``(4, 4)`` voxel -> mm of the label map.
        lesion: the lesion params (on the RAS-reoriented grid).
        appearance: the random-intensity params (``means`` indexed by position in ``classes``).
        classes: tissue ids in the order of the appearance params' class axis (0 first).
    """

    image: np.ndarray
    label: np.ndarray
    tissue: np.ndarray
    affine: np.ndarray
    lesion: LesionParams
    appearance: AppearanceParams
    classes: list[int]


# ----------------------------------------------------------------------------- inputs


def read_label_map(path: str | Path) -> tuple[np.ndarray, np.ndarray, nib.Nifti1Header]:
    """Read an integer label map: ``(int64 (X, Y, Z), affine 4x4, header)``.

    MensegError naming the file when it is unreadable, not 3D (a 4D file with one volume is
    squeezed), not integer-valued, negative, or has fewer than 2 classes.
    """
    path = Path(path)
    img = load_nifti(path)
    try:
        data = np.asarray(np.asanyarray(img.dataobj))
    except Exception as e:  # nibabel raises many types for truncated files
        raise MensegError(f"unreadable or truncated NIfTI data ({type(e).__name__})", path) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3 or data.size == 0:
        raise MensegError(f"label map must be 3D, got shape {tuple(data.shape)}", path)
    if not np.issubdtype(data.dtype, np.integer):
        if not np.isfinite(data).all():
            raise MensegError("label map contains NaN/inf", path)
        nonint = data != np.round(data)
        if nonint.any():
            ex = ", ".join(f"{v:g}" for v in np.unique(data[nonint])[:3])
            raise MensegError(f"label map has non-integer values (e.g. {ex}); expected integer classes",
                              path)
    data = data.astype(np.int64)
    if int(data.min()) < 0:
        raise MensegError(f"label map has negative classes (min {int(data.min())})", path)
    classes = np.unique(data)
    if classes.size < 2:
        raise MensegError(f"label map needs at least 2 classes, found only {classes.tolist()}", path)
    affine = np.asarray(img.affine, np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise MensegError("label map affine is singular or not finite", path)
    return data, affine, img.header


def parse_label_mapping(data: Mapping[Any, Any], where: str | Path | None = None) -> dict[int, int]:
    """``{class: tissue name}`` (keys ints or digit strings) -> ``{class: tissue id}``."""
    out: dict[int, int] = {}
    for k, v in data.items():
        try:
            cls = int(k)
        except (TypeError, ValueError):
            raise MensegError(f"label mapping key '{k}' is not an integer class", where) from None
        name = str(v).lower()
        if name not in MAPPABLE:
            raise MensegError(f"label mapping: unknown tissue '{v}' for class {cls} "
                              f"(use {', '.join(MAPPABLE)})", where)
        if cls < 0:
            raise MensegError(f"label mapping: negative class {cls}", where)
        out[cls] = MAPPABLE[name]
    return out


def load_label_mapping(path: str | Path) -> dict[int, int]:
    """Read a JSON label mapping file ``{"2": "wm", "3": "gm", ...}`` (see :func:`parse_label_mapping`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MensegError(f"unreadable label mapping ({e})", path) from None
    if not isinstance(data, dict):
        raise MensegError("label mapping must be a JSON object {class: tissue name}", path)
    return parse_label_mapping(data, path)


def find_label_maps(src: str | Path) -> list[Path]:
    """The NIfTI files directly in ``src`` (sorted by name); MensegError if none."""
    src = Path(src)
    if not src.is_dir():
        raise MensegError("label-map folder not found", src)
    files = sorted(p for p in src.iterdir() if p.is_file() and is_nifti(p))
    if not files:
        raise MensegError("no label maps (*.nii.gz / *.nii) in folder", src)
    return files


def map_stem(path: Path) -> str:
    """File name without its NIfTI ending."""
    return path.name[: -len(nifti_ending(path))]


def from_labels_seed(seed: int, stem: str, k: int) -> int:
    """Seed of case ``k`` of label map ``stem``: ``derive_seed(seed, "from_labels", stem, k)``."""
    return derive_seed(int(seed), KIND, stem, int(k))


# ----------------------------------------------------------------------------- one case


def _class_table(anatomy_classes: list[int]) -> list[int]:
    """Rendered class ids: background first, then the anatomy's classes and every lesion tissue."""
    rest = sorted((set(anatomy_classes) | set(T.LESION)) - {T.BACKGROUND})
    return [T.BACKGROUND, *rest]


def synth_on_label_map(
    label_map: np.ndarray,
    affine: np.ndarray,
    case_seed: int,
    mapping: Mapping[int, int] | None = None,
    lesion_cfg: LesionConfig | None = None,
    appearance_cfg: AppearanceConfig | None = None,
    lesion_params: LesionParams | None = None,
    appearance_params: AppearanceParams | None = None,
    where: str | Path | None = None,
) -> LabelMapCase:
    """Lesion(s) + random intensities on one label map ``(X, Y, Z)`` int in its grid (``affine``).

    Draws lesion and appearance params from ``case_seed`` unless given (replay). ``where``
    names the source in error messages.
    """
    lesion_cfg = lesion_cfg if lesion_cfg is not None else LesionConfig()
    ornt = nio.io_orientation(affine)
    lm_ras = nio.apply_orientation(np.asarray(label_map), ornt)
    sp = spacing_of(affine)
    sp_ras = tuple(float(sp[int(a)]) for a in np.argsort(ornt[:, 0]))
    anat = anatomy_from_label_map(torch.from_numpy(np.ascontiguousarray(lm_ras, np.int64)),
                                  dict(mapping or {}), spacing=sp_ras)  # type: ignore[arg-type]
    if not bool((anat.tissue == T.DURA).any()):
        raise MensegError("label map leaves no background margin around its classes for the dura "
                          "(meningiomas seed on it); pad the map with background", where)
    if lesion_params is None:
        gen = torch.Generator().manual_seed(derive_seed(int(case_seed), "lesion"))
        try:
            lesion_params = sample_lesion_params(gen, lesion_cfg, anat, sp_ras)  # type: ignore[arg-type]
        except ValueError as e:
            raise MensegError(f"cannot place a lesion on this label map: {e}", where) from None
    elif tuple(lesion_params.shape) != tuple(anat.tissue.shape):
        raise MensegError(f"lesion params are for a grid of {tuple(lesion_params.shape)}, the label "
                          f"map (RAS) is {tuple(anat.tissue.shape)}", where)
    res = apply_lesions(anat.tissue, lesion_params, "cpu", cortex_mm=lesion_cfg.oedema_cortex_mm)
    classes = _class_table(anat.extra["classes"])
    lut = torch.zeros(max(classes) + 1, dtype=torch.int64)
    lut[torch.tensor(classes)] = torch.arange(len(classes))
    compact = lut[res.tissue]
    if appearance_params is None:
        gen = torch.Generator().manual_seed(derive_seed(int(case_seed), "appearance"))
        image, appearance_params = render_random_intensities(compact, len(classes), gen, sp_ras,
                                                             appearance_cfg)
    else:
        if len(appearance_params.means[0]) != len(classes):
            raise MensegError(f"appearance params have {len(appearance_params.means[0])} classes, "
                              f"this label map gives {len(classes)}", where)
        image = render(compact, appearance_params, sp_ras)
    back = nio.ornt_transform(_RAS, ornt)
    img = np.stack([nio.apply_orientation(c, back) for c in image.numpy()]).astype(np.float32)
    lab = nio.apply_orientation(res.label.numpy(), back).astype(np.uint8)
    tis = nio.apply_orientation(res.tissue.numpy(), back).astype(np.int64)
    return LabelMapCase(image=np.ascontiguousarray(img), label=np.ascontiguousarray(lab),
                        tissue=np.ascontiguousarray(tis), affine=np.asarray(affine, np.float64),
                        lesion=lesion_params, appearance=appearance_params, classes=classes)


# ----------------------------------------------------------------------------- dataset


def _output_ids(maps: list[Path], per_map: int) -> list[list[str]]:
    ids = [[f"{map_stem(p)}-syn{k}" for k in range(per_map)] for p in maps]
    stems = [map_stem(p) for p in maps]
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:  # e.g. a.nii and a.nii.gz
        raise MensegError(f"two label maps share the name '{dup[0]}'", maps[0].parent)
    return ids


def _preview(w: Any, cid: str, stem: str, case: LabelMapCase) -> None:
    """PNG of the case in RAS display orientation, through the lesion."""
    from menseg.synth.preview import write_preview_ras

    write_preview_ras(w.tmp / "preview" / f"{cid}.png", case.image, case.label, case.affine,
                      title=f"{cid} (label map {stem})")


def from_labels_dataset(
    src: str | Path,
    out: str | Path,
    per_map: int = 1,
    seed: int = 0,
    mapping: Mapping[int, int] | None = None,
    lesion_cfg: LesionConfig | None = None,
    appearance_cfg: AppearanceConfig | None = None,
    layout: Literal["brats", "nnunet"] = "brats",
    preview: bool = False,
    max_previews: int = 16,
) -> list[Path]:
    """Synthesise ``per_map`` cases on every label map of ``src``; returns the sidecar path of each case.

    Args:
        src: flat folder of integer label-map NIfTI files (never modified). Every map is
            validated (:func:`read_label_map`) before anything is written.
        out: new or empty folder, not inside ``src``; written via a temporary folder beside it
            renamed onto it at the end (an error leaves nothing behind).
        per_map: cases per label map (case k seeded with :func:`from_labels_seed`).
        seed: master seed.
        mapping: optional ``{class: tissue id}`` (see :func:`load_label_mapping`); without it
            no oedema is painted (see the module docstring).
        lesion_cfg, appearance_cfg: randomisation ranges (defaults; the appearance config's
            intensity rules are ignored, only its artefact ranges are used).
        layout: ``brats`` or ``nnunet`` (sidecars in ``out/params/``).
        preview: also write PNG mosaics (``out/preview/<case>.png``) of the first ``max_previews`` cases.
    """
    from tqdm.auto import tqdm

    from menseg.synth.writer import DatasetWriter

    lesion_cfg = lesion_cfg if lesion_cfg is not None else LesionConfig()
    if layout not in ("brats", "nnunet"):
        raise MensegError(f"unknown layout '{layout}' for label-map synthesis (use brats or nnunet)")
    if per_map < 1:
        raise MensegError(f"cases per label map must be >= 1, got {per_map}")
    src, out = Path(src), Path(out)
    root = src.absolute()
    if out.resolve().is_relative_to(src.resolve()):
        raise MensegError("output folder must not be inside the label-map folder", out)
    maps = find_label_maps(src)
    for p in maps:  # validate every map first
        read_label_map(p)
    ids = _output_ids(maps, per_map)
    mapping = dict(mapping or {})
    if mapping and T.WM not in mapping.values():
        log.warning("label mapping names no 'wm' class: no oedema (SNFH) will be painted")
    elif not mapping:
        log.info("no label mapping: every class gets a random intensity; no oedema (SNFH) is painted")
    log.info("synthesising %d case(s) on each of %d label map(s) of %s", per_map, len(maps), src)
    sidecars: list[Path] = []
    n_previews = 0
    with DatasetWriter(out, layout) as w, tqdm(total=len(maps) * per_map, desc="synth (labels)",
                                               unit="case", disable=None) as bar:
        for path, row in zip(maps, ids, strict=True):
            data, affine, header = read_label_map(path)
            stem = map_stem(path)
            source = file_entry(path, root)
            affines = {m: affine for m in (*MODALITIES, SEG_SUFFIX)}
            likes: dict[str, Any] = {m: header for m in (*MODALITIES, SEG_SUFFIX)}
            for k, cid in enumerate(row):
                s = from_labels_seed(seed, stem, k)
                case = synth_on_label_map(data, affine, s, mapping, lesion_cfg, appearance_cfg,
                                          where=path)
                side = {
                    "menseg_from_labels_sidecar": FROM_LABELS_SIDECAR_VERSION,
                    "kind": KIND,
                    "case_id": cid,
                    "source": {"root": str(root), **source},
                    "seed": int(seed),
                    "k": k,
                    "case_seed": s,
                    "shape": list(data.shape),
                    "affine": affine.tolist(),
                    "spacing": list(spacing_of(affine)),
                    "mapping": {str(c): T.TISSUE_NAMES[t] for c, t in sorted(mapping.items())},
                    "classes": case.classes,
                    "lesion_config": to_plain(lesion_cfg),
                    "lesion": to_plain(case.lesion),
                    "appearance": to_plain(case.appearance),
                    "torch": torch.__version__,
                }
                sidecars.append(w.write_arrays(cid, case.image, case.label, affines, likes, side))
                if preview and n_previews < max_previews:
                    _preview(w, cid, stem, case)
                    n_previews += 1
                log.debug("%s <- %s k=%d: %s", cid, path.name, k,
                          ", ".join(f"{x.shape} {x.volume_cm3:.1f} cm3" for x in case.lesion.lesions))
                bar.update(1)
    final = Path(out)
    return [final / p for p in w.relative(sidecars)]


# ----------------------------------------------------------------------------- replay


def load_from_labels_sidecar(path: str | Path) -> dict[str, Any]:
    """Read and sanity-check a sidecar of :func:`from_labels_dataset`."""
    from menseg.synth.writer import read_sidecar_of_kind

    required = ("source", "case_seed", "lesion", "appearance", "lesion_config", "mapping")
    return read_sidecar_of_kind(path, KIND, required, "a label-map synthesis")


def replay_from_labels(
    sidecar: str | Path | dict[str, Any],
    src: str | Path | None = None,
    check_source: bool = True,
) -> LabelMapCase:
    """Re-create a case bit-exactly from its sidecar (path or loaded dict).

    The label map is read from ``src`` (the label-map folder, when it has moved; the file by
    its recorded relative path) or else from its recorded absolute path; with ``check_source``
    its SHA-256 must match. The stored lesion and appearance params are re-applied (no re-draw),
    so an edited sidecar renders the edited case.
    """
    side = load_from_labels_sidecar(sidecar) if not isinstance(sidecar, dict) else sidecar
    where = sidecar if not isinstance(sidecar, dict) else None
    entry = side["source"]
    p = Path(src) / entry["relative"] if src is not None else Path(entry["path"])
    if not p.is_file():
        raise MensegError("label map of the synthetic case not found", p)
    if check_source and sha256_file(p) != entry["sha256"]:
        raise MensegError("label map changed since the synthesis (SHA-256 differs)", p)
    data, affine, _ = read_label_map(p)
    if list(data.shape) != list(side["shape"]):
        raise MensegError(f"label map shape {data.shape} != recorded {side['shape']}", where)
    mapping = parse_label_mapping(side["mapping"], where)
    return synth_on_label_map(
        data, affine, int(side["case_seed"]), mapping,
        lesion_cfg=from_dict(LesionConfig, side["lesion_config"]),
        lesion_params=from_dict(LesionParams, side["lesion"]),
        appearance_params=from_dict(AppearanceParams, side["appearance"]),
        where=p,
    )


__all__ = [
    "FROM_LABELS_SIDECAR_VERSION",
    "KIND",
    "MAPPABLE",
    "LabelMapCase",
    "find_label_maps",
    "from_labels_dataset",
    "from_labels_seed",
    "load_from_labels_sidecar",
    "load_label_mapping",
    "map_stem",
    "parse_label_mapping",
    "read_label_map",
    "replay_from_labels",
    "synth_on_label_map",
]
