"""Random draws from an explicit ``torch.Generator`` (DESIGN.md: randomness is explicit), one home.

Every sampler of parameters (synthesis stages, augmentation, ISM fields) draws its numbers through
these, so a parameter is always ``lo + (hi - lo) * u`` (log-uniform: ``exp`` of that in log space)
with ``u`` from ``torch.rand`` on the generator, and a sub-seed always one ``randint(0, 2**62)``.

``dtype`` is the dtype of ``u``: float64 everywhere except the lesion stage, whose recorded parameters
come from float32 draws (changing it would change every synthetic lesion). :func:`uniform` draws one
number (a 0-d tensor), :func:`uniforms` ``n`` numbers in one call; on a CPU generator ``n`` scalar
draws give the same numbers as one call of ``n``.
"""

from __future__ import annotations

import math

import torch

#: Sub-seeds are drawn from ``[0, SEED_RANGE)``.
SEED_RANGE = 2**62


def uniform(gen: torch.Generator, lo: float = 0.0, hi: float = 1.0, *, dtype: torch.dtype = torch.float64
            ) -> float:
    """One draw uniform in ``[lo, hi)``: ``lo + (hi - lo) * u``, ``u = torch.rand((), dtype)``."""
    return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=dtype))


def uniforms(gen: torch.Generator, n: int, lo: float = 0.0, hi: float = 1.0, *,
             dtype: torch.dtype = torch.float64) -> list[float]:
    """``n`` draws uniform in ``[lo, hi)`` from one ``torch.rand(n, dtype)``."""
    return [lo + (hi - lo) * u for u in torch.rand(n, generator=gen, dtype=dtype).tolist()]


def log_uniform(gen: torch.Generator, lo: float, hi: float, *, dtype: torch.dtype = torch.float64) -> float:
    """One draw log-uniform in ``[lo, hi)`` (both > 0): ``exp(uniform(log lo, log hi))``."""
    return math.exp(uniform(gen, math.log(lo), math.log(hi), dtype=dtype))


def log_uniforms(gen: torch.Generator, n: int, lo: float, hi: float) -> list[float]:
    """``n`` draws log-uniform in ``[lo, hi)`` from one ``torch.rand(n)``."""
    return [math.exp(v) for v in uniforms(gen, n, math.log(lo), math.log(hi))]


def draw_seed(gen: torch.Generator) -> int:
    """A sub-seed in ``[0, 2**62)`` (seeds a generator of its own, e.g. for a full-size noise field)."""
    return int(torch.randint(0, SEED_RANGE, (), generator=gen))


__all__ = ["SEED_RANGE", "draw_seed", "log_uniform", "log_uniforms", "uniform", "uniforms"]
