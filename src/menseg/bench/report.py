"""Report of the data-efficiency benchmark: CSV tables, figures, ``report.md`` and ``report.html``.

:func:`write_report` turns the finished :class:`~menseg.bench.stats.RunRecord` s and the
run description ``meta`` into a folder a person can read (``report.md``), open offline
(``report.html``, figures embedded) or analyse (``results.csv``, ``per_case.csv``,
``tests.csv``). The two documents are rendered from one list of blocks, so their content
is the same. Every file is written atomically.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from menseg.bench.stats import TABLE_METRICS, RunRecord, aggregate, group_runs, paired_tests, per_case_means
from menseg.constants import REGION_NAMES
from menseg.data.io import read_image, read_label
from menseg.data.validate import spacing_of
from menseg.errors import MensegError
from menseg.evaluate.metrics import metric_names
from menseg.synth.preview import LABEL_COLOURS, lesion_centre
from menseg.utils import atomic_path, write_text_atomic

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from menseg.data.layouts import CaseFiles

log = logging.getLogger(__name__)

HOME = "home"  #: name of the home test set (as menseg.bench.efficiency.HOME)

#: Columns of ``tests.csv`` (keys of :func:`~menseg.bench.stats.paired_tests` rows).
TEST_COLUMNS: tuple[str, ...] = (
    "variant", "reference", "n_labeled", "metric", "n_cases", "mean_reference", "mean_variant", "mean_diff",
    "median_diff", "sd_diff", "detectable", "statistic", "p_value", "p_holm", "wins", "losses", "note",
)
_METRIC_LABEL = {"lesion_dice": "lesion Dice", "lesion_hd95": "lesion HD95 (mm)", "dice": "Dice"}
_LABEL_NAMES = {1: "NETC", 2: "SNFH", 3: "ET"}
#: One piece of the report: ("h1"|"h2"|"p"|"code", text), ("ul", items), ("table", head, rows),
#: ("img", alt, file name).
Block = tuple[Any, ...]


def table_metrics() -> list[str]:
    """Metric names of the results table: ``f"{region}_{m}"`` for ET, TC, WT and m in TABLE_METRICS."""
    return [f"{r}_{m}" for r in REGION_NAMES for m in TABLE_METRICS]


# ---------------------------------------------------------------- formatting helpers
def _digits(metric: str) -> int:
    return 1 if "hd95" in metric else 3  # mm to 0.1 mm; Dice to 0.001


def _num(x: float, digits: int, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else (f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}")


def _kv(d: Any) -> str:
    if not isinstance(d, Mapping):
        return str(d)
    return ", ".join(f"{k}={v}" for k, v in d.items())


def _duration(s: float) -> str:
    s = float(s)
    h, rem = divmod(int(round(s)), 3600)
    return f"{s:.0f} s ({h} h {rem // 60:02d} min {rem % 60:02d} s)"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    write_text_atomic(path, buf.getvalue())
    return path


def _save_png(fig: Figure, path: Path) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = buf.getvalue()
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return data


# ---------------------------------------------------------------- figures
def _figure(w: float, h: float) -> Figure:
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100)


def _colours(variants: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return {v: cmap(i % 10) for i, v in enumerate(variants)}


def _learning_curve(rows: list[dict[str, Any]], variants: Sequence[str], ns: Sequence[int]) -> Figure:
    fig = _figure(12, 3.8)
    axes = fig.subplots(1, len(REGION_NAMES), squeeze=False)[0]
    colours = _colours(variants)
    for ax, region in zip(axes, REGION_NAMES, strict=True):
        m = f"{region}_lesion_dice"
        for v in variants:
            pts = [(r["n_labeled"], r[f"{m}_mean"], r[f"{m}_std"]) for r in rows if r["variant"] == v]
            x, y, e = zip(*pts, strict=True)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=v, color=colours[v])
        ax.set_xticks(list(ns))
        ax.set_ylim(0.0, 1.02)
        ax.set_xlabel("number of labelled training cases")
        ax.set_title(f"{region} lesion-wise Dice")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean ± std over seeds")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def _boxplots(records: Sequence[RunRecord], variants: Sequence[str], ns: Sequence[int]) -> Figure:
    from matplotlib.patches import Patch

    fig = _figure(12, 3.8)
    axes = fig.subplots(1, len(REGION_NAMES), squeeze=False)[0]
    colours, groups = _colours(variants), group_runs(records)
    rng = np.random.default_rng(0)  # jitter only; fixed so the figure is reproducible
    width = 0.8 / len(variants)
    for ax, region in zip(axes, REGION_NAMES, strict=True):
        m = f"{region}_lesion_dice"
        for i, n in enumerate(ns):
            for j, v in enumerate(variants):
                if (v, n) not in groups:
                    continue
                vals = list(per_case_means(records, v, n, m).values())
                pos = i + (j - (len(variants) - 1) / 2) * width
                bp = ax.boxplot([vals], positions=[pos], widths=width * 0.75, patch_artist=True,
                                showfliers=False, manage_ticks=False, medianprops={"color": "black"})
                for box in bp["boxes"]:
                    box.set_facecolor(colours[v])
                    box.set_alpha(0.45)
                jitter = rng.uniform(-width * 0.2, width * 0.2, len(vals))
                ax.scatter(pos + jitter, vals, s=9, color=colours[v], zorder=3)
        ax.set_xticks(range(len(ns)), [str(n) for n in ns])
        ax.set_xlim(-0.5, len(ns) - 0.5)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("number of labelled training cases")
        ax.set_title(f"{region} lesion-wise Dice per test case")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("seed-averaged per-case score")
    axes[0].legend(handles=[Patch(color=colours[v], alpha=0.6, label=v) for v in variants], fontsize=8)
    fig.tight_layout()
    return fig


def _load_case(files: CaseFiles, pred_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, float]:
    """(t1c, reference, prediction or None) reoriented to RAS, and the axial aspect ratio y/x."""
    from nibabel import orientations as nio

    t1c, affine = read_image(files.images["t1c"])
    ref = read_label(files.label)[0] if files.label is not None else np.zeros(t1c.shape, np.uint8)
    pred = None
    if pred_path.is_file():
        pred = read_label(pred_path)[0]
        if pred.shape != t1c.shape:
            log.warning("%s: prediction grid %s differs from the image %s; not shown",
                        pred_path, pred.shape, t1c.shape)
            pred = None
    else:
        log.warning("%s: prediction missing", pred_path)
    ornt = nio.io_orientation(affine)
    sp = spacing_of(affine)
    sp_ras = [sp[int(a)] for a in np.argsort(ornt[:, 0])]
    ras = [None if a is None else nio.apply_orientation(a, ornt) for a in (t1c, ref, pred)]
    return ras[0], ras[1], ras[2], sp_ras[1] / sp_ras[0]


def _overlays(run: RunRecord, test_cases: Mapping[str, CaseFiles]) -> Figure:
    """Best / median / worst test case of ``run`` by WT lesion Dice: reference outline, prediction."""
    from matplotlib.patches import Patch

    score = {c: float(run.metrics[c].get("WT_lesion_dice", math.nan)) for c in run.metrics if c in test_cases}
    ranked = sorted(score, key=lambda c: (-score[c] if not math.isnan(score[c]) else math.inf, c))
    picks: dict[str, list[str]] = {}
    if ranked:
        for name, cid in (("best", ranked[0]), ("median", ranked[(len(ranked) - 1) // 2]),
                          ("worst", ranked[-1])):
            picks.setdefault(cid, []).append(name)
    fig = _figure(3.2 * max(len(picks), 1), 6.6)
    fig.suptitle(f"{run.variant}: N={run.n_labeled}, seed {run.seed} "
                 "(axial t1c through the reference lesion centre)", fontsize=9)
    if not picks:
        fig.text(0.5, 0.5, "no test case images available", ha="center")
        return fig
    axes = fig.subplots(2, len(picks), squeeze=False)
    lut = np.zeros((4, 4), np.float32)
    for k, rgba in LABEL_COLOURS.items():
        lut[k] = rgba
    for col, (cid, names) in enumerate(picks.items()):
        t1c, ref, pred, aspect = _load_case(test_cases[cid], Path(run.pred_dir) / f"{cid}.nii.gz")
        z = lesion_centre(ref)[2]  # volume centre when the reference is empty

        def axial(v: np.ndarray, z: int = z) -> np.ndarray:
            return v[:, :, z].T[::-1]  # x (R) to the right, y (A) up

        img = axial(t1c)
        fg = img[img != 0]
        lo, hi = np.percentile(fg, (0.5, 99.5)) if fg.size else (0.0, 1.0)
        for ax in axes[:, col]:
            ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, aspect=aspect,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        ax_ref, ax_pred = axes[:, col]
        lims = ax_ref.get_xlim(), ax_ref.get_ylim()
        ref2d = axial(ref)
        for k in (1, 2, 3):
            mask = ref2d == k
            if mask.any():
                ax_ref.contour(mask.astype(float), levels=[0.5], colors=[LABEL_COLOURS[k][:3]],
                               linewidths=1.2)
        ax_ref.set_xlim(*lims[0])
        ax_ref.set_ylim(*lims[1])
        if pred is not None:
            ax_pred.imshow(lut[axial(pred)], aspect=aspect, interpolation="nearest")
        else:
            ax_pred.text(0.5, 0.5, "no prediction", ha="center", va="center", transform=ax_pred.transAxes,
                         bbox={"facecolor": "white", "alpha": 0.8})
        ax_ref.set_title(f"{' / '.join(names)}: {cid}\nWT lesion Dice {_num(score[cid], 3)}", fontsize=8)
        if col == 0:
            ax_ref.set_ylabel("reference (outline)", fontsize=8)
            ax_pred.set_ylabel("prediction", fontsize=8)
    fig.legend(handles=[Patch(color=LABEL_COLOURS[k][:3], label=n) for k, n in _LABEL_NAMES.items()],
               loc="lower center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    return fig


# ---------------------------------------------------------------- documents
def _how_it_was_run(meta: Mapping[str, Any]) -> list[Block]:
    blocks: list[Block] = [("h2", "How it was run")]
    if meta.get("command"):
        blocks.append(("code", str(meta["command"])))
    items, known = [], set()

    def add(label: str, *keys: str, fmt: Any = str) -> None:
        known.update(keys)
        if all(k in meta and meta[k] is not None for k in keys):
            items.append(f"{label}: " + " ".join(fmt(meta[k]) for k in keys))

    add("menseg version", "menseg_version")
    add("profile", "profile")
    add("profile settings", "profile_settings", fmt=_kv)
    add("hardware / environment", "environment", fmt=_kv)
    add("data", "data")
    add("unlabelled scans", "unlabeled")
    add("labelled pool (cases)", "n_pool")
    add("held-out test split (cases)", "n_test")
    add("variants (first = reference of the tests)", "variants", fmt=lambda v: ", ".join(map(str, v)))
    add("numbers of labelled cases N", "labeled", fmt=lambda v: ", ".join(map(str, v)))
    add("seeds", "seeds", fmt=lambda v: ", ".join(map(str, v)))
    add("started", "started")
    add("finished", "finished")
    add("compute time (sum of the runs' training and prediction)", "wall_seconds", fmt=_duration)
    known.update(("title", "command"))
    items += [f"{k}: {_kv(v)}" for k, v in meta.items() if k not in known]
    return [*blocks, ("ul", items)]


def _set_title(test_set: str) -> str:
    return "home test set" if test_set == HOME else f"away test set {test_set}"


def _headline(per_set: Mapping[str, Mapping[str, Any]], records: Sequence[RunRecord], sets: Sequence[str],
              variants: Sequence[str], ceiling_n: int | None) -> tuple[list[str], list[list[Any]]]:
    """WT lesion-wise Dice per variant and N, one column per test set (the :func:`aggregate` rows of
    each set), drop home -> away, share of the ceiling (the reference trained on the whole pool) at home."""
    m = "WT_lesion_dice"
    rows = {(r["variant"], r["n_labeled"], t): r for t in sets for r in per_set[t]["rows"]}
    unl = {r.variant: r.unlabeled_from or "none" for r in records}
    away = [t for t in sets if t != HOME]
    ceil = rows.get((variants[0], ceiling_n, HOME)) if ceiling_n is not None else None
    head = ["variant", "unlabelled scans", "N", "seeds", *(_set_title(t) for t in sets)]
    if away and HOME in sets:
        head.append("drop home -> away (mean)")
    if ceil:
        head.append("share of ceiling (home)")
    body = []
    for v in variants:
        for n in sorted({k[1] for k in rows if k[0] == v}):
            first = next(rows[(v, n, t)] for t in sets if (v, n, t) in rows)
            row: list[Any] = [v, unl.get(v, "none"), n, first["n_seeds"]]
            for t in sets:
                r = rows.get((v, n, t))
                row.append(f"{r[f'{m}_mean']:.3f} ± {r[f'{m}_std']:.3f}" if r else "n/a")
            home = rows.get((v, n, HOME))
            if away and HOME in sets:
                aw = [rows[(v, n, t)][f"{m}_mean"] for t in away if (v, n, t) in rows]
                row.append(f"{home[f'{m}_mean'] - np.mean(aw):+.3f}" if home and aw else "n/a")
            if ceil:
                row.append(f"{home[f'{m}_mean'] / ceil[f'{m}_mean']:.0%}" if home else "n/a")
            body.append(row)
    return head, body


def _value_of(r: RunRecord, case_id: str, metric: str) -> float:
    return float(r.metrics[case_id].get(metric, math.nan))


def _differences(tests: Mapping[str, list[dict[str, Any]]], sets: Sequence[str]
                 ) -> tuple[list[str], list[list[Any]]]:
    """WT lesion-wise Dice difference from the reference per variant and N, one column per test
    set: the mean paired difference, the smallest difference the design detects (80% power, alpha
    0.05) and the Holm-adjusted p."""
    cells: dict[tuple[str, int], dict[str, str]] = {}
    for t in sets:
        for row in tests.get(t, []):
            if row["metric"] != "WT_lesion_dice":
                continue
            cells.setdefault((row["variant"], row["n_labeled"]), {})[t] = (
                f"{_num(row['mean_diff'], 3, sign=True)} (detectable {_num(row['detectable'], 3)}; "
                f"p {_p(row['p_holm'])})")
    head = ["variant", "N", *(_set_title(t) for t in sets)]
    return head, [[v, n, *(c.get(t, "n/a") for t in sets)] for (v, n), c in cells.items()]


def _power_table(tests: Mapping[str, list[dict[str, Any]]], sets: Sequence[str]
                 ) -> tuple[list[str], list[list[Any]]]:
    """Per N and test set: test cases, and the median / largest detectable WT difference over the
    variants compared with the reference."""
    ns = sorted({r["n_labeled"] for t in sets for r in tests.get(t, [])})
    body = []
    for n in ns:
        row: list[Any] = [n]
        for t in sets:
            d = [r["detectable"] for r in tests.get(t, []) if r["n_labeled"] == n
                 and r["metric"] == "WT_lesion_dice" and not math.isnan(r["detectable"])]
            cases = {r["n_cases"] for r in tests.get(t, []) if r["n_labeled"] == n}
            row.append(f"{np.median(d):.3f} (max {max(d):.3f}; {max(cases)} cases)" if d else "n/a")
        body.append(row)
    return ["N", *(_set_title(t) for t in sets)], body


def _postprocess_table(records: Sequence[RunRecord], variants: Sequence[str], sets: Sequence[str]
                       ) -> tuple[list[str], list[list[Any]]] | None:
    """WT lesion-wise Dice with the learned post-processing, with the fixed one instead, and the
    difference (mean over seeds of the test-set means), per variant, N and test set."""
    m = "WT_lesion_dice"
    acc: dict[tuple[str, int, str], list[tuple[float, float]]] = {}
    for r in records:
        if not r.metrics_fixed:
            continue
        learned = float(np.mean([_value_of(r, c, m) for c in r.metrics]))
        fixed = float(np.mean([float(r.metrics_fixed[c].get(m, math.nan)) for c in r.metrics_fixed]))
        acc.setdefault((r.variant, r.n_labeled, r.test_set), []).append((learned, fixed))
    def cell(xs: list[tuple[float, float]]) -> str:
        lw, fx = np.mean([x[0] for x in xs]), np.mean([x[1] for x in xs])
        return f"{lw:.3f} vs {fx:.3f} ({lw - fx:+.3f})"

    return _per_variant_table(acc, variants, sets, cell)


def _per_variant_table(acc: Mapping[tuple[str, int, str], list[Any]], variants: Sequence[str],
                       sets: Sequence[str], cell: Any) -> tuple[list[str], list[list[Any]]] | None:
    """Rows ``[variant, N, cell per test set]`` of per-run values gathered by (variant, N, test set);
    ``cell`` formats one non-empty list (over seeds), "n/a" where there is none. None when ``acc`` is."""
    if not acc:
        return None
    body = []
    for v in variants:
        for n in sorted({k[1] for k in acc if k[0] == v}):
            body.append([v, n, *(cell(xs) if (xs := acc.get((v, n, t))) else "n/a" for t in sets)])
    return ["variant", "N", *(_set_title(t) for t in sets)], body


def _errors_table(records: Sequence[RunRecord], variants: Sequence[str], sets: Sequence[str]
                  ) -> tuple[list[str], list[list[Any]]] | None:
    """Where WT lesion-wise Dice is lost, per variant, N and test set (means over seeds): voxel-wise WT
    Dice, false-positive WT lesions and missed WT lesions per 100 test cases. ``None`` when the runs hold
    no lesion counts."""
    acc: dict[tuple[str, int, str], list[tuple[float, float, float]]] = {}
    for r in records:
        cases = list(r.metrics.values())
        if not cases or "WT_n_fp" not in cases[0]:
            continue
        acc.setdefault((r.variant, r.n_labeled, r.test_set), []).append((
            float(np.mean([c["WT_dice"] for c in cases])),
            100.0 * float(np.mean([c["WT_n_fp"] for c in cases])),
            100.0 * float(np.mean([c["WT_n_fn"] for c in cases]))))
    def cell(xs: list[tuple[float, float, float]]) -> str:
        dice, fp, fn = (np.mean([x[i] for x in xs]) for i in range(3))
        return f"{dice:.3f}; {fp:.0f} FP, {fn:.0f} FN"

    return _per_variant_table(acc, variants, sets, cell)


def _set_blocks(test_set: str, records: Sequence[RunRecord], rows: list[dict[str, Any]],
                tests: list[dict[str, Any]], reference: str, variants: Sequence[str],
                figures: Mapping[str, str], heading: bool) -> list[Block]:
    metrics = table_metrics()
    head = ["variant", "N", "seeds", "test cases"] + [
        f"{r} {_METRIC_LABEL[m]}" for r in REGION_NAMES for m in TABLE_METRICS]
    body = [[r["variant"], r["n_labeled"], r["n_seeds"], r["n_test_cases"]]
            + [f"{_num(r[f'{m}_mean'], _digits(m))} ± {_num(r[f'{m}_std'], _digits(m))}" for m in metrics]
            for r in rows]
    suffix = f": {_set_title(test_set)}" if heading else ""
    out: list[Block] = [("h2", f"Results{suffix}"),
                        ("p", "Mean ± sample std over seeds of the per-run mean over the test cases "
                              "(Dice 0-1, HD95 in mm; unmatched lesions count as Dice 0, HD95 374 mm)."),
                        ("table", head, body), ("h2", f"Figures{suffix}")]
    out += [("img", alt, name) for name, alt in figures.items()]
    out.append(("h2", f"Paired tests against {reference}{suffix}"))
    if len(variants) < 2:
        out.append(("p", "one variant only: no paired tests"))
    elif not tests:
        out.append(("p", "no N was run for both a variant and the reference: no paired tests"))
    else:
        t_head = ["variant", "N", "metric", "cases", f"mean {reference}", "mean variant", "mean diff",
                  "detectable diff", "median diff", "wins / losses", "W", "p", "p (Holm)", "note"]
        t_body = [[t["variant"], t["n_labeled"], t["metric"], t["n_cases"]]
                  + [_num(t[k], _digits(t["metric"]))
                     for k in ("mean_reference", "mean_variant", "mean_diff", "detectable", "median_diff")]
                  + [f"{t['wins']} / {t['losses']}", _num(t["statistic"], 1), _p(t["p_value"]),
                     _p(t["p_holm"]), t["note"]] for t in tests]
        out.append(("table", t_head, t_body))
    return out


def _blocks(meta: Mapping[str, Any], records: Sequence[RunRecord], per_set: Mapping[str, Any],
            reference: str, variants: Sequence[str], ceiling_n: int | None) -> list[Block]:
    sets = list(per_set)
    multi = len(sets) > 1
    tests = {t: per_set[t]["tests"] for t in sets}
    out: list[Block] = [("h1", str(meta.get("title", "menseg data-efficiency benchmark")))]
    out += _how_it_was_run(meta)
    if multi or ceiling_n is not None:
        head, body = _headline(per_set, records, sets, variants, ceiling_n)
        out += [("h2", "Headline: WT lesion-wise Dice by test set"),
                ("p", "Mean ± std over seeds of the per-run mean over each test set. Away sites are other "
                      "scanners and patient populations that no run trains on; a variant uses an away "
                      "site's unlabelled scans only where the 'unlabelled scans' column names that site "
                      "(adapting to a new hospital). Drop: home minus the mean of the away sets."
                      + (f" Ceiling: {variants[0]} trained on the whole labelled pool (N = {ceiling_n})."
                         if ceiling_n is not None else "")),
                ("table", head, body)]
    if len(variants) > 1 and any(tests.values()):
        head, body = _differences(tests, sets)
        out += [("h2", f"Differences from {reference} (WT lesion-wise Dice)"),
                ("p", "Mean paired difference over test cases (seed-averaged per-case scores); "
                      "'detectable' is the smallest true difference this design detects with 80% power "
                      "at two-sided alpha 0.05 from the observed spread of the paired differences "
                      "(paired t approximation); p is the Holm-adjusted Wilcoxon p. A difference below "
                      "its detectable size that is not significant says the benchmark is too small, "
                      "not that there is no effect."),
                ("table", head, body)]
        head, body = _power_table(tests, sets)
        out += [("h2", "Detectable difference per N and test set"),
                ("p", "Median (and largest) over the variants compared with the reference of the "
                      "detectable WT lesion-wise Dice difference (80% power, alpha 0.05)."),
                ("table", head, body)]
    pp = _postprocess_table(records, variants, sets)
    if pp is not None:
        out += [("h2", "Learned post-processing"),
                ("p", "WT lesion-wise Dice with the post-processing each run learned from its training "
                      "data vs the fixed rule (components below infer.min_component_mm3 removed), from "
                      "the same network output; mean over seeds (difference in brackets)."),
                ("table", *pp)]
    errs = _errors_table(records, variants, sets)
    if errs is not None:
        out += [("h2", "Where lesion-wise Dice is lost"),
                ("p", "Per variant, N and test set, mean over seeds: voxel-wise WT Dice (the whole "
                      "volume as one region); false-positive WT lesions (FP: predicted components that "
                      "match no reference lesion) and missed WT lesions (FN) per 100 test cases. "
                      "Lesion-wise Dice counts each FP and FN as a lesion with Dice 0, so a variant can "
                      "gain voxel-wise Dice and still lose lesion-wise Dice by adding false positives."),
                ("table", *errs)]
    for t in sets:
        d = per_set[t]
        out += _set_blocks(t, d["records"], d["rows"], d["tests"], reference, variants, d["figures"], multi)
    timing: dict[tuple[str, int, int], list[Any]] = {}
    for r in records:
        row = timing.setdefault((r.variant, r.n_labeled, r.seed),
                                [r.variant, r.n_labeled, r.seed, f"{r.train_seconds:.1f}", 0.0])
        row[4] += r.predict_seconds
    runs_body = [[*row[:4], f"{row[4]:.1f}"] for row in timing.values()]
    out += [("h2", "Runs"), ("table", ["variant", "N", "seed", "train s", "predict s"], runs_body)]
    out += [("h2", "Protocol"), ("p", (
        "For each seed the labelled training subsets are drawn reproducibly from the labelled pool and are "
        "nested (the subset of a smaller N is contained in that of a larger N). Every run is evaluated on "
        "the same held-out test sets, which no run trains on; all runs have the same training budget "
        "(profile settings above) and are evaluated with their final checkpoint. p values: two-sided "
        "Wilcoxon signed-rank test over test cases on seed-averaged per-case scores, each variant against "
        f"the reference ({reference}) at the same N and on the same test set; Holm-Bonferroni correction "
        f"within one N and test set (the family is the {len(table_metrics())} metrics tested for one "
        "variant). Wins / losses count the test cases where the variant is better / worse (higher Dice, "
        "lower HD95)."))]
    return out


def _markdown(blocks: Sequence[Block]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    parts = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2"):
            parts.append(f"{'#' * int(kind[1])} {b[1]}")
        elif kind == "p":
            parts.append(b[1])
        elif kind == "code":
            parts.append(f"```\n{b[1]}\n```")
        elif kind == "ul":
            parts.append("\n".join(f"- {i}" for i in b[1]))
        elif kind == "table":
            lines = ["| " + " | ".join(cell(h) for h in b[1]) + " |", "|" + "---|" * len(b[1])]
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in b[2]]
            parts.append("\n".join(lines))
        elif kind == "img":
            parts.append(f"![{b[1]}]({b[2]})")
    return "\n\n".join(parts) + "\n"


_CSS = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;font-size:0.85em;margin:1em 0}"
        "th,td{border:1px solid #bbb;padding:3px 7px;text-align:right}th{background:#eee}"
        "img{max-width:100%}figure{margin:1em 0}figcaption{font-size:0.9em;color:#555}"
        "pre{background:#f4f4f4;padding:0.6em;overflow-x:auto}")


def _html(blocks: Sequence[Block], pngs: Mapping[str, bytes]) -> str:
    e = html.escape
    parts = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "p"):
            parts.append(f"<{kind}>{e(str(b[1]))}</{kind}>")
        elif kind == "code":
            parts.append(f"<pre>{e(str(b[1]))}</pre>")
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{e(str(i))}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(str(h))}</th>" for h in b[1])
            body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in b[2])
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            uri = "data:image/png;base64," + base64.b64encode(pngs[b[2]]).decode("ascii")
            parts.append(f'<figure><img alt="{e(b[1])}" src="{uri}">'
                         f"<figcaption>{e(b[1])}</figcaption></figure>")
    title = e(str(blocks[0][1]))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")


# ---------------------------------------------------------------- entry point
def write_report(
    out_dir: str | Path,
    records: Sequence[RunRecord],
    meta: dict[str, Any],
    test_cases: Mapping[str, Any],
) -> dict[str, Path]:
    """Write the benchmark report into ``out_dir`` (created) and return file name -> path.

    Files: ``results.csv`` (:func:`~menseg.bench.stats.aggregate` of :func:`table_metrics` per
    test set), ``per_case.csv`` (every metric of every run and test case), ``tests.csv`` (paired
    Wilcoxon tests of every variant against the first, see ``meta["variants"]``, per test set,
    with the detectable difference), ``learning_curve.png``, ``boxplots.png``,
    ``overlays_<variant>.png`` (best / median / worst home test case at the largest N, smallest
    seed; away test sets add ``_<set>`` to the figure names), ``report.md`` and a self-contained
    ``report.html``. ``meta`` describes the run (title, profile, environment, timing...; keys
    are optional and unknown keys are listed as they are; ``ceiling_n``: N of the ceiling runs).
    ``test_cases``: test set -> case id -> files, or for one test set case id -> files (t1c and
    reference label are read for the overlays).
    """
    from menseg.data.layouts import CaseFiles as Files

    if not records:
        raise MensegError("no finished runs to report")
    if test_cases and all(isinstance(v, Files) for v in test_cases.values()):
        test_cases = {HOME: test_cases}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen = list(dict.fromkeys(r.variant for r in records))
    variants = [v for v in dict.fromkeys(meta.get("variants") or []) if v in seen]
    variants += [v for v in seen if v not in variants]
    records = sorted(records, key=lambda r: variants.index(r.variant))  # aggregate keeps this order
    reference = variants[0]
    sets = list(dict.fromkeys(r.test_set for r in records))
    sets.sort(key=lambda t: t != HOME)  # home first, the rest in the order met
    ceiling_n = meta.get("ceiling_n")
    metrics = table_metrics()
    written: dict[str, Path] = {}
    pngs: dict[str, bytes] = {}
    per_set: dict[str, dict[str, Any]] = {}
    results_rows: list[list[Any]] = []
    tests_rows: list[list[Any]] = []
    header: list[str] = []
    for t in sets:
        recs = [r for r in records if r.test_set == t]
        ns = sorted({r.n_labeled for r in recs})
        rows = aggregate(recs, metrics)
        tests = paired_tests(recs, reference, metrics) if any(r.variant == reference for r in recs) else []
        header = ["test_set", *rows[0]]
        results_rows += [[t, *r.values()] for r in rows]
        tests_rows += [[t, *(row[k] for k in TEST_COLUMNS)] for row in tests]
        sfx = "" if t == HOME else f"_{_safe(t)}"
        where = "" if t == HOME else f" ({_set_title(t)})"
        vs = [v for v in variants if any(r.variant == v for r in recs)]
        curve, boxes = f"learning_curve{sfx}.png", f"boxplots{sfx}.png"
        figures = {curve: f"learning curve{where}: lesion-wise Dice vs number of labelled cases",
                   boxes: f"per-case lesion-wise Dice{where} (mean over seeds) by number of labelled cases"}
        pngs[curve] = _save_png(_learning_curve(rows, vs, ns), out / curve)
        pngs[boxes] = _save_png(_boxplots(recs, vs, ns), out / boxes)
        if t == HOME:  # overlays of the home set only: enough to see what the numbers mean
            for v in vs:
                runs = [r for r in recs if r.variant == v]
                n_max = max(r.n_labeled for r in runs)
                run = min((r for r in runs if r.n_labeled == n_max), key=lambda r: r.seed)
                name = f"overlays_{_safe(v)}.png"
                pngs[name] = _save_png(_overlays(run, test_cases.get(t, {})), out / name)
                figures[name] = f"overlays {v}: best, median and worst test case (N={n_max}, seed {run.seed})"
        per_set[t] = {"records": recs, "rows": rows, "tests": tests, "figures": figures}

    written["results.csv"] = _write_csv(out / "results.csv", header, results_rows)
    all_metrics = metric_names()
    per_case = [[r.test_set, r.variant, r.n_labeled, r.seed, cid,
                 *(r.metrics[cid].get(m, "") for m in all_metrics)]
                for t in sets for runs in group_runs(per_set[t]["records"]).values() for r in runs
                for cid in sorted(r.metrics)]
    written["per_case.csv"] = _write_csv(
        out / "per_case.csv", ["test_set", "variant", "n_labeled", "seed", "case_id", *all_metrics], per_case)
    written["tests.csv"] = _write_csv(out / "tests.csv", ["test_set", *TEST_COLUMNS], tests_rows)
    for name in pngs:
        written[name] = out / name

    blocks = _blocks(meta, records, per_set, reference, variants, ceiling_n)
    write_text_atomic(out / "report.md", _markdown(blocks))
    write_text_atomic(out / "report.html", _html(blocks, pngs))
    written["report.md"], written["report.html"] = out / "report.md", out / "report.html"
    log.info("wrote benchmark report %s (%d files)", out, len(written))
    return written


__all__ = ["TEST_COLUMNS", "table_metrics", "write_report"]
