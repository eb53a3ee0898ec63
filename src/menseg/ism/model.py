"""The segmentation model with its ISM parts: one module to train, checkpoint and predict with.

:class:`ISMNet` holds the DynUNet (``net``) and, as switched on in ``cfg.ism``:

- ``stem``: :class:`~menseg.ism.modal.ModalFusionStem` in place of the U-Net's input block
  (``ism.modal``): the model then runs on any non-empty subset of the four sequences;
- ``mixer``: :class:`~menseg.ism.spatial.SpatialMixer` (``ism.spatial``), used only by
  :meth:`ISMNet.mix_forward` during training;
- ``temporal``: :class:`~menseg.ism.temporal.TemporalFusion` (``ism.temporal``): fuses a
  registered earlier visit at one encoder level.

Calling conventions. ``model(x)`` with ``x (B, 4, X, Y, Z)`` is the single-visit forward. A prior
visit travels *as extra channels*: ``x (B, 8, X, Y, Z)`` is ``[current, prior]`` on one grid, so
sliding-window inference and mirroring need no change; the day gap and the sequences present are
set for a whole prediction with :meth:`ISMNet.conditioned`. Without any ISM part switched on the
checkpoint holds the plain DynUNet (:func:`build_model` returns it), so baseline checkpoints keep
their format.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from menseg.config import Config
from menseg.constants import MODALITIES
from menseg.errors import MensegError
from menseg.ism.modal import ModalFusionStem
from menseg.ism.spatial import FieldBatch, SpatialMixer
from menseg.ism.temporal import TemporalFusion, temporal_forward
from menseg.nets.unet import decode, encode, encode_from, level_channels, n_levels

Tensor = torch.Tensor

N_MOD = len(MODALITIES)


class ISMNet(nn.Module):
    """DynUNet + modal-fusion stem + spatial mixer + temporal fusion (each optional).

    Args:
        net: the DynUNet from :func:`menseg.nets.build_network`.
        cfg: the run config (``cfg.ism`` says which parts exist; ``cfg.model.norm`` the stem's norm).
    """

    def __init__(self, net: nn.Module, cfg: Config) -> None:
        super().__init__()
        ism = cfg.ism
        self.net = net
        chans = level_channels(net)  # type: ignore[arg-type]
        self.stem: ModalFusionStem | None = None
        if ism.modal.enabled:
            self.stem = ModalFusionStem(N_MOD, chans[0], cfg.model.norm, ism.modal.channels)
        self.mixer: SpatialMixer | None = SpatialMixer(ism.spatial, chans) if ism.spatial.enabled else None
        self.temporal: TemporalFusion | None = None
        if ism.temporal.enabled:
            if not 0 <= ism.temporal.level < n_levels(net):  # type: ignore[arg-type]
                raise MensegError(
                    f"ism.temporal.level must be in 0..{n_levels(net) - 1}, got {ism.temporal.level}")  # type: ignore[arg-type]
            self.temporal = TemporalFusion(chans[ism.temporal.level], ism.temporal)
        # inference-time conditioning (set by ``conditioned``), not parameters
        self._present: Tensor | None = None
        self._gap_days: float | None = None

    # ------------------------------------------------------------------ conditioning

    @contextlib.contextmanager
    def conditioned(
        self, present: Tensor | Sequence[bool] | None = None, gap_days: float | None = None
    ) -> Iterator[ISMNet]:
        """Within the block, ``self(x)`` uses these sequences and this day gap (for sliding windows).

        ``present``: ``(4,)`` bool in ``MODALITIES`` order (None: all). A model without modal fusion
        refuses absent sequences. ``gap_days``: days from the prior visit (given as channels 4..7
        of ``x``) to the current one.
        """
        if present is not None:
            present = torch.as_tensor(present, dtype=torch.bool)
            if present.shape != (N_MOD,) or not bool(present.any()):
                raise MensegError(f"present must be {N_MOD} booleans with at least one true")
            self._check_present(present)
        old = self._present, self._gap_days
        self._present, self._gap_days = present, gap_days
        try:
            yield self
        finally:
            self._present, self._gap_days = old

    def _check_present(self, present: Tensor) -> None:
        """Refuse absent sequences (``present`` ``(4,)`` or ``(B, 4)`` bool) without modal fusion or
        sequence dropout's presence input."""
        from menseg.nets import PresenceStem

        present = torch.as_tensor(present, dtype=torch.bool)
        if isinstance(self.net.input_block, PresenceStem):
            return
        if self.stem is None and not bool(present.all()):
            absent = ~present.reshape(-1, N_MOD).all(dim=0)
            missing = [m for m, a in zip(MODALITIES, absent.tolist(), strict=True) if a]
            raise MensegError(
                "this model was trained without modal fusion (ism.modal) and needs all four "
                f"sequences; missing: {', '.join(missing)}")

    def _stem(self, present: Tensor | None) -> nn.Module | None:
        if self.stem is None:
            return None
        return self.stem.bind(present)

    # ------------------------------------------------------------------ forwards

    def forward(
        self,
        x: Tensor,
        present: Tensor | None = None,
        gap_days: Tensor | float | None = None,
        has_prior: Tensor | None = None,
    ) -> Tensor:
        """Segmentation logits, as ``net(x)`` returns them.

        ``x``: ``(B, 4, ...)``, or ``(B, 8, ...)`` = current + registered prior visit (then
        ``gap_days`` or :meth:`conditioned`'s gap is needed, and the model must have temporal
        fusion). ``present``: ``(B, 4)`` / ``(4,)`` bool (default: :meth:`conditioned`'s, else all).
        ``has_prior``: ``(B,)`` bool, samples whose prior channels are to be ignored.
        """
        present = present if present is not None else self._present
        if present is not None:
            self._check_present(present)
        stem = self._stem(present)
        if x.shape[1] == 2 * N_MOD:
            if self.temporal is None:
                raise MensegError("a prior visit was given, but this model has no temporal fusion "
                                  "(ism.temporal)")
            gap = gap_days if gap_days is not None else self._gap_days
            if gap is None:
                raise MensegError("a prior visit needs the day gap (gap_days)")
            return temporal_forward(self.net, self.temporal, x[:, :N_MOD], x[:, N_MOD:], gap, stem=stem,
                                    has_prior=has_prior)
        if x.shape[1] != N_MOD:
            raise MensegError(
                f"expected {N_MOD} (or {2 * N_MOD} with a prior visit) channels, got {x.shape[1]}")
        if stem is None:
            return self.net(x)
        return decode(self.net, encode(self.net, x, stem))  # type: ignore[arg-type]

    def mix_forward(
        self, xa: Tensor, xb: Tensor | None, field_batch: FieldBatch, present: Tensor | None = None,
        keep: Tensor | None = None,
    ) -> Tensor:
        """Training forward with spatial feature mixing (:meth:`SpatialMixer.mix_forward`).

        ``present`` (``(B, 4)``) applies to both sources: a partner is seen with the same
        sequences as the sample it is mixed into.
        """
        if self.mixer is None:
            raise MensegError("mix_forward needs ism.spatial.enabled")
        # with xb None the partner's features are a's rolled along the batch, each computed with its
        # own sample's presence
        return self.mixer.mix_forward(self.net, xa, xb, field_batch, self._stem(present), keep)

    def visit_forward(
        self,
        x: Tensor,
        x_prior: Tensor,
        gap_days: Tensor,
        has_prior: Tensor,
        present: Tensor | None = None,
        progression: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Training forward on visit pairs, with optional temporal mixing (ISM part 3).

        Both visits go through the encoder up to the temporal level ``L``. With ``progression``
        (one ``(B, 1, ...)`` tensor per level ``0..L``, the local progression ``w`` of
        :func:`menseg.ism.temporal.temporal_weight` on that level's grid; 1 = the current visit)
        every level ``l <= L`` becomes the intermediate state ``(1 - w) f_prior + w f_cur``;
        samples with ``w = 1`` everywhere keep their current features exactly. Then the prior's
        level-``L`` features are fused into it (:class:`TemporalFusion`, gap ``gap_days`` per
        sample, ``has_prior`` False = no fusion), the deeper levels are recomputed and decoded.
        """
        if self.temporal is None:
            raise MensegError("visit_forward needs ism.temporal.enabled")
        lv = self.temporal.cfg.level
        stem = self._stem(present)
        fa = encode(self.net, x, stem, stop=lv)  # type: ignore[arg-type]
        fp = encode(self.net, x_prior, stem, stop=lv)  # type: ignore[arg-type]
        if progression is not None:
            if len(progression) < lv + 1:
                raise MensegError(f"visit_forward needs a progression map on levels 0..{lv}")
            fa = [(1 - w.to(a.dtype)) * p + w.to(a.dtype) * a
                  for a, p, w in zip(fa, fp, progression[: lv + 1], strict=True)]
        fused = self.temporal(fa[lv], fp[lv], gap_days, has_prior)
        return decode(self.net, [*fa[:lv], fused, *encode_from(self.net, fused, lv)])  # type: ignore[arg-type]

    def describe(self) -> str:
        """One line naming the ISM parts, for logs."""
        parts = [n for n, m in (("modal", self.stem), ("spatial", self.mixer), ("temporal", self.temporal))
                 if m is not None]
        return "DynUNet + ISM (" + ", ".join(parts) + ")" if parts else "DynUNet"


def build_model(cfg: Config) -> nn.Module:
    """The network of a run: the plain DynUNet, or :class:`ISMNet` when any ISM part is on."""
    from menseg.nets import build_run_network

    net = build_run_network(cfg)
    if not cfg.ism.any:
        return net
    return ISMNet(net, cfg)


__all__ = ["ISMNet", "build_model"]
