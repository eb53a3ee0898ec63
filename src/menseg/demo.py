"""``menseg demo``: generate a phantom dataset, train, predict held-out cases, evaluate.

Everything is written under one folder so a new user can look at each step's output.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from menseg.errors import MensegError

log = logging.getLogger(__name__)

#: Phantom geometry of the demo: small enough for 2 CPU cores, big enough to need sliding windows.
DEMO_SHAPE = (72, 72, 56)
DEMO_TRAIN_CASES = 10
DEMO_TEST_CASES = 4


def run_demo(out: str | Path, steps: int | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Run train -> predict -> evaluate on generated phantom data under ``out``.

    Returns the evaluation summary (as written to ``out/evaluation/summary.json``).
    """
    from menseg.config import load_config
    from menseg.data.phantom import write_phantom_dataset
    from menseg.evaluate.runner import evaluate_folders
    from menseg.infer.predict import predict
    from menseg.train.trainer import train

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise MensegError("demo folder exists and is not empty (use --overwrite)", out)
        shutil.rmtree(out)
    t0 = time.perf_counter()
    train_dir, test_dir = out / "data" / "train", out / "data" / "test"
    log.info("generating %d training and %d test phantom cases", DEMO_TRAIN_CASES, DEMO_TEST_CASES)
    write_phantom_dataset(train_dir, DEMO_TRAIN_CASES, DEMO_SHAPE, seed=0, prefix="DEMO-TRAIN")
    write_phantom_dataset(test_dir, DEMO_TEST_CASES, DEMO_SHAPE, seed=1, prefix="DEMO-TEST")

    overrides = [f"data.root={train_dir}", f"out_dir={out / 'run'}"]
    if steps is not None:
        overrides.append(f"train.steps={steps}")
    cfg = load_config("demo", overrides)
    run_dir = train(cfg)
    pred_dir = out / "predictions"
    predict(run_dir / "best.pt", test_dir, pred_dir)
    summary = evaluate_folders(pred_dir, test_dir, out / "evaluation")
    minutes = (time.perf_counter() - t0) / 60
    log.info("demo finished in %.1f min", minutes)
    log.info("data:        %s", out / "data")
    log.info("run:         %s (config.yaml, metrics.jsonl, best.pt, latest.pt)", run_dir)
    log.info("predictions: %s", pred_dir)
    log.info("evaluation:  %s (metrics.csv, summary.json)", out / "evaluation")
    return summary
