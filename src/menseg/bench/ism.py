"""ISM evidence beyond the learning curve: missing sequences and earlier visits.

``menseg bench missing --out BENCH``: for the finished runs of a data-efficiency benchmark
(``menseg bench efficiency``), predict the fixed test split with each single sequence dropped,
and score lesion-wise Dice per region. A model with modal fusion (``ism.modal``) is told which
sequence is missing; a model without it cannot be, so the missing channel is filled with 0 (the
mean of the z-scored sequence: what one does to run a four-channel network on three). Scores are
on the preprocessed grid (the network's own), against the preprocessed reference label, after the
same thresholding and small-component removal as ``menseg predict``.

``menseg bench longitudinal --out DIR``: a synthetic longitudinal cohort (the embedded site's MR
model, 3 visits per patient, growth and pose change between visits) is generated once; a model is
trained on the visits of the training patients (visit pairs when it has temporal fusion), and the
last visit of every test patient is predicted through ``menseg predict`` twice: alone, and with
the previous visit as ``--prior`` (registered, fused). Lesion-wise Dice in the case's own space.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from menseg.constants import MODALITIES, REGION_NAMES
from menseg.errors import MensegError
from menseg.utils import derive_seed, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

#: Conditions of the missing-sequence test: nothing dropped, then each sequence alone.
DROPS: tuple[str, ...] = ("none", *MODALITIES)


def conditions(kind: str = "single") -> list[tuple[str, ...]]:
    """The sequences kept in each condition: ``single``: all four, then each one dropped (5);
    ``all``: every non-empty subset (15), largest first, MODALITIES order within a size."""
    import itertools

    if kind == "single":
        return [tuple(m for m in MODALITIES if m != d) for d in DROPS]
    if kind == "all":
        return [c for k in range(len(MODALITIES), 0, -1) for c in itertools.combinations(MODALITIES, k)]
    raise MensegError(f"--subsets must be 'single' or 'all', got '{kind}'")


def _finished_runs(
    bench: Path, variants: Sequence[str], labeled: int | None
) -> tuple[int, list[dict[str, Any]]]:
    runs = []
    for rj in sorted(bench.glob("runs/*/n*/seed*/run.json")):
        d = json.loads(rj.read_text())
        d["_dir"] = rj.parent
        runs.append(d)
    if not runs:
        raise MensegError("no finished benchmark runs (runs/*/n*/seed*/run.json)", bench)
    names = set(variants)
    ns = sorted({r["n_labeled"] for r in runs if r["variant"] in names})
    if not ns:
        raise MensegError(f"no finished runs of variants {', '.join(variants)}", bench)
    n = labeled if labeled is not None else ns[-1]
    chosen = [r for r in runs if r["variant"] in names and r["n_labeled"] == n]
    for v in variants:
        if not any(r["variant"] == v for r in chosen):
            log.warning("variant %s has no finished run with N = %d in %s; it is left out", v, n, bench)
    if not chosen:
        raise MensegError(f"no finished runs with N = {n} (have {', '.join(map(str, ns))})", bench)
    return n, chosen


def _test_cases(bench: Path, root: Path) -> list[Any]:
    from menseg.data.layouts import discover_cases

    ids = json.loads((bench / "bench.json").read_text())["test"]
    found = {}
    for folder in (root, root.parent / "test"):
        if folder.is_dir():
            for c in discover_cases(folder):
                found.setdefault(c.case_id, c)
    missing = [i for i in ids if i not in found]
    if missing:
        raise MensegError(f"test case '{missing[0]}' not found next to {root}", bench)
    return [found[i] for i in ids]


def _score(label: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    from menseg.evaluate.metrics import lesion_wise, region_masks

    pm, rm = region_masks(label), region_masks(ref)
    return {
        f"{r}_lesion_dice": float(lesion_wise(pm[r], rm[r], spacing)["lesion_dice"]) for r in REGION_NAMES
    }


def run_missing(
    bench: str | Path,
    variants: Sequence[str] = ("baseline", "ism-modal"),
    labeled: int | None = None,
    device: str = "auto",
    progress: bool = True,
    subsets: str = "single",
    max_cases: int | None = None,
) -> Path:
    """Dice with sequences dropped, for every finished run of ``variants`` at one N.

    ``subsets``: ``single`` (each sequence dropped alone; folder ``BENCH/missing``) or ``all``
    (predicted from each of the 15 non-empty subsets; folder ``BENCH/subsets``). Writes
    ``missing.csv`` (one row per variant, seed, condition and test case) and ``missing.md``
    (mean +- std over seeds of the test-set mean, and the share of the complete-scan figure);
    returns the folder. A model with sequence dropout or modal fusion sees which sequences are
    there; a model without either gets zero channels for the dropped ones. ``max_cases``: only
    the first that many home test cases (sorted ids), to bound the cost of the 15 subsets.
    """
    from tqdm.auto import tqdm

    from menseg.checkpoint import COMPANION, load_model
    from menseg.config import has_companion
    from menseg.data.dataset import preprocess_dataset
    from menseg.infer.postprocess import regions_to_labels, remove_small_components
    from menseg.infer.sliding import predict_probs, resolve_device
    from menseg.ism.model import ISMNet

    bench = Path(bench)
    if not (bench / "bench.json").is_file():
        raise MensegError("not a benchmark folder (no bench.json); run menseg bench efficiency first", bench)
    n, runs = _finished_runs(bench, variants, labeled)
    dev = resolve_device(device)
    conds = conditions(subsets)
    out = bench / ("missing" if subsets == "single" else "subsets")
    out.mkdir(exist_ok=True)
    # the pool's folder on this machine: from the run's own config (run.json keeps no paths)
    root = Path(yaml.safe_load((runs[0]["_dir"] / "train" / "config.yaml").read_text())["data"]["root"])
    spacing = [float(s) for s in runs[0]["config"]["data.spacing"]]
    test = _test_cases(bench, root)
    if max_cases is not None:
        if max_cases < 1:
            raise MensegError(f"--cases must be at least 1, got {max_cases}")
        test = sorted(test, key=lambda c: c.case_id)[:max_cases]
    cases = preprocess_dataset(test, out / "preprocessed", spacing)
    rows: list[dict[str, Any]] = []
    bar = tqdm(
        total=len(runs) * len(conds) * len(cases), desc="missing sequences", unit="case", disable=not progress
    )
    for run in runs:
        full = load_model(run["_dir"] / "train" / "latest.pt", dev)
        # a run with a companion for incomplete scans predicts them with it, as menseg predict does
        companion = run["_dir"] / "train" / COMPANION / "latest.pt"
        part = load_model(companion, dev) if has_companion(full[1]) else full
        for kept in conds:
            model, cfg = full if len(kept) == len(MODALITIES) else part
            modal = isinstance(model, ISMNet) and model.stem is not None  # (a presence stem needs no hint)
            present = [m in kept for m in MODALITIES]
            dropped = " ".join(m for m in MODALITIES if m not in kept) or "none"
            for case in cases:
                x = torch.from_numpy(np.array(case.image, dtype=np.float32))
                for i, m in enumerate(MODALITIES):
                    if m not in kept:
                        x[i] = 0.0
                ctx = (model.conditioned(present=present if modal else None) if isinstance(model, ISMNet)
                       else contextlib.nullcontext())
                with ctx:
                    probs = predict_probs(model, x, cfg.train.patch_size, cfg.infer, dev, mirror=False)
                label = regions_to_labels(probs.numpy(), cfg.infer.threshold)
                label = remove_small_components(label, case.spacing, cfg.infer.min_component_mm3)
                rows.append(
                    {
                        "variant": run["variant"],
                        "seed": run["seed"],
                        "kept": " ".join(kept),
                        "dropped": dropped,
                        "case": case.case_id,
                        "modal_fusion": modal,
                        **_score(label, np.asarray(case.label), case.spacing),
                    }
                )
                bar.update(1)
    bar.close()
    rows = _earlier_rows(out, rows, n) + rows
    keys = list(rows[0])
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    write_text_atomic(out / "missing.csv", buf.getvalue())
    table = missing_table(rows, n)
    write_text_atomic(out / "missing.md", table)
    log.info("missing-sequence results in %s", out)
    return out


def _earlier_rows(out: Path, rows: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """The rows of an earlier ``missing.csv`` in ``out`` for variants this run did not predict, when that
    run measured the same N, conditions and cases (so a run for one new variant adds to the table instead
    of replacing it); otherwise none (logged)."""
    path, table = out / "missing.csv", out / "missing.md"
    if not path.is_file() or not table.is_file():
        return []
    m = re.search(r"\(N = (\d+) labelled", table.read_text())
    old = list(csv.DictReader(io.StringIO(path.read_text())))
    done = {r["variant"] for r in rows}
    keep = [r for r in old if r["variant"] not in done]
    if not keep:
        return []
    grid = {(r["kept"], r["case"]) for r in rows}
    if m is None or int(m.group(1)) != n or any((r["kept"], r["case"]) not in grid for r in keep):
        log.info("%s: the earlier rows (%s) were measured on other conditions, cases or N: not kept", path,
                 ", ".join(sorted({r["variant"] for r in keep})))
        return []
    log.info("%s: keeping the earlier rows of %s", path, ", ".join(sorted({r["variant"] for r in keep})))
    for r in keep:
        r["seed"] = int(r["seed"])
        r["modal_fusion"] = r["modal_fusion"] == "True"
        for k in list(r):
            if k.endswith("_lesion_dice"):
                r[k] = float(r[k])
    return keep


def missing_table(rows: Sequence[dict[str, Any]], n: int) -> str:
    """Markdown table: per variant and condition (sequences dropped), mean +- std over seeds of the
    test-set mean lesion-wise Dice per region, and its share of the variant's complete-scan mean."""
    lines = [
        f"Lesion-wise Dice with sequences dropped at prediction (N = {n} labelled cases; "
        "mean ± std over seeds of the test-set mean; in brackets the share of the complete-scan mean)",
        "",
        "| variant | dropped | " + " | ".join(REGION_NAMES) + " |",
        "|---|---|" + "---|" * len(REGION_NAMES),
    ]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    drops = list(dict.fromkeys(r["dropped"] for r in rows))

    def seed_means(v: str, drop: str, reg: str) -> list[float]:
        sub = [r for r in rows if r["variant"] == v and r["dropped"] == drop]
        seeds = sorted({r["seed"] for r in sub})
        return [float(np.mean([r[f"{reg}_lesion_dice"] for r in sub if r["seed"] == s])) for s in seeds]

    for v in variants:
        for drop in drops:
            if not any(r["variant"] == v and r["dropped"] == drop for r in rows):
                continue
            cells = []
            for reg in REGION_NAMES:
                means = seed_means(v, drop, reg)
                sd = float(np.std(means, ddof=1)) if len(means) > 1 else 0.0  # sample std, as the report
                full = seed_means(v, "none", reg)
                share = (f" ({np.mean(means) / np.mean(full):.0%})" if drop != "none" and full
                         and np.mean(full) > 0 else "")
                cells.append(f"{np.mean(means):.3f} ± {sd:.3f}{share}")
            lines.append(f"| {v} | {drop} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- longitudinal


@dataclasses.dataclass(frozen=True)
class LongitudinalSpec:
    """The synthetic longitudinal cohort and the training budget of ``menseg bench longitudinal``."""

    n_train: int = 6  #: training patients (all their visits are labelled)
    n_test: int = 6  #: test patients (the last visit is scored)
    visits: int = 3
    spacing_mm: float = 2.0
    site: str = "site-a"
    seed: int = 0


def longitudinal_cohort(out: Path, spec: LongitudinalSpec) -> Path:
    """``out/cohort`` (train/ and test/ in the longitudinal layout), generated on first use."""
    import shutil

    from menseg.synth.engine import SynthConfig, synth_dataset, with_spacing

    folder = out / "cohort"
    key = dataclasses.asdict(spec)
    done = folder / "cohort.json"
    if done.is_file():
        if json.loads(done.read_text()) != key:
            raise MensegError(
                "the cohort in this folder was made with other settings; use a new --out", folder
            )
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    cfg = dataclasses.replace(with_spacing(SynthConfig(), spec.spacing_mm), site=spec.site)
    for i, (sub, n) in enumerate((("train", spec.n_train), ("test", spec.n_test))):
        synth_dataset(
            folder / sub,
            n,
            "longitudinal",
            seed=derive_seed(spec.seed, "longitudinal", i),
            cfg=cfg,
            visits=spec.visits,
            device="cpu",
            prefix=f"LONG-{sub.upper()}",
        )
    write_json_atomic(done, key)
    return folder


def run_longitudinal(
    out: str | Path,
    variant: str = "ism",
    profile: str = "quick",
    spec: LongitudinalSpec | None = None,
    overrides: Sequence[str] = (),
    device: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``variant`` on the cohort's training patients, score the test patients' last visits
    with and without the previous visit as prior; writes ``out/longitudinal.json`` and ``.md``."""
    from menseg.bench.efficiency import load_profile
    from menseg.config import load_config
    from menseg.data.layouts import discover_series
    from menseg.evaluate.runner import evaluate_pairs
    from menseg.infer.predict import predict
    from menseg.train.trainer import train

    spec = spec or LongitudinalSpec()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cohort = longitudinal_cohort(out, spec)
    prof = load_profile(profile)
    sets = prof.overrides()
    run_dir = out / "train" / Path(variant).stem
    cfg = load_config(
        variant,
        [
            *sets,
            f"data.root={cohort / 'train'}",
            f"out_dir={run_dir}",
            "data.val_fraction=0",
            f"train.device={device}",
            *overrides,
        ],
    )
    resume = (run_dir / "latest.pt").is_file()
    train(cfg, resume=resume, progress=progress)
    ckpt = run_dir / "latest.pt"
    series = discover_series(cohort / "test")
    for mode in MODES:
        # the registered prior label does not depend on the variant: one folder for all
        sub = PRIOR_LABEL if mode == PRIOR_LABEL else f"{Path(variant).stem}/{mode}"
        pred_dir = out / "predictions" / sub
        pairs = {}
        for _patient, visits in series.items():
            (prev, d0), (last, d1) = visits[-2], visits[-1]
            target = pred_dir / f"{last.case_id}.nii.gz"
            if not target.is_file() and mode == PRIOR_LABEL:
                registered_prior_label(prev, last, target)
            elif not target.is_file():
                kw = {"prior": prev, "gap_days": float(d1 - d0)} if mode == "with_prior" else {}
                predict(
                    ckpt,
                    [dataclasses.replace(last, label=None)],
                    pred_dir,
                    device=device,
                    progress=False,
                    **kw,
                )
            pairs[last.case_id] = (target, last.label)
        evaluate_pairs(pairs, out / "evaluation" / Path(variant).stem / mode, progress=False)
    summary = _longitudinal_summary(out / "evaluation" / Path(variant).stem)
    summary["gate"] = temporal_gate(ckpt)
    write_json_atomic(
        out / f"longitudinal-{Path(variant).stem}.json",
        {"spec": dataclasses.asdict(spec), "variant": variant, "profile": profile, "summary": summary},
    )
    write_text_atomic(out / f"longitudinal-{Path(variant).stem}.md", longitudinal_table(summary, variant))
    return summary


#: The third row of ``menseg bench longitudinal``: no network, the previous visit's label rigidly registered
#: onto the last visit (what the prior alone says about the last visit: the information it carries).
PRIOR_LABEL = "prior_label"
MODES: tuple[str, ...] = ("without_prior", "with_prior", PRIOR_LABEL)


def registered_prior_label(prev: Any, last: Any, target: Path) -> Path:
    """Write ``target``: the label of visit ``prev`` (CaseFiles with a label) rigidly registered onto visit
    ``last`` (their t1c, mutual information: :func:`menseg.ism.register.register_rigid`), nearest-neighbour
    resampled onto ``last``'s grid, with ``last``'s affine."""
    import nibabel as nib

    from menseg.ism.register import register_rigid, resample_to_fixed

    if prev.label is None:
        raise MensegError("the previous visit has no label", prev.case_id)
    mov, fix = nib.load(str(prev.images["t1c"])), nib.load(str(last.images["t1c"]))
    lab = nib.load(str(prev.label))
    tf = register_rigid(np.asarray(mov.dataobj, np.float32), mov.affine, np.asarray(fix.dataobj, np.float32),
                        fix.affine)
    out = resample_to_fixed(np.asarray(lab.dataobj).astype(np.uint8), lab.affine, tf, fix.shape[:3],
                            fix.affine, order=0)
    target.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(out, fix.affine), str(target))
    return target


def temporal_gate(checkpoint: Path) -> float | None:
    """``tanh(GATE_GAIN * alpha)``, the opening of a trained temporal fusion's gate (0 = the prior is
    ignored everywhere; the per-location sigmoid scales it further), or None without temporal fusion."""
    from menseg.checkpoint import load_checkpoint
    from menseg.ism.temporal import GATE_GAIN

    alpha = load_checkpoint(checkpoint)["model"].get("temporal.alpha")
    return None if alpha is None else float(np.tanh(GATE_GAIN * float(alpha)))


def _longitudinal_summary(eval_root: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode in MODES:
        with open(eval_root / mode / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        out[mode] = {
            "n": len(rows),
            **{
                f"{r}_lesion_dice": float(np.mean([float(x[f"{r}_lesion_dice"]) for x in rows]))
                for r in REGION_NAMES
            },
            "per_case": {x["case_id"]: {r: float(x[f"{r}_lesion_dice"]) for r in REGION_NAMES} for x in rows},
        }
    return out


def longitudinal_table(summary: dict[str, Any], variant: str) -> str:
    """Markdown table of :func:`run_longitudinal`'s summary."""
    lines = [
        f"Last-visit lesion-wise Dice, {variant}, with and without the previous visit as prior",
        "",
        "| prediction | cases | " + " | ".join(REGION_NAMES) + " |",
        "|---|---|" + "---|" * len(REGION_NAMES),
    ]
    names = {"without_prior": "without prior", "with_prior": "with prior",
             PRIOR_LABEL: "previous visit's label, registered (no network)"}
    for mode in MODES:
        if mode not in summary:  # results written before the row existed
            continue
        s = summary[mode]
        lines.append(
            f"| {names[mode]} | {s['n']} | "
            + " | ".join(f"{s[f'{r}_lesion_dice']:.3f}" for r in REGION_NAMES)
            + " |"
        )
    if summary.get("gate") is not None:
        lines += ["", f"Temporal gate after training: tanh(gain x alpha) = {summary['gate']:.4f} "
                      "(0: the prior is ignored)."]
    return "\n".join(lines) + "\n"


__all__ = [
    "DROPS",
    "MODES",
    "PRIOR_LABEL",
    "LongitudinalSpec",
    "longitudinal_cohort",
    "longitudinal_table",
    "missing_table",
    "registered_prior_label",
    "run_longitudinal",
    "run_missing",
    "temporal_gate",
]
