"""Training parts: how an idea plugs into the one trainer without the trainer naming it.

A *part* is one training idea (ISM, Sim2Real, ...). The trainer (:mod:`menseg.train.trainer`) knows
only this protocol: it builds the parts the config switches on, in the fixed order of :data:`ORDER`,
and calls each hook of every part in that order. A hook left at its default does nothing, so a part
implements only what it changes:

- attributes: ``name``; ``count_stats`` (statistics that count samples: summed over DDP ranks, the
  others averaged); ``runs_on`` (kinds of training samples it can run on) and ``sample_kind`` (the kind
  its data yields, or None; checked once, in :func:`check_parts`); ``trains_without_labels`` /
  ``uses_unlabelled`` (what it needs of ``data.root`` / ``data.unlabeled_root``); ``owns_forward``;
  ``unused_parameters`` (whether DDP must look for parameters a step did not use);
- ``load_data``: the training / validation samples, when they are not the labelled cases;
- ``network``: the network, when it is not the plain one (built under the run's init seed);
- ``setup``: pools, samplers (``run.sampler``, ``run.batches``) and modules, before training;
- ``modules``: extra trained modules (their parameters join the optimiser, their state the checkpoint
  under the dict's key);
- ``bind``: the network as trained (after DDP's SyncBatchNorm conversion);
- ``mix_batch``: the augmented batch changed in image space (copy-paste), labels with it;
- ``label_mask``: labels whose class is unknown, left out of the loss;
- ``supervised_regions``: regions a sample does not supervise (e.g. ET without t1c), left out of the loss;
- ``batch_stats``: statistics of the step's batch (before the forward);
- ``forward``: the step's forward, ``(outputs, targets, stats)``; at most one part owns it;
- ``extra_loss``: a loss term added to the segmentation loss, with its statistics;
- ``finish``: what the part adds to the final checkpoint, from the trained model.

Adding an idea: subclass :class:`Part`, give it a ``name`` and ``enabled(cfg)``, implement its hooks,
decorate it with :func:`register` and list its module in :data:`ORDER` (see docs/DESIGN.md).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from menseg.config import Config
from menseg.errors import MensegError

Tensor = torch.Tensor

#: Modules that define the built-in parts, in the order their parts run (a part's hooks run before the
#: hooks of the parts after it: Sim2Real sets up the sampler that copy-paste and ISM's partners are drawn
#: from; sequence dropout acts on the sample after copy-paste has pasted into it).
ORDER: tuple[str, ...] = ("menseg.train.sim2real", "menseg.train.copypaste", "menseg.train.seqdrop",
                          "menseg.train.ism", "menseg.train.postprocess")

_REGISTRY: dict[str, type[Part]] = {}


def register(cls: type[Part]) -> type[Part]:
    """Class decorator: make ``cls`` a training part under ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no part name")
    _REGISTRY[cls.name] = cls
    return cls


@dataclass
class TrainSetup:
    """What the trainer has built so far, handed to the parts' ``load_data`` and ``setup``.

    ``cfg`` is the run's config; ``rank_cfg`` the same with the rank's own seed (what a rank draws on
    its own: dropout, mixing fields, alignment patches). ``sampler`` is built from ``train_cases`` on
    first use unless a part has set it; ``batches`` is the :class:`StepBatches` type that turns it into
    the batch of a step.
    """

    cfg: Config
    rank_cfg: Config
    out: Path
    cache: Path
    device: torch.device
    progress: bool = True
    train_cases: list[Any] = field(default_factory=list)
    val_cases: list[Any] = field(default_factory=list)
    model: nn.Module | None = None
    batches: type | None = None
    #: the samples of each global batch this process builds (its DDP shard; all of them on one process)
    shard: range = range(0)
    _sampler: Any = None

    @property
    def sampler(self) -> Any:
        """The step sampler; by default a :class:`PatchSampler` over the labelled training cases."""
        if self._sampler is None:
            from menseg.data.sampling import PatchSampler

            tc = self.cfg.train
            self._sampler = PatchSampler([(c.image, c.label) for c in self.train_cases], tc.patch_size,
                                         tc.fg_oversample)
        return self._sampler

    @sampler.setter
    def sampler(self, value: Any) -> None:
        self._sampler = value


