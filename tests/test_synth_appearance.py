"""Tests of the randomised appearance model (menseg.synth.appearance)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import synth_blocks
from menseg.constants import MODALITIES
from menseg.errors import MensegError
from menseg.synth import appearance as A
from menseg.synth import tissues as T

CH = {m: i for i, m in enumerate(MODALITIES)}
OCTANTS = (T.WM, T.GM, T.CSF, T.TUMOUR, T.OEDEMA, T.CYST, T.CALCIFICATION, T.DURA)


def octant_map(n: int = 32) -> torch.Tensor:
    return synth_blocks.octant_map(OCTANTS, n)


def interior_means(img: torch.Tensor, tissue: torch.Tensor, margin: int) -> dict[int, torch.Tensor]:
    return synth_blocks.interior_means(img, tissue, OCTANTS, margin)


def test_sampled_means_follow_contrast_order() -> None:
    for seed in range(200):
        p = A.sample_appearance_params(torch.Generator().manual_seed(seed))
        for seq, bright, dark in A.CONTRAST_ORDER:
            m = p.means[CH[seq]]
            tb, td = A._NAME_TO_ID[bright], A._NAME_TO_ID[dark]
            assert m[tb] > m[td], (seed, seq, bright, dark)
        t1c, t1n = p.means[CH["t1c"]], p.means[CH["t1n"]]
        # ET enhanced on t1c relative to t1n (normalised by WM), dural tail too
        assert t1c[T.TUMOUR] / t1c[T.WM] > 1.25 * t1n[T.TUMOUR] / t1n[T.WM]
        assert t1c[T.DURAL_TAIL] / t1c[T.WM] > 1.1 * t1n[T.DURAL_TAIL] / t1n[T.WM]
        # t1c tumour above every healthy tissue
        assert all(t1c[T.TUMOUR] > t1c[h] for h in T.HEALTHY)
        # T2w: CSF brightest of the healthy tissues; FLAIR: CSF darkest of them
        t2w = p.means[CH["t2w"]]
        assert t2w[T.CSF] > max(t2w[T.WM], t2w[T.GM], t2w[T.DURA])
        assert p.means[CH["t2f"]][T.CSF] < min(p.means[CH["t2f"]][h] for h in (T.WM, T.GM))
        assert p.means[CH["t2f"]][T.BACKGROUND] == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_rendered_contrast_order_without_bias(seed: int) -> None:
    tissue = octant_map(32)
    cfg = A.AppearanceConfig(bias_strength=(0.0, 0.0))
    p = A.sample_appearance_params(torch.Generator().manual_seed(seed), cfg)
    img = A.render(tissue, p, spacing=(1.0, 1.0, 1.0))
    m = interior_means(img, tissue, margin=5)
    for seq, bright, dark in A.CONTRAST_ORDER:
        tb, td = A._NAME_TO_ID[bright], A._NAME_TO_ID[dark]
        if tb in m and td in m and not (tb == T.DURA or td == T.DURA):
            assert m[tb][CH[seq]] > m[td][CH[seq]], (seq, bright, dark)
    c, n = CH["t1c"], CH["t1n"]
    assert m[T.TUMOUR][c] / m[T.WM][c] > m[T.TUMOUR][n] / m[T.WM][n]
    assert m[T.CSF][CH["t2f"]] < m[T.WM][CH["t2f"]] < m[T.OEDEMA][CH["t2f"]]
    assert m[T.CSF][CH["t2w"]] > m[T.GM][CH["t2w"]]


def test_background_zero_and_dtype() -> None:
    tissue = octant_map(16)
    p = A.sample_appearance_params(torch.Generator().manual_seed(1))
    img = A.render(tissue, p, spacing=(2.0, 2.0, 2.0))
    assert img.shape == (4, *tissue.shape) and img.dtype == torch.float32
    assert torch.all(img[:, tissue == T.BACKGROUND] == 0)
    assert torch.all(img[:, (tissue != T.BACKGROUND) & (tissue != T.DURA)] > 0)
    assert torch.isfinite(img).all()


def test_outer_dura_stripping() -> None:
    tissue = torch.zeros(12, 12, 12, dtype=torch.long)
    tissue[1:11, 1:11, 1:11] = T.DURA
    tissue[2:10, 2:10, 2:10] = T.WM
    tissue[5:7, 5:7, 1:11] = T.DURA  # a "falx" that touches the shell only at its ends
    p = A.sample_appearance_params(torch.Generator().manual_seed(0))
    on = A.render(tissue, replace(p, strip_outer_dura=True), (4.0, 4.0, 4.0))
    off = A.render(tissue, replace(p, strip_outer_dura=False), (4.0, 4.0, 4.0))
    shell = A.outer_shell(tissue, T.DURA)
    assert shell.sum() == 10**3 - 8**3  # exactly the outer shell (the falx ends lie in it)
    assert torch.all(on[:, shell] == 0) and torch.all(off[:, shell] > 0)
    assert torch.all(on[:, 5:7, 5:7, 3:9] > 0)  # the inner falx stays


def test_replay_exact_and_json_roundtrip() -> None:
    tissue = octant_map(16)
    p1 = A.sample_appearance_params(torch.Generator().manual_seed(7))
    p2 = A.sample_appearance_params(torch.Generator().manual_seed(7))
    assert p1 == p2
    p3 = A.AppearanceParams.from_dict(json.loads(json.dumps(p1.to_dict())))
    assert p3 == p1
    a, b, c = (A.render(tissue, p, (1.5, 1.5, 1.5)) for p in (p1, p2, p3))
    assert torch.equal(a, b) and torch.equal(a, c)
    other = A.render(tissue, A.sample_appearance_params(torch.Generator().manual_seed(8)), (1.5, 1.5, 1.5))
    assert not torch.equal(a, other)


def test_thick_slices_smooth_along_one_axis_only() -> None:
    x = torch.zeros(12, 12, 12)
    x[::2] = 1.0  # stripes along axis 0
    y = A.thick_slices(x, axis=0, thickness_vox=4.0)
    assert y[2:-2].std() < 0.3 * x.std()
    z = A.thick_slices(x, axis=1, thickness_vox=4.0)
    assert torch.allclose(z, x, atol=1e-6)


def test_render_random_intensities() -> None:
    labels = torch.zeros(20, 20, 20, dtype=torch.long)
    labels[2:18, 2:18, 2:18] = 1
    labels[5:15, 5:15, 5:15] = 2
    labels[8:12, 8:12, 8:12] = 3
    img, p = A.render_random_intensities(labels, 4, torch.Generator().manual_seed(3), spacing=(2.0, 2.0, 2.0))
    assert img.shape == (4, 20, 20, 20)
    assert torch.all(img[:, labels == 0] == 0)
    assert not p.strip_outer_dura
    assert torch.equal(img, A.render(labels, p, (2.0, 2.0, 2.0)))
    # no ordering: across seeds, class 3 is sometimes brighter and sometimes darker than class 2
    signs = set()
    for s in range(20):
        q = A.sample_random_intensity_params(torch.Generator().manual_seed(s), 4)
        signs.add(q.means[0][3] > q.means[0][2])
    assert signs == {True, False}


def test_bad_rules_and_inputs() -> None:
    rules = {k: dict(v) for k, v in A.DEFAULT_RULES.items()}
    rules["t1n"]["gm"] = "bogus * 1..2"
    with pytest.raises(MensegError, match="not defined"):
        A.sample_appearance_params(torch.Generator().manual_seed(0),
                                   A.AppearanceConfig(intensity_rules=rules))
    rules["t1n"]["gm"] = "wm times two"
    with pytest.raises(MensegError, match="expected"):
        A.sample_appearance_params(torch.Generator().manual_seed(0),
                                   A.AppearanceConfig(intensity_rules=rules))
    p = A.sample_appearance_params(torch.Generator().manual_seed(0))
    with pytest.raises(MensegError):
        A.render(torch.full((4, 4, 4), 99, dtype=torch.long), p)


def test_config_from_dict_roundtrip() -> None:
    from dataclasses import asdict

    cfg = A.AppearanceConfig(noise_sigma=(0.0, 0.1))
    back = A.AppearanceConfig.from_dict(json.loads(json.dumps(asdict(cfg))))
    assert back == cfg
    with pytest.raises(MensegError, match="unknown key"):
        A.AppearanceConfig.from_dict({"nosie": [0, 1]})
