"""Inject synthetic meningiomas into a user's own scans, as a dataset operation (issue 4, point 1b).

::

    sidecars = inject_dataset("my_scans/", "my_scans_inj/", per_scan=2, seed=0)
    case = replay_injection(sidecars[0])      # bit-exact re-creation from the sidecar

Every case of ``src`` (BraTS or nnU-Net layout, labelled or not) gives ``per_scan``
variants. Variant ``k`` of case ``c`` draws its lesion from a CPU ``torch.Generator``
seeded with ``derive_seed(seed, "inject", c, k)``, so variants are independent of each
other and of the rest of the dataset. The scan is processed in the file's own voxel grid
(spacing from the affine, any orientation) by :func:`inject_into_image`;
each modality is written back float32 with its source file's affine and header, the label
uint8 with the t1c file's. An existing label is kept where it is (the new lesion is placed
away from it and the mass effect does not move it); the new lesion's labels are added.

Output case ids are ``<source id>-inj<k>`` (valid for both layouts), or with ``prefix``
BraTS-style ``<prefix>-<nnnnn>-000``. Each case has a JSON sidecar (``-params.json``, see
:mod:`menseg.synth.writer` for where) with the source case id, root and files (with
SHA-256), seed, k and the sampled :class:`InjectionParams`;
:func:`replay_injection` re-renders the case from it bit-exactly (same torch version, CPU).

One scan (:func:`inject_into_image`, torch): pseudo tissues are estimated from the skull-stripped
scan (1-D 3-means on t1n inside the brain mask: CSF < GM < WM; the dura is the mask's rim; voxels of
an existing label are :data:`~menseg.synth.lesion.EXISTING`), the lesion machinery of
:mod:`menseg.synth.lesion` places and grows one meningioma on that map, the scan is warped by its
mass effect, and lesion intensities derived from the scan's own tissue statistics are painted and
blended at the edges (partial volume).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from menseg.constants import MODALITIES, SEG_SUFFIX
from menseg.data.layouts import CaseFiles, discover_cases
from menseg.data.preprocess import load_case
from menseg.data.validate import spacing_of
from menseg.draws import draw_seed
from menseg.errors import MensegError
from menseg.filters import binomial_pass
from menseg.kmeans import kmeans_1d
from menseg.synth import tissues as T
from menseg.synth.lesion import (
    EXISTING,
    LesionConfig,
    LesionParams,
    Vec3,
    apply_lesions,
    dilate6,
    sample_lesion_params,
    smooth_noise,
    u32,
)
from menseg.synth.serial import from_dict, to_plain
from menseg.utils import derive_seed, sha256_file

log = logging.getLogger(__name__)

#: Version of the injection sidecar format (bump when its keys change).
INJECT_SIDECAR_VERSION = 1
#: Value of the sidecar's ``kind`` key.
KIND = "injection"


# ----------------------------------------------------------------------------- one scan
@dataclass(frozen=True)
class InjectionParams:
    """Sampled injection: the lesion params on the scan's grid plus per-sequence intensity draws.

    contrast: per sequence (MODALITIES order) the drawn relative factors used in
    :func:`_lesion_intensities`; texture_seed seeds the tumour texture.
    """

    lesion: LesionParams
    contrast: tuple[tuple[float, ...], ...]
    texture_seed: int


@dataclass
class _ScanStats:
    wm: torch.Tensor  # (4,) mean per sequence
    gm: torch.Tensor
    csf: torch.Tensor
    sd: torch.Tensor  # (4,) WM std per sequence (texture / noise level)
    span: torch.Tensor  # (4,) robust intensity span (q99 - q01) in the brain


def _pseudo_tissue(image: torch.Tensor, label: torch.Tensor | None) -> tuple[torch.Tensor, _ScanStats]:
    """Tissue map estimated from a skull-stripped scan: 3-means on t1n (CSF < GM < WM), dura = mask rim."""
    brain = (image != 0).any(0)
    t1n = image[1]
    vals = t1n[brain]
    step = max(1, vals.numel() // 200_000)
    c = kmeans_1d(vals[::step].float(), 3, 12, quantiles=(0.1, 0.5, 0.9), until_settled=False)
    b1, b2 = (c[0] + c[1]) / 2, (c[1] + c[2]) / 2
    tissue = torch.full(t1n.shape, T.BACKGROUND, dtype=torch.int64, device=image.device)
    tissue[brain & (t1n < b1)] = T.CSF
    tissue[brain & (t1n >= b1) & (t1n < b2)] = T.GM
    tissue[brain & (t1n >= b2)] = T.WM
    tissue[brain & dilate6(~brain)] = T.DURA
    if label is not None:
        tissue[label > 0] = EXISTING
    stats = []
    for cls in (T.WM, T.GM, T.CSF):
        m = tissue == cls
        stats.append(torch.stack([image[k][m].mean() if bool(m.any()) else image[k][brain].mean()
                                  for k in range(image.shape[0])]))
    m = tissue == T.WM
    sd = torch.stack([image[k][m].std() if int(m.sum()) > 1 else torch.tensor(0.0)
                      for k in range(image.shape[0])])
    q = []
    for k in range(image.shape[0]):
        v = image[k][brain][::step].float()
        lo_hi = torch.quantile(v, torch.tensor([0.01, 0.99]))
        q.append(lo_hi[1] - lo_hi[0])
    return tissue, _ScanStats(stats[0], stats[1], stats[2], sd, torch.stack(q))


def sample_injection_params(gen: torch.Generator, cfg: LesionConfig, tissue: torch.Tensor,
                            spacing: Vec3, margin_mm: float = 8.0) -> InjectionParams:
    """One lesion seeded on the scan's brain rim, >= ``margin_mm`` away from the existing label."""

    @dataclass
    class _A:
        tissue: torch.Tensor
        regions: dict[str, torch.Tensor]
        brain_mask: torch.Tensor

    k = [max(1, math.ceil(margin_mm / s)) for s in spacing]
    near = _box_dilate(tissue == EXISTING, k)
    rim = (tissue == T.DURA) & ~near
    if not bool(rim.any()):
        raise ValueError("no free brain rim left to place a lesion on")
    brain = (tissue != T.BACKGROUND) & (tissue != T.DURA)
    one = LesionConfig(**{**cfg.__dict__, "multiple_prob": 0.0})
    lp = sample_lesion_params(gen, one, _A(tissue, {"dura": rim}, brain), spacing)
    contrast = (
        (u32(gen, 0.3, 0.8), u32(gen, 1.0, 1.2)),  # t1c: ET above max(WM, GM) by x span; tail x ET
        (u32(gen, 0.85, 1.0),),  # t1n: tumour iso/hypo vs GM (FACTS §2: iso 60-90%, hypo 10-40%)
        (u32(gen, 0.95, 1.25), u32(gen, 0.3, 0.7)),  # t2f: tumour iso/mildly hyper vs GM; oedema +span
        (u32(gen, 0.9, 1.3), u32(gen, 0.4, 0.8)),  # t2w: tumour iso (~50%)/hyper (35-40%); oedema->CSF
    )
    return InjectionParams(lesion=lp, contrast=contrast, texture_seed=draw_seed(gen))


