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


def _halves(images: Sequence[np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """First half (training) and second half (test) of the cases; one case is used for both."""
    imgs = list(images)
    if len(imgs) == 1:
        log.warning("domain_gap: a set has one case; its patches train and test the classifier")
        return imgs, imgs
    k = int(math.ceil(len(imgs) / 2))
    return imgs[:k], imgs[k:]


class _Patches:
    """Random head-centred patches from a list of images."""

    def __init__(self, images: Sequence[np.ndarray], patch: tuple[int, int, int]) -> None:
        self.images = list(images)
        self.patch = patch
        self.head = [foreground_coords(np.any(np.asarray(im) != 0, axis=0)) for im in self.images]

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
) -> tuple[float, float]:
    """``(accuracy, AUC)`` of a fresh domain classifier on held-out patches (see module docstring)."""
    dev = resolve_device(device)
    patch = tuple(int(p) for p in patch)  # type: ignore[assignment]
    r_tr, r_te = _halves(real)
    c_tr, c_te = _halves(candidate)
    src_r, src_c = _Patches(r_tr, patch), _Patches(c_tr, patch)
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
    x = np.concatenate([_Patches(r_te, patch).draw(rng, TEST_PATCHES),
                        _Patches(c_te, patch).draw(rng, TEST_PATCHES)])
    labels = np.concatenate([np.zeros(TEST_PATCHES), np.ones(TEST_PATCHES)])
    net.eval()
    with torch.no_grad():
        scores = np.concatenate([net(torch.from_numpy(x[i: i + 16]).to(dev)).float().cpu().numpy()
                                 for i in range(0, len(x), 16)])
    acc = float(np.mean((scores > 0) == labels.astype(bool)))
    return acc, _auc(scores, labels)


def pseudo_tissues(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pseudo-tissue map ``(X, Y, Z)`` int8 of a preprocessed image: -1 outside the head, else 0/1/2
    (CSF/GM/WM-like: k-means classes of t1n inside the head, by increasing t1n mean)."""
    img = np.asarray(image)
    head = np.any(img != 0, axis=0)
    t1n = img[MODALITIES.index("t1n")][head].astype(np.float64)
    out = np.full(head.shape, -1, np.int8)
    if t1n.size == 0:
        return out
    fit = t1n if t1n.size <= KMEANS_SAMPLE else rng.choice(t1n, KMEANS_SAMPLE, replace=False)
    centres = kmeans_1d(fit, len(TISSUES), KMEANS_ITERS)
    out[head] = np.argmin(np.abs(t1n[:, None] - centres[None]), axis=1).astype(np.int8)
    return out


def _pooled(images: Sequence[np.ndarray], rng: np.random.Generator) -> dict[tuple[int, int], np.ndarray]:
    """``(sequence, tissue) -> pooled intensities`` over a set of images (each subsampled)."""
    parts: dict[tuple[int, int], list[np.ndarray]] = {}
    for img in images:
        img = np.asarray(img)
        tis = pseudo_tissues(img, rng)
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


def tissue_distances(real: Sequence[np.ndarray], candidate: Sequence[np.ndarray], *, seed: int = 0
                     ) -> dict[str, float]:
    """``tissue_w1`` (mean over 12 sequence-tissue pairs) and ``w1_<seq>`` (z-score units)."""
    from scipy.stats import wasserstein_distance

    a = _pooled(real, np.random.default_rng(derive_seed(seed, "gap-w1", "real")))
    b = _pooled(candidate, np.random.default_rng(derive_seed(seed, "gap-w1", "candidate")))
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

    Returns:
        name -> ``{"classifier_acc", "classifier_auc", "tissue_w1", "w1_t1c", "w1_t1n", "w1_t2f",
        "w1_t2w"}``.
    """
    _check(real, "real")
    for name, imgs in candidates.items():
        _check(imgs, name)
    out: dict[str, dict[str, float]] = {}
    for name, imgs in candidates.items():
        acc, auc = classifier_scores(real, imgs, seed=seed, patch=patch, steps=steps, device=device)
        out[name] = {"classifier_acc": acc, "classifier_auc": auc, **tissue_distances(real, imgs, seed=seed)}
        log.info("domain gap of %s: classifier accuracy %.3f, tissue W1 %.3f", name, acc,
                 out[name]["tissue_w1"])
    return out


def gap_table(result: dict[str, dict[str, float]]) -> str:
    """Markdown table of :func:`domain_gap`'s result, one row per candidate set."""
    cols = ["classifier_acc", "classifier_auc", "tissue_w1", *[f"w1_{m}" for m in MODALITIES]]
    lines = ["| set | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for name, row in result.items():
        lines.append(f"| {name} | " + " | ".join(f"{row.get(c, float('nan')):.3f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


__all__ = ["DomainClassifier", "TISSUES", "classifier_scores", "domain_gap", "gap_table", "pseudo_tissues",
           "tissue_distances"]
