"""``menseg benchmark speed`` in quick mode: keys present, figures positive, table renders."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from menseg.bench.speed import benchmark_speed, default_models, render_speed
from menseg.errors import MensegError


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
