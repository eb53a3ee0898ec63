"""Pilot for the medium profile's step budget (issue 16, item 1): where does the baseline's validation
Dice stop improving with more steps, at N = 3 and N = 10 labelled cases on the 2 mm grid?

Selection data only: a pilot cohort of the home site (site-a, 2 mm) generated from its own seed (101),
disjoint from every benchmark cohort; each run trains on N pool cases and validates on 8 other pool
cases (never a test split). For each budget the whole poly schedule is run (the LR depends on the
total), so every budget is a real run, not a point on a longer one. Quick-profile network and patch.

    python docs/benchmarks/medium/pilot_steps.py OUT_DIR [--budgets 400,800,1600,3200] [--labeled 3,10]

Writes OUT_DIR/pilot.json (appended run by run, so a rerun continues) and prints one line per run;
``--report`` writes OUT_DIR/pilot.md (the tables) from pilot.json without training.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from menseg.bench.efficiency import CohortSpec, draw_subsets, embedded_cohort
from menseg.config import load_config
from menseg.data.layouts import discover_cases
from menseg.train.trainer import train

QUICK = ["data.spacing=[2.0,2.0,2.0]", "model.filters=[16,32,64,128]", "model.deep_supr_num=1",
         "train.batch_size=2", "train.patch_size=[48,48,48]", "infer.overlap=0.25", "infer.mirror=false"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--budgets", default="400,800,1600,3200")
    ap.add_argument("--labeled", default="3,10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report", action="store_true")
    a = ap.parse_args()
    if a.report:
        report(a.out)
        return
    spec = CohortSpec(site="site-a", spacing_mm=2.0, n_pool=24, n_test=1, n_unlabeled=0, seed=101)
    cohort = embedded_cohort(spec)
    ids = sorted(c.case_id for c in discover_cases(cohort / "labeled"))
    val, train_pool = ids[-8:], ids[:-8]
    a.out.mkdir(parents=True, exist_ok=True)
    res_path = a.out / "pilot.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    for n in (int(x) for x in a.labeled.split(",")):
        cases = draw_subsets(train_pool, [n], a.seed)[n]
        for steps in (int(x) for x in a.budgets.split(",")):
            key = f"n{n}-steps{steps}-seed{a.seed}"
            if key in results:
                continue
            run = a.out / "runs" / key
            cfg = load_config("baseline", [
                *QUICK, f"data.root={cohort / 'labeled'}", f"data.cache_dir={a.out / 'cache'}",
                f"out_dir={run}", f"train.steps={steps}", f"train.val_every={max(steps // 4, 1)}",
                f"train.checkpoint_every={steps}", f"train.seed={a.seed}",
                f"data.cases={json.dumps(cases + val)}", f"data.val_cases={json.dumps(val)}"])
            t0 = time.perf_counter()
            train(cfg, progress=False)
            recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            vals = [r for r in recs if "val_mean_dice" in r]
            seconds = round(time.perf_counter() - t0, 1)
            results[key] = {"n": n, "steps": steps, "seed": a.seed, "seconds": seconds,
                            "s_per_step": round(recs[-1]["time"] / steps, 4),
                            "curve": [{k: r[k] for k in ("step", "val_WT_dice", "val_TC_dice", "val_ET_dice",
                                                         "val_mean_dice")} for r in vals]}
            res_path.write_text(json.dumps(results, indent=1))
            last = vals[-1]
            line = (f"{key}: final val WT {last['val_WT_dice']:.3f} mean {last['val_mean_dice']:.3f} "
                    f"({results[key]['seconds']} s)")
            print(line, flush=True)  # noqa: T201


def report(out: Path) -> None:
    """pilot.md: per N, the final validation Dice of each budget and the curve of each run."""
    results = json.loads((out / "pilot.json").read_text())
    lines = ["| N | steps | seed | final val WT Dice | final val mean Dice | best val WT (step) | s/step "
             "| run s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results.values(), key=lambda r: (r["n"], r["steps"], r["seed"])):
        last = r["curve"][-1]
        best = max(r["curve"], key=lambda c: c["val_WT_dice"])
        lines.append(f"| {r['n']} | {r['steps']} | {r['seed']} | {last['val_WT_dice']:.3f} | "
                     f"{last['val_mean_dice']:.3f} | "
                     f"{best['val_WT_dice']:.3f} ({best['step']}) | {r['s_per_step']:.3f} | "
                     f"{r['seconds']:.0f} |")
    (out / "pilot.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))  # noqa: T201


if __name__ == "__main__":
    main()
