"""Figure of one mixed training sample per copy-paste competitor (docs/figures/copy_paste.png).

    python docs/figures/copy_paste.py [OUT.png]

A small cohort of the home site (site-a, 2 mm, its own seed), the quick profile's 48^3 patches: the
same step's sample before mixing and after CarveMix and after TumorCP (p = 1), t1c with the labels
(SNFH green, NETC blue, ET red) on the axial slice through the pasted region.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from menseg.bench.efficiency import CohortSpec, embedded_cohort  # noqa: E402
from menseg.config import load_config  # noqa: E402
from menseg.data.dataset import preprocess_dataset  # noqa: E402
from menseg.data.layouts import discover_cases  # noqa: E402
from menseg.data.sampling import PatchSampler  # noqa: E402
from menseg.train.augment import augment_batch  # noqa: E402
from menseg.train.batches import StepBatches  # noqa: E402
from menseg.train.parts import TrainSetup, build_parts  # noqa: E402

COLOURS = {1: (0.2, 0.4, 1.0), 2: (0.2, 0.9, 0.3), 3: (1.0, 0.2, 0.2)}


def overlay(ax: plt.Axes, image: np.ndarray, label: np.ndarray, title: str) -> None:
    ax.imshow(image.T, cmap="gray", origin="lower")
    rgba = np.zeros((*label.T.shape, 4))
    for v, c in COLOURS.items():
        rgba[label.T == v] = (*c, 0.45)
    ax.imshow(rgba, origin="lower")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("copy_paste.png")
    cohort = embedded_cohort(CohortSpec(site="site-a", spacing_mm=2.0, n_pool=4, n_test=1, n_unlabeled=0,
                                        seed=202))
    cache = Path.home() / ".cache" / "menseg" / "figure-cache"
    cases = preprocess_dataset(discover_cases(cohort / "labeled"), cache, (2.0, 2.0, 2.0))
    pairs = [(c.image, c.label) for c in cases]
    sampler = PatchSampler(pairs, (48, 48, 48), 1.0)  # the partners' (tumour-centred either way)
    samples = PatchSampler(pairs, (48, 48, 48), 0.0)  # the step's own samples: anywhere
    step, rows = 3, []
    for name in ("carvemix", "tumorcp"):
        cfg = load_config(name, [f"{name}.p=1.0", "train.patch_size=[48,48,48]", "data.spacing=[2.0,2.0,2.0]",
                                 "train.seed=4"])
        part = build_parts(cfg)[0]
        run = TrainSetup(cfg, cfg, out.parent, cache, torch.device("cpu"), shard=range(2))
        run.sampler = sampler
        part.setup(run)
        img, lab, meta = (torch.from_numpy(a) for a in StepBatches(samples, 2, 4)[step])
        img, lab = augment_batch(img, lab, cfg.aug, [11, 12], cfg.data.spacing)
        mixed, mlab = part.mix_batch(step, img, lab, meta)
        changed = (mlab[0] != lab[0]).any(0).any(0)
        z = int(torch.nonzero(changed).float().mean().round()) if changed.any() else img.shape[-1] // 2
        rows.append((name, img[0, 0, :, :, z].numpy(), lab[0, :, :, z].numpy(), mixed[0, 0, :, :, z].numpy(),
                     mlab[0, :, :, z].numpy()))
    fig, axes = plt.subplots(len(rows), 2, figsize=(5.2, 2.7 * len(rows)))
    for r, (name, a, la, m, lm) in enumerate(rows):
        overlay(axes[r, 0], a, la, "sample (augmented)")
        overlay(axes[r, 1], m, lm, f"after {name}")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(out)  # noqa: T201


if __name__ == "__main__":
    main()
