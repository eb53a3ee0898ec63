"""Issue 17, item 6: how far menseg's synthetic meningiomas are from *real* scans, before and after the
sim->real translator, with lesions left out of every set.

    python docs/benchmarks/realism/gap_real.py WORK [--sources template,label-maps] [--steps 600]

Real: the three 4-sequence studies of ``../shared/data/real-unlabeled/`` (tumours of other kinds; they
are left out of every patch by ``menseg sim2real gap``'s lesion rule). For each synthetic *source*:

- ``template``: ``menseg synth --cases 12 --spacing 2 --seed 123`` (the engine's deformed template
  anatomy, randomised appearance: what Sim2Real's synthetic pool is made of);
- ``label-maps``: ``menseg synth --from-labels ../shared/data/label-maps --label-mapping synthseg``, one
  case per map (20 real whole-head anatomies, SynthSeg's label maps, Apache-2.0);

a translator is fitted to the real studies (``menseg sim2real fit-translator``, ``--steps`` steps), then
the gap of the raw and the translated cases is measured with three classifier seeds (mean and spread of
the AUC; target: at most 0.75 after translation). Work files (cases, translators) go to WORK (not
committed); the tables, ``results.json`` and ``mosaic.png`` (raw / translated / real, mid-axial slice,
four sequences) to this folder. A step whose output exists is not redone.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
REAL = ROOT.parent / "shared" / "data" / "real-unlabeled"
MAPS = ROOT.parent / "shared" / "data" / "label-maps"
MAPPING = ROOT / "src" / "menseg" / "synth" / "mappings" / "synthseg.json"
SEEDS = (0, 1, 2)
SPACING = 2.0
log = logging.getLogger("gap_real")


def menseg(*args: str) -> None:
    cmd = [sys.executable, "-m", "menseg", *args]
    log.info("$ menseg %s", " ".join(args))
    subprocess.run(cmd, check=True)


def make_source(name: str, out: Path) -> None:
    if (out / "done").is_file():
        return
    if out.exists():
        import shutil

        shutil.rmtree(out)
    if name == "template":
        menseg("synth", str(out), "--cases", "12", "--spacing", str(SPACING), "--seed", "123")
    elif name == "label-maps":
        menseg("synth", str(out), "--from-labels", str(MAPS), "--cases", "1", "--seed", "123",
               "--label-mapping", str(MAPPING))
    else:
        raise SystemExit(f"unknown source {name}")
    (out / "done").write_text("")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--sources", default="template,label-maps")
    ap.add_argument("--steps", type=int, default=600, help="translator steps")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if not REAL.is_dir():
        raise SystemExit(f"no real studies at {REAL}")
    from menseg.data.dataset import preprocess_dataset
    from menseg.data.layouts import discover_cases
    from menseg.sim2real.gap import domain_gap
    from menseg.sim2real.translator import load_translator, translate_image

    sp = (SPACING,) * 3
    real_cases = preprocess_dataset(discover_cases(REAL), a.work / "cache" / "real", sp)
    real = [np.asarray(c.image) for c in real_cases]
    stored = HERE / "results.json"
    results: dict[str, dict] = json.loads(stored.read_text()) if stored.is_file() else {}
    shown = {}
    for src in a.sources.split(","):
        syn_dir, tr_dir = a.work / f"syn-{src}", a.work / f"translator-{src}-{a.steps}"
        make_source(src, syn_dir)
        if not (tr_dir / "translator.pt").is_file():
            menseg("sim2real", "fit-translator", "--synthetic", str(syn_dir), "--real", str(REAL), "--out",
                   str(tr_dir), "--spacing", str(SPACING), "--set", f"steps={a.steps}",
                   *(["--resume"] if (tr_dir / "latest.pt").is_file() else []))
        pre = preprocess_dataset(discover_cases(syn_dir), a.work / "cache" / f"syn-{src}", sp)
        raw = [np.asarray(c.image) for c in pre]
        labels = [None if c.label is None else np.asarray(c.label) for c in pre]
        gen = load_translator(tr_dir)
        translated = [translate_image(gen, img) for img in raw]
        key = f"{src}, translator {a.steps} steps"
        sets = {"raw": raw, "translated": translated}
        per_seed = {s: domain_gap(real, sets, seed=s, away_from_lesions=True, spacing_mm=SPACING,
                                  labels={"raw": labels, "translated": labels})
                    for s in SEEDS}
        row = {}
        for kind in ("raw", "translated"):
            aucs = [per_seed[s][kind]["classifier_auc"] for s in SEEDS]
            row[kind] = {"auc_mean": float(np.mean(aucs)), "auc_sd": float(np.std(aucs, ddof=1)),
                         "auc": aucs, "tissue_w1": per_seed[0][kind]["tissue_w1"],
                         "excluded": per_seed[0][kind]["excluded"]}
        row["real_excluded"] = per_seed[0]["real"]["excluded"]
        results[key] = row
        log.info("%s: AUC raw %.3f (sd %.3f), translated %.3f (sd %.3f)", key, row["raw"]["auc_mean"],
                 row["raw"]["auc_sd"], row["translated"]["auc_mean"], row["translated"]["auc_sd"])
        shown[src] = (raw[0], translated[0])
        stored.write_text(json.dumps(results, indent=1) + "\n")
    mosaic(shown, real[0], HERE / "mosaic.png")


def mosaic(shown: dict[str, tuple[np.ndarray, np.ndarray]], real: np.ndarray, path: Path) -> None:
    """Rows: each source raw and translated, then a real study; columns: the four sequences (mid-axial
    slice through the head's centre, z-scores shown in [-3, 3])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from menseg.constants import MODALITIES

    rows = [(f"{s} raw", r) for s, (r, _) in shown.items()]
    rows += [(f"{s} translated", t) for s, (_, t) in shown.items()]
    rows.append(("real", real))
    fig, axes = plt.subplots(len(rows), 4, figsize=(8, 2.1 * len(rows)))
    for i, (title, img) in enumerate(rows):
        head = np.any(img != 0, axis=0)
        z = int(np.round(np.argwhere(head)[:, 2].mean()))
        for c, m in enumerate(MODALITIES):
            ax = axes[i, c]
            ax.imshow(img[c, :, :, z].T, cmap="gray", origin="lower", vmin=-3, vmax=3)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(m, fontsize=9)
            if c == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
