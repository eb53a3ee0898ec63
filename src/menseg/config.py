"""Run configuration: frozen dataclasses, YAML load/save and dotted CLI overrides.

A run is configured by one YAML file (a path, or the name of a packaged config
such as ``baseline``) plus overrides ``section.key=value``. ``data=DIR`` is a
shorthand for ``data.root=DIR``. The resolved config is saved with every run.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from menseg.constants import MODALITIES
from menseg.errors import MensegError

PACKAGED_CONFIGS = Path(__file__).parent / "configs"


@dataclass(frozen=True)
class DataConfig:
    """Where the labelled cases are and how they are preprocessed."""

    root: str | None = None  #: dataset folder (BraTS or nnU-Net v2 raw layout)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)  #: target spacing, mm
    val_fraction: float = 0.2  #: share of cases held out for validation (at least one)
    val_cases: tuple[str, ...] = ()  #: explicit validation case ids (overrides val_fraction)
    cache_dir: str | None = None  #: preprocessed cache; default <out_dir>/preprocessed
    #: use only these labelled case ids (training + validation); empty = every labelled case in root
    cases: tuple[str, ...] = ()
    #: folder of extra scans without labels (BraTS or nnU-Net layout), for variants that learn from
    #: unlabelled scans; the baseline does not read it
    unlabeled_root: str | None = None


@dataclass(frozen=True)
class ModelConfig:
    """3D U-Net of the nnU-Net family (MONAI DynUNet)."""

    name: str = "dynunet"
    filters: tuple[int, ...] = (16, 32, 64, 128, 256)  #: channels per stage
    deep_supervision: bool = True
    deep_supr_num: int = 2  #: extra low-resolution heads used by the loss
    norm: str = "instance"
    dropout: float = 0.0
    #: start from these weights instead of random ones (fine-tuning): a shipped model's name
    #: (``menseg models list``), a checkpoint file or a run folder. The network must match, layer for
    #: layer (an ISM network may start from a plain one: its ISM modules then start from scratch).
    init: str | None = None


@dataclass(frozen=True)
class AugConfig:
    """Probabilities and ranges of the replayable spatial and intensity augmentations."""

    p_flip: float = 0.5  #: per axis
    p_rotate: float = 0.2
    rotate_deg: float = 30.0
    p_scale: float = 0.2
    scale_range: tuple[float, float] = (0.7, 1.4)
    p_elastic: float = 0.1
    elastic_magnitude_mm: float = 4.0  #: sd of the control-point displacements, mm (voxels = mm / spacing)
    elastic_grid: int = 5  #: control points per axis
    p_gamma: float = 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)
    p_noise: float = 0.1
    noise_std: tuple[float, float] = (0.0, 0.1)
    p_bias: float = 0.1
    bias_strength: float = 0.3
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    p_lowres: float = 0.2
    lowres_zoom: tuple[float, float] = (0.5, 1.0)


#: ``train.amp_dtype`` and ``train.compile`` values.
AMP_DTYPES: tuple[str, ...] = ("auto", "bf16", "fp16")
COMPILE_MODES: tuple[str, ...] = ("off", "default", "reduce-overhead", "max-autotune", "eager")
#: ``infer.stitch`` values.
STITCH_MODES: tuple[str, ...] = ("auto", "device", "cpu")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation budget and schedule."""

    steps: int = 1000
    batch_size: int = 2
    patch_size: tuple[int, int, int] = (96, 96, 96)  #: voxels
    lr: float = 1e-2  #: SGD + Nesterov, poly decay as nnU-Net
    #: the learning rate rises linearly from lr / warmup_steps to lr over these first steps, then decays
    #: (poly) as without warm-up (fine-tuning from ``model.init``)
    warmup_steps: int = 0
    #: the encoder (first block, downsampling stages, bottleneck; ISM's modal stem) is not updated in
    #: these first steps, so a fine-tuned decoder settles before the pretrained features move
    freeze_encoder_steps: int = 0
    momentum: float = 0.99
    weight_decay: float = 3e-5
    fg_oversample: float = 0.33  #: share of patches centred on foreground
    val_every: int = 250
    checkpoint_every: int = 50
    amp: bool = True  #: mixed precision (autocast), see ``amp_dtype``
    #: auto | bf16 | fp16. auto: bf16 where it is native (CUDA with bf16; CPUs with AVX512-BF16 / AMX,
    #: 1.8x faster steps than fp32 on such a 2-core CPU), else fp16 with loss scaling on CUDA and fp32 on
    #: the CPU. bf16 / fp16 autocast any CPU (fp16 with a loss scaler), e.g. to test the paths.
    amp_dtype: str = "auto"
    channels_last: bool = False  #: channels_last_3d memory format for the network and its inputs
    #: off | default | reduce-overhead | max-autotune (torch.compile of the network's forward, in place,
    #: so checkpoints keep their keys) | eager (graph capture only, no code generation: a quick check)
    compile: str = "off"
    num_workers: int = 0  #: batch-building worker processes (per rank under DDP)
    seed: int = 0
    device: str = "auto"
    deterministic: bool = False

    def __post_init__(self) -> None:
        if self.warmup_steps < 0 or self.freeze_encoder_steps < 0:
            raise MensegError("train.warmup_steps and train.freeze_encoder_steps must be at least 0")
        for key, allowed in (("amp_dtype", AMP_DTYPES), ("compile", COMPILE_MODES)):
            value = getattr(self, key)
            if value not in allowed:
                raise MensegError(f"train.{key} must be one of {', '.join(allowed)}, got '{value}'")


