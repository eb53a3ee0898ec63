"""``menseg predict MODEL INPUT OUTPUT``: label maps in each input's own space.

For every case: read and validate the four modalities, preprocess them exactly
as the model's training data (reorient to RAS+, crop to the brain, resample to
the stored ``data.spacing``, z-score), predict region probabilities by
sliding-window inference (optionally mirrored), map the probabilities back onto
the input grid (trilinear, exact inverse geometry), threshold them into a
BraTS-MEN label map, remove tiny components, and write ``<case_id>.nii.gz``
(uint8) with the t1c file's affine and header, so shape, affine and
orientation equal the input's. Inputs are never written to; existing outputs
are refused unless ``overwrite``. All outputs are checked before any work is
done, so a refused run writes nothing.

ISM models (:class:`menseg.ism.model.ISMNet`):

- missing sequences: a case may lack some of the four sequences; a model trained with
  modal fusion (``ism.modal``) segments it from the ones present (they are logged per case);
  any other model refuses such cases before any work is done;
- earlier visit: with ``prior`` (one earlier visit of the one case being predicted) and
  ``gap_days``, the prior is preprocessed the same way, rigidly registered onto the current
  case's preprocessed grid and fused by the model's temporal fusion (``ism.temporal``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from tqdm.auto import tqdm

from menseg.checkpoint import load_model_and_state
from menseg.config import Config
from menseg.constants import MODALITIES
from menseg.data.io import nifti_ending, write_label
from menseg.data.layouts import CaseFiles, discover_inputs
from menseg.data.preprocess import invert, load_case, preprocess, present_mask
from menseg.data.validate import orientation_of, spacing_of
from menseg.errors import MensegError
from menseg.infer.postprocess import apply_learned, regions_to_labels, remove_small_components
from menseg.infer.sliding import PRECISIONS, predict_probs, resolve_device, resolve_precision
from menseg.models import resolve_model
from menseg.utils import write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

#: Ending of written label files.
LABEL_ENDING = ".nii.gz"

InputSpec = str | os.PathLike | Sequence[str | os.PathLike] | Sequence[CaseFiles]


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def output_paths(cases: Sequence[CaseFiles], output: str | Path) -> list[Path]:
    """Where each case's label goes.

    ``output`` ending in ``.nii.gz`` / ``.nii`` is a file path (only for one case);
    anything else is a folder receiving ``<case_id>.nii.gz`` per case.
    """
    out = Path(output)
    if nifti_ending(out):
        if len(cases) != 1:
            raise MensegError(
                f"output is a single file but the input holds {len(cases)} cases; "
                "give a folder instead",
                out,
            )
        if out.is_dir():
            raise MensegError("output file name is an existing folder", out)
        return [out]
    if out.exists() and not out.is_dir():
        raise MensegError("output must be a folder (or a .nii.gz path for one case)", out)
    paths = [out / f"{c.case_id}{LABEL_ENDING}" for c in cases]
    seen: dict[Path, str] = {}
    for c, p in zip(cases, paths, strict=True):
        if p in seen:
            raise MensegError(f"two input cases share the id '{c.case_id}'; outputs would collide", p)
        seen[p] = c.case_id
    return paths


def check_outputs(
    cases: Sequence[CaseFiles], outputs: Sequence[Path], protected: Sequence[Path], overwrite: bool
) -> list[bool]:
    """Refuse outputs that are input files (always); per output, whether it already exists and is
    kept (skipped: not ``overwrite``)."""
    inputs = [p for c in cases for p in c.files] + list(protected)
    for out in outputs:
        for inp in inputs:
            if _same_file(out, inp):
                raise MensegError(f"refusing to write onto input file {inp}", out)
    return [out.exists() and not overwrite for out in outputs]


def sidecar_path(label_path: str | Path) -> Path:
    """The JSON sidecar beside a predicted label: ``<case>.nii.gz`` -> ``<case>.json``."""
    label_path = Path(label_path)
    ending = nifti_ending(label_path) or ""
    return label_path.with_name(label_path.name[: len(label_path.name) - len(ending)] + ".json")


def _sidecar(model_ref: str, case: CaseFiles, rules: Any, cfg: Config, ignored: Sequence[str] = ()
             ) -> dict[str, Any]:
    """What a label was predicted from (written beside it)."""
    from menseg import __version__

    return {
        "model": model_ref,
        "sequences_used": list(case.present),
        "sequences_missing": [m for m in case.missing if m not in ignored],
        "sequences_ignored": list(ignored),
        "postprocess": ({"learned": rules} if rules
                        else {"fixed": {"min_component_mm3": cfg.infer.min_component_mm3}}),
        "menseg_version": __version__,
    }


#: The columns of ``OUT/errors.csv`` (``predict --keep-going``).
ERROR_COLUMNS: tuple[str, ...] = ("case_id", "error")


def predict_case(
    model: torch.nn.Module,
    cfg: Config,
    case: CaseFiles,
    device: torch.device,
    mirror: bool | None = None,
    *,
    prior: CaseFiles | None = None,
    gap_days: float | None = None,
    rules: Mapping[str, Mapping[str, Any]] | None = None,
    raw: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Predict one case; returns ``(label (X, Y, Z) uint8, affine 4x4)`` in the input's grid.

    ``rules``: learned post-processing (:func:`menseg.infer.postprocess.learn_postprocess`) applied
    instead of ``infer.min_component_mm3``; ``raw``: no post-processing at all (see
    :func:`postprocess_label`).

    The grid is the reference file's (t1c, or the first sequence present; shape and voxel
    order as read); ``cfg`` supplies the training spacing (``data.spacing``), patch
    (``train.patch_size``) and inference settings (``infer``). ``prior``/``gap_days``: an
    earlier visit and the days since it (temporal-fusion models only).
    """
    from menseg.ism.model import ISMNet

    # The label (if the case has one) is not needed to predict: don't read it.
    image, _, affine = load_case(dataclasses.replace(case, label=None))
    present = present_mask(case)
    image_pp, _, props = preprocess(image, None, affine, cfg.data.spacing, present=present, name=case.case_id)
    del image
    x = torch.from_numpy(image_pp)
    if prior is not None:
        from menseg.ism.visits import prepare_prior

        shared = [i for i, m in enumerate(MODALITIES) if present[i] and m in prior.images]
        if not shared:
            raise MensegError(f"the prior visit '{prior.case_id}' ({', '.join(prior.present)}) shares no "
                              f"sequence with case '{case.case_id}' ({', '.join(case.present)}) to register "
                              "on")
        prior_pp, tf = prepare_prior(image_pp, {**props, "case_id": case.case_id}, prior, cfg.data.spacing,
                                     seed=cfg.train.seed, channel=shared[0])
        log.info("%s: prior visit %s (%g days earlier) registered (rotation %.1f deg, shift %.1f mm)",
                 case.case_id, prior.case_id, gap_days, tf.rotation_angle_deg,
                 float(np.linalg.norm(tf.translation_mm)))
        x = torch.cat([x, torch.from_numpy(prior_pp)])
    ctx = (model.conditioned(present=present, gap_days=gap_days) if isinstance(model, ISMNet)
           else contextlib.nullcontext())
    with ctx:
        probs_pp = predict_probs(model, x, cfg.train.patch_size, cfg.infer, device, mirror=mirror)
    probs = invert(probs_pp.numpy(), props, order=1)  # (3, X, Y, Z) on the input grid
    del probs_pp, image_pp
    label = regions_to_labels(probs, cfg.infer.threshold)
    if raw:
        return label, affine
    return postprocess_label(label, affine, cfg, rules), affine


