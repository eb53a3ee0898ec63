"""Inject synthetic meningiomas into a user's own scans, as a dataset operation (issue 4, point 1b).

::

    sidecars = inject_dataset("my_scans/", "my_scans_inj/", per_scan=2, seed=0)
    case = replay_injection(sidecars[0])      # bit-exact re-creation from the sidecar

Every case of ``src`` (BraTS or nnU-Net layout, labelled or not) gives ``per_scan``
variants. Variant ``k`` of case ``c`` draws its lesion from a CPU ``torch.Generator``
seeded with ``derive_seed(seed, "inject", c, k)``, so variants are independent of each
other and of the rest of the dataset. The scan is processed in the file's own voxel grid
(spacing from the affine, any orientation) by :func:`menseg.synth.lesion.inject_into_image`;
each modality is written back float32 with its source file's affine and header, the label
uint8 with the t1c file's. An existing label is kept where it is (the new lesion is placed
away from it and the mass effect does not move it); the new lesion's labels are added.

Output case ids are ``<source id>-inj<k>`` (valid for both layouts), or with ``prefix``
BraTS-style ``<prefix>-<nnnnn>-000``. Each case has a JSON sidecar (``-params.json``, see
:mod:`menseg.synth.writer` for where) with the source case id, root and files (with
SHA-256), seed, k and the sampled :class:`~menseg.synth.lesion.InjectionParams`;
:func:`replay_injection` re-renders the case from it bit-exactly (same torch version, CPU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch

from menseg.constants import MODALITIES, SEG_SUFFIX
from menseg.data.layouts import CaseFiles, discover_cases
from menseg.data.preprocess import load_case
from menseg.data.validate import spacing_of
from menseg.errors import MensegError
from menseg.synth import lesion as _lesion
from menseg.synth.lesion import InjectionParams, LesionConfig
from menseg.synth.serial import from_dict, to_plain
from menseg.utils import derive_seed, sha256_file

log = logging.getLogger(__name__)

#: Version of the injection sidecar format (bump when its keys change).
INJECT_SIDECAR_VERSION = 1
#: Value of the sidecar's ``kind`` key.
KIND = "injection"


@dataclass
class InjectedCase:
    """One injected scan, in the source file's grid.

    Attributes:
        image: ``(4, X, Y, Z)`` float32, MODALITIES order.
        label: ``(X, Y, Z)`` uint8 BraTS-MEN labels (source label + new lesion).
        affine: ``(4, 4)`` voxel -> mm of the t1c file.
        params: the injection that was applied.
        influence: ``(X, Y, Z)`` bool, voxels that may differ from the source (None unless asked).
        source_label: ``(X, Y, Z)`` uint8 label of the source (zeros when unlabelled).
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    params: InjectionParams
    source_label: np.ndarray
    influence: np.ndarray | None = None


def injection_seed(seed: int, case_id: str, k: int) -> int:
    """Seed of variant ``k`` of source case ``case_id``: ``derive_seed(seed, "inject", case_id, k)``."""
    return derive_seed(int(seed), "inject", case_id, int(k))


def file_entry(path: Path, root: Path) -> dict[str, str]:
    """Absolute path (symlinks kept), path relative to the dataset root, and SHA-256 of a source file."""
    p = path.absolute()
    try:
        rel = p.relative_to(root).as_posix()
    except ValueError:
        rel = p.name
    return {"path": str(p), "relative": rel, "sha256": sha256_file(p)}


def _to_device(device: str | torch.device) -> torch.device:
    """``auto``/``cpu`` -> CPU. Injection is CPU-only for now (its GPU path is untested)."""
    if str(device).lower() in ("auto", "cpu"):
        return torch.device("cpu")
    raise MensegError(f"injection runs on the CPU only (got device '{device}'); use cpu or auto")


