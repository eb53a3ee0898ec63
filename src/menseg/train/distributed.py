"""Distributed data-parallel training on PyTorch's own engine (``torch.distributed`` + DDP).

A run started by ``torchrun --nproc_per_node=N -m menseg train ...`` (or ``menseg train --nproc N``,
which starts torchrun) has ``WORLD_SIZE`` > 1 in its environment; :func:`setup` then joins the process
group (NCCL on CUDA, gloo on CPU) and every rank runs :func:`menseg.train.trainer.train`.

The rules, each a function here so that one place holds them:

- **Global batch.** ``train.batch_size`` is the global batch of a step, as on one process: rank ``r``
  of ``W`` builds and trains on samples ``[r*B/W, (r+1)*B/W)`` of the step's batch
  (:func:`shard`), so over a run every sample of every step is seen by exactly one rank, and the
  augmentation of a sample (seeded by its global index) does not depend on ``W``. ``B`` must be a
  multiple of ``W``.
- **Gradients.** DDP averages the ranks' gradients. Dice pooled over the batch (nnU-Net's batch Dice)
  and masked BCE are not means over samples, so the loss sums their parts across ranks with
  :func:`sum_across_ranks` (differentiable): ``W`` processes then take the same step as one process
  with the combined batch (tested with gloo on CPU).
- **Seeds.** Rank 0 uses the run seed; rank ``r`` > 0 uses :func:`rank_seed` for what is drawn per
  rank (dropout, ISM mixing, alignment patches). Data and augmentation come from the global batch.
- **Writing.** Only rank 0 writes (config, ``metrics.jsonl``, checkpoints, caches first: the other
  ranks wait at a barrier, then read the cache). A resumed state is read by rank 0 and broadcast, so
  the run folder need only exist on rank 0's node.
- **Validation.** Validation cases are split over the ranks and the per-case Dice summed with an
  all-reduce: every rank gets the metrics of the whole validation set.
- **Batch norm.** With ``model.norm: batch`` the network's BatchNorm layers become SyncBatchNorm on
  CUDA (statistics over the global batch); PyTorch's SyncBatchNorm has no CPU kernel, so on CPU each
  rank keeps its own statistics (a warning says so).
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from menseg.errors import MensegError
from menseg.utils import SINGLE, Context, context_from_env, derive_seed, env_int

log = logging.getLogger(__name__)

#: How long a rank waits for the others at a collective before failing (e.g. rank 0 preparing caches).
TIMEOUT = datetime.timedelta(minutes=60)


def current() -> Context:
    """The context of the joined process group, or :data:`SINGLE` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size(), env_int("LOCAL_RANK", dist.get_rank()))
    return SINGLE


def device_for(ctx: Context, requested: str) -> str:
    """The device of this rank: on CUDA, GPU ``LOCAL_RANK``; otherwise ``requested`` unchanged."""
    if not ctx.enabled or requested not in ("auto", "cuda"):
        return requested
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        if ctx.local_rank >= n:
            raise MensegError(f"local rank {ctx.local_rank} has no GPU ({n} visible); start at most {n} "
                              "processes per node")
        return f"cuda:{ctx.local_rank}"
    return requested


def setup(ctx: Context, device: torch.device) -> Context:
    """Join the process group ``ctx`` (:func:`context_from_env`) describes; no-op for one process."""
    if not ctx.enabled or dist.is_initialized():
        return current() if ctx.enabled else SINGLE
    if not dist.is_available():
        raise MensegError("this PyTorch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=TIMEOUT)
    log.info("rank %d of %d joined (%s)", ctx.rank, ctx.world, backend)
    return ctx


def teardown() -> None:
    """Leave the process group if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.enabled:
        dist.barrier()


@contextmanager
def main_first(ctx: Context) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. writes a cache), the others then run it (and read the cache)."""
    if ctx.enabled and not ctx.main:
        dist.barrier()
    yield
    if ctx.enabled and ctx.main:
        dist.barrier()


def broadcast(ctx: Context, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled between the run's own processes)."""
    if not ctx.enabled:
        return obj
    box = [obj if ctx.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def shard(batch_size: int, ctx: Context) -> range:
    """Global sample indices of this rank's part of a step's batch (contiguous, disjoint, covering)."""
    if batch_size % ctx.world:
        raise MensegError(f"train.batch_size ({batch_size}) is the global batch and must be a multiple of "
                          f"the number of processes ({ctx.world})")
    per = batch_size // ctx.world
    return range(ctx.rank * per, (ctx.rank + 1) * per)


def split_items(items: Sequence[Any], ctx: Context) -> list[Any]:
    """Round-robin share of ``items`` for this rank (validation cases): each item on exactly one rank."""
    return list(items[ctx.rank::ctx.world])


def rank_seed(seed: int, rank: int) -> int:
    """The seed of what rank ``rank`` draws on its own: the run seed on rank 0."""
    return seed if rank == 0 else derive_seed(seed, "rank", rank)


class _SumAcrossRanks(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the gradient too, as the sum's Jacobian is."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        g = grad.clone()
        dist.all_reduce(g)
        return g


def _in_group() -> bool:
    """A process group of more than one rank is joined."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_across_ranks(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over the ranks of the joined group, differentiably; ``x`` itself with one process.

    DDP averages gradients over ``W`` ranks and the backward of the sum multiplies by ``W``, so a loss
    built from pooled sums gets exactly the gradient of the one-process loss.
    """
    return _SumAcrossRanks.apply(x) if _in_group() else x


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over ranks (no gradient); ``x`` with one process."""
    if not _in_group():
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y


def check_in_sync(ctx: Context, params: Sequence[torch.Tensor], device: torch.device) -> None:
    """Fail when the ranks' parameters have drifted apart (a parameter left out of the gradient
    all-reduce would do that silently): compares a float64 checksum of ``params`` over the ranks."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        total = torch.stack([p.detach().double().sum() for p in params]).sum()
        weighted = torch.stack([(i + 1) * p.detach().double().abs().sum()
                                for i, p in enumerate(params)]).sum()
        mine = torch.stack([total, weighted]).to(device)
    lo, hi = mine.clone(), mine.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    gap = float((hi - lo).abs().max())
    scale = float(mine.abs().max()) + 1.0
    if gap > 1e-6 * scale:
        raise MensegError(f"the {ctx.world} processes' weights differ (checksum gap {gap:.3g}): gradients "
                          "were not all-reduced for some parameter; please report this with your config")


def sync_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm layers -> SyncBatchNorm on CUDA; on CPU a warning (PyTorch has no CPU kernel for it)."""
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not has_bn:
        return model
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    log.warning("batch norm on CPU: each process keeps its own batch statistics (PyTorch's SyncBatchNorm "
                "runs on CUDA only)")
    return model


def torchrun_command(nproc: int, argv: Sequence[str]) -> list[str]:
    """The command that runs ``menseg <argv>`` on ``nproc`` local processes under torchrun."""
    if nproc < 1:
        raise MensegError(f"--nproc must be at least 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "menseg", *argv]


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``menseg <argv>`` on ``nproc`` local processes (single node) and return torchrun's exit code."""
    cmd = torchrun_command(nproc, argv)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    log.info("starting %d processes: %s", nproc, " ".join(cmd))
    return subprocess.call(cmd, env=env)


__all__ = [
    "SINGLE", "Context", "all_reduce_sum", "barrier", "broadcast", "check_in_sync", "context_from_env",
    "current", "device_for", "launch", "main_first", "rank_seed", "setup", "shard", "split_items",
    "sum_across_ranks", "sync_batch_norm", "teardown", "torchrun_command",
]
