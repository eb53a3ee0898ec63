"""How close a set of images comes to real scans: a domain classifier and per-tissue intensity distances.

All images are *preprocessed* ``(4, X, Y, Z)`` float32 arrays (z-scored inside the head,
exactly 0 outside; MODALITIES order). For each candidate set (e.g. raw synthetic and
translated synthetic cases) :func:`domain_gap` reports:

``classifier_acc`` / ``classifier_auc``
    a small fresh 3D CNN (:class:`DomainClassifier`, same architecture and initial weights
    for every candidate) is trained for ``steps`` steps to tell real patches from candidate
    patches drawn from the first half of each set's cases, then tested on a balanced set
    of patches from the other half. 0.5 = indistinguishable, 1.0 = fully separable. This
    sees texture and context, which is what the translator is trained to fool.
``tissue_w1``, ``w1_<seq>``
    pseudo-tissues (3 classes, CSF/GM/WM-like) from a 1D k-means (:mod:`menseg.kmeans`) on t1n inside
    the head of each case (centres sorted by their t1n mean), then per sequence and tissue the
    1-Wasserstein distance (z-score units) between the pooled real and the pooled candidate
    intensities (each subsampled to at most ``MAX_VALUES`` values with a seeded generator).
    ``tissue_w1`` is the mean over the 12 (sequence, tissue) pairs, ``w1_<seq>`` the mean over
    the tissues of one sequence. This checks the intensity statistics a segmenter relies
    on, independently of any network.
``excluded``
    with ``away_from_lesions`` (the default of ``menseg sim2real gap``), the mean share of the head left
    out as lesion (:func:`lesion_mask`): classifier patches then contain no lesion voxel and the tissue
    distances skip lesion voxels, so the gap measured is the one of the anatomy and the scanner, not of
    the tumours (real test scans hold tumours of other kinds). The same rule is applied to every set, so
    leaving voxels out makes no difference of its own between them; a set's known labels are left out
    too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as fnn
from torch import Tensor, nn

from menseg.constants import MODALITIES
from menseg.data.sampling import choose_start, crop_pad, foreground_coords
from menseg.device import resolve_device
from menseg.errors import MensegError
from menseg.kmeans import kmeans_1d
from menseg.utils import derive_seed

log = logging.getLogger(__name__)

#: Pseudo-tissue classes (by increasing t1n mean).
TISSUES: tuple[str, ...] = ("csf", "gm", "wm")
#: At most this many intensities per (set, sequence, tissue) enter a Wasserstein distance.
MAX_VALUES = 20_000
#: Patches per class in the classifier's test set, and per class in one training batch.
TEST_PATCHES = 32
BATCH_PER_CLASS = 4
CLASSIFIER_LR = 1e-3
KMEANS_ITERS = 50
#: Values used to fit the k-means centres of one case (seeded subsample).
KMEANS_SAMPLE = 50_000
#: Lesion-like voxels of any scan (:func:`lesion_mask`): FLAIR or contrast-enhanced T1 above these
#: z-scores (of the preprocessed image, z-scored inside the head), in connected components of at least
#: ``LESION_MIN_CM3``, grown by ``LESION_MARGIN_MM``. On the three real studies of the shared data (a
#: glioma, a metastasis case, an African glioma scan) this finds 6-84 cm3 per scan at 2 mm.
LESION_Z_T2F = 2.0
LESION_Z_T1C = 2.5
LESION_MIN_CM3 = 1.0
LESION_MARGIN_MM = 4.0


class DomainClassifier(nn.Module):
    """``(B, 4, X, Y, Z) -> (B,)`` logit 'candidate, not real'. Three stride-2 convolutions, global pooling.

    No normalisation layers: instance norm would hide exactly the intensity shifts it should see.
    """

    def __init__(self, channels: int = 8, in_channels: int = len(MODALITIES)) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv3d(in_channels, c, 3, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(c, 2 * c, 3, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(2 * c, 4 * c, 3, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True),
        )
        self.fc = nn.Linear(4 * c, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3, 4)))[:, 0]


def _check(images: Sequence[np.ndarray], what: str) -> None:
    if len(images) == 0:
        raise MensegError(f"domain_gap: '{what}' holds no images")
    for i, img in enumerate(images):
        shape = getattr(img, "shape", None)
        if shape is None or len(shape) != 4 or shape[0] != len(MODALITIES):
            raise MensegError(f"domain_gap: '{what}' image {i} must have shape (4, X, Y, Z), got {shape}")


def lesion_mask(image: np.ndarray, spacing_mm: float, label: np.ndarray | None = None) -> np.ndarray:
    """Bool ``(X, Y, Z)``: lesion-like voxels of a preprocessed image (isotropic ``spacing_mm``) and of its
    ``label`` when known (label > 0), grown by ``LESION_MARGIN_MM``. Lesion-like: FLAIR above
    ``LESION_Z_T2F`` or contrast-enhanced T1 above ``LESION_Z_T1C`` inside the head, in connected
    components of at least ``LESION_MIN_CM3`` (normal bright specks stay in)."""
    from scipy import ndimage as ndi

    img = np.asarray(image)
    head = np.any(img != 0, axis=0)
    bright = ((img[MODALITIES.index("t2f")] > LESION_Z_T2F) | (img[MODALITIES.index("t1c")] > LESION_Z_T1C))
    bright &= head
    comps, n = ndi.label(bright)
    out = np.zeros(head.shape, bool)
    if n:
        sizes = ndi.sum_labels(bright, comps, np.arange(1, n + 1)) * spacing_mm ** 3 / 1000.0
        out = np.isin(comps, 1 + np.flatnonzero(sizes >= LESION_MIN_CM3))
    if label is not None:
        out |= np.asarray(label) > 0
    r = int(round(LESION_MARGIN_MM / spacing_mm))
    if r and out.any():
        out = ndi.maximum_filter(out, size=2 * r + 1)
    return out


def lesion_free_centres(image: np.ndarray, lesion: np.ndarray, patch: Sequence[int]) -> np.ndarray:
    """Head voxels ``(N, 3)`` around which a ``patch`` holds no ``lesion`` voxel (away from the
    volume's border); when a scan has none, head voxels outside the lesion (logged)."""
    from scipy import ndimage as ndi

    head = np.any(np.asarray(image) != 0, axis=0)
    if not lesion.any():
        return foreground_coords(head)
    near = ndi.maximum_filter(lesion, size=tuple(int(p) + 1 for p in patch))
    ok = head & ~near
    if not ok.any():
        log.warning("domain_gap: every %s-voxel patch of a scan touches its lesion; patches centred "
                    "outside the lesion are used", "x".join(str(int(p)) for p in patch))
        ok = head & ~lesion
    return foreground_coords(ok)


def _halves(images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """First half (training) and second half (test) of the cases; one case is used for both."""
    imgs = list(images)
    if len(imgs) == 1:
        log.warning("domain_gap: a set has one case; its patches train and test the classifier")
        return imgs, imgs
    k = int(math.ceil(len(imgs) / 2))
    return imgs[:k], imgs[k:]


class _Patches:
    """Random patches from a list of images, centred in the head (or on each image's ``centres``)."""

    def __init__(self, images: Sequence[np.ndarray], patch: tuple[int, int, int],
                 centres: Sequence[np.ndarray] | None = None) -> None:
        self.images = list(images)
        self.patch = patch
        self.head = (list(centres) if centres is not None
                     else [foreground_coords(np.any(np.asarray(im) != 0, axis=0)) for im in self.images])

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        out = []
        for _ in range(n):
            i = int(rng.integers(len(self.images)))
            start = choose_start(self.images[i].shape[1:], self.patch, rng, self.head[i])
            out.append(crop_pad(self.images[i], start, self.patch).astype(np.float32, copy=False))
        return np.stack(out)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged)."""
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s), np.float64)
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[i: j + 1] = (i + j) / 2 + 1
        i = j + 1
    r = np.empty_like(ranks)
    r[order] = ranks
    pos = labels.astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classifier_scores(
    real: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    *,
    seed: int = 0,
    patch: tuple[int, int, int] = (32, 32, 32),
    steps: int = 150,
    device: str = "cpu",
    real_centres: Sequence[np.ndarray] | None = None,
    candidate_centres: Sequence[np.ndarray] | None = None,
) -> tuple[float, float]:
    """``(accuracy, AUC)`` of a fresh domain classifier on held-out patches (see module docstring);
    ``*_centres``: per image, the voxels patches may be centred on (default: the head)."""
    dev = resolve_device(device)
    patch = tuple(int(p) for p in patch)  # type: ignore[assignment]
    r_tr, r_te = _halves(real)
    c_tr, c_te = _halves(candidate)
    rc_tr, rc_te = _halves(real_centres) if real_centres is not None else (None, None)
    cc_tr, cc_te = _halves(candidate_centres) if candidate_centres is not None else (None, None)
    src_r, src_c = _Patches(r_tr, patch, rc_tr), _Patches(c_tr, patch, cc_tr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, "gap-classifier-init"))
        net = DomainClassifier()
    net.to(dev).train()
    opt = torch.optim.Adam(net.parameters(), lr=CLASSIFIER_LR)
    y = torch.cat([torch.zeros(BATCH_PER_CLASS), torch.ones(BATCH_PER_CLASS)]).to(dev)
    for step in range(steps):
        rng = np.random.default_rng(derive_seed(seed, "gap-batch", step))
        x = np.concatenate([src_r.draw(rng, BATCH_PER_CLASS), src_c.draw(rng, BATCH_PER_CLASS)])
        loss = fnn.binary_cross_entropy_with_logits(net(torch.from_numpy(x).to(dev)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    rng = np.random.default_rng(derive_seed(seed, "gap-test"))
    x = np.concatenate([_Patches(r_te, patch, rc_te).draw(rng, TEST_PATCHES),
                        _Patches(c_te, patch, cc_te).draw(rng, TEST_PATCHES)])
    labels = np.concatenate([np.zeros(TEST_PATCHES), np.ones(TEST_PATCHES)])
    net.eval()
    with torch.no_grad():
        scores = np.concatenate([net(torch.from_numpy(x[i: i + 16]).to(dev)).float().cpu().numpy()
                                 for i in range(0, len(x), 16)])
    acc = float(np.mean((scores > 0) == labels.astype(bool)))
    return acc, _auc(scores, labels)


def pseudo_tissues(image: np.ndarray, rng: np.random.Generator, exclude: np.ndarray | None = None
                   ) -> np.ndarray:
    """Pseudo-tissue map ``(X, Y, Z)`` int8 of a preprocessed image: -1 outside the head (and in
    ``exclude``), else 0/1/2 (CSF/GM/WM-like: k-means classes of t1n inside the head, by increasing t1n
    mean)."""
    img = np.asarray(image)
    head = np.any(img != 0, axis=0)
    if exclude is not None:
        head &= ~exclude
    t1n = img[MODALITIES.index("t1n")][head].astype(np.float64)
    out = np.full(head.shape, -1, np.int8)
    if t1n.size == 0:
        return out
    fit = t1n if t1n.size <= KMEANS_SAMPLE else rng.choice(t1n, KMEANS_SAMPLE, replace=False)
    centres = kmeans_1d(fit, len(TISSUES), KMEANS_ITERS)
    out[head] = np.argmin(np.abs(t1n[:, None] - centres[None]), axis=1).astype(np.int8)
    return out


def _pooled(images: Sequence[np.ndarray], rng: np.random.Generator,
            exclude: Sequence[np.ndarray] | None = None) -> dict[tuple[int, int], np.ndarray]:
    """``(sequence, tissue) -> pooled intensities`` over a set of images (each subsampled)."""
    parts: dict[tuple[int, int], list[np.ndarray]] = {}
    for i, img in enumerate(images):
        img = np.asarray(img)
        tis = pseudo_tissues(img, rng, None if exclude is None else exclude[i])
        for t in range(len(TISSUES)):
            sel = tis == t
            for c in range(len(MODALITIES)):
                parts.setdefault((c, t), []).append(img[c][sel].astype(np.float64))
    out = {}
    for key, vals in parts.items():
        v = np.concatenate(vals) if vals else np.zeros(0)
        if v.size > MAX_VALUES:
            v = rng.choice(v, MAX_VALUES, replace=False)
        out[key] = v
    return out


def tissue_distances(real: Sequence[np.ndarray], candidate: Sequence[np.ndarray], *, seed: int = 0,
                     real_exclude: Sequence[np.ndarray] | None = None,
                     candidate_exclude: Sequence[np.ndarray] | None = None) -> dict[str, float]:
    """``tissue_w1`` (mean over 12 sequence-tissue pairs) and ``w1_<seq>`` (z-score units); voxels in an
    image's ``*_exclude`` mask are left out."""
    from scipy.stats import wasserstein_distance

    a = _pooled(real, np.random.default_rng(derive_seed(seed, "gap-w1", "real")), real_exclude)
    b = _pooled(candidate, np.random.default_rng(derive_seed(seed, "gap-w1", "candidate")), candidate_exclude)
    w = np.full((len(MODALITIES), len(TISSUES)), np.nan)
    for (c, t), va in a.items():
        vb = b.get((c, t), np.zeros(0))
        if va.size and vb.size:
            w[c, t] = wasserstein_distance(va, vb)
    res = {"tissue_w1": float(np.nanmean(w)) if np.any(np.isfinite(w)) else float("nan")}
    for c, m in enumerate(MODALITIES):
        row = w[c][np.isfinite(w[c])]
        res[f"w1_{m}"] = float(row.mean()) if row.size else float("nan")
    return res


def domain_gap(
    real: Sequence[np.ndarray],
    candidates: dict[str, Sequence[np.ndarray]],
    *,
    seed: int = 0,
    patch: tuple[int, int, int] = (32, 32, 32),
    steps: int = 150,
    device: str = "cpu",
    away_from_lesions: bool = False,
    spacing_mm: float = 2.0,
    labels: dict[str, Sequence[np.ndarray | None]] | None = None,
) -> dict[str, dict[str, float]]:
    """Distance of each candidate image set to the real images.

    Args:
        real: preprocessed real images ``(4, X, Y, Z)``.
        candidates: name -> preprocessed images, e.g. ``{"raw": [...], "translated": [...]}``.
        seed: seeds the classifier's initialisation (the same for every candidate), its batches
            and the subsampling.
        patch: classifier patch size, voxels.
        steps: classifier training steps.
        device: where the classifier runs.
        away_from_lesions: leave lesions out of every set (:func:`lesion_mask`; see the module docstring).
        spacing_mm: the images' isotropic grid (for the lesion rule's sizes and margin).
        labels: name -> per-image label maps (or None) of a candidate set, left out with its lesions.

    Returns:
        name -> ``{"classifier_acc", "classifier_auc", "tissue_w1", "w1_t1c", "w1_t1n", "w1_t2f",
        "w1_t2w", "excluded"}``.
    """
    _check(real, "real")
    for name, imgs in candidates.items():
        _check(imgs, name)

    Masks = list[np.ndarray] | None

    def lesions(imgs: Sequence[np.ndarray], labs: Sequence[np.ndarray | None] | None) -> Masks:
        if not away_from_lesions:
            return None
        return [lesion_mask(im, spacing_mm, None if labs is None else labs[i]) for i, im in enumerate(imgs)]

    def centres(imgs: Sequence[np.ndarray], masks: Masks) -> Masks:
        if masks is None:
            return None
        return [lesion_free_centres(im, m, patch) for im, m in zip(imgs, masks, strict=True)]

    def share(imgs: Sequence[np.ndarray], masks: Masks) -> float:
        if masks is None:
            return 0.0
        heads = [np.any(np.asarray(im) != 0, axis=0) for im in imgs]
        return float(np.mean([(m & h).sum() / max(1, h.sum()) for h, m in zip(heads, masks, strict=True)]))

    real_les = lesions(real, None)
    real_ctr = centres(real, real_les)
    out: dict[str, dict[str, float]] = {}
    for name, imgs in candidates.items():
        les = lesions(imgs, (labels or {}).get(name))
        acc, auc = classifier_scores(real, imgs, seed=seed, patch=patch, steps=steps, device=device,
                                     real_centres=real_ctr, candidate_centres=centres(imgs, les))
        out[name] = {"classifier_acc": acc, "classifier_auc": auc,
                     **tissue_distances(real, imgs, seed=seed, real_exclude=real_les, candidate_exclude=les),
                     "excluded": share(imgs, les)}
        log.info("domain gap of %s: classifier accuracy %.3f, AUC %.3f, tissue W1 %.3f", name, acc, auc,
                 out[name]["tissue_w1"])
    if away_from_lesions:
        out["real"] = {"excluded": share(real, real_les)}
    return out


def gap_table(result: dict[str, dict[str, float]]) -> str:
    """Markdown table of :func:`domain_gap`'s result, one row per candidate set."""
    cols = ["classifier_acc", "classifier_auc", "tissue_w1", *[f"w1_{m}" for m in MODALITIES]]
    if any("excluded" in row for row in result.values()):
        cols.append("excluded")
    lines = ["| set | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, row in result.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" if c in row else "-" for c in cols) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["DomainClassifier", "TISSUES", "classifier_scores", "domain_gap", "gap_table",
           "lesion_free_centres", "lesion_mask", "pseudo_tissues", "tissue_distances"]
