"""Tests of the physics-based site appearance model (menseg.synth.site)."""

from __future__ import annotations

import math

import pytest
import torch

import synth_blocks
from menseg.constants import MODALITIES
from menseg.errors import MensegError
from menseg.synth import site as S
from menseg.synth import tissues as T

CH = {m: i for i, m in enumerate(MODALITIES)}
OCTANTS = (T.WM, T.GM, T.CSF, T.TUMOUR, T.OEDEMA, T.CYST, T.CALCIFICATION, T.DURAL_TAIL)


def octant_map(n: int = 32) -> torch.Tensor:
    return synth_blocks.octant_map(OCTANTS, n)


def interior_means(img: torch.Tensor, tissue: torch.Tensor, margin: int) -> dict[int, torch.Tensor]:
    return synth_blocks.interior_means(img, tissue, OCTANTS, margin)


def d(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# ------------------------------------------------------------------ signal equations


def test_flair_nulls_csf_at_t1_ln2() -> None:
    t1_csf = d(4300.0)
    s = S.inversion_recovery(d(1.0), t1_csf, d(750.0), tr=1e9, te=0.0, ti=float(t1_csf) * math.log(2))
    assert float(s) == pytest.approx(0.0, abs=1e-12)
    # finite TR: null at T1 ln(2 / (1 + e^{-TR/T1}))
    tr = 9000.0
    ti = 4300.0 * math.log(2.0 / (1.0 + math.exp(-tr / 4300.0)))
    assert float(S.inversion_recovery(d(1.0), t1_csf, d(750.0), tr, 0.0, ti)) == pytest.approx(0.0, abs=1e-12)
    # WM is far from its null point
    assert float(S.inversion_recovery(d(0.77), d(830.0), d(80.0), tr, 0.0, ti)) > 0.5


def test_spin_echo_limits() -> None:
    pd, t1, t2 = d(0.8), d(900.0), d(100.0)
    assert float(S.spin_echo(pd, t1, t2, tr=1e9, te=0.0)) == pytest.approx(0.8)  # PD weighting
    assert float(S.spin_echo(pd, t1, t2, tr=1e-6, te=0.0)) == pytest.approx(0.0, abs=1e-8)  # saturated
    assert float(S.spin_echo(pd, t1, t2, tr=1e9, te=100.0)) == pytest.approx(0.8 * math.exp(-1.0))  # T2 decay
    assert float(S.spin_echo(pd, t1, t2, tr=900.0, te=0.0)) == pytest.approx(0.8 * (1 - math.exp(-1.0)))


def test_spoiled_gre_values() -> None:
    t1 = d(1000.0)
    tr = 10.0
    e1 = math.exp(-tr / 1000.0)
    s90 = S.spoiled_gre(d(1.0), t1, d(50.0), tr, 0.0, 90.0)
    assert float(s90) == pytest.approx(1 - e1)
    ernst = math.degrees(math.acos(e1))
    sig = [float(S.spoiled_gre(d(1.0), t1, d(50.0), tr, 0.0, a)) for a in (ernst - 2, ernst, ernst + 2)]
    assert sig[1] > sig[0] and sig[1] > sig[2]


def test_mprage_small_flip_long_tr_is_inversion_recovery() -> None:
    t1 = torch.tensor([500.0, 1000.0, 4000.0], dtype=torch.float64)
    flip = 0.01
    s = S.mprage(torch.ones(3, dtype=torch.float64), t1, torch.full((3,), 80.0, dtype=torch.float64),
                 tr=1e6, te=0.0, ti=900.0, flip_deg=flip, echo_spacing=7.0, n_readouts=100)
    expected = torch.abs(1 - 2 * torch.exp(-900.0 / t1)) * math.sin(math.radians(flip))
    assert torch.allclose(s, expected, rtol=1e-4)
    with pytest.raises(MensegError):
        S.mprage(torch.ones(1), torch.ones(1) * 900, torch.ones(1) * 80, tr=1000.0, te=3.0, ti=100.0,
                 flip_deg=8.0, echo_spacing=7.0, n_readouts=176)


# ------------------------------------------------------------------ sites


@pytest.mark.parametrize("name", S.list_sites())
def test_site_contrast_order(name: str) -> None:
    prof = S.site_profile(name)
    for seed in range(20):
        sig = S.tissue_signals(prof, S.sample_site_params(prof, seed))
        t1n, t1c, t2w, t2f = (sig[CH[m]] for m in ("t1n", "t1c", "t2w", "t2f"))
        assert t1n[T.WM] > t1n[T.GM] > t1n[T.CSF]
        assert t1n[T.TUMOUR] < 1.15 * t1n[T.GM] and t1n[T.TUMOUR] < t1n[T.WM]  # iso/hypo (FACTS §2)
        assert t1c[T.TUMOUR] > 1.15 * t1c[T.WM] and t1c[T.TUMOUR] > t1c[T.GM]
        assert t1c[T.TUMOUR] / t1c[T.WM] > 1.5 * t1n[T.TUMOUR] / t1n[T.WM]  # ET enhances
        assert t1c[T.DURAL_TAIL] > t1c[T.WM]
        assert t1c[T.OEDEMA] < t1c[T.WM]  # no enhancement of SNFH
        assert t2w[T.CSF] > t2w[T.GM] > t2w[T.WM] and t2w[T.CSF] > t2w[T.OEDEMA] > t2w[T.GM]
        assert t2f[T.CSF] < 0.15 * t2f[T.WM]  # CSF nulled
        assert t2f[T.OEDEMA] > t2f[T.GM] and t2f[T.OEDEMA] > t2f[T.WM]
        for row in (t1n, t1c, t2w, t2f):
            assert row[T.CALCIFICATION] < row[T.WM] and row[T.CALCIFICATION] < row[T.GM]
            assert row[T.BACKGROUND] == 0


def test_render_site_image_properties() -> None:
    tissue = octant_map(32)
    img = S.render_site(tissue, "site-a", spacing=(1.0, 1.0, 1.0), seed=1)
    assert img.shape == (4, *tissue.shape) and img.dtype == torch.float32
    assert torch.all(img[:, tissue == T.BACKGROUND] == 0) and torch.isfinite(img).all()
    m = interior_means(img, tissue, margin=4)
    c, n, f, w = CH["t1c"], CH["t1n"], CH["t2f"], CH["t2w"]
    assert m[T.TUMOUR][c] / m[T.WM][c] > 1.3 * m[T.TUMOUR][n] / m[T.WM][n]
    assert m[T.CSF][f] < 0.3 * m[T.WM][f] and m[T.OEDEMA][f] > m[T.GM][f]
    assert m[T.CSF][w] > m[T.GM][w] > m[T.WM][w]
    assert m[T.WM][n] > m[T.GM][n] > m[T.CSF][n]


def test_render_site_deterministic_and_sites_differ() -> None:
    tissue = octant_map(16)
    a1 = S.render_site(tissue, "site-a", (2.0, 2.0, 2.0), seed=5)
    a2 = S.render_site(tissue, S.site_profile("site-a"), (2.0, 2.0, 2.0), seed=5)
    assert torch.equal(a1, a2)
    assert not torch.equal(a1, S.render_site(tissue, "site-a", (2.0, 2.0, 2.0), seed=6))
    b = S.render_site(tissue, "site-b", (2.0, 2.0, 2.0), seed=5)
    assert not torch.allclose(a1, b)
    # the scanner profile is fixed: only biology/positioning/noise change with the seed
    prof = S.site_profile("site-a")
    pa, pb = S.sample_site_params(prof, 5), S.sample_site_params(prof, 6)
    assert pa != pb and S.site_profile("site-a") == S.site_profile("site-a")
    assert S.sample_site_params(S.site_profile("site-a"), 5) == pa


def test_thick_slices_and_stripping_of_site_b() -> None:
    prof = S.site_profile("site-b")
    assert prof.strip_outer_dura and prof.t2w.voxel_mm[2] == 5.0
    tissue = torch.zeros(20, 20, 20, dtype=torch.long)
    tissue[1:19, 1:19, 1:19] = T.DURA
    tissue[2:18, 2:18, 2:18] = T.WM
    tissue[2:18, 2:18, 2:18:2] = T.GM  # one-voxel stripes along z
    img = S.render_site(tissue, prof, (1.0, 1.0, 1.0), seed=0)
    shell = (tissue == T.DURA)
    assert torch.all(img[:, shell] == 0)
    # 5 mm slices along z average the 1 mm stripes; x/y sampling (0.9 mm) keeps detail
    w = img[CH["t2w"], 6:14, 6:14, 6:14]
    sig = S.tissue_signals(prof, S.sample_site_params(prof, 0))[CH["t2w"]]
    stripe = float(sig[T.GM] - sig[T.WM]) * prof.t2w.scale
    assert (w[:, :, 1:] - w[:, :, :-1]).abs().mean() < 0.3 * abs(stripe)


def test_unknown_site_and_bad_input() -> None:
    with pytest.raises(MensegError, match="unknown site"):
        S.site_profile("site-zz")
    with pytest.raises(MensegError):
        S.render_site(torch.zeros(4, 4, dtype=torch.long), "site-a")
    assert set(S.list_sites()) >= {"site-a", "site-b", "site-c"}
    assert S.site_profile("site-a").field_t == 3.0 and S.site_profile("site-b").field_t == 1.5
