"""A pool of synthetic cases generated once into a folder and preprocessed like real cases.

Training variants that learn from synthetic meningiomas (ISM's ``synthetic`` partners, Sim2Real's
synthetic samples) draw patches from a fixed pool instead of synthesising in the training loop: on
CPU a 2 mm case takes about 3 s to synthesise, a patch a few milliseconds to cut.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from menseg.data.dataset import PreprocessedCase, preprocess_dataset
from menseg.data.layouts import discover_cases
from menseg.errors import MensegError
from menseg.synth.engine import SynthConfig, synth_dataset, with_spacing
from menseg.utils import write_json_atomic

log = logging.getLogger(__name__)


def synthetic_pool_cases(
    folder: str | Path,
    n: int,
    seed: int,
    spacing: Sequence[float],
    cache: str | Path,
    prefix: str = "SYN",
    what: str = "training",
) -> list[PreprocessedCase]:
    """``n`` synthetic cases (default procedural appearance model), preprocessed at ``spacing`` mm.

    The cases are generated on first use into ``folder/cases`` (BraTS layout, synthesised on a grid of
    ``min(spacing)`` mm from master ``seed``; ``folder/done.json`` marks a finished pool, an unfinished
    one is regenerated) and preprocessed into ``cache`` (reused when unchanged).
    """
    folder = Path(folder)
    if not (folder / "done.json").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        log.info("generating %d synthetic cases for %s in %s", n, what, folder)
        scfg = with_spacing(SynthConfig(), float(min(spacing)))
        synth_dataset(folder / "cases", n, "brats", seed=seed, cfg=scfg, prefix=prefix, device="cpu")
        write_json_atomic(folder / "done.json", {"n": n, "spacing_mm": float(min(spacing)), "seed": seed})
    cases = discover_cases(folder / "cases")
    if len(cases) != n:
        raise MensegError(f"synthetic pool holds {len(cases)} cases, expected {n}; delete it to rebuild",
                          folder)
    return preprocess_dataset(cases, cache, spacing)


__all__ = ["synthetic_pool_cases"]