def postprocess_label(label: np.ndarray, affine: np.ndarray, cfg: Config,
                      rules: Mapping[str, Mapping[str, Any]] | None) -> np.ndarray:
    """The learned ``rules`` applied to a raw label map, or without them the fixed rule: components
    below ``infer.min_component_mm3`` removed."""
    if rules:
        return apply_learned(label, spacing_of(affine), rules)
    return remove_small_components(label, spacing_of(affine), cfg.infer.min_component_mm3)


def predict(
    model_path: str | Path | None,
    input: InputSpec,
    output: str | Path,
    device: str = "auto",
    mirror: bool | None = None,
    overwrite: bool = False,
    *,
    overlap: float | None = None,
    precision: str | None = None,
    progress: bool = True,
    prior: str | os.PathLike | Sequence[str | os.PathLike] | CaseFiles | None = None,
    gap_days: float | None = None,
    learned_postprocess: bool = True,
    fixed_output: str | Path | None = None,
    keep_going: bool = False,
    sequences: Sequence[str] | None = None,
) -> list[Path]:
    """Predict label maps for one case or a folder of cases.

    Args:
        model_path: checkpoint file, a run folder (:func:`~menseg.checkpoint.run_checkpoint`: its
            ``best.pt``, or ``latest.pt`` when the run validated nothing), a model name
            (:func:`menseg.models.resolve_model`, checksum checked), or None for the shipped model.
        input: a dataset folder (BraTS or nnU-Net layout), one BraTS case folder, a flat
            folder of nnU-Net channel files, or a list of four image files
            (see :func:`menseg.data.layouts.discover_inputs`), or a list of
            :class:`~menseg.data.layouts.CaseFiles`.
        output: folder receiving ``<case_id>.nii.gz`` per case (and ``<case_id>.json``: model,
            sequences used and missing, post-processing, menseg version), or, for one case, a
            file path ending ``.nii.gz``. A case whose label exists is skipped unless ``overwrite``.
        device: ``auto`` | ``cpu`` | ``cuda`` (``cuda`` without CUDA is a MensegError).
        mirror: test-time mirroring; None uses the model's stored ``infer.mirror``.
        overwrite: redo cases whose output exists (input files are never replaced); without it
            they are skipped.
        overlap: sliding-window overlap in [0, 1); None uses the model's ``infer.overlap``.
        precision: ``fp32`` | ``bf16``; None uses the model's ``infer.precision``.
        progress: show a progress bar over cases.
        prior: an earlier visit of the (single) input case: a case folder, its image files or
            a :class:`~menseg.data.layouts.CaseFiles`; needs a model with temporal fusion
            (``ism.temporal``) and ``gap_days``.
        gap_days: days from the prior visit to the input case (``>= 0``).
        learned_postprocess: apply the post-processing the run learned (``postprocess.learn``; stored
            in its final checkpoint) where the checkpoint has one; False, or a checkpoint without one,
            removes components below ``infer.min_component_mm3``.
        fixed_output: a folder that also receives every label with the fixed post-processing
            instead of the learned one, from the same network output (to measure what the learned
            rules do); written only when the model has learned rules (and they are applied).
        keep_going: a case that cannot be read or predicted is recorded (``OUT/errors.csv`` for a
            folder output: case id and its one-line error) and the others are predicted; at the
            end a MensegError says how many failed. Without it the first bad case raises, after the
            labels already written.
        sequences: predict from these sequences only (names of ``MODALITIES``), ignoring the others
            even where present (to compare); the model must accept a subset.

    Returns:
        Paths written, in case order. Each label is uint8 ``(X, Y, Z)`` with the same
        shape, affine and orientation as the case's t1c file.
    """
    dev = resolve_device(device)
    if overlap is not None and not 0.0 <= overlap < 1.0:
        raise MensegError(f"overlap must be in [0, 1), got {overlap}")
    if precision is not None and precision not in PRECISIONS:
        raise MensegError(f"precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")
    model_path, model_label = resolve_model(model_path)
    failed: list[tuple[str, str]] = []  # (case id or folder, one-line error)
    if isinstance(input, Sequence) and input and all(isinstance(c, CaseFiles) for c in input):
        cases = list(input)  # already discovered (e.g. a benchmark's test split)
    else:
        cases = discover_inputs(input, allow_missing=True,  # type: ignore[arg-type]
                                errors=failed if keep_going else None)
    if not cases and not failed:
        where = input if isinstance(input, str | os.PathLike) else None
        raise MensegError("no cases found to predict", where)
    every_input = [f for c in cases for f in c.files]  # ignored sequences are inputs too: never written
    ignored: dict[str, list[str]] = {}
    if sequences is not None:
        cases = _select_sequences(cases, sequences, ignored, failed if keep_going else None)
    prior_case = _prior_case(prior, gap_days, cases) if cases else None
    outputs = output_paths(cases, output) if cases else []
    protected = [model_path, *every_input, *(prior_case.files if prior_case else [])]
    existing = check_outputs(cases, outputs, protected, overwrite)
    errors_csv = None if nifti_ending(Path(output)) else Path(output) / "errors.csv"

    model, cfg, extras = load_model_and_state(model_path, dev)
    rules = (extras.get("postprocess") or {}).get("rules") if learned_postprocess else None
    companion = _load_companion(model_path, extras, dev, learned_postprocess) if any(
        c.missing for c in cases) else None
    if keep_going:  # cases the model cannot use become error rows, the rest is predicted
        usable = []
        for case, out, old in zip(cases, outputs, existing, strict=True):
            try:
                _check_model_fits(model, model_path, [case], prior_case, companion)
                usable.append((case, out, old))
            except MensegError as e:
                failed.append((case.case_id, _one_line(e)))
        todo = usable
    else:
        _check_model_fits(model, model_path, cases, prior_case, companion)
        todo = list(zip(cases, outputs, existing, strict=True))
    infer_changes = {k: v for k, v in (("overlap", overlap), ("precision", precision)) if v is not None}
    if infer_changes:
        cfg = dataclasses.replace(cfg, infer=dataclasses.replace(cfg.infer, **infer_changes))
    use_mirror = cfg.infer.mirror if mirror is None else mirror
    log.info(
        "predicting %d case(s) with %s on %s (spacing %s mm, patch %s, mirror %s, %s, %s)",
        len(cases), model_label, dev, tuple(cfg.data.spacing), tuple(cfg.train.patch_size),
        use_mirror, resolve_precision(dev, cfg.infer.precision),
        "learned post-processing" if rules else f"components < {cfg.infer.min_component_mm3:g} mm3 removed",
    )
    written: list[Path] = []
    skipped = 0
    bar = tqdm(todo, desc="predict", unit="case", disable=not progress)
    for case, out, old in bar:
        bar.set_postfix_str(case.case_id)
        if old:
            log.info("%s: %s exists, skipped (--overwrite to predict it again)", case.case_id, out)
            skipped += 1
            continue
        try:
            which = (model, cfg, rules, model_label) if companion is None or not case.missing else companion
            label, affine = _predict_one(which[0], which[1], case, out, dev, use_mirror, prior_case, gap_days,
                                         which[2], fixed_output, which[3], ignored.get(case.case_id, []))
        except Exception as e:  # noqa: BLE001 - with keep_going any failure of one case is recorded
            if not keep_going:
                raise
            failed.append((case.case_id, _one_line(e)))
            log.error("%s: failed: %s", case.case_id, _one_line(e))
            continue
        log.info(
            "%s -> %s (%s, %s, %s mm)",
            case.case_id, out, "x".join(map(str, label.shape)), orientation_of(affine),
            "x".join(f"{s:g}" for s in spacing_of(affine)),
        )
        written.append(out)
    log.info("predicted %d case(s), %d failed, %d skipped because already written", len(written),
             len(failed), skipped)
    if keep_going and errors_csv is not None:
        _write_errors(errors_csv, failed)
    if failed:
        where = f" (see {errors_csv})" if errors_csv is not None else ""
        total = len(failed) + len(written) + skipped
        raise MensegError(f"{len(failed)} of {total} case(s) failed{where}; first: "
                          f"{failed[0][0]}: {failed[0][1]}")
    return written


