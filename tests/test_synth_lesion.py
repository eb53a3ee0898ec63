"""Tests of menseg.synth.lesion on a toy anatomy (4 mm) and on injected phantoms / real scans."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch

from menseg.synth import lesion as L
from menseg.synth.tissues import (
    CALCIFICATION,
    CSF,
    CYST,
    DURA,
    DURAL_TAIL,
    GM,
    NECROSIS,
    OEDEMA,
    TUMOUR,
    VENTRICLE,
    WM,
)

SP = (4.0, 4.0, 4.0)


@dataclass
class Toy:
    tissue: torch.Tensor
    regions: dict[str, torch.Tensor]
    brain_mask: torch.Tensor
    spacing: tuple[float, float, float] = SP


def toy_anatomy(shape=(40, 48, 40)) -> Toy:
    """WM ball in a GM shell in a CSF shell, DURA shell outside, ventricle in the middle (mm)."""
    axes = [(torch.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, SP, strict=True)]
    g = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    r = g.norm(dim=0)
    t = torch.zeros(shape, dtype=torch.int64)
    t[r < 72] = DURA
    t[r < 68] = CSF
    t[r < 64] = GM
    t[r < 56] = WM
    t[r < 12] = VENTRICLE
    dura = t == DURA
    regions = {"convexity": dura & (g[2] > 20), "skull_base": dura & (g[2] < -20),
               "sphenoid_wing": dura & (g[2].abs() <= 20)}
    return Toy(t, regions, (t != 0) & ~dura)


def _sample(seed: int, cfg=L.LesionConfig(), anat=None):
    anat = anat or toy_anatomy()
    return anat, L.sample_lesion_params(torch.Generator().manual_seed(seed), cfg, anat)


def test_params_json_and_replay():
    anat, p = _sample(0)
    import json

    from menseg.synth.serial import from_dict, to_plain
    p2 = from_dict(L.LesionParams, json.loads(json.dumps(to_plain(p))))
    assert p2 == p
    a = L.apply_lesions(anat.tissue, p)
    b = L.apply_lesions(anat.tissue, p2)
    assert torch.equal(a.tissue, b.tissue) and torch.equal(a.label, b.label)
    _, p3 = _sample(0)
    assert p3 == p
    _, p4 = _sample(1)
    assert p4 != p


@pytest.mark.parametrize("seed", range(8))
def test_lesion_anatomy(seed):
    cfg = L.LesionConfig(volume_median_cm3=30.0, volume_log_sigma=0.3, tail_prob=1.0, cyst_prob=1.0,
                         oedema_p_range=(1.0, 1.0), oedema_extent_mm=(10.0, 20.0), multiple_prob=0.0)
    anat, p = _sample(seed, cfg)
    shape = ["globular", "lobulated", "en_plaque"][seed % 3]
    p = dataclasses.replace(p, lesions=tuple(dataclasses.replace(x, shape=shape) for x in p.lesions))
    les = p.lesions[0]
    assert les.site in anat.regions and bool(anat.regions[les.site][les.seed_voxel])
    n = torch.tensor(les.normal)
    centre = torch.tensor([(s - 1) / 2 for s in anat.tissue.shape]) - torch.tensor(les.seed_voxel)
    assert float(n @ torch.nn.functional.normalize(centre, dim=0)) > 0.7  # points inward
    res = L.apply_lesions(anat.tissue, p)
    t, lab = res.tissue, res.label
    tum = (t == TUMOUR) | (t == CYST) | (t == NECROSIS) | (t == CALCIFICATION)
    assert tum[les.seed_voxel]  # touches the dura at its seed
    vox = 4 ** 3 / 1000
    assert abs(float(tum.sum()) * vox - les.volume_cm3) <= 0.05 * les.volume_cm3 + vox
    # labels
    assert torch.equal(lab == 3, t == TUMOUR)
    assert torch.equal(lab == 1, (t == CYST) | (t == NECROSIS) | (t == CALCIFICATION))
    assert torch.equal(lab == 2, t == OEDEMA)
    # NETC strictly inside the tumour: all 6-neighbours are tumour classes
    core = lab == 1
    assert not bool((L.dilate6(core) & ~tum).any())
    assert bool(core.any())
    # oedema only where (deformed) WM was, outside the core
    if bool((t == OEDEMA).any()):
        assert not bool(((t == OEDEMA) & tum).any())
    assert bool((t == OEDEMA).any()) or les.oedema_extent_mm < 5
    # tail on/near dura, not labelled
    assert bool((t == DURAL_TAIL).any())
    assert not bool((lab[t == DURAL_TAIL]).any())
    # untouched outside the lesion box
    (lo, hi), = res.boxes
    m = torch.ones_like(tum)
    m[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = False
    assert torch.equal(t[m], anat.tissue[m])


def test_oedema_follows_wm():
    cfg = L.LesionConfig(volume_median_cm3=20.0, volume_log_sigma=0.1, oedema_p_range=(1.0, 1.0),
                         oedema_extent_mm=(30.0, 30.0), mass_effect=(0.0, 0.0),
                         multiple_prob=0.0)
    anat, p = _sample(3, cfg)
    res = L.apply_lesions(anat.tissue, p)
    oed = res.tissue == OEDEMA
    assert bool(oed.any()) and bool((anat.tissue[oed] == WM).all())  # no mass effect: WM unchanged


def test_mass_effect_pushes_brain():
    cfg = L.LesionConfig(volume_median_cm3=40.0, volume_log_sigma=0.0, mass_effect=(1.0, 1.0),
                         oedema_p_range=(0.0, 0.0), tail_prob=0.0, multiple_prob=0.0)
    anat, p = _sample(5, cfg)
    res = L.apply_lesions(anat.tissue, p)
    assert bool(res.moved[0].any())
    disp = res.displacement()
    assert float(disp.abs().max()) > 1.0
    wm0 = int((anat.tissue == WM).sum())
    wm1 = int((res.tissue == WM).sum())
    assert wm1 < wm0  # brain compressed / displaced by the tumour


def test_volume_distribution_spans():
    cfg = L.LesionConfig()
    g = torch.Generator().manual_seed(0)
    v = [L._lesion_volume(g, cfg) for _ in range(2000)]
    assert min(v) < 1.0 and max(v) > 100.0
    assert L.oedema_probability(2, cfg) < 0.3 < 0.7 < L.oedema_probability(40, cfg)
