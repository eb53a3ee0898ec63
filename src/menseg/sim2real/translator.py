"""Cycle-consistent 3D sim->real image translator with a lesion-keeping semantic term.

Inputs are *preprocessed* arrays (:mod:`menseg.data.preprocess`): images float32
``(4, X, Y, Z)`` z-scored per sequence inside the head and exactly 0 outside
(MODALITIES order t1c, t1n, t2f, t2w), labels uint8 ``(X, Y, Z)`` (BraTS-MEN 0..3).

Networks (all 3D, fully convolutional, patch-trained):

- generators ``G`` (synthetic -> real) and ``F`` (real -> synthetic), :class:`Generator`:
  a small residual U-Net (two stride-2 downsamplings, residual blocks at 1/4 resolution,
  trilinear upsampling with skips). The output is ``y = x + max_delta * tanh(h)`` kept only
  inside the head mask ``(x != 0).any(channel)``: the background stays exactly 0, no
  intensity can move by more than ``max_delta`` (z-score units) and the geometry (head
  outline, lesion position) is the input's. The last convolution starts at zero, so an
  untrained generator is the identity;
- PatchGAN discriminators ``D_real`` and ``D_syn`` (:class:`PatchDiscriminator`), least-squares
  GAN loss;
- a small segmenter ``S`` (DynUNet, filters 8/16/32) predicting the region logits ET/TC/WT.
  ``S`` learns the synthetic labels on raw synthetic patches *and* on detached ``G(s)``;
  after ``semantic_warmup`` steps ``G`` also minimises ``semantic_weight * (Dice + BCE)(S(G(s)),
  label)`` with ``S`` frozen for that term (CyCADA). A generator that moved, erased or
  invented tumour would be punished by a segmenter that knows where the lesion is.

Loss of the generators per step (``s`` synthetic, ``r`` real patches)::

    LSGAN(D_real(G(s)), 1) + LSGAN(D_syn(F(r)), 1)
    + cycle_weight * (H(F(G(s)) - s) + H(G(F(r)) - r))
    + identity_weight * (H(G(r) - r) + H(F(s) - s))
    + semantic_weight * (Dice + BCE)(S(G(s)), regions(label))     (step >= semantic_warmup)

``H`` is the mean Huber penalty with ``RECON_BETA = 1`` z-score unit (quadratic below, L1 above)
rather than CycleGAN's plain L1. Both generators start at the identity, exactly where L1 has its
kink: there the cycle term's gradient has full size whatever the deviation, flips sign at every
step and dominates Adam's normalisation, so the generators stay pinned to the identity
(DESIGN.md, Decisions: translator reconstruction loss).

Why 3D patches rather than 2.5D slices: the gap between synthetic and real scans is partly
3D texture (partial volume, bias fields, through-plane smoothness) and the segmenter that
consumes the translated images is 3D; a slice-wise translator would add slice-to-slice
flicker that the segmenter could learn as a synthetic cue. The price is memory, kept small
with patches and a narrow network (``channels``, default 16).

Sampling: each step draws ``batch_size`` synthetic patches, the first half (at least one)
centred on a lesion voxel, the others on a random head voxel, and ``batch_size`` real patches
centred on random head voxels. Real scans are unlabelled, so their patches hold a lesion only as often as
a lesion fills the head; the lesion-centred synthetic patches serve the semantic, cycle and
identity terms, but the discriminators see only the head-centred ones (with ``batch_size``
1: all). Otherwise 'holds a lesion' would itself be a domain cue and the adversarial terms would
push G to erase lesions and F to invent them (DESIGN.md, Decisions: what the translator's
discriminators see).

Determinism: the batch of step ``t`` is drawn from ``default_rng(derive_seed(seed,
"translator-batch", t))`` and the networks are initialised from ``derive_seed(seed,
"translator-init")`` inside ``torch.random.fork_rng``; nothing else is random, so a resumed
fit equals an uninterrupted one on CPU.

Fit folder::

    config.json      TranslatorConfig (+ seed, spacing)
    metrics.jsonl    one line per step
    latest.pt        full state every checkpoint_every steps (all networks and optimisers), with its
                     .sha256; the one before is kept as latest.prev.pt, and a resume falls back to it
                     (warning) when latest.pt is damaged
    .lock            held by the fitting process: a second fitter on the folder fails at once
    translator.pt    final: {"generator", "segmenter", "config", "seed", "spacing", ...}
    preview/step_<nnnnnn>.png
"""

from __future__ import annotations

# The translator lives in three modules: translator_nets (networks), translator_fit (fitting) and
# translator_io (its folders); this one is its public face.
from menseg.sim2real.translator_fit import (
    NOT_FIT,
    fit_translator,
    fit_translator_from_folders,
    n_lesion_patches,
)
from menseg.sim2real.translator_io import (
    load_segmenter,
    load_translator,
    translate_dataset,
    translator_config,
    write_preview,
)
from menseg.sim2real.translator_nets import (
    DIVISOR,
    Generator,
    PatchDiscriminator,
    build_segmenter,
    head_mask,
    translate_image,
)

__all__ = [
    "DIVISOR",
    "NOT_FIT",
    "Generator",
    "PatchDiscriminator",
    "build_segmenter",
    "fit_translator",
    "fit_translator_from_folders",
    "head_mask",
    "n_lesion_patches",
    "load_segmenter",
    "load_translator",
    "translate_dataset",
    "translate_image",
    "translator_config",
    "write_preview",
]