def _predict_one(model: torch.nn.Module, cfg: Config, case: CaseFiles, out: Path, dev: torch.device,
                 mirror: bool, prior: CaseFiles | None, gap_days: float | None, rules: Any,
                 fixed_output: str | Path | None, model_ref: str, ignored: Sequence[str] = ()
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Predict, post-process and write one case's label and sidecar."""
    if case.missing:
        log.warning("%s: predicting from %s only (missing %s)", case.case_id, ", ".join(case.present),
                    ", ".join(case.missing))
    label, affine = predict_case(model, cfg, case, dev, mirror=mirror, prior=prior, gap_days=gap_days,
                                 raw=True)
    like = nib.load(str(case.reference))
    if fixed_output is not None and rules:
        fixed = Path(fixed_output) / out.name
        fixed.parent.mkdir(parents=True, exist_ok=True)
        write_label(fixed, postprocess_label(label, affine, cfg, None), affine, like=like)
    label = postprocess_label(label, affine, cfg, rules)
    write_label(out, label, affine, like=like)
    write_json_atomic(sidecar_path(out), _sidecar(model_ref, case, rules, cfg, ignored))
    return label, affine


def _select_sequences(cases: Sequence[CaseFiles], sequences: Sequence[str], ignored: dict[str, list[str]],
                      failed: list[tuple[str, str]] | None) -> list[CaseFiles]:
    """The cases with only ``sequences`` kept (``ignored``: case id -> sequences left out); a case with
    none of them is an error (recorded in ``failed`` when given, else raised)."""
    wanted = [m.strip().lower() for m in sequences if m.strip()]
    unknown = [m for m in wanted if m not in MODALITIES]
    if unknown or not wanted:
        raise MensegError(f"--sequences takes names among {', '.join(MODALITIES)}, got "
                          f"'{','.join(sequences)}'")
    kept = []
    for c in cases:
        images = {m: f for m, f in c.images.items() if m in wanted}
        if not images:
            err = MensegError(f"case '{c.case_id}' has none of the sequences asked for ({', '.join(wanted)}; "
                              f"it has {', '.join(c.present)})")
            if failed is None:
                raise err
            failed.append((c.case_id, str(err)))
            continue
        ignored[c.case_id] = [m for m in c.present if m not in wanted]
        kept.append(dataclasses.replace(c, images=images))
    return kept


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if isinstance(e, MensegError) else f"{type(e).__name__}: {text}"


def _write_errors(path: Path, failed: Sequence[tuple[str, str]]) -> None:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(ERROR_COLUMNS)
    w.writerows(failed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, buf.getvalue())


def _prior_case(
    prior: str | os.PathLike | Sequence[str | os.PathLike] | CaseFiles | None,
    gap_days: float | None,
    cases: Sequence[CaseFiles],
) -> CaseFiles | None:
    if prior is None:
        if gap_days is not None:
            raise MensegError("gap_days is only used with a prior visit (--prior)")
        return None
    if len(cases) != 1:
        raise MensegError(f"a prior visit belongs to one case, but the input holds {len(cases)} cases")
    if gap_days is None or not np.isfinite(gap_days) or gap_days < 0:
        raise MensegError(f"a prior visit needs the days since it (--gap-days >= 0), got {gap_days}")
    if isinstance(prior, CaseFiles):
        found = [prior]
    else:
        found = discover_inputs(prior, allow_missing=True)  # type: ignore[arg-type]
    if len(found) != 1:
        raise MensegError(f"--prior must be one earlier visit, found {len(found)} cases",
                          prior if isinstance(prior, str | os.PathLike) else None)
    return found[0]


def _load_companion(model_path: Path, state: dict[str, Any], dev: torch.device, learned_postprocess: bool
                    ) -> tuple[torch.nn.Module, Config, Any, str] | None:
    """``(model, cfg, rules, label)`` of the companion for incomplete scans
    (:func:`~menseg.checkpoint.companion_state`), or None when the model has none."""
    from menseg.checkpoint import companion_state, model_from_state

    found = companion_state(model_path, state)
    if found is None:
        return None
    comp, label = found
    model, ccfg = model_from_state(comp, dev, label)
    rules = (comp.get("postprocess") or {}).get("rules") if learned_postprocess else None
    log.info("cases lacking a sequence are predicted by the run's companion %s", label)
    return model, ccfg, rules, label


def _check_model_fits(
    model: torch.nn.Module, path: Path, cases: Sequence[CaseFiles], prior: CaseFiles | None,
    companion: Any = None,
) -> None:
    """Refuse, before any work, inputs the model (or its companion for incomplete scans) cannot use."""
    from menseg.ism.model import ISMNet
    from menseg.nets import accepts_subsets

    partial = [c for c in cases if c.missing]
    if partial and not accepts_subsets(model) and companion is None:
        c = partial[0]
        raise MensegError(
            f"case '{c.case_id}' lacks {', '.join(c.missing)}; this model needs all four sequences "
            "(it was trained without sequence dropout: train with seqdrop.enabled=true to predict from a "
            "subset)", path)
    if prior is not None and prior.missing and not accepts_subsets(model):
        raise MensegError(
            f"the prior visit '{prior.case_id}' lacks {', '.join(prior.missing)}; this model needs all four "
            "sequences (train with seqdrop.enabled=true to use incomplete visits)", path)
    if prior is not None and not (isinstance(model, ISMNet) and model.temporal is not None):
        raise MensegError("this model has no temporal fusion (ism.temporal); it cannot use a prior visit",
                          path)


__all__ = ["ERROR_COLUMNS", "LABEL_ENDING", "check_outputs", "output_paths", "postprocess_label", "predict",
           "predict_case", "sidecar_path"]
