"""Sim2Real's synthetic stream (``sim2real.stream``): cases as a function of (seed, index), label maps
trimmed to a skull-stripped brain, the rolling pool and its background thread, and training on it
(resume bit-exact across a renewal)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from menseg.checkpoint import load_checkpoint
from menseg.config import StreamConfig, load_config, with_overrides
from menseg.errors import MensegError
from menseg.sim2real.stream import RollingPool, StreamSource, resolve_mapping, trim_csf
from menseg.synth import tissues as T
from menseg.train.trainer import train
from nifti_factory import write_phantom_pools


def _head(size: int = 96, seed: int = 0) -> np.ndarray:
    """A whole-head label map at 1 mm in SynthSeg's ids: WM (2) in cortex (3) in CSF (24), a CSF canal
    running down to the volume's edge (as whole-head maps label the spinal canal) and scalp (507)."""
    rng = np.random.default_rng(seed)
    c = size / 2 + rng.uniform(-1, 1, 3)
    x, y, z = np.meshgrid(*(np.arange(size) for _ in range(3)), indexing="ij")
    r = np.sqrt((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2)
    lab = np.zeros((size,) * 3, np.int32)
    lab[r < 30] = 507
    lab[r < 23] = 24
    lab[r < 20] = 3
    lab[r < 13] = 2
    canal = (np.hypot(x - c[0], y - c[1]) < 3) & (z < c[2])
    lab[canal & (lab != 2) & (lab != 3)] = 24
    return lab


@pytest.fixture(scope="module")
def maps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("label-maps")
    for i in range(2):
        nib.save(nib.Nifti1Image(_head(seed=i), np.eye(4)), str(folder / f"head_{i}.nii.gz"))
    return folder


def _source(maps: Path, **kw: object) -> StreamSource:
    cfg = StreamConfig(**{"label_maps": str(maps), "label_map_share": 1.0, **kw})  # type: ignore[arg-type]
    return StreamSource.build(cfg, 11, (2.0, 2.0, 2.0))


def test_trim_csf_drops_the_canal_and_keeps_the_rim() -> None:
    head = _head()
    mapping = resolve_mapping("synthseg")
    assert mapping is not None and mapping[24] == T.CSF and mapping[507] == T.BACKGROUND
    trimmed = trim_csf(head, mapping, (1.0, 1.0, 1.0))
    assert (trimmed == 24).sum() < (head == 24).sum()
    # the canal more than 6 mm below the cortex (whose lowest voxel is at z = 28) is gone
    assert (head[:, :, :20] == 24).any() and not (trimmed[:, :, :20] == 24).any()
    assert ((trimmed == 24) == (head == 24))[25:71, 25:71, 30:71].all()  # the rim around the brain stays
    assert (trimmed == 507).sum() == (head == 507).sum()  # other classes untouched


def test_stream_cases_are_brain_sized_and_a_function_of_seed_and_index(maps: Path) -> None:
    src = _source(maps)
    cid, img, lab = src.case(3)
    again = src.case(3)
    assert cid == again[0] == "STREAM-0000003"
    assert np.array_equal(img, again[1]) and np.array_equal(lab, again[2])
    assert not np.array_equal(img, src.case(4)[1])
    assert img.shape[0] == 4 and img.shape[1:] == lab.shape and (lab > 0).any()
    # cropped to the brain and its CSF rim (23 mm radius, 2 mm voxels): not the 30 mm scalp, nor the
    # canal 48 mm down
    assert max(lab.shape) <= 29, lab.shape
    assert set(np.unique(lab).tolist()) <= {0, 1, 2, 3}


def test_kinds_follow_the_shares_and_bad_names_are_refused(maps: Path) -> None:
    src = _source(maps, label_map_share=0.25, sites=("random", "site-b"))
    kinds = [src.kind(j) for j in range(800)]
    assert sum(k.startswith("map:") for k in kinds) / 800 == pytest.approx(0.25, abs=0.05)
    assert {k for k in kinds if not k.startswith("map:")} == {"random", "site-b"}
    with pytest.raises(MensegError, match="sim2real.stream.sites: unknown 'site-z'"):
        _source(maps, sites=("random", "site-z"))
    with pytest.raises(MensegError, match="label_mapping 'nope' is neither a packaged mapping"):
        _source(maps, label_mapping="nope")
    with pytest.raises(MensegError, match=r"no label maps \(\*.nii.gz / \*.nii\) in folder"):
        StreamSource.build(StreamConfig(label_maps=str(maps / "..")), 0, (2.0, 2.0, 2.0))


def _fake_case(j: int) -> tuple[str, np.ndarray, np.ndarray]:
    return f"C{j}", np.full((4, 2, 2, 2), float(j), np.float32), np.zeros((2, 2, 2), np.uint8)


def test_rolling_pool_makes_the_next_generation_in_the_background() -> None:
    made: list[tuple[int, str]] = []

    def make(j: int) -> tuple[str, np.ndarray, np.ndarray]:
        made.append((j, threading.current_thread().name))
        return _fake_case(j)

    pool = RollingPool(make, n=3, every=5, transform=lambda cs: [(c, i + 100, lab) for c, i, lab in cs])
    assert pool.generation_of(4) == 0 and pool.generation_of(5) == 1
    gen0 = pool.get(0)
    assert [c for c, _, _ in gen0] == ["C0", "C1", "C2"] and gen0[0][1][0, 0, 0, 0] == 100
    deadline = time.time() + 10
    while len(made) < 6 and time.time() < deadline:
        time.sleep(0.01)
    assert [j for j, _ in made[3:]] == [3, 4, 5]
    assert all(name.startswith("menseg-stream") for _, name in made[3:])  # made in the background
    gen1 = pool.get(1)
    assert [c for c, _, _ in gen1] == ["C3", "C4", "C5"]
    assert pool.made >= 6 and pool.make_seconds > 0  # (generation 2 may be under way already)
    assert pool.get(3)[0][0] == "C9"  # a jump (resume) makes the generation it needs at once
    with pytest.raises(MensegError, match="holds 3 cases, got 1"):
        pool.put(7, [_fake_case(0)])


def test_a_failing_generation_fails_in_the_trainer() -> None:
    def make(j: int) -> tuple[str, np.ndarray, np.ndarray]:
        if j >= 2:
            raise MensegError(f"case {j} cannot be made")
        return _fake_case(j)

    pool = RollingPool(make, n=2, every=1)
    pool.get(0)
    with pytest.raises(MensegError, match="case 2 cannot be made"):
        pool.get(1)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_phantom_pools(tmp_path_factory.mktemp("s2r-stream"), n_labelled=2)


def test_training_on_a_renewed_stream_resumes_exactly(data: Path, maps: Path, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    import logging

    cfg = load_config("sim2real", [
        "model.filters=[4,8,16]", "model.deep_supr_num=1", "train.patch_size=[16,16,16]",
        "train.batch_size=2", "train.val_every=100", "train.checkpoint_every=2", "train.seed=3",
        "data.val_fraction=0",
        "sim2real.n_synthetic=2", "sim2real.translator.enabled=false", "sim2real.align.method=mmd",
        "sim2real.align.levels=[1,2]", "sim2real.schedule.real_start=0.25",
        "sim2real.schedule.real_end=0.25",
        "sim2real.stream.refresh_every=2", f"sim2real.stream.label_maps={maps}",
        "sim2real.stream.label_map_share=1.0", "postprocess.learn=false",
        f"data.root={data / 'labeled'}", f"data.unlabeled_root={data / 'unlabeled'}",
        f"data.cache_dir={data / 'cache'}", "data.spacing=[2.0,2.0,2.0]", f"out_dir={tmp_path / 'a'}",
        "train.steps=6"])
    with caplog.at_level(logging.INFO, logger="menseg"):
        train(cfg, progress=False)
    ready = [r.getMessage() for r in caplog.records if "synthetic generation" in r.getMessage()]
    assert [m.split()[3] for m in ready] == ["1", "2"], ready  # renewed at steps 2 and 4
    recs = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["s2r_synthetic"] for r in recs) > 0
    state = load_checkpoint(tmp_path / "a" / "latest.pt")
    b = with_overrides(cfg, [f"out_dir={tmp_path / 'b'}"])
    train(b, progress=False, stop_at=3)  # killed inside generation 1
    train(b, resume=True, progress=False)
    other = load_checkpoint(tmp_path / "b" / "latest.pt")
    for k, v in state["model"].items():
        assert torch.equal(v, other["model"][k]), k
    with pytest.raises(MensegError, match="refresh_every needs train.num_workers=0"):
        train(with_overrides(cfg, [f"out_dir={tmp_path / 'c'}", "train.num_workers=1"]), progress=False)


def test_the_pretraining_recipe_trains_with_no_label(maps: Path, tmp_path: Path) -> None:
    from menseg.checkpoint import run_checkpoint

    cfg = load_config("pretrain", [
        "model.filters=[4,8,16]", "train.patch_size=[16,16,16]", "train.steps=3", "train.checkpoint_every=3",
        "sim2real.n_synthetic=2", "sim2real.stream.refresh_every=2", f"sim2real.stream.label_maps={maps}",
        "data.spacing=[4.0,4.0,4.0]", f"data.cache_dir={tmp_path / 'cache'}", f"out_dir={tmp_path / 'run'}"])
    assert cfg.data.root is None and not cfg.sim2real.translator.enabled
    out = train(cfg, progress=False)
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(r["s2r_real"] == 0 for r in recs)
    assert run_checkpoint(out).name == "latest.pt"  # nothing validated: prediction uses the final weights
