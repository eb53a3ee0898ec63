"""``menseg benchmark synth``: synthetic cases per second, with a per-stage time breakdown.

Generates ``n`` cases of :func:`menseg.synth.engine.generate_case` on one
device after untimed warm-up cases (template loading and its per-process
cache, thread pools, CUDA kernels), and reports cases/s plus the mean seconds
of each stage (anatomy, lesion, appearance), CUDA-synchronised. Writing NIfTI
files is not included (see ``write_s_per_case`` when ``measure_write``).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from menseg.bench.env import environment, loadavg
from menseg.synth.engine import SynthConfig, generate_case, resolve_device

log = logging.getLogger(__name__)

#: Target speeds from issue 4, point 6 (cases/s at 1 mm, 160x192x160).
TARGET_CPU = 0.5
TARGET_GPU = 10.0


def benchmark_synth(
    device: str = "auto",
    n: int = 5,
    shape: Sequence[int] = (160, 192, 160),
    *,
    spacing: float = 1.0,
    site: str | None = None,
    warmup: int = 1,
    seed: int = 0,
    cfg: SynthConfig | None = None,
    measure_write: bool = False,
) -> dict[str, Any]:
    """Measure synthesis speed.

    Args:
        device: ``auto`` | ``cpu`` | ``cuda``.
        n: timed cases (indices ``warmup .. warmup + n - 1``).
        shape: grid (X, Y, Z) voxels; 160x192x160 at 1 mm is the issue's reference.
        spacing: isotropic voxel size, mm.
        site: render with this site's MR-physics model instead of the randomised appearance.
        warmup: untimed cases first (the first one loads and caches the template).
        seed: master seed.
        cfg: base config (its shape/spacing/site are replaced by the arguments).
        measure_write: also time writing one case as BraTS NIfTI (+ sidecar) to a temp folder.

    Returns:
        JSON-serialisable dict: environment, ``cases_per_s``, ``s_per_case``,
        ``stage_s`` (mean seconds per stage), ``stage_fraction``, ``per_case_s`` (list),
        ``template_s`` (first warm-up case, includes the template load), ``target`` and ``meets_target``.
    """
    dev = resolve_device(device)
    base = cfg if cfg is not None else SynthConfig()
    sp = (float(spacing),) * 3
    cfg = replace(base, shape=tuple(int(s) for s in shape), spacing=sp, site=site)  # type: ignore[arg-type]
    res: dict[str, Any] = {
        **environment(dev),
        "shape": list(cfg.grid_shape),
        "spacing_mm": list(sp),
        "site": site,
        "n": n,
        "warmup": warmup,
    }
    t0 = time.perf_counter()
    for i in range(warmup):
        generate_case(cfg, seed, i, dev)
        if i == 0:
            res["template_s"] = time.perf_counter() - t0
    per_case: list[float] = []
    stages: dict[str, float] = {}
    lesion_counts: list[int] = []
    for i in range(warmup, warmup + n):
        t = time.perf_counter()
        case = generate_case(cfg, seed, i, dev)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        per_case.append(time.perf_counter() - t)
        for k, v in case.timings.items():
            stages[k] = stages.get(k, 0.0) + v
        lesions = case.params.get("lesion", {}).get("lesions", [])
        lesion_counts.append(len(lesions) if isinstance(lesions, list) else 0)
        log.info("synth case %d: %.2f s %s", i, per_case[-1], case.timings)
    total = sum(per_case)
    res["per_case_s"] = per_case
    res["s_per_case"] = total / max(n, 1)
    res["cases_per_s"] = n / total if total > 0 else float("inf")
    res["stage_s"] = {k: v / max(n, 1) for k, v in stages.items()}
    accounted = sum(res["stage_s"].values())
    res["stage_s"]["other"] = max(0.0, res["s_per_case"] - accounted)
    res["stage_fraction"] = {k: v / res["s_per_case"] for k, v in res["stage_s"].items()} if total else {}
    res["lesions_per_case"] = lesion_counts
    if measure_write and n > 0:
        from menseg.synth import writer

        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            with writer.DatasetWriter(Path(tmp) / "w", "brats") as w:
                w.write(case, writer.case_id("BENCH", 0))
            res["write_s_per_case"] = time.perf_counter() - t
    res["target"] = TARGET_GPU if dev.type == "cuda" else TARGET_CPU
    res["meets_target"] = res["cases_per_s"] >= res["target"]
    res["load_average_end"] = loadavg()
    return res


def synth_bench_table(res: dict[str, Any]) -> Any:
    """A ``rich.table.Table`` of :func:`benchmark_synth`'s result."""
    from rich.table import Table

    shape = "x".join(str(s) for s in res["shape"])
    sp = res["spacing_mm"][0]
    table = Table(
        title=f"menseg synth on {res['device']} ({res['device_name']}, {res['threads']} threads): "
        f"{shape} at {sp:g} mm, {res['n']} case(s)"
        + (f", site {res['site']}" if res.get("site") else ", randomised appearance"),
        caption=f"load average (1/5/15 min) at start {res.get('load_average_start')}, end "
        f"{res.get('load_average_end')}; above {res['threads']} means other work inflated the figures.",
    )
    table.add_column("stage")
    table.add_column("s / case", justify="right")
    table.add_column("share", justify="right")
    for k, v in res["stage_s"].items():
        table.add_row(k, f"{v:.3f}", f"{100 * res['stage_fraction'].get(k, 0.0):.0f}%")
    table.add_row("total", f"{res['s_per_case']:.3f}", "100%", style="bold")
    ok = "yes" if res["meets_target"] else "NO"
    table.add_row("cases / s", f"{res['cases_per_s']:.2f}", f"target {res['target']:g}: {ok}",
                  style="bold")
    if "template_s" in res:
        table.add_row("first case (template load)", f"{res['template_s']:.2f}", "")
    if "write_s_per_case" in res:
        table.add_row("write one case (NIfTI + sidecar)", f"{res['write_s_per_case']:.2f}", "")
    return table


def render_synth_bench(res: dict[str, Any], console: Any = None) -> None:
    """Print :func:`synth_bench_table` with rich (to ``console`` or stdout)."""
    from rich.console import Console

    (console or Console()).print(synth_bench_table(res))


__all__ = ["TARGET_CPU", "TARGET_GPU", "benchmark_synth", "render_synth_bench", "synth_bench_table"]
