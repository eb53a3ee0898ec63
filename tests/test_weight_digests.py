"""Guard: every packaged training config, 20 steps on a micro cohort, gives the recorded weights bit for bit.

The digests in ``weight_digests.json`` were recorded before the trainer was split into parts (issue 15),
so a refactor that changes no behaviour keeps them. A change that is *meant* to change training updates
them in the same commit and says why in its message and the CHANGELOG:

    MENSEG_RECORD_DIGESTS=1 pytest tests/test_weight_digests.py

Floating-point results depend on the CPU's kernels, so the digests hold for the torch version and CPU
capability they were recorded with (stored beside them); on another platform the test skips and says so.
They also depend on the number of intra-op threads (how reductions are split), so the guard trains with
:data:`THREADS` threads whatever the machine has.
The micro cohort: 3 labelled and 2 unlabelled phantoms (2 mm, 32x32x24 voxels) trained at 4 mm, the
synthetic engine's real pools (1-2 cases) and a 4-step translator; a longitudinal cohort of 3 synthetic
patients with 2 visits each covers ISM's visit pairs.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from menseg.checkpoint import load_checkpoint
from menseg.config import PACKAGED_CONFIGS, load_config, packaged_config_names
from menseg.train.trainer import train
from nifti_factory import write_phantom_pools

DIGESTS = Path(__file__).with_name("weight_digests.json")
RECORD = os.environ.get("MENSEG_RECORD_DIGESTS") == "1"
STEPS = 20
#: intra-op threads of the guard's runs (the digests were recorded with 2)
THREADS = 2

#: One budget for every config: the configs keep their own parts, augmentation and schedules.
MICRO = ["model.filters=[4,8,16]", "model.deep_supr_num=1", "train.patch_size=[16,16,16]",
         "train.batch_size=2", f"train.steps={STEPS}", "train.val_every=1000", "train.checkpoint_every=10",
         "train.seed=7", "data.val_fraction=0", "data.spacing=[4.0,4.0,4.0]",
         "train.amp=false",  # fp32 everywhere: bf16 autocast depends on the CPU (the digests predate it)
         "ism.spatial.levels=[1]", "ism.temporal.level=1", "ism.n_synthetic=1",
         "sim2real.n_synthetic=2", "sim2real.align.levels=[1,2]", "sim2real.inject.per_scan=1",
         "sim2real.translator.steps=4", "sim2real.translator.patch_size=[16,16,16]",
         "sim2real.translator.channels=4", "sim2real.translator.preview_every=0",
         "sim2real.translator.checkpoint_every=2", "sim2real.translator.semantic_warmup=2"]


#: Cases of the guard: (id, packaged config, longitudinal cohort?).
CASES = [(n, n, False) for n in packaged_config_names()] + [("ism@visits", "ism", True)]


def weights_digest(run: Path) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the final model (and aligner) tensors."""
    state = load_checkpoint(run / "latest.pt")
    h = hashlib.sha256()
    for part in ("model", "aligner"):
        for k, v in sorted((state.get(part) or {}).items()):
            t = v.detach().cpu().contiguous().reshape(-1)
            h.update(f"{part}.{k}:{t.dtype}:{tuple(v.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def platform() -> str:
    return f"torch {torch.__version__.split('+')[0]}, {torch.backends.cpu.get_cpu_capability()}"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from menseg.synth.engine import SynthConfig, synth_dataset, with_spacing

    root = tmp_path_factory.mktemp("micro-cohort")
    write_phantom_pools(root, n_labelled=3)
    synth_dataset(root / "longitudinal", 3, "longitudinal", seed=1, cfg=with_spacing(SynthConfig(), 4.0),
                  visits=2, device="cpu")
    return root


@pytest.fixture(autouse=True)
def fixed_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def recorded() -> dict:
    if RECORD:
        return {"platform": platform(), "digests": {}}
    if not DIGESTS.is_file():
        pytest.skip(f"no recorded digests ({DIGESTS.name}); record them with MENSEG_RECORD_DIGESTS=1")
    rec = json.loads(DIGESTS.read_text())
    if rec["platform"] != platform():
        pytest.skip(f"digests recorded on {rec['platform']}, this is {platform()}: floating-point kernels "
                    "differ; record them here with MENSEG_RECORD_DIGESTS=1 to use the guard")
    return rec


@pytest.mark.parametrize("case,config,visits", CASES, ids=[c[0] for c in CASES])
def test_packaged_config_trains_to_the_recorded_weights(
    case: str, config: str, visits: bool, cohort: Path, recorded: dict, tmp_path: Path
) -> None:
    data = [f"data.root={cohort / 'longitudinal'}"] if visits else [
        f"data.root={cohort / 'labeled'}", f"data.unlabeled_root={cohort / 'unlabeled'}"]
    cfg = load_config(PACKAGED_CONFIGS / f"{config}.yaml",
                      [*MICRO, *data, f"data.cache_dir={cohort / 'cache'}", f"out_dir={tmp_path / 'run'}"])
    digest = weights_digest(train(cfg, progress=False))
    if RECORD:
        recorded["digests"][case] = digest
        old = json.loads(DIGESTS.read_text()) if DIGESTS.is_file() else {"digests": {}}
        old["platform"] = platform()
        old["digests"][case] = digest
        DIGESTS.write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")
        return
    assert case in recorded["digests"], f"no digest recorded for {case}; record with MENSEG_RECORD_DIGESTS=1"
    assert digest == recorded["digests"][case], f"{case}: the weights after {STEPS} steps changed"