def inject_arrays(
    image: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    cfg: LesionConfig,
    seed: int,
    params: InjectionParams | None = None,
    return_influence: bool = False,
) -> InjectedCase:
    """Inject one lesion into ``image`` ``(4, X, Y, Z)`` (label ``(X, Y, Z)`` or None) in its own grid.

    ``seed`` seeds the CPU generator the lesion is drawn from; with ``params`` given the
    stored injection is re-applied instead (no draw). Spacing comes from ``affine``.
    """
    img_t = torch.from_numpy(np.ascontiguousarray(image, np.float32))
    lab_np = (np.zeros(image.shape[1:], np.uint8) if label is None
              else np.ascontiguousarray(label, np.uint8))
    lab_t = None if label is None else torch.from_numpy(lab_np)
    spacing = spacing_of(affine)
    gen = torch.Generator().manual_seed(int(seed))
    try:
        res = _lesion.inject_into_image(img_t, lab_t, gen, cfg, spacing, params=params,
                                        return_influence=return_influence)
    except ValueError as e:  # e.g. no free brain rim left
        raise MensegError(f"cannot inject a lesion: {e}") from None
    out, lab, ip = res[0], res[1], res[2]
    infl = res[3].numpy() if return_influence else None
    return InjectedCase(image=out.numpy().astype(np.float32, copy=False), label=lab.numpy().astype(np.uint8),
                        affine=np.asarray(affine, np.float64), params=ip, source_label=lab_np,
                        influence=infl)


def _output_ids(cases: list[CaseFiles], per_scan: int, prefix: str | None) -> list[list[str]]:
    ids = [[f"{c.case_id}-inj{k}" if prefix is None else f"{prefix}-{i * per_scan + k:05d}-000"
            for k in range(per_scan)] for i, c in enumerate(cases)]
    flat = [x for row in ids for x in row]
    if len(set(flat)) != len(flat):
        dup = sorted({x for x in flat if flat.count(x) > 1})[0]
        raise MensegError(f"output case id '{dup}' would be written twice; use prefix= to renumber")
    return ids


def _preview(w: Any, cid: str, src_id: str, case: InjectedCase) -> None:
    """PNG of the injected case in RAS display orientation, centred on (and showing) the new lesion."""
    from menseg.synth.preview import write_preview_ras

    new = np.where(case.label != case.source_label, case.label, 0).astype(np.uint8)
    write_preview_ras(w.tmp / "preview" / f"{cid}.png", case.image, new, case.affine,
                      title=f"{cid} (from {src_id}; new lesion)")


def inject_dataset(
    src: str | Path,
    out: str | Path,
    per_scan: int = 1,
    seed: int = 0,
    cfg: LesionConfig | None = None,
    layout: Literal["brats", "nnunet"] = "brats",
    preview: bool = False,
    device: str | torch.device = "cpu",
    prefix: str | None = None,
    max_previews: int = 16,
) -> list[Path]:
    """Inject synthetic meningiomas into every case of ``src``; returns the sidecar path of each case written.

    Args:
        src: dataset folder (BraTS or nnU-Net layout; labels optional). Never modified.
        out: new or empty folder, not inside ``src``; written via a temporary folder beside it
            that is renamed onto it at the end, so an error leaves nothing behind.
        per_scan: injected variants per source case (variant k seeded with
            :func:`injection_seed` ``(seed, case_id, k)``).
        seed: master seed.
        cfg: lesion randomisation (default :class:`LesionConfig`; one lesion per variant).
        layout: ``brats`` or ``nnunet`` (sidecars in ``out/params/``).
        preview: also write PNG mosaics (``out/preview/<case>.png``) of the first
            ``max_previews`` cases, centred on the new lesion.
        device: ``cpu`` (or ``auto``, which means CPU here).
        prefix: None -> case ids ``<source id>-inj<k>``; else ``<prefix>-<nnnnn>-000``.
    """
    from tqdm.auto import tqdm

    from menseg.synth.writer import DatasetWriter

    _to_device(device)
    cfg = cfg if cfg is not None else LesionConfig()
    if layout not in ("brats", "nnunet"):
        raise MensegError(f"unknown layout '{layout}' for injection (use brats or nnunet)")
    if per_scan < 1:
        raise MensegError(f"variants per scan must be >= 1, got {per_scan}")
    src, out = Path(src), Path(out)
    root = src.absolute()
    if out.resolve().is_relative_to(src.resolve()):
        raise MensegError("output folder must not be inside the source dataset", out)
    cases = discover_cases(src)
    ids = _output_ids(cases, per_scan, prefix)
    log.info("injecting %d variant(s) into each of %d case(s) of %s", per_scan, len(cases), src)
    sidecars: list[Path] = []
    n_previews = 0
    with DatasetWriter(out, layout) as w, tqdm(total=len(cases) * per_scan, desc="inject",
                                               unit="case", disable=None) as bar:
        for case, row in zip(cases, ids, strict=True):
            image, label, affine = load_case(case)
            files = {m: file_entry(case.images[m], root) for m in MODALITIES}
            files[SEG_SUFFIX] = None if case.label is None else file_entry(case.label, root)  # type: ignore[assignment]
            heads = {m: nib.load(case.images[m]) for m in MODALITIES}
            affines = {m: np.asarray(h.affine, np.float64) for m, h in heads.items()}
            likes: dict[str, Any] = {m: h.header for m, h in heads.items()}
            affines[SEG_SUFFIX], likes[SEG_SUFFIX] = affines[MODALITIES[0]], likes[MODALITIES[0]]
            for k, cid in enumerate(row):
                s = injection_seed(seed, case.case_id, k)
                res = inject_arrays(image, label, affine, cfg, s)
                side = {
                    "menseg_inject_sidecar": INJECT_SIDECAR_VERSION,
                    "kind": KIND,
                    "case_id": cid,
                    "source": {"root": str(root), "case_id": case.case_id, "files": files},
                    "seed": int(seed),
                    "k": k,
                    "case_seed": s,
                    "shape": list(image.shape[1:]),
                    "affine": np.asarray(affine, np.float64).tolist(),
                    "spacing": list(spacing_of(affine)),
                    "lesion_config": to_plain(cfg),
                    "injection": to_plain(res.params),
                    "torch": torch.__version__,
                }
                sidecars.append(w.write_arrays(cid, res.image, res.label, affines, likes, side))
                if preview and n_previews < max_previews:
                    _preview(w, cid, case.case_id, res)
                    n_previews += 1
                les = res.params.lesion.lesions
                log.debug("%s <- %s k=%d: %s", cid, case.case_id, k,
                          ", ".join(f"{x.shape} {x.volume_cm3:.1f} cm3" for x in les))
                bar.update(1)
    final = Path(out)
    return [final / p for p in w.relative(sidecars)]


