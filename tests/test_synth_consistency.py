"""Label/image consistency of whole generated cases (the full chain, 2 mm grid).

ET only where T1c is enhanced, lesions attached to the dura, SNFH outside the core,
and labels equal to the tissue map's BraTS-MEN labels.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from scipy import ndimage

from menseg.constants import MODALITIES
from menseg.synth import tissues as T
from menseg.synth.engine import SynthConfig, generate_case

CFG = SynthConfig(spacing=(2.0, 2.0, 2.0))
SEEDS = [(11, i) for i in range(4)]
T1C, T1N = MODALITIES.index("t1c"), MODALITIES.index("t1n")


@pytest.fixture(scope="module", params=[None, "site-b"], ids=["randomised", "site-b"])
def cases(request):
    cfg = dataclasses.replace(CFG, site=request.param)
    return [generate_case(cfg, seed, index, device="cpu") for seed, index in SEEDS]


def test_label_is_the_tissue_label(cases):
    for c in cases:
        expected = T.tissue_to_label(torch.as_tensor(c.tissue)).numpy()
        np.testing.assert_array_equal(np.asarray(c.label), expected)
        assert (np.asarray(c.label) > 0).any(), "every generated case carries a lesion"


def test_et_is_enhanced_on_t1c(cases):
    for c in cases:
        img, lab, tis = np.asarray(c.image), np.asarray(c.label), np.asarray(c.tissue)
        et = lab == 3
        wm = tis == T.WM
        # Enhancement: ET is brighter than white matter on T1c, relative to the pre-contrast T1n.
        t1c_ratio = np.median(img[T1C][et]) / np.median(img[T1C][wm])
        t1n_ratio = np.median(img[T1N][et]) / np.median(img[T1N][wm])
        assert t1c_ratio > 1.05, t1c_ratio
        assert t1c_ratio > t1n_ratio * 1.2, (t1c_ratio, t1n_ratio)


def test_lesions_touch_the_dura(cases):
    struct = ndimage.generate_binary_structure(3, 3)
    for c in cases:
        tis = np.asarray(c.tissue)
        dura = np.isin(tis, [T.DURA, T.DURAL_TAIL])
        core = np.isin(tis, [T.TUMOUR, T.CYST, T.NECROSIS, T.CALCIFICATION])
        comps, n = ndimage.label(core, struct)
        assert n >= 1
        for k in range(1, n + 1):
            grown = ndimage.binary_dilation(comps == k, struct, iterations=1)
            # a tumour sits on the dura; a tiny fragment cut off by the skull edge may not
            if (comps == k).sum() >= 8:
                assert (grown & dura).any(), f"lesion component {k} of {n} is not attached to the dura"


def test_snfh_outside_the_core(cases):
    for c in cases:
        lab, tis = np.asarray(c.label), np.asarray(c.tissue)
        snfh = lab == 2
        assert not (snfh & np.isin(tis, [T.TUMOUR, T.CYST, T.NECROSIS, T.CALCIFICATION])).any()
        # NETC only inside the tumour: each NETC voxel is enclosed by tumour tissue (no NETC island
        # touching healthy brain directly)
        netc = lab == 1
        if netc.any():
            ring = ndimage.binary_dilation(netc) & ~netc
            assert np.isin(tis[ring], [T.TUMOUR, T.CYST, T.NECROSIS, T.CALCIFICATION, T.DURA, T.DURAL_TAIL,
                                       T.BACKGROUND]).mean() > 0.9
