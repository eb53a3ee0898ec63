"""Helpers for tests that run ``menseg`` in subprocesses (kill / resume, torchrun)."""

from __future__ import annotations

import json
import os
from pathlib import Path


def subprocess_env() -> dict[str, str]:
    """This environment for a child ``menseg``: one thread, unbuffered, and no torchrun variables
    inherited from a surrounding distributed run."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def steps_done(run_dir: Path) -> int:
    """The last step ``run_dir/metrics.jsonl`` records (0 if none; a line cut by a kill is skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    n = 0
    for line in path.read_text().splitlines():
        try:
            n = max(n, int(json.loads(line)["step"]))
        except (ValueError, KeyError):
            continue
    return n
