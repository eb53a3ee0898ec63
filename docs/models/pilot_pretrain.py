"""Pilot for the zero-label model's training budget (issue 18, item 1): how does the WT lesion-wise Dice of
``configs/pretrain.yaml`` (no labelled case) grow with its steps, at home and at the away sites, and what do
the synthetic stream and the trainer cost?

Selection data only: the test splits of the issue-17 selection cohorts (home site-a seed 404, site-b 405,
site-c 406; ``docs/benchmarks/ideas/selection/profile.yaml``), disjoint from the medium benchmark's test
sets. One run of ``--steps`` steps (its poly schedule over the whole budget) is stopped at each milestone,
its weights copied and used to predict the selection sets, then resumed: a learning curve of one run (the
weights at 5k of a 20k run are not those of a 5k run, whose learning rate would have decayed sooner).

    python docs/models/pilot_pretrain.py OUT_DIR [--steps 20000] [--milestones 1000,2500,5000,10000,20000]
        [--label-maps ../shared/data/label-maps] [--cases 20] [--device cpu]

Writes OUT_DIR/pilot.json (milestone by milestone, so a rerun continues) and prints one line per
milestone: steps, training seconds, s/step, stream cases/s and trainer wait, WT lesion-wise Dice per site.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import time
from pathlib import Path

from menseg.bench.efficiency import embedded_cohort, load_profile
from menseg.config import load_config
from menseg.evaluate.runner import evaluate_folders
from menseg.infer.predict import predict
from menseg.train.trainer import train

PROFILE = Path(__file__).resolve().parents[1] / "benchmarks" / "ideas" / "selection" / "profile.yaml"


class _StreamLog(logging.Handler):
    """Keeps the stream's 'generation ready' lines (cases/s made, seconds the trainer waited)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.rate: float | None = None
        self.waited: float = 0.0

    def emit(self, record: logging.LogRecord) -> None:
        m = re.search(r"made at ([\d.]+) cases/s.*?([\d.]+) s in all", record.getMessage())
        if m:
            self.rate, self.waited = float(m.group(1)), float(m.group(2))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--milestones", default="1000,2500,5000,10000,20000")
    ap.add_argument("--label-maps", default="../shared/data/label-maps")
    ap.add_argument("--cases", type=int, default=20, help="selection cases per site")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    prof = load_profile(PROFILE)
    sets = {spec.site: embedded_cohort(spec) / "test" for spec in (prof.cohort, *prof.away)}
    a.out.mkdir(parents=True, exist_ok=True)
    res_path = a.out / "pilot.json"
    results = json.loads(res_path.read_text()) if res_path.is_file() else {}
    run = a.out / "run"
    overrides = [f"out_dir={run}", f"train.steps={a.steps}", "train.checkpoint_every=250",
                 f"data.cache_dir={a.out / 'cache'}", f"train.device={a.device}"]
    if a.label_maps:
        overrides.append(f"sim2real.stream.label_maps={a.label_maps}")
    cfg = load_config("pretrain", overrides)
    stream = _StreamLog()
    logging.getLogger("menseg").addHandler(stream)
    for ms in (int(x) for x in a.milestones.split(",")):
        key = f"steps{ms}"
        if key in results:
            continue
        t0 = time.perf_counter()
        resume = (run / "latest.pt").is_file()
        train(cfg, resume=resume, stop_at=ms, progress=True)
        seconds = time.perf_counter() - t0
        snap = a.out / f"weights-{ms}.pt"
        shutil.copyfile(run / "latest.pt", snap)
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        row = {"steps": ms, "train_seconds_total": recs[-1]["time"], "s_per_step": recs[-1]["time"] / ms,
               "stream_cases_per_s": stream.rate, "trainer_waited_s": stream.waited, "wt_lesion_dice": {},
               "predict_seconds": {}}
        for site, test in sets.items():
            cases = sorted(p for p in test.iterdir() if p.is_dir())[: a.cases]
            pred = a.out / "predictions" / key / site
            t1 = time.perf_counter()
            predict(snap, cases_folder(cases, a.out / "inputs" / site), pred, device=a.device, progress=False,
                    overwrite=True)
            row["predict_seconds"][site] = round(time.perf_counter() - t1, 1)
            summary = evaluate_folders(pred, a.out / "inputs" / site, a.out / "evaluation" / key / site)
            row["wt_lesion_dice"][site] = round(summary["mean"]["WT_lesion_dice"], 4)
        results[key] = row
        res_path.write_text(json.dumps(results, indent=1))
        print(f"{key}: {seconds:.0f} s this leg, {row['s_per_step']:.3f} s/step, stream "  # noqa: T201
              f"{row['stream_cases_per_s']} cases/s (trainer waited {row['trainer_waited_s']} s); WT lesion "
              f"Dice {row['wt_lesion_dice']}", flush=True)


def cases_folder(cases: list[Path], folder: Path) -> Path:
    """A folder holding links to the first selection cases (predict and evaluate read it as a dataset)."""
    if not folder.is_dir():
        folder.mkdir(parents=True)
        for c in cases:
            (folder / c.name).symlink_to(c.resolve(), target_is_directory=True)
    return folder


if __name__ == "__main__":
    main()
