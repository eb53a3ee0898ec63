"""Where sliding-window outputs are stitched (``infer.stitch``): the rule, and identical results."""

from __future__ import annotations

import pytest
import torch

from menseg.config import InferConfig, load_config
from menseg.errors import MensegError
from menseg.infer.sliding import predict_probs, stitch_device
from menseg.nets import build_network

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


def test_stitch_rule() -> None:
    big = (4, 512, 512, 400)  # 8 fp32 channels of 512x512x400: 3.4 GB
    assert stitch_device(CPU, big, "auto") == CPU
    assert stitch_device(CUDA, big, "cpu") == CPU
    assert stitch_device(CUDA, big, "device") == CUDA
    assert stitch_device(CUDA, big, "auto", total_memory=80 * 2**30) == CUDA  # 3.4 GB < 20 GB
    assert stitch_device(CUDA, big, "auto", total_memory=12 * 2**30) == CPU  # 3.4 GB > 3 GB
    with pytest.raises(MensegError, match="infer.stitch"):
        stitch_device(CUDA, big, "host")
    with pytest.raises(MensegError, match="infer.stitch"):
        load_config("baseline", ["infer.stitch=host"])


def test_cpu_stitching_gives_the_same_probabilities() -> None:
    torch.manual_seed(0)
    net = build_network(load_config("baseline", ["model.filters=[4,8,16]", "model.deep_supr_num=1"]).model)
    image = torch.randn(4, 20, 18, 16)
    a = predict_probs(net, image, (16, 16, 16), InferConfig(overlap=0.25), "cpu")
    b = predict_probs(net, image, (16, 16, 16), InferConfig(overlap=0.25, stitch="cpu"), "cpu")
    assert a.shape == (3, 20, 18, 16) and torch.equal(a, b)