def _lesion_intensities(st: _ScanStats, ip: InjectionParams) -> dict[int, torch.Tensor]:
    """(4,) target intensity per painted tissue class (MODALITIES order t1c, t1n, t2f, t2w)."""
    (e, tail_f), (t1n_f,), (flair_f, oed_f), (t2_f, oed2_f) = ip.contrast
    wm, gm, csf, span = st.wm, st.gm, st.csf, st.span
    et = torch.stack([torch.maximum(wm[0], gm[0]) + e * span[0], gm[1] * t1n_f, gm[2] * flair_f,
                      gm[3] * t2_f])
    oed = torch.stack([wm[0] * 0.9, wm[1] * 0.9, wm[2] + oed_f * span[2], wm[3] + oed2_f * (csf[3] - wm[3])])
    cyst = torch.stack([csf[0], csf[1], (csf[2] + gm[2]) / 2, csf[3]])
    necrosis = torch.stack([gm[0] * 0.75, gm[1] * 0.8, gm[2] * 1.1, (gm[3] + csf[3]) / 2])
    calc = torch.stack([wm[0] * 0.4, wm[1] * 0.4, wm[2] * 0.4, wm[3] * 0.4])  # T1/T2 hypointense (FACTS §1)
    tail = torch.stack([et[0] * tail_f, gm[1], gm[2], gm[3]])  # tail enhances >= tumour (Goldsher)
    return {T.TUMOUR: et, T.OEDEMA: oed, T.CYST: cyst, T.NECROSIS: necrosis, T.CALCIFICATION: calc,
            T.DURAL_TAIL: tail}


