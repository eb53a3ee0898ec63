"""Heavier checks, run on request: `pytest -m slow` (the demo) and `pytest -m gpu` (CUDA paths)."""

import json
from pathlib import Path

import pytest
import torch

from menseg.data.phantom import write_phantom_dataset


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path):
    from menseg.demo import run_demo

    summary = run_demo(tmp_path / "demo")
    assert summary["n_cases"] >= 2
    on_disk = json.loads((tmp_path / "demo" / "evaluation" / "summary.json").read_text())
    assert on_disk["mean"] == summary["mean"]
    # the demo must learn something on its phantom data, not just run
    assert summary["mean"]["WT_dice"] > 0.5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_amp_training_and_prediction(tmp_path: Path):
    import nibabel as nib

    from menseg.config import load_config
    from menseg.infer.predict import predict
    from menseg.train.trainer import train

    write_phantom_dataset(tmp_path / "d", n_cases=3, shape=(40, 40, 32), seed=0)
    cfg = load_config("demo", [f"data={tmp_path / 'd'}", f"out_dir={tmp_path / 'run'}", "train.steps=4",
                               "train.device=cuda", "train.amp=true", "train.val_every=4",
                               "train.patch_size=[32,32,32]"])
    run = train(cfg)
    out = predict(run / "best.pt", tmp_path / "d", tmp_path / "pred", device="cuda", precision="bf16")
    assert len(out) == 3
    assert nib.load(out[0]).shape == (40, 40, 32)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cuda_speed_options_and_cpu_stitching(tmp_path: Path, dtype: str):
    """amp (bf16, fp16 + loss scaler), channels_last_3d and torch.compile train on CUDA; a GPU
    prediction stitched on the CPU equals one stitched on the GPU."""
    from menseg.checkpoint import load_model
    from menseg.config import InferConfig, load_config
    from menseg.infer.sliding import predict_probs
    from menseg.train.trainer import train

    write_phantom_dataset(tmp_path / "d", n_cases=3, shape=(40, 40, 32), seed=0)
    cfg = load_config("demo", [f"data={tmp_path / 'd'}", f"out_dir={tmp_path / 'run'}", "train.steps=4",
                               "train.device=cuda", "train.amp=true", f"train.amp_dtype={dtype}",
                               "train.channels_last=true", "train.compile=default", "train.val_every=4",
                               "train.patch_size=[32,32,32]"])
    run = train(cfg)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 4 and all(r["loss"] == r["loss"] for r in recs)  # no NaN
    model, _ = load_model(run / "latest.pt", "cuda")
    image = torch.randn(4, 40, 40, 32)
    a = predict_probs(model, image, (32, 32, 32), InferConfig(stitch="device", precision="fp32"), "cuda")
    b = predict_probs(model, image, (32, 32, 32), InferConfig(stitch="cpu", precision="fp32"), "cuda")
    assert torch.allclose(a, b, atol=1e-5)