@dataclass(frozen=True)
class InferConfig:
    """Sliding-window prediction and post-processing."""

    overlap: float = 0.5
    mirror: bool = False  #: test-time mirroring on all three axes
    sw_batch_size: int = 1
    min_component_mm3: float = 10.0  #: predicted components smaller than this are removed
    threshold: float = 0.5
    #: fp32 | bf16 | auto (bf16 where the device runs it natively: CUDA, CPUs with AVX512-BF16/AMX;
    #: faster there at the same Dice: DESIGN.md, Decisions: inference precision)
    precision: str = "auto"
    #: auto | device | cpu: where the sliding-window outputs are accumulated. auto: on the CPU when a
    #: GPU predicts a volume whose buffers (input + 3 outputs + weights, fp32) exceed a quarter of its
    #: memory, else on the predicting device
    stitch: str = "auto"

    def __post_init__(self) -> None:
        if self.stitch not in STITCH_MODES:
            raise MensegError(f"infer.stitch must be one of {', '.join(STITCH_MODES)}, got '{self.stitch}'")


#: Where the partner *b* of a spatial mix can come from (``ism.spatial.sources``): another case of the
#: batch, another place of the same case, a synthetic case, or an unlabelled scan
#: (``data.unlabeled_root``) whose target is the network's own prediction on it (a consistency term).
ISM_SOURCES: tuple[str, ...] = ("batch", "location", "synthetic", "unlabelled")
#: The default partners (``unlabelled`` needs ``data.unlabeled_root``, so it is opt-in).
ISM_DEFAULT_SOURCES: tuple[str, ...] = ("batch", "location", "synthetic")


