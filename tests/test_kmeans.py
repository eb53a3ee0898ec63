"""1-D k-means (menseg.kmeans): numpy and torch give the same clusters; each caller's settings hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from menseg.errors import MensegError
from menseg.kmeans import kmeans_1d


def test_three_clusters_numpy_and_torch() -> None:
    v = np.concatenate([np.full(50, -2.0), np.full(30, 0.5), np.full(20, 3.0)])
    np.testing.assert_allclose(kmeans_1d(v), [-2.0, 0.5, 3.0])
    t = kmeans_1d(torch.from_numpy(v).float().flip(0), 3, 12, quantiles=(0.1, 0.5, 0.9), until_settled=False)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    torch.testing.assert_close(t, torch.tensor([-2.0, 0.5, 3.0]))


def test_noisy_clusters_agree_across_backends_and_sort() -> None:
    rng = np.random.default_rng(0)
    v = np.concatenate([rng.normal(m, 0.2, 300) for m in (4.0, -1.0, 1.5)])
    a = kmeans_1d(v)
    b = kmeans_1d(torch.from_numpy(v), until_settled=True).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-9)
    assert list(a) == sorted(a)


def test_refusals() -> None:
    with pytest.raises(MensegError, match="at least one value"):
        kmeans_1d(np.zeros(0))
    with pytest.raises(ValueError, match="initial quantiles"):
        kmeans_1d(np.arange(5.0), 3, quantiles=(0.5,))
