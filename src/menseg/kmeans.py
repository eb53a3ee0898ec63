"""1-D k-means (Lloyd), the one implementation: pseudo-tissues of a scan from its t1n intensities
(lesion injection in :mod:`menseg.synth.inject`, the domain-gap measure in :mod:`menseg.sim2real.gap`).

Deterministic: the initial centres are quantiles of the values. The two callers differ in settings,
not in algorithm, and keep their own numbers: the gap measure runs in numpy float64 with centres at
the quantiles ``(j + 0.5) / k`` and stops once the centres settle (``np.allclose``); injection runs in
torch on the scan's tensor (float32, its device) with quantiles 0.1 / 0.5 / 0.9 and a fixed 12 passes.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from menseg.errors import MensegError

A = TypeVar("A")


def kmeans_1d(values: A, k: int = 3, iters: int = 50, *, quantiles: Sequence[float] | None = None,
              until_settled: bool = True) -> A:
    """Sorted centres ``(k,)`` of a 1-D k-means of ``values``.

    Args:
        values: numpy array (any shape; computed in float64) or torch tensor (computed in its dtype
            and on its device); flattened.
        k: number of clusters.
        iters: at most this many Lloyd passes (assign each value to its nearest centre, move each
            centre to the mean of its values; a centre without values stays).
        quantiles: initial centres as quantiles of ``values`` (``k`` of them); default
            ``(j + 0.5) / k``.
        until_settled: stop early once a pass moves no centre beyond ``allclose``'s tolerance.

    Returns:
        ``(k,)`` centres in increasing order, numpy float64 or a tensor like ``values``.
    """
    torch = sys.modules.get("torch")
    as_tensor = torch is not None and isinstance(values, torch.Tensor)
    q = list(quantiles) if quantiles is not None else [(j + 0.5) / k for j in range(k)]
    if len(q) != k:
        raise ValueError(f"k-means needs {k} initial quantiles, got {len(q)}")
    v: Any
    if as_tensor:
        v = values.reshape(-1)  # type: ignore[attr-defined]
        if v.numel() == 0:
            raise MensegError("k-means needs at least one value")
        c = torch.quantile(v, torch.tensor(q, dtype=v.dtype, device=v.device))
    else:
        v = np.asarray(values, np.float64).ravel()
        if v.size == 0:
            raise MensegError("k-means needs at least one value")
        c = np.quantile(v, np.asarray(q))
    for _ in range(iters):
        if as_tensor:
            a = (v[:, None] - c[None]).abs().argmin(1)
            new = torch.stack([v[a == j].mean() if bool((a == j).any()) else c[j] for j in range(k)])
            settled = until_settled and torch.allclose(new, c)
        else:
            a = np.argmin(np.abs(v[:, None] - c[None]), axis=1)
            new = np.array([v[a == j].mean() if np.any(a == j) else c[j] for j in range(k)])
            settled = until_settled and np.allclose(new, c)
        if settled:
            break
        c = new
    return c.sort().values if as_tensor else np.sort(c)


__all__ = ["kmeans_1d"]
