"""Seconds per training step of the quick-profile baseline in each precision / memory format, and where a
step's time goes (issue 16, item 1; the figures in docs/benchmarks/medium/pilot.md and CHANGELOG).

    python docs/benchmarks/medium/step_speed.py OUT_DIR [fp32 bf16 bf16-cl fp32-cl]
    python docs/benchmarks/medium/step_speed.py OUT_DIR --profile

Data: 4 phantoms of 80x96x80 voxels at 2 mm (the size of the embedded cohort's brain box). One 50-step
run per setting; s/step is the mean of steps 10-50 from metrics.jsonl's wall times (warm-up excluded).
``--profile``: cProfile of one 60-step bf16 run (auto), the top of the cumulative table.
"""

from __future__ import annotations

import cProfile
import json
import pstats
import shutil
import sys
from pathlib import Path

from menseg.config import load_config
from menseg.data.phantom import write_phantom_dataset
from menseg.train.trainer import train

BUDGET = ["data.spacing=[2.0,2.0,2.0]", "model.filters=[16,32,64,128]", "model.deep_supr_num=1",
          "train.batch_size=2", "train.patch_size=[48,48,48]", "train.checkpoint_every=1000",
          "infer.overlap=0.25", "data.val_fraction=0"]
VARIANTS = {"fp32": ["train.amp=false"], "bf16": ["train.amp_dtype=bf16"],
            "bf16-cl": ["train.amp_dtype=bf16", "train.channels_last=true"],
            "fp32-cl": ["train.amp=false", "train.channels_last=true"]}


def _cfg(root: Path, run: Path, steps: int, extra: list[str]):  # type: ignore[no-untyped-def]
    shutil.rmtree(run, ignore_errors=True)
    return load_config("baseline", [*BUDGET, f"train.steps={steps}", f"data={root / 'data'}",
                                    f"data.cache_dir={root / 'cache'}", f"out_dir={run}", *extra])


def main() -> None:
    root = Path(sys.argv[1])
    if not (root / "data").exists():
        write_phantom_dataset(root / "data", n_cases=4, shape=(80, 96, 80), spacing=(2.0, 2.0, 2.0), seed=1)
    if "--profile" in sys.argv:
        pr = cProfile.Profile()
        pr.enable()
        train(_cfg(root, root / "run-profile", 60, []), progress=False)
        pr.disable()
        pstats.Stats(pr).sort_stats("cumulative").print_stats(25)
        return
    out = {}
    for name in sys.argv[2:] or list(VARIANTS):
        run = root / f"run-{name}"
        train(_cfg(root, run, 50, VARIANTS[name]), progress=False)
        t = {r["step"]: r["time"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
        out[name] = round((t[50] - t[10]) / 40, 4)
        print(f"{name}: {out[name]} s/step", flush=True)  # noqa: T201
    (root / "step_speed.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