class Part:
    """A training idea plugged into the trainer; every hook defaults to "changes nothing"."""

    #: the part's name (in messages and the registry)
    name: ClassVar[str] = ""
    #: statistics of this part that count samples
    count_stats: ClassVar[frozenset[str]] = frozenset()
    #: the kinds of training samples this part can run on
    runs_on: ClassVar[frozenset[str]] = frozenset({"cases"})
    #: whether the run may have no labelled case (``data.root`` unset)
    trains_without_labels: ClassVar[bool] = False
    #: whether the part reads ``data.unlabeled_root``
    uses_unlabelled: ClassVar[bool] = False
    #: how to avoid this part's sample kind (for the error of a part that cannot run on it)
    sample_hint: ClassVar[str] = ""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        #: the kind of samples :meth:`load_data` yields, when they are not labelled cases
        self.sample_kind: str | None = None
        #: whether :meth:`forward` replaces the network's plain forward
        self.owns_forward = False
        #: whether a step may leave some trained parameters unused (DDP must then look for them)
        self.unused_parameters = False

    @classmethod
    def enabled(cls, cfg: Config) -> bool:
        """Whether the config switches this part on."""
        raise NotImplementedError

    # ------------------------------------------------------------ what the run is made of

    def load_data(self, run: TrainSetup) -> tuple[list[Any], list[Any]] | None:
        """``(training, validation)`` samples (and ``run.sampler`` / ``run.batches``), or None."""
        return None

    def network(self) -> nn.Module | None:
        """The network of the run, or None for the plain one."""
        return None

    def setup(self, run: TrainSetup) -> None:
        """Build what the part needs before the first step (``run.model`` exists)."""

    def modules(self) -> dict[str, nn.Module]:
        """Trained modules besides the network, by checkpoint key."""
        return {}

    def bind(self, model: nn.Module) -> None:
        """Use ``model`` (the network as trained) from now on."""

    # ------------------------------------------------------------ every step

    def mix_batch(self, step: int, img: Tensor, lab: Tensor, meta: Tensor) -> tuple[Tensor, Tensor]:
        """The step's augmented batch changed in image space (e.g. copy-paste), labels with it."""
        return img, lab

    def label_mask(self, lab: Tensor, always: bool) -> tuple[Tensor, Tensor | None]:
        """``(labels, known voxels or None)``; ``always``: return a mask even when all are known (DDP)."""
        return lab, None

    def supervised_regions(self, lab: Tensor) -> Tensor | None:
        """``(B, 3)`` bool: the regions (ET, TC, WT) each sample of the step supervises, or None (all).
        A part that may return a mask on some step returns one on every step (DDP: one loss path)."""
        return None

    def batch_stats(self, meta: Tensor) -> dict[str, float]:
        """Statistics of the step's batch (``meta``: its per-sample metadata)."""
        return {}

    def forward(self, step: int, img: Tensor, lab: Tensor, meta: Tensor
                ) -> tuple[Any, Tensor, dict[str, float]] | None:
        """``(outputs, targets, stats)`` of the step, or None to leave the forward to others."""
        return None

    def extra_loss(self, step: int, device: torch.device) -> tuple[Tensor, dict[str, float]] | None:
        """A loss term of the step and its statistics, or None."""
        return None

    # ------------------------------------------------------------ after the last step

    def finish(self, run: TrainSetup, model: nn.Module) -> dict[str, Any]:
        """What the part adds to the final checkpoint, from the trained model (called after the last step,
        written with that step's checkpoint)."""
        return {}


def part_types() -> list[type[Part]]:
    """Every registered part, in :data:`ORDER`."""
    for mod in ORDER:
        importlib.import_module(mod)
    rank = {m: i for i, m in enumerate(ORDER)}
    return sorted(_REGISTRY.values(), key=lambda c: rank.get(c.__module__, len(ORDER)))


def check_parts(parts: Sequence[Part]) -> None:
    """Refuse parts that cannot run together, in one place, with one-line errors."""
    kinds = [p for p in parts if p.sample_kind is not None]
    if len(kinds) > 1:
        raise MensegError(f"{kinds[0].name} and {kinds[1].name} both choose the training samples; "
                          "switch one of them off")
    kind, hint = (kinds[0].sample_kind, kinds[0].sample_hint) if kinds else ("cases", "")
    for p in parts:
        if kind not in p.runs_on:
            raise MensegError(f"{p.name} does not run on {kind} yet ({hint})")
    owners = [p.name for p in parts if p.owns_forward]
    if len(owners) > 1:
        raise MensegError(f"{' and '.join(owners)} both replace the forward pass; switch one of them off")


def build_parts(cfg: Config) -> list[Part]:
    """The parts ``cfg`` switches on, in :data:`ORDER`, checked to run together."""
    parts = [cls(cfg) for cls in part_types() if cls.enabled(cfg)]
    check_parts(parts)
    return parts


def full_precision(like: Tensor) -> contextlib.AbstractContextManager:
    """Autocast switched off on ``like``'s device: a part's data-side work inside the step's forward
    (partner augmentation, mixing fields of the targets, label interpolation) stays in fp32 when the
    network runs in bf16 / fp16, so soft targets are not rounded to 8 bits of mantissa."""
    return torch.autocast(like.device.type, enabled=False)


class StepModule(nn.Module):
    """The network and the parts' modules with the step's whole forward, for DDP to wrap (a part may
    call sub-modules of the network directly, which a DDP-wrapped network would not see)."""

    def __init__(self, compute: Callable[..., tuple[Any, ...]], model: nn.Module,
                 modules: dict[str, nn.Module]) -> None:
        super().__init__()
        self.compute = compute
        self.model = model
        self.parts = nn.ModuleDict(modules)

    def forward(self, *args: Any) -> tuple[Any, ...]:
        return self.compute(*args)


__all__ = ["ORDER", "Part", "StepModule", "TrainSetup", "build_parts", "check_parts", "full_precision",
           "part_types", "register"]
