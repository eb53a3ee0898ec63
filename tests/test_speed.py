"""``menseg benchmark speed``: report structure on toy sizes (default suite), the quick benchmark (slow)."""

from __future__ import annotations

import io
import json
import math

import pytest
from rich.console import Console

from menseg.bench.speed import BenchModel, benchmark_speed, default_models, n_parameters, render_speed
from menseg.config import ModelConfig
from menseg.errors import MensegError
from menseg.nets import build_network

FIGURES = ("train_it_per_s", "predict_crop_s", "predict_case_s", "predict_case_mirror_s", "peak_memory_mb")


def test_smoke_report_structure() -> None:
    """Tiny networks, one timed step, one precision: the report's keys, types, units and counts."""
    models = {
        "small": BenchModel(ModelConfig(filters=(4, 8, 16), deep_supr_num=1), (16, 16, 16)),
        "wide": BenchModel(ModelConfig(filters=(6, 12, 24), deep_supr_num=1), (16, 16, 16)),
        "wider": BenchModel(ModelConfig(filters=(8, 16, 32), deep_supr_num=1), (16, 16, 16)),
    }
    res = benchmark_speed(device="cpu", precisions=("fp32",), mirror="default-only", models=models,
                          train_warmup=0, train_steps=1, case_shape=(4, 16, 16, 16),
                          crop_shape=(4, 16, 16, 12))
    assert json.loads(json.dumps(res)) == res  # plain JSON types only (written by --out)
    # What was asked is what is recorded.
    assert res["device"] == "cpu" and res["quick"] is False
    assert res["case_shape"] == [4, 16, 16, 16] and res["crop_shape"] == [4, 16, 16, 12]
    assert res["train_warmup_steps"] == 0 and res["train_timed_steps"] == 1
    assert res["precisions"] == ["fp32"] and res["mirror_mode"] == "default-only"
    assert "MiB" in res["memory_kind"]
    assert isinstance(res["threads"], int) and res["threads"] >= 1
    assert isinstance(res["torch"], str) and isinstance(res["device_name"], str)
    for key in ("load_average_start", "load_average_end"):
        assert res[key] is None or (len(res[key]) == 3 and all(isinstance(v, float) for v in res[key]))
    # One entry per network, in the order given; the first is the ratios' reference.
    assert list(res["models"]) == list(models)
    for i, (name, spec) in enumerate(models.items()):
        entry = res["models"][name]
        assert set(entry) == {"filters", "patch_size", "deep_supr_num", "params_m", "fp32",
                              "process_maxrss_mb"}
        assert entry["filters"] == list(spec.model.filters) and entry["patch_size"] == [16, 16, 16]
        assert entry["deep_supr_num"] == 1
        net = build_network(spec.model, patch_size=spec.patch_size)
        assert entry["params_m"] == pytest.approx(n_parameters(net) / 1e6)  # millions of parameters
        e = entry["fp32"]
        assert set(e) == {*FIGURES, "predict_case_mirror_measured"}
        assert all(isinstance(e[k], float) and math.isfinite(e[k]) and e[k] > 0 for k in FIGURES)
        # default-only: the first network's mirrored prediction is timed, the others' estimated as 8x.
        assert e["predict_case_mirror_measured"] is (i == 0)
        if i > 0:
            assert e["predict_case_mirror_s"] == pytest.approx(8 * e["predict_case_s"])
        # MiB, sampled RSS: never above the process's peak RSS recorded after the phase.
        assert e["peak_memory_mb"] <= entry["process_maxrss_mb"] + 1.0
        assert e["peak_memory_mb"] > 10.0  # a Python process with torch holds far more than 10 MiB
    assert res["process_maxrss_mb"] >= max(m["process_maxrss_mb"] for m in res["models"].values())
    # Ratios: one block per network after the first, each the documented quotient.
    assert set(res["ratio"]) == {"wide", "wider"}
    base = res["models"]["small"]["fp32"]
    for other in ("wide", "wider"):
        o, r = res["models"][other]["fp32"], res["ratio"][other]["fp32"]
        assert set(res["ratio"][other]) == {"fp32"} and set(r) == set(FIGURES)
        assert r["train_it_per_s"] == pytest.approx(base["train_it_per_s"] / o["train_it_per_s"])
        for key in FIGURES[1:]:
            assert r[key] == pytest.approx(o[key] / base[key]), key
    # The table has a column per network and precision plus one per ratio block.
    buf = io.StringIO()
    render_speed(res, Console(file=buf, width=400))
    text = buf.getvalue()
    assert "ratio vs wide" in text and "ratio vs wider" in text and "ratio vs small" not in text
    mirror_row = next(line for line in text.splitlines() if "8-flip mirror" in line)
    assert mirror_row.count("~") == 2  # the two estimated mirror figures


@pytest.mark.slow
def test_quick_benchmark_has_all_figures() -> None:
    res = benchmark_speed(device="cpu", quick=True, mirror="default-only")
    json.dumps(res)  # serialisable for --out
    assert res["device"] == "cpu" and res["quick"] is True
    assert set(res["models"]) == {"default", "nnunet"}
    for name, entry in res["models"].items():
        assert entry["params_m"] > 0
        assert entry["process_maxrss_mb"] > 0
        for prec in ("fp32", "bf16"):
            e = entry[prec]
            for key in ("train_it_per_s", "predict_crop_s", "predict_case_s",
                        "predict_case_mirror_s", "peak_memory_mb"):
                assert e[key] > 0, (name, prec, key)
            assert e["predict_case_mirror_measured"] is (name == "default")
    est = res["models"]["nnunet"]["fp32"]
    assert est["predict_case_mirror_s"] == pytest.approx(8 * est["predict_case_s"])
    for prec in ("fp32", "bf16"):
        r = res["ratio"]["nnunet"][prec]
        assert set(r) == {"train_it_per_s", "predict_crop_s", "predict_case_s",
                          "predict_case_mirror_s", "peak_memory_mb"}
        assert all(v > 0 for v in r.values())
    buf = io.StringIO()
    render_speed(res, Console(file=buf, width=250))
    text = buf.getvalue()
    assert "load average" in text
    assert "training it/s" in text and "ratio vs nnunet" in text and "~" in text


def test_full_size_models_are_the_documented_ones() -> None:
    models = default_models()
    assert models["default"].patch_size == (96, 96, 96)
    assert models["nnunet"].model.filters == (32, 64, 128, 256, 320, 320)
    assert models["nnunet"].patch_size == (128, 128, 128)


def test_bad_mirror_mode() -> None:
    with pytest.raises(MensegError, match="mirror mode"):
        benchmark_speed(device="cpu", quick=True, mirror="sometimes")
