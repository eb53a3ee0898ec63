"""Distributed training (DDP, gloo on CPU): sharding rules, and 2 processes == 1 process with the combined
batch; ISM + Sim2Real under DDP; the precision / memory-format / compile code paths on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from menseg.checkpoint import load_checkpoint
from menseg.config import load_config
from menseg.data.phantom import write_phantom_dataset
from menseg.errors import MensegError
from menseg.train import distributed as ddp
from menseg.train.trainer import amp_setup, train
from proc_helpers import subprocess_env

STEPS = 4
TINY = ["model.filters=[4,8,16]", "model.deep_supr_num=1", "train.patch_size=[16,16,16]",
        "train.checkpoint_every=1", "train.deterministic=true", "train.device=cpu"]


def _menseg(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "menseg", *args], capture_output=True, text=True,
                          env=subprocess_env(), timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ddp-phantoms")
    write_phantom_dataset(root / "data", n_cases=3, shape=(24, 24, 24), seed=5)
    return root


# ---------------------------------------------------------------- rules


@pytest.mark.parametrize("batch,world", [(2, 1), (2, 2), (8, 4), (6, 3)])
def test_shards_cover_the_global_batch_exactly_once(batch: int, world: int) -> None:
    parts = [ddp.shard(batch, ddp.Context(r, world, r)) for r in range(world)]
    assert sorted(i for p in parts for i in p) == list(range(batch))
    assert len({len(p) for p in parts}) == 1
    items = [f"case{i}" for i in range(7)]
    split = [ddp.split_items(items, ddp.Context(r, world, r)) for r in range(world)]
    assert sorted(x for s in split for x in s) == items


def test_the_ranks_batches_are_the_one_process_batch_cut_in_parts() -> None:
    from menseg.data.sampling import PatchSampler
    from menseg.train.trainer import StepBatches

    rng = np.random.default_rng(0)
    cases = [(rng.normal(size=(4, 20, 20, 20)).astype(np.float32),
              rng.integers(0, 4, (20, 20, 20)).astype(np.uint8)) for _ in range(3)]
    sampler = PatchSampler(cases, (8, 8, 8), 0.33)
    whole = StepBatches(sampler, 4, seed=5)
    for step in (0, 7, 123):
        img, lab, case = whole[step]
        parts = [StepBatches(sampler, 4, seed=5, part=ddp.shard(4, ddp.Context(r, 2, r)))[step]
                 for r in range(2)]
        assert np.array_equal(np.concatenate([p[0] for p in parts]), img)
        assert np.array_equal(np.concatenate([p[1] for p in parts]), lab)
        assert np.array_equal(np.concatenate([p[2] for p in parts]), case)


def test_a_batch_that_does_not_split_is_refused_before_any_work(tmp_path: Path) -> None:
    with pytest.raises(MensegError, match="multiple of the number of processes"):
        ddp.shard(3, ddp.Context(0, 2, 0))
    proc = subprocess.run([sys.executable, "-m", "menseg", "train", "baseline", "train.batch_size=3",
                           f"out_dir={tmp_path / 'x'}", "data=nowhere", "--nproc", "2"],
                          capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert proc.returncode == 2 and "multiple of the number of processes" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_only_train_runs_under_torchrun(tmp_path: Path) -> None:
    env = {**subprocess_env(), "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
    proc = subprocess.run([sys.executable, "-m", "menseg", "synth", str(tmp_path / "s"), "--cases", "1"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "only 'menseg train' runs under torchrun" in proc.stderr
    assert not (tmp_path / "s").exists()


def test_rank_seeds_context_and_launch_command(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ddp.rank_seed(7, 0) == 7
    seeds = {ddp.rank_seed(7, r) for r in range(4)}
    assert len(seeds) == 4
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert ddp.context_from_env() == ddp.Context(2, 4, 0)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(MensegError, match="bad distributed environment"):
        ddp.context_from_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(MensegError, match="not an integer"):
        ddp.context_from_env()
    cmd = ddp.torchrun_command(2, ["train", "baseline"])
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc_per_node=2" in cmd and cmd[-3:] == ["menseg", "train", "baseline"]
    with pytest.raises(MensegError):
        ddp.torchrun_command(0, [])


def test_batch_norm_becomes_sync_batch_norm_on_cuda_only(caplog: pytest.LogCaptureFixture) -> None:
    net = nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2))
    synced = ddp.sync_batch_norm(net, torch.device("cuda"))  # conversion itself needs no GPU
    assert any(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
    cpu = ddp.sync_batch_norm(nn.Sequential(nn.Conv3d(1, 2, 3), nn.BatchNorm3d(2)), torch.device("cpu"))
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in cpu.modules())
    assert "own batch statistics" in caplog.text
    inst = nn.Sequential(nn.Conv3d(1, 2, 3), nn.InstanceNorm3d(2))
    assert ddp.sync_batch_norm(inst, torch.device("cuda")) is inst


def test_single_process_helpers_are_identities() -> None:
    x = torch.arange(3.0, requires_grad=True)
    assert ddp.sum_across_ranks(x) is x and ddp.all_reduce_sum(x) is x
    assert ddp.broadcast(ddp.SINGLE, {"a": 1}) == {"a": 1}
    with ddp.main_first(ddp.SINGLE):
        pass
    ddp.check_in_sync(ddp.SINGLE, [x], torch.device("cpu"))


# ---------------------------------------------------------------- DDP == one process


def test_two_gloo_processes_match_one_process_with_the_combined_batch(data: Path, tmp_path: Path) -> None:
    common = [f"data={data / 'data'}", f"data.cache_dir={data / 'cache'}", *TINY, f"train.steps={STEPS}",
              "train.batch_size=2", "train.val_every=2", "data.val_fraction=0.34", "train.seed=11",
              "train.lr=0.02", "train.amp=false"]  # fp32: bf16 rounding would hide the exactness measured
    one, two = tmp_path / "one", tmp_path / "two"
    _menseg("train", "baseline", *common, f"out_dir={one}")
    proc = _menseg("train", "baseline", *common, f"out_dir={two}", "--nproc", "2")
    assert "[rank 0]" in proc.stderr and "2 processes (global batch 2)" in proc.stderr
    assert "[rank 1] menseg.train.trainer: model" not in proc.stderr  # other ranks log warnings only
    a, b = load_checkpoint(one / "latest.pt"), load_checkpoint(two / "latest.pt")
    assert a["step"] == b["step"] == STEPS
    gap = max(float((a["model"][k].float() - b["model"][k].float()).abs().max()) for k in a["model"])
    # 3.3e-5 apart after 4 steps with the pooling switched off (tried); float summation order only here
    assert gap < 1e-6, gap
    ra = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rb] == list(range(1, STEPS + 1))  # rank 0 alone wrote, once per step
    for x, y in zip(ra, rb, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        for k in ("val_ET_dice", "val_TC_dice", "val_WT_dice"):  # all-reduced validation
            assert (k in x) == (k in y) and y.get(k, 0.0) == pytest.approx(x.get(k, 0.0), abs=1e-6)
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    # resume under DDP: rank 0 reads latest.pt and broadcasts it; the run goes on from step 4
    _menseg("train", "baseline", *common, f"out_dir={two}", f"train.steps={STEPS + 1}", "--resume",
            "--nproc", "2")
    assert load_checkpoint(two / "latest.pt")["step"] == STEPS + 1
    assert len((two / "metrics.jsonl").read_text().splitlines()) == STEPS + 1


def test_ism_and_sim2real_train_under_ddp(tmp_path: Path) -> None:
    root = tmp_path / "d"
    write_phantom_dataset(root / "lab", n_cases=2, shape=(32, 32, 24), spacing=(2.0, 2.0, 2.0), seed=4)
    write_phantom_dataset(root / "unl", n_cases=2, shape=(32, 32, 24), spacing=(2.0, 2.0, 2.0), seed=9,
                          prefix="UNLAB")
    for seg in (root / "unl").glob("*/*-seg.nii.gz"):
        seg.unlink()
    out = tmp_path / "both"
    _menseg("train", "both", f"data={root / 'lab'}", f"data.unlabeled_root={root / 'unl'}",
            f"data.cache_dir={root / 'cache'}", "data.spacing=[2.0,2.0,2.0]", *TINY, "train.steps=3",
            "train.batch_size=2", "data.val_fraction=0", "train.seed=3", "sim2real.n_synthetic=2",
            "sim2real.translator.steps=2", "sim2real.translator.patch_size=[16,16,16]",
            "sim2real.align.method=adversarial", "sim2real.align.levels=[1,2]",
            "sim2real.inject.enabled=true", "sim2real.inject.per_scan=1", "ism.n_synthetic=1",
            "ism.spatial.levels=[1]", "ism.spatial.p=1.0",
            f"out_dir={out}", "--nproc", "2", timeout=400)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:  # counts summed over both ranks' shards: the global batch of 2
        assert r["s2r_real"] + r["s2r_synthetic"] + r["s2r_injected"] == 2
        assert r["ism_mixed"] == 2 and np.isfinite(r["loss"]) and "s2r_domain_acc" in r
    state = load_checkpoint(out / "latest.pt")
    assert state["step"] == 3 and state["aligner"]
    # the ranks' weights were compared at every checkpoint (check_in_sync) and the run finished


# ---------------------------------------------------------------- precision, memory format, compile


def test_amp_setup_follows_amp_and_amp_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    import menseg.infer.sliding as sliding

    cpu = torch.device("cpu")
    monkeypatch.setattr(sliding, "bf16_is_fast", lambda device: False)
    assert amp_setup(load_config("baseline"), cpu) == (None, None)  # auto on a CPU without bf16: fp32
    monkeypatch.setattr(sliding, "bf16_is_fast", lambda device: device.type == "cpu")
    assert amp_setup(load_config("baseline"), cpu) == (torch.bfloat16, None)  # native bf16: autocast
    monkeypatch.undo()
    assert amp_setup(load_config("baseline", ["train.amp_dtype=bf16"]), cpu) == (torch.bfloat16, None)
    dtype, scaler = amp_setup(load_config("baseline", ["train.amp_dtype=fp16"]), cpu)
    assert dtype == torch.float16 and isinstance(scaler, torch.amp.GradScaler)
    off = load_config("baseline", ["train.amp=false", "train.amp_dtype=bf16"])
    assert amp_setup(off, cpu) == (None, None)
    for bad in ("train.amp_dtype=fp8", "train.compile=fast"):
        with pytest.raises(MensegError, match="must be one of"):
            load_config("baseline", [bad])


@pytest.mark.parametrize("extra", [
    ["train.amp_dtype=bf16", "train.channels_last=true"],
    ["train.amp_dtype=fp16", "train.compile=eager"],
])
def test_mixed_precision_channels_last_and_compile_paths_train_on_cpu(
    data: Path, tmp_path: Path, extra: list[str]
) -> None:
    base = [f"data={data / 'data'}", f"data.cache_dir={data / 'cache'}", *TINY, "train.steps=2",
            "train.batch_size=2", "train.val_every=2", "data.val_fraction=0.34", "train.seed=1"]
    plain = train(load_config("baseline", [*base, f"out_dir={tmp_path / 'plain'}"]), progress=False)
    run = train(load_config("baseline", [*base, *extra, f"out_dir={tmp_path / 'x'}"]), progress=False)
    a, b = load_checkpoint(plain / "latest.pt"), load_checkpoint(run / "latest.pt")
    assert list(a["model"]) == list(b["model"])  # compile in place and channels_last keep the keys
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all(np.isfinite(r["loss"]) for r in recs) and "val_mean_dice" in recs[-1]
    if "train.amp_dtype=fp16" in extra:
        assert b["scaler"] is not None  # the fp16 loss scaler's state is checkpointed
    # the same numbers up to reduced precision
    assert recs[0]["loss"] == pytest.approx(json.loads((plain / "metrics.jsonl").read_text().splitlines()[0])
                                            ["loss"], rel=0.05)


@pytest.mark.slow
def test_inductor_compile_trains_on_cpu(data: Path, tmp_path: Path) -> None:
    """torch.compile with code generation (inductor, needs a C++ compiler): slow, minutes on 2 cores."""
    out = train(load_config("baseline", [f"data={data / 'data'}", f"data.cache_dir={data / 'cache'}", *TINY,
                                         "train.steps=2", "train.batch_size=2", "train.val_every=100",
                                         "data.val_fraction=0", "train.compile=default",
                                         f"out_dir={tmp_path / 'c'}"]), progress=False)
    assert load_checkpoint(out / "latest.pt")["step"] == 2
