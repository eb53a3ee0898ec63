"""Random draws (menseg.draws): ranges, replay, and the draw pattern the samplers' records rely on."""

from __future__ import annotations

import math

import pytest
import torch

from menseg.draws import SEED_RANGE, draw_seed, log_uniform, log_uniforms, uniform, uniforms


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_ranges_and_replay() -> None:
    vals = uniforms(gen(), 1000, -2.0, 3.0)
    assert all(-2.0 <= v < 3.0 for v in vals) and vals == uniforms(gen(), 1000, -2.0, 3.0)
    logs = log_uniforms(gen(), 1000, 0.5, 8.0)
    assert all(0.5 <= v < 8.0 for v in logs)
    # log-uniform: the log is uniform, so about half the draws lie below the geometric mean
    assert sum(v < math.sqrt(0.5 * 8.0) for v in logs) == pytest.approx(500, abs=60)
    assert 0 <= draw_seed(gen()) < SEED_RANGE and draw_seed(gen(1)) == draw_seed(gen(1))


def test_scalar_draws_follow_the_stream_of_one_call() -> None:
    g = gen(3)
    scalars = [uniform(g, 1.0, 2.0) for _ in range(5)]
    assert scalars == uniforms(gen(3), 5, 1.0, 2.0)
    assert log_uniform(gen(4), 0.1, 10.0) == log_uniforms(gen(4), 1, 0.1, 10.0)[0]


def test_float32_draws_are_a_different_stream_of_the_same_form() -> None:
    u32 = float(torch.rand((), generator=gen(5)))
    assert uniform(gen(5), 2.0, 4.0, dtype=torch.float32) == 2.0 + 2.0 * u32
    assert uniform(gen(5), dtype=torch.float32) != uniform(gen(5))
