"""``menseg demo``: synthesise a small cohort, train, predict held-out cases, evaluate.

The cohort comes from the synthetic engine rendered with a fixed scanner site's
MR-physics model (``menseg.synth.site``), the engine's stand-in for one hospital's
scans, at 2 mm so that it runs on 2 CPU cores. Everything is written under one
folder so a new user can look at each step's output.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from menseg.errors import MensegError

log = logging.getLogger(__name__)

#: Demo cohort: the 160x192x160 mm brain crop at 2 mm (80x96x80 voxels), one scanner site.
DEMO_SPACING_MM = 2.0
DEMO_SITE = "site-a"
DEMO_TRAIN_CASES = 10
DEMO_TEST_CASES = 4


def run_demo(out: str | Path, steps: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run synthesise -> train -> predict -> evaluate on a synthetic one-site cohort under ``out``.

    Returns the evaluation summary (as written to ``out/evaluation/summary.json``), with
    ``t1c_only``: the mean metrics of the same test cases predicted from t1c alone
    (``out/evaluation-t1c``).
    """
    import dataclasses

    from menseg.checkpoint import run_files
    from menseg.config import load_config
    from menseg.evaluate.runner import evaluate_folders
    from menseg.infer.predict import predict
    from menseg.synth.engine import SynthConfig, synth_dataset, with_spacing
    from menseg.train.trainer import train

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise MensegError("demo folder exists and is not empty (use --overwrite)", out)
        shutil.rmtree(out)
    t0 = time.perf_counter()
    train_dir, test_dir = out / "data" / "train", out / "data" / "test"
    log.info("synthesising %d training and %d test cases (%s, %g mm)", DEMO_TRAIN_CASES, DEMO_TEST_CASES,
             DEMO_SITE, DEMO_SPACING_MM)
    synth_cfg = dataclasses.replace(with_spacing(SynthConfig(), DEMO_SPACING_MM), site=DEMO_SITE)
    synth_dataset(train_dir, DEMO_TRAIN_CASES, "brats", seed=0, cfg=synth_cfg, prefix="DEMO-TRAIN",
                  device="cpu")
    synth_dataset(test_dir, DEMO_TEST_CASES, "brats", seed=1, cfg=synth_cfg, prefix="DEMO-TEST",
                  device="cpu", preview=True)

    overrides = [f"data.root={train_dir}", f"out_dir={out / 'run'}"]
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    cfg = load_config("demo", overrides)
    run_dir = train(cfg)
    pred_dir = out / "predictions"
    predict(run_dir, test_dir, pred_dir)
    summary = evaluate_folders(pred_dir, test_dir, out / "evaluation")
    # the same test cases from contrast-enhanced T1 alone (what a radiotherapy archive holds): the model
    # trained with sequence dropout accepts any subset
    predict(run_dir, test_dir, out / "predictions-t1c", sequences=["t1c"])
    t1c_only = evaluate_folders(out / "predictions-t1c", test_dir, out / "evaluation-t1c")
    summary["t1c_only"] = {"mean": t1c_only.get("mean", {}), "n_cases": t1c_only.get("n_cases")}
    minutes = (time.perf_counter() - t0) / 60
    log.info("demo finished in %.1f min", minutes)
    log.info("data:        %s (previews of the test cases in data/test/preview)", out / "data")
    log.info("run:         %s (%s)", run_dir, ", ".join(run_files(run_dir)))
    log.info("predictions: %s", pred_dir)
    log.info("evaluation:  %s (metrics.csv, summary.json); from t1c alone: %s", out / "evaluation",
             out / "evaluation-t1c")
    log.info("look at them: menseg review %s --images %s --ref %s --metrics %s", pred_dir, test_dir, test_dir,
             out / "evaluation")
    return summary
