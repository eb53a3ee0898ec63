"""``menseg bench reference`` in quick mode: both lanes measured, figures finite, table renders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from menseg.bench.reference import (
    benchmark_reference,
    deep_supervision_weights,
    precision_plan,
    reference_sizes,
    reference_table,
    steps_per_second,
    to_regions,
)
from menseg.errors import MensegError


def test_quick_reference_benchmark(tmp_path: Path) -> None:
    res = benchmark_reference(device="cpu", quick=True, steps=2, warmup=1, out_dir=tmp_path)
    json.dumps(res)
    assert res["device"] == "cpu" and res["precision"] == "fp32" and res["note"] == ""
    assert res["patch"] == [16, 16, 16] and res["batch"] == 2
    for lane in ("menseg", "monai"):
        for key in ("train_steps_per_s", "predict_s"):
            v = res[lane][key]
            assert math.isfinite(v) and v > 0, (lane, key, v)
        assert res[lane]["autocast"] == "fp32"
    for key in ("train_steps_per_s", "predict_s"):
        assert math.isfinite(res["ratio"][key]) and res["ratio"][key] > 0
    # same weights, same windows: the maps differ only by where the sigmoid is applied
    assert 0.0 <= res["predict_max_abs_diff"] < 1.0
    assert json.loads((tmp_path / "reference.json").read_text())["steps"] == 2
    table = reference_table(res)
    assert "| menseg | MONAI reference |" in table and "training steps/s" in table
    assert "prediction s/case" in table


def test_bad_precision_and_folder(tmp_path: Path) -> None:
    with pytest.raises(MensegError, match="precision"):
        benchmark_reference(device="cpu", quick=True, precision="fp8")
    (tmp_path / "x").write_text("taken")
    with pytest.raises(MensegError, match="empty"):
        benchmark_reference(device="cpu", quick=True, out_dir=tmp_path)


def test_precision_plan_on_cpu() -> None:
    cpu = torch.device("cpu")
    plan = precision_plan("bf16", cpu)  # bf16 autocast runs on CPU in both lanes
    assert plan.menseg_overrides == ("train.amp=true", "train.amp_dtype=bf16")
    assert plan.monai_autocast is torch.bfloat16 and plan.menseg_autocast is torch.bfloat16
    amp = precision_plan("amp", cpu)  # the trainer's auto rule: fp32 on CPU
    assert amp.monai_autocast is None and amp.menseg_autocast is None and not amp.scaler
    assert "fp32" in amp.note
    assert precision_plan("fp32", cpu).note == ""


def test_regions_and_weights() -> None:
    lab = torch.tensor([0, 1, 2, 3]).reshape(1, 4, 1, 1)
    reg = to_regions(lab)[:, :, 0, 0]
    assert reg.tolist() == [[0, 0, 0, 1], [0, 1, 0, 1], [0, 1, 1, 1]]  # ET, TC, WT
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])


def test_steps_per_second_reads_the_measured_span(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [(1, 5.0), (2, 6.0), (3, 7.0)]
    path.write_text("".join(json.dumps({"step": s, "time": t}) + "\n" for s, t in rows))
    assert steps_per_second(path, warmup=1, steps=2) == pytest.approx(1.0)
    assert steps_per_second(path, warmup=0, steps=3) == pytest.approx(3 / 7)
    with pytest.raises(MensegError):
        steps_per_second(path, warmup=2, steps=5)


def test_full_sizes_are_the_default_model() -> None:
    s = reference_sizes()
    assert s.patch_size == (96, 96, 96) and s.batch_size == 2
    assert s.model.filters == (16, 32, 64, 128, 256) and s.predict_shape == (4, 160, 192, 160)


def test_precision_plan_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA mapping, without a GPU: bf16 where supported, float16 + scaler otherwise."""
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    for prec in ("bf16", "amp"):
        plan = precision_plan(prec, cuda)
        assert plan.menseg_overrides[0] == "train.amp=true"
        assert plan.monai_autocast is torch.bfloat16 and plan.menseg_autocast is torch.bfloat16
        assert not plan.scaler and plan.predict == "bf16" and plan.note == ""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    plan = precision_plan("amp", cuda)
    assert plan.monai_autocast is torch.float16 and plan.scaler and plan.predict == "fp32"
    assert "fp32" in plan.note


def test_cli_prints_the_table(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from menseg.cli import app

    res = CliRunner().invoke(app, ["bench", "reference", "--device", "cpu", "--quick", "--steps", "1",
                                   "--warmup", "1", "--out", str(tmp_path / "r"), "--set",
                                   "train.channels_last=true"])
    assert res.exit_code == 0, res.output
    assert "MONAI reference" in res.output
    saved = json.loads((tmp_path / "r" / "reference.json").read_text())
    assert saved["menseg_set"] == ["train.channels_last=true"]
    cfg = (tmp_path / "r" / "menseg-run" / "config.yaml").read_text()
    assert "channels_last: true" in cfg
    with pytest.raises(MensegError, match="unknown config key"):
        benchmark_reference(device="cpu", quick=True, menseg_set=["train.fast=true"])