def _box_dilate(mask: torch.Tensor, half: list[int]) -> torch.Tensor:
    """Dilation of a (X, Y, Z) bool mask by a box of half-widths ``half`` voxels (separable max pool).

    Same result as one ``max_pool3d`` with the full box kernel, ~30x faster on CPU at 1 mm.
    """
    x = mask.float()[None, None]
    for d in range(3):
        ks, pad = [1, 1, 1], [0, 0, 0]
        ks[d], pad[d] = 2 * half[d] + 1, half[d]
        x = F.max_pool3d(x, ks, 1, pad)
    return x[0, 0] > 0


def _blur3(x: torch.Tensor) -> torch.Tensor:
    """Separable [1/4, 1/2, 1/4] blur of (C, X, Y, Z) (partial-volume edges), zero padded."""
    for d in range(1, 4):
        # binomial_pass leaves a 1-voxel axis as it is; zero padding (this blur's rule) halves it
        x = binomial_pass(x, 0.25, d) if x.shape[d] > 1 else 0.5 * x
    return x


def inject_into_image(
    image: torch.Tensor,
    label: torch.Tensor | None,
    gen: torch.Generator,
    cfg: LesionConfig,
    spacing: Vec3 = (1.0, 1.0, 1.0),
    params: InjectionParams | None = None,
    return_influence: bool = False,
) -> tuple[Any, ...]:
    """Inject one meningioma into a real skull-stripped scan.

    image: (4, X, Y, Z) float32 in MODALITIES order (t1c, t1n, t2f, t2w), background 0;
    label: (X, Y, Z) uint8 BraTS-MEN or None; spacing in mm. Pseudo tissues come from 3-means on
    t1n inside the brain (non-zero) mask, the dura is the mask's rim. The lesion is placed on the
    rim away from the existing label, the scan is warped by the mass effect (trilinear, label
    nearest), lesion intensities are derived per sequence from the scan's own WM/GM/CSF means and
    blended at the edges (partial volume). Voxels outside the influence region (lesion classes
    dilated by one voxel for blending, plus mass-effect support) are bit-identical to the input.

    Returns ``(image, label, params)`` (+ ``influence`` (X, Y, Z) bool with ``return_influence``);
    replay with ``params=``.
    """
    if image.ndim != 4 or image.shape[0] != 4:
        raise ValueError(f"image must be (4, X, Y, Z), got {tuple(image.shape)}")
    image = image.float()
    tissue, st = _pseudo_tissue(image, label)
    if params is None:
        params = sample_injection_params(gen, cfg, tissue, spacing)
    res = apply_lesions(tissue, params.lesion)
    brain = (image != 0).any(0)
    out = image.clone()
    lab = (label.clone() if label is not None else torch.zeros(tissue.shape, dtype=torch.uint8,
                                                               device=image.device))
    influence = torch.zeros(tissue.shape, dtype=torch.bool, device=image.device)
    for (lo, hi), src, moved in zip(res.boxes, res.sources, res.moved, strict=True):
        sl = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        if bool(moved.any()):
            size = torch.tensor(tissue.shape, dtype=torch.float32, device=image.device)
            grid = (src / (size - 1).clamp_min(1)[:, None, None, None] * 2 - 1).flip(0).permute(1, 2, 3, 0)
            warped = F.grid_sample(image[None], grid[None], mode="bilinear", align_corners=True)[0]
            inside = F.grid_sample(brain.float()[None, None], grid[None], mode="bilinear",
                                   align_corners=True)[0, 0]
            csf = st.csf.to(image.device)[:, None, None, None].expand_as(warped)
            warped = torch.where(inside[None] >= 0.5, warped / inside.clamp_min(1e-3)[None], csf)
            r = src.round().long()
            lab_src = lab[r[0], r[1], r[2]]
            m = moved & brain[sl]
            if label is not None:  # an existing lesion stays where it is: not displaced, not copied
                m &= (lab[sl] == 0) & (lab_src == 0)
            out[(slice(None), *sl)] = torch.where(m[None], warped, out[(slice(None), *sl)])
            lab[sl] = torch.where(m, lab_src, lab[sl])
            influence[sl] |= m
    painted = (res.tissue != tissue) & torch.isin(res.tissue, torch.tensor(T.LESION, device=tissue.device))
    if bool(painted.any()):
        vals = _lesion_intensities(st, params)
        g = torch.Generator().manual_seed(params.texture_seed)
        noise = torch.randn(tuple(tissue.shape), generator=g).to(image.device)
        cells = tuple(max(2, math.ceil(n * s / 15.0)) for n, s in zip(tissue.shape, spacing, strict=True))
        low = smooth_noise(tuple(tissue.shape), cells, params.texture_seed + 1, image.device)
        les_img = torch.zeros_like(out)
        for cls, v in vals.items():
            m = res.tissue == cls
            if not bool(m.any()):
                continue
            tex = v[:, None] * (1 + 0.08 * low[m])[None] + 0.5 * st.sd[:, None] * noise[m][None]
            if cls == T.OEDEMA:  # keep the scan's texture, shift its level (vasogenic oedema in WM)
                tex = out[:, m] * (v / st.wm.clamp_min(1e-6))[:, None]
            les_img[:, m] = tex
        # blur only in the painted box + 1 voxel: zero outside it, so equal to a full-volume blur
        idx = painted.nonzero()
        bl = [max(0, int(v) - 1) for v in idx.min(0).values]
        bh = [min(n, int(v) + 2) for v, n in zip(idx.max(0).values, tissue.shape, strict=True)]
        bs = tuple(slice(a, b) for a, b in zip(bl, bh, strict=True))
        pm = painted[bs].float()[None]
        num = _blur3(les_img[(slice(None), *bs)] * pm)
        den = _blur3(pm)
        keep = torch.zeros_like(painted)
        keep[bs] = (painted[bs] | (den[0] > 0)) & brain[bs]
        blended = out[(slice(None), *bs)] * (1 - den) + num
        out[(slice(None), *bs)] = torch.where(keep[bs][None], blended, out[(slice(None), *bs)])
        influence |= keep
        healthy = torch.where(res.tissue >= T.N_TISSUES, torch.zeros_like(res.tissue), res.tissue)
        new_lab = T.tissue_to_label(healthy)
        lab = torch.where(painted, new_lab, lab)
    out = torch.where(brain[None], out, image)
    if return_influence:
        return out, lab, params, influence
    return out, lab, params


# ----------------------------------------------------------------------------- arrays and datasets


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
        res = inject_into_image(img_t, lab_t, gen, cfg, spacing, params=params,
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
    "InjectionParams",
    "file_entry",
    "inject_arrays",
    "inject_dataset",
    "inject_into_image",
    "injection_seed",
    "load_injection_sidecar",
    "replay_injection",
    "sample_injection_params",
    "sha256_file",
]