def load_injection_sidecar(path: str | Path) -> dict[str, Any]:
    """Read and sanity-check an injection sidecar (``<case>-params.json`` of :func:`inject_dataset`)."""
    from menseg.synth.writer import read_sidecar_of_kind

    return read_sidecar_of_kind(path, KIND, ("source", "case_seed", "injection", "lesion_config"),
                                "an injection")


def replay_injection(
    sidecar: str | Path | dict[str, Any],
    src: str | Path | None = None,
    return_influence: bool = False,
    check_source: bool = True,
) -> InjectedCase:
    """Re-create an injected case bit-exactly from its sidecar (path or loaded dict).

    The source files are read from ``src`` (the source dataset root, when it has moved;
    files by their path relative to it) or else from their recorded absolute paths; with
    ``check_source`` their SHA-256 must match the recorded one. The stored
    :class:`InjectionParams` are re-applied (no re-draw), so an edited sidecar renders
    the edited injection.
    """
    side = load_injection_sidecar(sidecar) if not isinstance(sidecar, dict) else sidecar
    where = sidecar if not isinstance(sidecar, dict) else None
    files = side["source"]["files"]

    def locate(entry: dict[str, str]) -> Path:
        p = Path(src) / entry["relative"] if src is not None else Path(entry["path"])
        if not p.is_file():
            raise MensegError("source file of the injected case not found", p)
        if check_source and sha256_file(p) != entry["sha256"]:
            raise MensegError("source file changed since the injection (SHA-256 differs)", p)
        return p

    seg = files.get(SEG_SUFFIX)
    case = CaseFiles(side["source"]["case_id"], {m: locate(files[m]) for m in MODALITIES},
                     None if seg is None else locate(seg))
    image, label, affine = load_case(case)
    if list(image.shape[1:]) != list(side["shape"]):
        raise MensegError(f"source shape {image.shape[1:]} != recorded {side['shape']}", where)
    cfg = from_dict(LesionConfig, side["lesion_config"])
    params = from_dict(InjectionParams, side["injection"])
    return inject_arrays(image, label, affine, cfg, int(side["case_seed"]), params=params,
                         return_influence=return_influence)


__all__ = [
    "INJECT_SIDECAR_VERSION",
    "InjectedCase",
    "file_entry",
    "inject_arrays",
    "inject_dataset",
    "injection_seed",
    "load_injection_sidecar",
    "replay_injection",
    "sha256_file",
]