@dataclass(frozen=True)
class FieldConfig:
    """Distribution of mixing fields; every range is ``(low, high)`` and sampled per field."""

    n_features: int = 16  #: Fourier components K
    wavelength_mm: tuple[float, float] = (24.0, 96.0)  #: shortest wavelength L (mm), log-uniform
    period_days: tuple[float, float] = (90.0, 720.0)  #: shortest period T (days), log-uniform
    ratio: tuple[float, float] = (0.3, 0.7)  #: share of the volume taken from source a, uniform
    sharpness: tuple[float, float] = (2.0, 8.0)  #: sigmoid slope a (large -> near binary), log-uniform

    def __post_init__(self) -> None:
        if self.n_features < 1:
            raise MensegError(f"field n_features must be at least 1, got {self.n_features}")
        for name in ("wavelength_mm", "period_days", "sharpness"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise MensegError(f"field {name} must satisfy 0 < low <= high, got ({lo}, {hi})")
        lo, hi = self.ratio
        if not 0 < lo <= hi < 1:
            raise MensegError(f"field ratio must satisfy 0 < low <= high < 1, got ({lo}, {hi})")


@dataclass(frozen=True)
class SpatialMixConfig:
    """Spatial feature mixing (``ism.spatial``)."""

    enabled: bool = False
    p: float = 0.5  #: probability that a training sample is mixed
    #: encoder levels mixed through the learned fusion (0 = full resolution); the shallower skips are
    #: blended with the same field and the deeper levels recomputed from the deepest mixed level
    levels: tuple[int, ...] = (2,)
    sources: tuple[str, ...] = ISM_DEFAULT_SOURCES  #: what the partner b can be (see :data:`ISM_SOURCES`)
    #: probability that a ``location`` / ``synthetic`` partner patch is centred on tumour (else
    #: anywhere): mixing then brings lesion from elsewhere into the patch instead of diluting it;
    #: an ``unlabelled`` partner is anywhere (its tumour is unknown)
    partner_fg: float = 1.0
    #: keep the sample's own tumour (WT, dilated by ``keep_margin_mm``) whatever the field: a mix then
    #: adds the partner around the lesion instead of cutting the lesion away
    keep_tumour: bool = False
    keep_margin_mm: float = 4.0
    field: FieldConfig = field(default_factory=FieldConfig)

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise MensegError(f"ism.spatial.p must be in [0, 1], got {self.p}")
        if not 0.0 <= self.partner_fg <= 1.0:
            raise MensegError(f"ism.spatial.partner_fg must be in [0, 1], got {self.partner_fg}")
        if not self.levels or min(self.levels) < 0:
            raise MensegError(f"ism.spatial.levels must be non-empty levels >= 0, got {list(self.levels)}")
        bad = [s for s in self.sources if s not in ISM_SOURCES]
        if bad or not self.sources:
            raise MensegError(
                f"ism.spatial.sources must be a non-empty subset of {', '.join(ISM_SOURCES)}, got "
                f"{list(self.sources)}")


@dataclass(frozen=True)
class ModalFusionConfig:
    """Switch and training-time sequence dropout of modal fusion (config section ``ism.modal``)."""

    enabled: bool = False
    #: probability that a training sample loses some sequences
    p_drop: float = 0.3
    #: at most this many sequences dropped from one sample (at least one always stays)
    max_drop: int = 3
    #: channels of each per-sequence encoder; None = half the first U-Net level's channels (at least 4)
    channels: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_drop <= 1.0:
            raise MensegError(f"ism.modal.p_drop must be in [0, 1], got {self.p_drop}")
        if self.max_drop < 0:
            raise MensegError(f"ism.modal.max_drop must be at least 0, got {self.max_drop}")
        if self.channels is not None and self.channels < 1:
            raise MensegError(f"ism.modal.channels must be at least 1 (or null), got {self.channels}")


@dataclass(frozen=True)
class TemporalConfig:
    """``ism.temporal``: fusion of earlier visits and temporal mixing."""

    enabled: bool = False
    #: Encoder level where prior features are fused (0 = full resolution; deeper levels are
    #: recomputed from the fused features).
    level: int = 2
    #: Size of the Fourier encoding of the day gap (sin/cos pairs; an odd count adds tanh(gap/scale)).
    time_features: int = 8
    #: Scale of the encoding (days): the longest period is 4x this, the shortest 1/64 of it.
    max_gap_days: float = 1825.0
    #: Probability that a training sample with two visits is replaced by a temporal mix.
    p_mix: float = 0.5

    def __post_init__(self) -> None:
        if self.level < 0:
            raise MensegError(f"ism.temporal.level must be >= 0, got {self.level}")
        if self.time_features < 1:
            raise MensegError(f"ism.temporal.time_features must be >= 1, got {self.time_features}")
        if not self.max_gap_days > 0:
            raise MensegError(f"ism.temporal.max_gap_days must be > 0, got {self.max_gap_days}")
        if not 0.0 <= self.p_mix <= 1.0:
            raise MensegError(f"ism.temporal.p_mix must be in [0, 1], got {self.p_mix}")


@dataclass(frozen=True)
class ISMConfig:
    """Implicit Spatiotemporal Mixing (DESIGN.md, idea 1); each part is switched on its own."""

    spatial: SpatialMixConfig = field(default_factory=SpatialMixConfig)
    temporal: TemporalConfig = field(default_factory=TemporalConfig)
    modal: ModalFusionConfig = field(default_factory=ModalFusionConfig)
    #: synthetic cases generated once per run for the ``synthetic`` mixing source
    n_synthetic: int = 8

    @property
    def any(self) -> bool:
        """Whether any part changes the network (else the model is the plain DynUNet)."""
        return self.spatial.enabled or self.temporal.enabled or self.modal.enabled

    def __post_init__(self) -> None:
        if self.n_synthetic < 1:
            raise MensegError(f"ism.n_synthetic must be at least 1, got {self.n_synthetic}")


#: Feature-alignment methods (``sim2real.align.method``).
ALIGN_METHODS: tuple[str, ...] = ("none", "adversarial", "mmd", "coral")
#: Weight schedules of the alignment loss (``sim2real.align.schedule``).
ALIGN_SCHEDULES: tuple[str, ...] = ("constant", "linear", "dann")


@dataclass(frozen=True)
class TranslatorConfig:
    """Cycle-consistent sim->real translator (``sim2real.translator``; DESIGN.md, idea 2).

    3D, patch-based: two residual generators (synthetic->real, real->synthetic), two PatchGAN
    discriminators (least-squares GAN), cycle and identity L1 and a semantic term (a small segmenter
    trained on the synthetic labels must find them on the translated image, CyCADA-style).
    """

    enabled: bool = False  #: translate the synthetic cases before segmentation training
    #: a fitted translator (``menseg sim2real fit-translator`` folder or its ``translator.pt``);
    #: None = fit one per run seed from the synthetic pool and the unlabelled scans (cached)
    path: str | None = None
    steps: int = 600  #: optimisation steps of the translator
    patch_size: tuple[int, int, int] = (32, 32, 32)  #: voxels
    batch_size: int = 2
    channels: int = 16  #: generator width (discriminator: same)
    #: Adam, betas (0.5, 0.999) as CycleGAN; 5x its lr, because at 2e-4 the small translator did not
    #: move within its step budget (DESIGN.md, Decisions: translator learning rate)
    lr: float = 1e-3
    cycle_weight: float = 10.0  #: CycleGAN's lambda
    identity_weight: float = 5.0  #: 0.5 * cycle_weight, as CycleGAN
    semantic_weight: float = 1.0  #: lesion-keeping term (Dice + BCE of the segmenter on G(x))
    semantic_warmup: int = 100  #: steps the segmenter trains on raw synthetic cases before G feels it
    #: largest change G may make to a normalised intensity (|G(x) - x| <= max_delta, tanh-bounded)
    max_delta: float = 3.0
    preview_every: int = 200  #: before/after mosaic every N steps (0 = never)
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        if min(self.steps, self.batch_size, self.channels, self.checkpoint_every) < 1:
            raise MensegError("sim2real.translator steps, batch_size, channels and checkpoint_every "
                              "must be >= 1")
        if min(self.patch_size) < 8:
            raise MensegError(f"sim2real.translator.patch_size must be >= 8 voxels, got "
                              f"{list(self.patch_size)}")
        if min(self.cycle_weight, self.identity_weight, self.semantic_weight, self.semantic_warmup,
               self.preview_every) < 0 or not self.max_delta > 0 or not self.lr > 0:
            raise MensegError("sim2real.translator weights, warm-up and preview_every must be >= 0, "
                              "lr and max_delta > 0")


@dataclass(frozen=True)
class AlignConfig:
    """Feature alignment with unlabelled real scans (``sim2real.align``)."""

    #: none | adversarial (domain classifier behind gradient reversal, Kamnitsas et al. 2017) |
    #: mmd (multi-kernel Gaussian MMD) | coral (covariance alignment, Sun & Saenko 2016)
    method: str = "none"
    levels: tuple[int, ...] = (2, 3)  #: encoder levels whose features are aligned (0 = full resolution)
    weight: float = 0.1  #: final weight of the alignment term (the gradient-reversal factor for adversarial)
    #: constant | linear (0 -> weight over ``ramp`` of training) | dann (2/(1+exp(-10 p)) - 1, Ganin 2016)
    schedule: str = "dann"
    ramp: float = 0.5  #: share of training over which ``linear`` reaches full weight
    batch_size: int = 2  #: synthetic and real patches per step fed to the alignment term (each)
    max_voxels: int = 512  #: feature vectors drawn per domain and level for mmd / coral

    def __post_init__(self) -> None:
        if self.method not in ALIGN_METHODS:
            raise MensegError(f"sim2real.align.method must be one of {', '.join(ALIGN_METHODS)}, got "
                              f"'{self.method}'")
        if self.schedule not in ALIGN_SCHEDULES:
            raise MensegError(f"sim2real.align.schedule must be one of {', '.join(ALIGN_SCHEDULES)}, got "
                              f"'{self.schedule}'")
        if not self.levels or min(self.levels) < 0:
            raise MensegError(f"sim2real.align.levels must be non-empty levels >= 0, got {list(self.levels)}")
        if self.weight < 0 or not 0 < self.ramp <= 1 or self.batch_size < 1 or self.max_voxels < 2:
            raise MensegError("sim2real.align: weight >= 0, 0 < ramp <= 1, batch_size >= 1, max_voxels >= 2")


@dataclass(frozen=True)
class InjectConfig:
    """Semantic injection: synthetic lesions grown into real scans (``sim2real.inject``)."""

    enabled: bool = False
    per_scan: int = 2  #: injected variants of every real scan (labelled and unlabelled), made once per run
    #: share of the non-real-labelled samples drawn from injected scans (the rest: synthetic cases);
    #: 1.0 = injection only
    share: float = 0.5
    #: which real scans get lesions: ``both`` (labelled and data.unlabeled_root) or ``labelled`` (complete
    #: labels only; falls back to the unlabelled scans when there is no labelled case)
    into: str = "both"
    #: on an unlabelled scan only the injected lesion and this margin around it (mm) count as known
    #: labels (and the background outside the head); elsewhere the loss is masked, because the scan
    #: may hold its own, unlabelled tumour
    known_margin_mm: float = 12.0

    def __post_init__(self) -> None:
        if self.per_scan < 1:
            raise MensegError(f"sim2real.inject.per_scan must be >= 1, got {self.per_scan}")
        if not 0.0 <= self.share <= 1.0:
            raise MensegError(f"sim2real.inject.share must be in [0, 1], got {self.share}")
        if self.known_margin_mm < 0:
            raise MensegError(f"sim2real.inject.known_margin_mm must be >= 0, got {self.known_margin_mm}")
        if self.into not in ("both", "labelled"):
            raise MensegError(f"sim2real.inject.into must be both or labelled, got '{self.into}'")


#: Source schedules of a Sim2Real run (``sim2real.schedule.mode``).
SCHEDULE_MODES: tuple[str, ...] = ("mixed", "pretrain")


@dataclass(frozen=True)
class ScheduleConfig:
    """Share of real labelled samples over training (``sim2real.schedule``).

    ``mixed``: the real share goes linearly from ``real_start`` to ``real_end``. ``pretrain``:
    synthetic (and injected) samples only for the first ``switch`` of the steps, then ``real_end``
    (synthetic pre-training, real fine-tuning). Without labelled cases the real share is 0.
    """

    mode: str = "mixed"
    real_start: float = 0.5
    real_end: float = 0.5
    switch: float = 0.5

    def __post_init__(self) -> None:
        if self.mode not in SCHEDULE_MODES:
            raise MensegError(f"sim2real.schedule.mode must be one of {', '.join(SCHEDULE_MODES)}, got "
                              f"'{self.mode}'")
        for k in ("real_start", "real_end", "switch"):
            if not 0.0 <= getattr(self, k) <= 1.0:
                raise MensegError(f"sim2real.schedule.{k} must be in [0, 1], got {getattr(self, k)}")


@dataclass(frozen=True)
class StreamConfig:
    """Where a Sim2Real run's synthetic cases come from and how often they are renewed
    (``sim2real.stream``; :mod:`menseg.sim2real.stream`). At its defaults the run has one fixed pool of
    ``n_synthetic`` cases of the randomised appearance model on the template anatomy, as before."""

    #: replace the synthetic pool by the next ``n_synthetic`` cases of the stream every this many steps
    #: (made in a background thread while the current ones train); 0 = one pool for the whole run
    refresh_every: int = 0
    #: appearance of each case, drawn uniformly per case: ``random`` (the randomised appearance model)
    #: and/or MR-physics site names (site-a … site-d, ``menseg synth --site``)
    sites: tuple[str, ...] = ("random",)
    #: folder of whole-head label maps (e.g. ../shared/data/label-maps): real anatomy for a share of the
    #: cases, resampled to the run's grid, with random intensities (SynthSeg-style)
    label_maps: str | None = None
    label_map_share: float = 0.5  #: share of the cases made on a label map (when ``label_maps`` is set)
    #: which class of the label maps is which tissue: ``synthseg`` (packaged: FreeSurfer / SynthSeg ids,
    #: extra-cerebral classes to background so cases look skull-stripped), a JSON file, or none
    label_mapping: str | None = "synthseg"
    prefetch: bool = True  #: make the next pool in a background thread (False: at the refresh step)

    def __post_init__(self) -> None:
        if self.refresh_every < 0:
            raise MensegError(f"sim2real.stream.refresh_every must be >= 0, got {self.refresh_every}")
        if not self.sites:
            raise MensegError("sim2real.stream.sites must name at least one appearance (random or a site)")
        if not 0.0 <= self.label_map_share <= 1.0:
            raise MensegError(f"sim2real.stream.label_map_share must be in [0, 1], got "
                              f"{self.label_map_share}")

    @property
    def default(self) -> bool:
        """The fixed pool of randomised template cases (no stream)."""
        return self.refresh_every == 0 and tuple(self.sites) == ("random",) and not self.label_maps


@dataclass(frozen=True)
class Sim2RealConfig:
    """Sim2Real semantic injection (DESIGN.md, idea 2); ``enabled`` switches the whole section."""

    enabled: bool = False
    #: synthetic cases generated once per run seed (procedural appearance model) at the run's spacing
    n_synthetic: int = 24
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    translator: TranslatorConfig = field(default_factory=TranslatorConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    inject: InjectConfig = field(default_factory=InjectConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)

    def __post_init__(self) -> None:
        if self.n_synthetic < 1:
            raise MensegError(f"sim2real.n_synthetic must be at least 1, got {self.n_synthetic}")


@dataclass(frozen=True)
class CarveMixConfig:
    """CarveMix (Zhang et al., MICCAI 2021), a competitor of ISM and Sim2Real (``carvemix``): a lesion with a
    distance-based margin carved from another labelled case and pasted into the sample, labels with it."""

    enabled: bool = False
    p: float = 0.5  #: probability that a training sample receives a carved lesion

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise MensegError(f"carvemix.p must be in [0, 1], got {self.p}")


@dataclass(frozen=True)
class TumorCPConfig:
    """TumorCP (Yang et al., MICCAI 2021), a competitor of ISM and Sim2Real (``tumorcp``): another case's
    tumour, transformed as an object (rigid, scale, intensity jitter), pasted at a random place of the
    head in the sample, labels with it."""

    enabled: bool = False
    p: float = 0.5  #: probability that a training sample receives a pasted tumour (the paper's p_cp)
    p_transform: float = 0.5  #: probability of each object transform (rotation, scaling, flips; p_trans)
    rotate_deg: float = 30.0  #: rotation about each axis, uniform in +-rotate_deg
    scale_range: tuple[float, float] = (0.7, 1.4)  #: isotropic scaling of the tumour
    #: intensity jitter of the pasted tumour, per sequence: x * U(gain) + U(-shift, shift) (z-score units)
    gain_range: tuple[float, float] = (0.8, 1.2)
    shift: float = 0.2

    def __post_init__(self) -> None:
        if not (0.0 <= self.p <= 1.0 and 0.0 <= self.p_transform <= 1.0):
            raise MensegError(f"tumorcp.p and p_transform must be in [0, 1], got {self.p}, "
                              f"{self.p_transform}")
        lo_hi = (self.scale_range, self.gain_range)
        if not (all(0 < lo <= hi for lo, hi in lo_hi) and self.shift >= 0 and self.rotate_deg >= 0):
            raise MensegError("tumorcp: scale_range and gain_range need 0 < low <= high; shift and "
                              "rotate_deg >= 0")


@dataclass(frozen=True)
class PostprocessConfig:
    """Post-processing learned at the end of training (``postprocess``), as nnU-Net decides it from its
    cross-validation: per region a minimum component volume and whether to keep only the largest
    component, chosen by lesion-wise Dice on the validation cases (on the training cases when the run has
    none) and stored in the final checkpoint, where ``menseg predict`` applies it."""

    learn: bool = False
    #: minimum component volumes tried (mm^3), each with and without keep-largest
    candidates_mm3: tuple[float, ...] = (0.0, 10.0, 30.0, 100.0, 300.0, 1000.0)

    def __post_init__(self) -> None:
        if not self.candidates_mm3 or min(self.candidates_mm3) < 0:
            raise MensegError("postprocess.candidates_mm3 must be non-empty volumes >= 0")


@dataclass(frozen=True)
class SeqDropConfig:
    """Sequence dropout (``seqdrop``): per training sample a random subset of t1c/t1n/t2f/t2w is zeroed
    (never all), and the network sees which sequences a patch has (:class:`menseg.nets.PresenceStem`),
    so the model accepts any non-empty subset at prediction. One network trained so cost 4.8-6.4 WT points
    on complete scans (docs/benchmarks/sequences); with a companion (``companion_steps`` /
    ``companion_fraction``) the network trains without it and a fine-tuned copy takes the incomplete
    scans, at no cost on complete ones. Off in the dataclass (a stored config without the key is a run
    without dropout); the packaged configs switch it on with a companion (docs/DESIGN.md, Decisions).
    ``ism.modal`` (modal fusion) handles missing sequences its own way and takes its place when on."""

    enabled: bool = False
    #: probability that a training sample loses some sequences
    p_drop: float = 0.3
    #: at most this many sequences dropped from one sample (at least one always stays)
    max_drop: int = 3
    #: the subsets a dropping sample may keep, drawn uniformly (e.g. ``[t1c, t2f, t1n+t2f+t2w]``: the
    #: subsets archives hold); empty: a random subset of at least ``4 - max_drop`` sequences
    subsets: tuple[str, ...] = ()
    #: fraction of the training steps before dropout starts (0: from the first step)
    start_fraction: float = 0.0
    #: leave ET and TC out of the loss of a sample that has no t1c (enhancement cannot be seen
    #: without contrast: supervising it teaches the network to guess it on every scan)
    mask_unseen: bool = False
    #: N > 0: a *companion* for incomplete scans. The run's network trains without dropout (complete scans
    #: are predicted by it, at no cost); then a copy of it, with the presence input added (zero weights:
    #: it starts as the same function), is fine-tuned for N steps with dropout into ``<run>/companion``,
    #: and prediction uses it for the cases that lack a sequence
    companion_steps: int = 0
    #: the companion's steps as a share of ``train.steps`` when ``companion_steps`` is 0 (the packaged
    #: configs use 0.25: chosen on a selection cohort, docs/benchmarks/sequences/selection)
    companion_fraction: float = 0.0
    companion_lr: float = 3e-3  #: the companion's learning rate (after a warm-up of a tenth of its steps)

    def __post_init__(self) -> None:
        if self.companion_steps < 0 or not self.companion_lr > 0 or not 0.0 <= self.companion_fraction <= 4.0:
            raise MensegError("seqdrop.companion_steps must be at least 0, seqdrop.companion_fraction in "
                              "[0, 4] and seqdrop.companion_lr positive")
        if not 0.0 <= self.p_drop <= 1.0:
            raise MensegError(f"seqdrop.p_drop must be in [0, 1], got {self.p_drop}")
        if self.max_drop < 0:
            raise MensegError(f"seqdrop.max_drop must be at least 0, got {self.max_drop}")
        if not 0.0 <= self.start_fraction < 1.0:
            raise MensegError(f"seqdrop.start_fraction must be in [0, 1), got {self.start_fraction}")
        for s in self.subsets:
            subset_mask(s)  # a one-line error for an empty or unknown subset


def subset_mask(subset: str) -> tuple[bool, ...]:
    """``"t1n+t2f"`` (``+``, ``,`` or spaces between names) -> presence in MODALITIES order."""
    names = [n for n in re.split(r"[+,\s]+", str(subset).strip().lower()) if n]
    unknown = [n for n in names if n not in MODALITIES]
    if not names or unknown:
        raise MensegError(f"seqdrop.subsets: {subset!r} is not a non-empty set of {', '.join(MODALITIES)} "
                          "(join names with '+', e.g. t1n+t2f)")
    return tuple(m in names for m in MODALITIES)


@dataclass(frozen=True)
class Config:
    """Everything a run needs; saved as ``config.yaml`` in the run folder."""

    name: str = "baseline"
    out_dir: str = "runs/baseline"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    ism: ISMConfig = field(default_factory=ISMConfig)
    sim2real: Sim2RealConfig = field(default_factory=Sim2RealConfig)
    carvemix: CarveMixConfig = field(default_factory=CarveMixConfig)
    tumorcp: TumorCPConfig = field(default_factory=TumorCPConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    seqdrop: SeqDropConfig = field(default_factory=SeqDropConfig)


def presence_input(cfg: Config) -> bool:
    """Whether the run's network takes the sequences' presence as input (sequence dropout on, and
    not replaced by ISM's modal fusion nor left to a companion)."""
    return cfg.seqdrop.enabled and not cfg.ism.modal.enabled and not has_companion(cfg)


def companion_steps(cfg: Config) -> int:
    """Steps of the run's companion for incomplete scans: ``seqdrop.companion_steps``, else
    ``seqdrop.companion_fraction`` of ``train.steps`` (at least 1 when the fraction is positive); 0 when
    the run has no companion (sequence dropout off, or ISM's modal fusion in its place)."""
    sd = cfg.seqdrop
    if not sd.enabled or cfg.ism.modal.enabled:
        return 0
    if sd.companion_steps:
        return sd.companion_steps
    return max(1, round(sd.companion_fraction * cfg.train.steps)) if sd.companion_fraction > 0 else 0


def has_companion(cfg: Config) -> bool:
    """Whether the run trains a companion network for incomplete scans (``seqdrop.companion_steps`` or
    ``seqdrop.companion_fraction``)."""
    return companion_steps(cfg) > 0


def accepts_subsets(cfg: Config) -> bool:
    """Whether the run's model takes cases lacking sequences (presence input, ISM's modal fusion, or a
    companion network for them)."""
    return presence_input(cfg) or cfg.ism.modal.enabled or has_companion(cfg)


#: Keys whose default changed what a run does: a stored config that lacks one (a checkpoint, a benchmark
#: run, a run folder made before the key existed) was made with this value, not with today's default.
LEGACY_VALUES: dict[str, Any] = {"seqdrop.enabled": False}


def with_legacy_values(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored nested config dict with the :data:`LEGACY_VALUES` of the keys it lacks filled in."""
    out = copy.deepcopy(stored)
    for key, value in LEGACY_VALUES.items():
        *parents, leaf = key.split(".")
        node = out
        for k in parents:
            node = node.setdefault(k, {}) if isinstance(node.get(k, {}), dict) else {}
        node.setdefault(leaf, value)
    return out


def off_in_both(key: str, then: dict[str, Any], now: dict[str, Any]) -> bool:
    """Whether flat config ``key`` belongs to a section switched off in both flat configs (a
    ``<section>.enabled`` that is False in each): its value changes nothing either run did (e.g. the
    dropout schedule of two runs without dropout), so comparing runs may leave it out."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        flag = ".".join(parts[:i]) + ".enabled"
        if flag != key and then.get(flag) is False and now.get(flag) is False:
            return True
    return False


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config dataclass (tuples become lists, YAML-friendly)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        return v

    return conv(cfg)


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"steps": 3}}`` -> ``{"train.steps": 3}`` (a config dict's dotted keys)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, key + "."))
        else:
            out[key] = v
    return out


_T = typing.TypeVar("_T")


def _coerce(value: Any, tp: Any, where: str, kind: str) -> Any:
    """``value`` (from YAML / JSON) as type ``tp``; ``where`` names it in errors as ``<kind> '<where>'``."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad(what: str) -> MensegError:
        return MensegError(f"{kind} '{where}' {what}")

    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, kind=kind)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where, kind)
            except MensegError as e:
                errors.append(str(e))
        if len(errors) == 1:
            raise MensegError(errors[0])
        raise bad(f"fits none of {tp} ({'; '.join(errors)})")
    if origin is typing.Literal:
        if value not in args:
            raise bad(f"must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, list | tuple):
            raise bad(f"must be a list, got {value!r}")
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            item = args[0] if args else Any
            items = [_coerce(v, item, f"{where}[{i}]", kind) for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
        if not args:
            return tuple(value)
        if len(value) != len(args):
            raise bad(f"needs {len(args)} values, got {len(value)}")
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(_coerce(v, a, f"{where}[{i}]", kind) for i, (v, a) in pairs)
    if origin is dict:
        if not isinstance(value, dict):
            raise bad(f"must be a mapping, got {value!r}")
        ka, va = args if args else (Any, Any)
        return {_coerce(k, ka, where, kind): _coerce(v, va, f"{where}.{k}", kind) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad(f"must be a number, got {value!r}")
        return float(value)
    if tp is int:
        integral = isinstance(value, int) or isinstance(value, float) and value.is_integer()
        if isinstance(value, bool) or not integral:
            raise bad(f"must be an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad(f"must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise bad(f"must be a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type[_T], d: Any, where: str = "", *, kind: str = "config key") -> _T:
    """Build dataclass ``cls`` from a nested dict (YAML or JSON), checking keys and types.

    The one dataclass-from-dict parser (configs here; the synthetic engine's configs and sidecars
    through :func:`menseg.synth.serial.from_dict`). Missing keys keep their defaults, unknown keys are
    errors; values are converted along the type hints: nested dataclasses, ``tuple[...]`` (from lists),
    ``list[...]``, ``dict[...]``, ``Literal[...]``, ``X | None``, numbers (an integral float is an
    int), strings (a number is written as a string). An instance of ``cls`` is returned as it is.
    Errors are :class:`MensegError` naming the value as ``<kind> '<where>.<key>'`` (e.g.
    ``config key 'train.steps'``).
    """
    if isinstance(d, cls):
        return d
    if not isinstance(d, dict):
        raise MensegError(f"{kind} '{where}' must be a mapping, got {d!r}" if where
                          else f"{cls.__name__} needs a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(d) - names)
    if unknown:
        keys = ", ".join(f"'{where}.{k}'" if where else f"'{k}'" for k in unknown)
        plural = "s" if len(unknown) > 1 else ""
        raise MensegError(f"unknown {kind}{plural} {keys} (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k, kind) for k, v in d.items()}
    return cls(**kwargs)


def packaged_config_names() -> list[str]:
    """Names of the packaged training configs (``sim2real/s2r-raw`` for subfolders; not bench profiles)."""
    return [n for n in (p.relative_to(PACKAGED_CONFIGS).with_suffix("").as_posix()
                        for p in sorted(PACKAGED_CONFIGS.rglob("*.yaml"))) if not n.startswith("bench/")]


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A YAML path, or the name of a packaged config (``baseline``, ``sim2real/s2r-raw``)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    packaged = PACKAGED_CONFIGS / f"{name_or_path}.yaml"
    if packaged.is_file():
        return packaged
    known = ", ".join(packaged_config_names())
    raise MensegError(f"no such config file or packaged config (packaged: {known})", p)


def _resolve_base(base: Any, including: Path) -> Path:
    """``base:`` of the config file ``including``: a ``.yaml`` path (relative to that file's folder) or
    a packaged config name."""
    if not isinstance(base, str) or not base:
        raise MensegError(f"'base' must name a packaged config or a .yaml file, got {base!r}", including)
    if base.endswith((".yaml", ".yml")):
        path = (including.parent / base) if not Path(base).is_absolute() else Path(base)
        if not path.is_file():
            raise MensegError(f"base config file not found: {base}", including)
        return path
    packaged = PACKAGED_CONFIGS / f"{base}.yaml"
    if not packaged.is_file():
        raise MensegError(f"base '{base}' is not a packaged config (packaged: "
                          f"{', '.join(packaged_config_names())}; a file must end in .yaml)", including)
    return packaged


def _read_config_file(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML mapping of ``path`` merged onto its ``base:`` chain (dicts merge, lists and values
    replace); a cycle of bases is refused."""
    key = path.resolve()
    if key in chain:
        names = " -> ".join(p.name for p in (*chain, key))
        raise MensegError(f"config bases form a cycle ({names})", path)
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise MensegError(f"not valid YAML ({e})", path) from None
    except OSError as e:
        raise MensegError(f"cannot read config ({e.strerror})", path) from None
    if not isinstance(loaded, dict):
        raise MensegError("config must be a YAML mapping", path)
    if "base" not in loaded:
        return loaded
    base = loaded.pop("base")
    return _merge(_read_config_file(_resolve_base(base, path), (*chain, key)), loaded)


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise MensegError(f"override '{dotted}': '{k}' is not a section")
        cur = nxt
    cur[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["train.steps=10", "data=/x"]`` into a nested dict; values parsed as YAML."""
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise MensegError(f"override '{item}' must look like key=value (e.g. train.steps=100)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise MensegError(f"override '{item}' has an empty key")
        if key == "data":
            key = "data.root"
        try:
            value = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise MensegError(f"override '{item}': value is not valid YAML ({e})") from None
        _set_dotted(out, key, value)
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def load_config(name_or_path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a config (packaged name or YAML path), apply dotted overrides, validate.

    A config file may start with ``base: NAME_OR_PATH`` (a packaged config, or a ``.yaml`` file relative
    to it) and list only what differs: it is merged onto its base recursively (mappings merge, lists and
    values replace), bases may have bases, and a cycle is refused.
    """
    d: dict[str, Any] = {}
    if name_or_path is not None:
        d = _read_config_file(resolve_config_path(name_or_path))
    d = _merge(d, parse_overrides(overrides or []))
    return from_dict(Config, d)


def with_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Return ``cfg`` with dotted overrides applied."""
    return from_dict(Config, _merge(to_dict(cfg), parse_overrides(overrides)))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    from menseg.utils import write_text_atomic

    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
