"""Trainer: end-to-end tiny run on phantoms, bit-exact resume, refusal of non-empty run folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from menseg.checkpoint import load_checkpoint, load_model
from menseg.config import Config, from_dict, load_config, with_overrides
from menseg.data.phantom import write_phantom_dataset
from menseg.data.sampling import PatchSampler
from menseg.errors import MensegError
from menseg.train.batches import iter_batches
from menseg.train.trainer import StepBatches, poly_lr, split_cases, train

STEPS = 6


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(root / "data", n_cases=3, shape=(32, 32, 32), seed=1)
    return root


def _cfg(data: Path, out: Path, *extra: str) -> Config:
    return load_config(None, [
        f"data={data / 'data'}", f"data.cache_dir={data / 'cache'}", f"out_dir={out}",
        "model.filters=[4,8,16]", "train.patch_size=[16,16,16]", "train.batch_size=2",
        f"train.steps={STEPS}", "train.val_every=3", "train.checkpoint_every=2", "train.seed=3",
        "infer.overlap=0.25", "aug.p_rotate=0.5", "aug.p_elastic=0.5", "aug.p_noise=0.5",
        *extra,
    ])


@pytest.fixture(scope="module")
def full_run(data: Path) -> tuple[Config, Path]:
    cfg = _cfg(data, data / "full")
    return cfg, train(cfg, progress=False)


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_end_to_end_outputs(full_run) -> None:
    cfg, out = full_run
    assert sorted(p.name for p in out.iterdir()) == [
        ".lock", "best.pt", "best.pt.sha256", "config.yaml", "latest.prev.pt", "latest.prev.pt.sha256",
        "latest.pt", "latest.pt.sha256", "metrics.jsonl"]
    assert load_checkpoint(out / "latest.prev.pt")["step"] == STEPS - 2  # the checkpoint before
    assert from_dict(Config, yaml.safe_load((out / "config.yaml").read_text())) == cfg
    recs = _lines(out / "metrics.jsonl")
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) and r["lr"] > 0 and r["time"] >= 0 for r in recs)
    assert recs[0]["lr"] == pytest.approx(cfg.train.lr)
    val_steps = [r["step"] for r in recs if "val_mean_dice" in r]
    assert val_steps == [3, 6]
    for r in recs:
        if "val_mean_dice" in r:
            assert 0.0 <= r["val_mean_dice"] <= 1.0
            assert {"val_ET_dice", "val_TC_dice", "val_WT_dice"} <= set(r)
    latest = load_checkpoint(out / "latest.pt")
    best = load_checkpoint(out / "best.pt")
    assert latest["step"] == STEPS and best["step"] in (3, 6)
    best_val = max(r["val_mean_dice"] for r in recs if "val_mean_dice" in r)
    assert latest["best_metric"] == pytest.approx(best_val)
    model, cfg2 = load_model(out / "best.pt", "cpu")
    assert cfg2 == cfg
    with torch.no_grad():
        assert model(torch.zeros(1, 4, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


def test_resume_is_bit_exact(full_run, data: Path) -> None:
    cfg_full, out_full = full_run
    cfg = _cfg(data, data / "killed")
    out = train(cfg, stop_at=5, progress=False)  # "killed" after step 5; last checkpoint at 4
    assert load_checkpoint(out / "latest.pt")["step"] == 4
    assert len(_lines(out / "metrics.jsonl")) == 5
    train(cfg, resume=True, progress=False)
    a = load_checkpoint(out_full / "latest.pt")
    b = load_checkpoint(out / "latest.pt")
    assert b["step"] == STEPS
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    ra, rb = _lines(out_full / "metrics.jsonl"), _lines(out / "metrics.jsonl")
    assert [r["step"] for r in rb] == list(range(1, STEPS + 1))  # line 5 of the killed run replaced
    for x, y in zip(ra, rb, strict=True):
        assert {k: v for k, v in x.items() if k != "time"} == {k: v for k, v in y.items() if k != "time"}
    # Resuming a finished run is a no-op.
    train(cfg, resume=True, progress=False)
    assert len(_lines(out / "metrics.jsonl")) == STEPS


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(
    full_run, data: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    cfg_full, out_full = full_run
    cfg = _cfg(data, data / f"damaged-{damage}")
    out = train(cfg, stop_at=5, progress=False)  # checkpoints at 2 and 4
    latest = out / "latest.pt"
    raw = bytearray(latest.read_bytes())
    if damage == "truncate":
        latest.write_bytes(bytes(raw[: len(raw) // 2]))
    else:  # one flipped byte: still a loadable zip, caught by the checksum
        raw[len(raw) // 3] ^= 0xFF
        latest.write_bytes(bytes(raw))
    with pytest.raises(MensegError, match="damaged|cannot read"):
        load_checkpoint(latest)
    with caplog.at_level(logging.WARNING, logger="menseg.checkpoint"):
        train(cfg, resume=True, progress=False)  # from step 2 (latest.prev.pt)
    assert "previous checkpoint" in caplog.text
    a, b = load_checkpoint(out_full / "latest.pt"), load_checkpoint(latest)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [r["step"] for r in _lines(out / "metrics.jsonl")] == list(range(1, STEPS + 1))


def test_failed_checkpoint_write_is_a_clear_error_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from menseg.checkpoint import save_checkpoint

    path = tmp_path / "latest.pt"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}, "step": 1}, keep_previous=True)
    before = path.read_bytes()

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(MensegError, match="No space left"):
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}, "step": 2}, keep_previous=True)
    assert path.read_bytes() == before and load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.pt", "latest.pt.sha256"]


def test_refuses_non_empty_out_dir_and_bad_resume(full_run, data: Path, tmp_path: Path) -> None:
    cfg, out = full_run
    before = (out / "latest.pt").stat().st_mtime_ns
    with pytest.raises(MensegError, match="not empty"):
        train(cfg, progress=False)
    assert (out / "latest.pt").stat().st_mtime_ns == before
    with pytest.raises(MensegError, match="nothing to resume"):
        train(_cfg(data, tmp_path / "fresh"), resume=True, progress=False)
    with pytest.raises(MensegError, match="model.filters"):
        train(with_overrides(cfg, ["model.filters=[4,8,32]"]), resume=True, progress=False)
    with pytest.raises(MensegError, match="data.root"):
        train(with_overrides(cfg, ["data.root=null", f"out_dir={tmp_path / 'x'}"]), progress=False)


def test_run_without_validation_names_and_predicts_from_its_final_weights(data: Path, tmp_path: Path,
                                                                           caplog) -> None:
    """No validation case (as a zero-label run): no best.pt, the log lists only what was written, and
    predicting from the run folder uses latest.pt."""
    import logging

    from menseg.checkpoint import run_checkpoint, run_files
    from menseg.infer.predict import predict

    cfg = _cfg(data, tmp_path / "noval", "data.val_fraction=0", "train.steps=2")
    with caplog.at_level(logging.INFO, logger="menseg"):
        out = train(cfg, progress=False)
    assert not (out / "best.pt").exists()
    assert run_files(out) == ["latest.pt", "metrics.jsonl", "config.yaml"]
    finished = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("finished"))
    assert "best.pt" not in finished and "latest.pt, metrics.jsonl, config.yaml" in finished
    assert run_checkpoint(out) == out / "latest.pt"
    written = predict(out, data / "data" / "PHANTOM-00000-000", tmp_path / "pred")
    assert len(written) == 1 and written[0].is_file()
    (out / "latest.pt").unlink()
    with pytest.raises(MensegError, match="no checkpoint in this run folder"):
        run_checkpoint(out)


def test_split_cases_reproducible() -> None:
    ids = [f"c{i}" for i in range(10)]
    tr, va = split_cases(ids, 0.2, (), seed=0)
    assert len(va) == 2 and sorted(tr + va) == ids
    assert split_cases(ids, 0.2, (), seed=0) == (tr, va)
    assert any(split_cases(ids, 0.2, (), seed=s) != (tr, va) for s in range(1, 6))
    assert split_cases(ids, 0.5, ("c3",), seed=0)[1] == ["c3"]
    assert split_cases(ids, 0.0, (), seed=0) == (ids, [])
    with pytest.raises(MensegError, match="c99"):
        split_cases(ids, 0.2, ("c99",), seed=0)


def test_poly_lr() -> None:
    assert poly_lr(0.01, 0, 100) == 0.01
    assert poly_lr(0.01, 50, 100) == pytest.approx(0.01 * 0.5**0.9)
    assert poly_lr(0.01, 100, 100) == 0.0


def test_worker_batches_equal_main_process() -> None:
    rng = np.random.default_rng(0)
    lab = np.zeros((20, 20, 20), np.uint8)
    lab[5:8, 5:8, 5:8] = 3
    sampler = PatchSampler([(rng.normal(size=(4, 20, 20, 20)).astype(np.float32), lab)], (8, 8, 8), 0.5)
    ds = StepBatches(sampler, 2, seed=4)
    main = list(iter_batches(ds, 3, 6, num_workers=0, pin=False))
    workers = list(iter_batches(ds, 3, 6, num_workers=1, pin=False))
    for (a, b, e), (c, d, f) in zip(main, workers, strict=True):
        assert torch.equal(a, c) and torch.equal(b, d) and torch.equal(e, f)
        assert e.tolist() == [0, 0]  # the case index of each sample
