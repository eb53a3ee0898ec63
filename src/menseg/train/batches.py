"""What a training step draws: the split into training and validation cases, and the step-indexed
batches (:class:`StepBatches`) that the trainer iterates, in this process or in worker processes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from menseg.config import Config
from menseg.data.sampling import PatchSampler
from menseg.errors import MensegError
from menseg.utils import derive_seed


def cache_dir(cfg: Config, out: Path) -> Path:
    """The preprocessing cache: ``data.cache_dir``, or ``<out_dir>/preprocessed``."""
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else out / "preprocessed"


def split_cases(ids: Sequence[str], val_fraction: float, val_cases: Sequence[str], seed: int) -> tuple[
    list[str], list[str]
]:
    """Split case ids into ``(train, val)`` reproducibly from ``seed``.

    ``val_cases`` (explicit ids) overrides ``val_fraction``; otherwise
    ``max(1, round(n * val_fraction))`` cases are held out (none when the
    fraction is 0), chosen by a permutation seeded from ``(seed, "split")``.
    At least one case is always left for training.
    """
    ids = list(ids)
    if val_cases:
        unknown = sorted(set(val_cases) - set(ids))
        if unknown:
            raise MensegError(f"data.val_cases: no labelled case '{unknown[0]}' in the dataset")
        val = [i for i in ids if i in set(val_cases)]
    elif val_fraction > 0:
        n_val = min(len(ids) - 1, max(1, round(len(ids) * val_fraction)))
        perm = np.random.default_rng(derive_seed(seed, "split")).permutation(len(ids))
        val = sorted(ids[i] for i in perm[:n_val])
    else:
        val = []
    train = [i for i in ids if i not in set(val)]
    if not train:
        raise MensegError("no cases left for training after holding out the validation cases")
    return train, val


class StepBatches(torch.utils.data.Dataset):
    """Dataset indexed by step: item ``t`` is the (un-augmented) batch of step ``t``.

    Returns numpy ``(image (B, C, *patch) f32, label (B, *patch) uint8, case (B,) int64)``
    (``case``: each sample's index in the sampler's case list); a pure function of
    ``(seed, t)``, so worker processes need no seeding. Parts that draw otherwise subclass it and
    override :meth:`choices` (which patches) or ``__getitem__`` (what a sample is).
    """

    def __init__(self, sampler: PatchSampler, batch_size: int, seed: int, part: range | None = None) -> None:
        self.sampler = sampler
        self.batch_size = batch_size
        self.seed = seed
        #: the samples of each global batch this process builds (a DDP rank's shard); all by default
        self.part = range(batch_size) if part is None else part

    def __len__(self) -> int:
        return 2**31 - 1

    def choices(self, step: int, rng: np.random.Generator) -> list[Any]:
        """The patch choices of ``step`` (``rng`` seeded from ``(seed, "batch", step)``)."""
        return self.sampler.sample(rng, self.batch_size)

    def __getitem__(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng(derive_seed(self.seed, "batch", int(step)))
        choices = self.choices(int(step), rng)[self.part.start:self.part.stop]
        pairs = [self.sampler.extract(c) for c in choices]
        cases = np.asarray([c.case for c in choices], dtype=np.int64)
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), cases


def iter_batches(
    ds: StepBatches, start: int, stop: int, num_workers: int, pin: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Batches ``start .. stop - 1`` of ``ds`` as tensors, built here or by ``num_workers`` processes."""
    if num_workers <= 0:
        for t in range(start, stop):
            img, lab, cases = ds[t]
            yield torch.from_numpy(img), torch.from_numpy(lab), torch.from_numpy(cases)
        return
    loader = torch.utils.data.DataLoader(
        ds, batch_size=None, sampler=range(start, stop), num_workers=num_workers, pin_memory=pin,
        prefetch_factor=2,
    )
    yield from loader


__all__ = ["StepBatches", "cache_dir", "iter_batches", "split_cases"]
