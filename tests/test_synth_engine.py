"""Synthesis engine: replay, sidecars, layouts, preview, longitudinal growth, streaming (4 mm grid)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml

from menseg.constants import MODALITIES
from menseg.data.io import read_image, read_label
from menseg.data.layouts import detect_layout, discover_cases, discover_series
from menseg.data.validate import check_dataset
from menseg.errors import MensegError
from menseg.synth.engine import (
    SynthConfig,
    SynthStream,
    generate_case,
    replay_case,
    synth_dataset,
)
from menseg.synth.longitudinal import (
    Growth,
    LongitudinalConfig,
    Pose,
    apply_pose,
    generate_series,
    sample_growth,
    volume_at,
)

CFG = SynthConfig(spacing=(4.0, 4.0, 4.0))  # 40x48x40 voxels


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """One tiny dataset per layout (2 cases; longitudinal: 1 patient x 2 visits)."""
    root = tmp_path_factory.mktemp("synth")
    out = {}
    for layout in ("brats", "nnunet", "longitudinal"):
        n = 1 if layout == "longitudinal" else 2
        sidecars = synth_dataset(root / layout, n, layout, seed=3, cfg=CFG, preview=layout == "brats",
                                 visits=2, device="cpu")
        out[layout] = (root / layout, sidecars)
    return out


def test_config_round_trip():
    cfg = replace(CFG, site="site-a", longitudinal=LongitudinalConfig(gap_days=(30, 60)))
    d = yaml.safe_load(yaml.safe_dump(cfg.to_dict()))
    assert SynthConfig.from_dict(d) == cfg
    assert SynthConfig().grid_shape == (160, 192, 160)
    assert CFG.grid_shape == (40, 48, 40)
    with pytest.raises(MensegError, match="unknown key"):
        SynthConfig.from_dict({"spacin": [1, 1, 1]})


def test_generate_case_replays_and_differs():
    a = generate_case(CFG, seed=5, index=1)
    b = generate_case(CFG, seed=5, index=1)
    c = generate_case(CFG, seed=5, index=2)
    assert a.image.shape == (len(MODALITIES), 40, 48, 40) and a.image.dtype == torch.float32
    assert a.label.shape == (40, 48, 40) and a.label.dtype == torch.uint8
    assert torch.equal(a.image, b.image) and torch.equal(a.label, b.label)
    assert not torch.equal(a.image, c.image)
    assert int((a.label == 3).sum()) > 0  # every case has an enhancing tumour
    assert set(torch.unique(a.label).tolist()) <= {0, 1, 2, 3}
    assert (a.image[:, a.tissue == 0] == 0).all()  # skull-stripped
    json.dumps(a.params)  # JSON-serialisable
    assert a.params["seed"] == 5 and a.params["index"] == 1


def test_replay_from_sidecar_bit_exact(datasets):
    root, sidecars = datasets["brats"]
    side = json.loads(sidecars[1].read_text())
    assert side["index"] == 1 and side["seed"] == 3 and side["case_id"] == "SYNTH-MEN-00001-000"
    for key in ("config", "anatomy", "lesion", "appearance", "seeds"):
        assert key in side
    replayed = replay_case(sidecars[1])
    fresh = generate_case(CFG, 3, 1)
    assert torch.equal(replayed.image, fresh.image) and torch.equal(replayed.label, fresh.label)
    # ... and equal to what was written
    folder = sidecars[1].parent
    lab, aff = read_label(folder / "SYNTH-MEN-00001-000-seg.nii.gz")
    assert np.array_equal(lab, replayed.label.numpy())
    img, _ = read_image(folder / "SYNTH-MEN-00001-000-t2f.nii.gz")
    assert np.array_equal(img, replayed.image[MODALITIES.index("t2f")].numpy())
    np.testing.assert_allclose(aff, replayed.affine)


def test_edited_sidecar_renders_the_edit(datasets):
    _, sidecars = datasets["brats"]
    side = json.loads(sidecars[0].read_text())
    les = side["lesion"]["lesions"][0]
    les["volume_cm3"] = les["volume_cm3"] * 2
    bigger = replay_case(side)
    orig = replay_case(sidecars[0])
    assert int((bigger.label % 2 == 1).sum()) > int((orig.label % 2 == 1).sum())


@pytest.mark.parametrize("layout", ["brats", "nnunet", "longitudinal"])
def test_layouts_readable(datasets, layout):
    root, sidecars = datasets[layout]
    assert detect_layout(root) == layout
    cases = discover_cases(root)
    assert len(cases) == 2 and all(c.label is not None for c in cases)
    reports = check_dataset(root)
    assert all(r.shape == (40, 48, 40) for r in reports)
    assert all(p.is_file() for p in sidecars) and len(sidecars) == 2
    if layout == "nnunet":
        meta = json.loads((root / "dataset.json").read_text())
        assert meta["channel_names"] == {str(i): m for i, m in enumerate(MODALITIES)}
        assert meta["numTraining"] == 2
    if layout == "longitudinal":
        series = discover_series(root)
        ((patient, visits),) = series.items()
        assert patient == "SYNTH-MEN-00000"
        assert [c.case_id for c, _ in visits] == ["SYNTH-MEN-00000-000", "SYNTH-MEN-00000-001"]
        days = [d for _, d in visits]
        assert days[0] == 0 and 90 <= days[1] <= 720
        side = json.loads(sidecars[1].read_text())
        assert side["kind"] == "visit" and side["day"] == days[1] and side["pose"] is not None
        replayed = replay_case(sidecars[1])
        lab, _ = read_label(visits[1][0].label)
        assert np.array_equal(lab, replayed.label.numpy())


def test_refuses_non_empty_out(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(MensegError, match="not empty"):
        synth_dataset(tmp_path / "x", 1, "brats", cfg=CFG, device="cpu")
    with pytest.raises(MensegError, match="unknown layout"):
        synth_dataset(tmp_path / "y", 1, "flat", cfg=CFG, device="cpu")  # type: ignore[arg-type]
    assert not (tmp_path / "y").exists()


def test_preview_png(datasets):
    import matplotlib.image as mpimg

    root, _ = datasets["brats"]
    pngs = sorted((root / "preview").glob("*.png"))
    assert [p.name for p in pngs] == ["SYNTH-MEN-00000-000.png", "SYNTH-MEN-00001-000.png"]
    img = mpimg.imread(pngs[0])
    assert img.ndim == 3 and img.shape[0] > 300 and img.shape[1] > 200
    assert float(img[..., :3].std()) > 0.05  # not blank
    # the overlay colours appear (ET yellow: high R and G, low B)
    rgb = img[..., :3]
    assert ((rgb[..., 0] > 0.8) & (rgb[..., 1] > 0.7) & (rgb[..., 2] < 0.4)).sum() > 20


def test_growth_model():
    g = Growth(rate_pct=10.0, model="gompertz", capacity_ratio=5.0)
    # initial relative rate ln(1.1)/yr; saturates at 5 x V0
    dt = 1.0
    assert math.isclose((volume_at(1.0, g, dt) - 1.0) / (dt / 365.25), math.log(1.1), rel_tol=1e-3)
    assert volume_at(2.0, g, 365.25 * 400) == pytest.approx(10.0, rel=1e-3)
    assert volume_at(1.0, g, 0) == 1.0
    e = Growth(rate_pct=10.0, model="exponential", capacity_ratio=5.0)
    assert volume_at(1.0, e, 365.25 * 2) == pytest.approx(1.21)
    cfg = LongitudinalConfig()
    rates = [sample_growth(torch.Generator().manual_seed(i), cfg).rate_pct for i in range(400)]
    pos = sorted(r for r in rates if r > 0)
    assert 3.0 < pos[len(pos) // 2] < 8.0  # median ~5 %/yr (FACTS §3)
    assert max(rates) <= 70.0 and min(pos) >= 0.5
    assert 0 < sum(r < 0 for r in rates) < 50  # ~5% regress


def test_longitudinal_volumes_grow_on_average():
    # Faster growth than the FACTS default (5 %/yr), so the change shows on a 4 mm grid.
    cfg = replace(CFG, longitudinal=LongitudinalConfig(growth_median_pct=30.0, p_regress=0.0))
    first, last = 0.0, 0.0
    for p in range(3):
        series = generate_series(cfg, seed=11, patient_index=p, n_visits=3)
        vols = [s.params["lesion_volumes_cm3"][0] for s in series]
        days = [s.params["day"] for s in series]
        assert days == sorted(days) and days[0] == 0
        assert vols == sorted(vols) and vols[-1] > vols[0]  # growth is monotone without regression
        first += int((series[0].label % 2 == 1).sum())  # tumour core voxels (labels 1, 3)
        last += int((series[-1].label % 2 == 1).sum())
        # same patient, new appearance per visit
        assert not torch.equal(series[0].image, series[1].image)
    assert last > first


def test_apply_pose():
    t = torch.zeros((10, 12, 8), dtype=torch.int64)
    t[4:6, 5:7, 3:5] = 3
    assert torch.equal(apply_pose(t, Pose(), (2.0, 2.0, 2.0)), t)
    moved = apply_pose(t, Pose(translation_mm=(2.0, 0.0, -2.0)), (2.0, 2.0, 2.0))
    assert torch.equal(moved, torch.roll(t, shifts=(1, 0, -1), dims=(0, 1, 2)))
    rot = apply_pose(t, Pose(rotation_deg=(0.0, 0.0, 3.0)), (1.0, 1.0, 1.0))
    assert rot.dtype == t.dtype and abs(int((rot == 3).sum()) - int((t == 3).sum())) <= 4


def test_synth_stream():
    stream = SynthStream(CFG, seed=2, batch_size=2, device="cpu", n_batches=2)
    batches = list(stream)
    assert len(batches) == 2
    img, lab = batches[1]
    assert img.shape == (2, 4, 40, 48, 40) and img.dtype == torch.float32
    assert lab.shape == (2, 40, 48, 40) and lab.dtype == torch.uint8
    again = SynthStream(CFG, seed=2, batch_size=2, device="cpu", start=1).batch(1)
    assert torch.equal(again[0], img) and torch.equal(again[1], lab)
    assert torch.equal(img[0], generate_case(CFG, 2, 2).image)


def test_site_model_case_replays():
    from menseg.synth.site import list_sites

    cfg = replace(CFG, site=list_sites()[0])
    a = generate_case(cfg, seed=1, index=0)
    assert a.params["appearance"] is None and a.params["site_case"] is not None
    b = replay_case(json.loads(json.dumps(a.params)))
    assert torch.equal(a.image, b.image) and torch.equal(a.label, b.label)
    rand = generate_case(CFG, seed=1, index=0)
    assert torch.equal(rand.label, a.label)  # same anatomy and lesion, other appearance model
    assert not torch.equal(rand.image, a.image)
    with pytest.raises(MensegError, match="unknown site"):
        generate_case(replace(CFG, site="nowhere"), seed=1, index=0)
