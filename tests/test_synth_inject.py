"""Tests of menseg.synth.inject: synthetic meningiomas injected into a dataset of scans (issue 4, 1b)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from menseg.constants import MODALITIES
from menseg.data.layouts import detect_layout, discover_cases
from menseg.data.phantom import make_phantom_case, write_phantom_dataset
from menseg.data.validate import check_dataset
from menseg.errors import MensegError
from menseg.synth.inject import (
    inject_dataset,
    inject_into_image,
    injection_seed,
    load_injection_sidecar,
    replay_injection,
)
from menseg.synth.lesion import LesionConfig
from shared_data import REAL_UNLABELED, needs_real_unlabeled

SHAPE = (40, 40, 40)
SP = 3.0
#: Moderate lesions so they fit the 120 mm phantom head; oedema always (exercises SNFH).
CFG = LesionConfig(volume_median_cm3=8.0, volume_log_sigma=0.3, oedema_p_range=(1.0, 1.0))


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _write_lps_case(root: Path) -> None:
    """An unlabelled int16 case with an LPS affine (x, y flipped), as BraTS files often are."""
    img, _, _ = make_phantom_case(SHAPE, (SP, SP, SP), np.random.default_rng(5))
    aff = np.diag([-SP, -SP, SP, 1.0])
    aff[:3, 3] = [60.0, 70.0, -55.0]
    cid = "LPS-00001-000"
    (root / cid).mkdir(parents=True)
    for c, m in enumerate(MODALITIES):
        nib.save(nib.Nifti1Image(np.round(img[c]).astype(np.int16), aff), root / cid / f"{cid}-{m}.nii.gz")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny volumes: one torch thread is ~50x faster than two on a busy shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("src") / "ds"
    write_phantom_dataset(root, 1, SHAPE, (SP, SP, SP), seed=0)  # labelled, RAS
    _write_lps_case(root)  # unlabelled, LPS, int16
    return root


@pytest.fixture(scope="module")
def injected(src: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], dict]:
    before = _hashes(src)
    out = tmp_path_factory.mktemp("out") / "inj"
    sidecars = inject_dataset(src, out, per_scan=2, seed=3, cfg=CFG, preview=True, max_previews=1)
    return out, sidecars, before


def _case_arrays(case) -> tuple[list[nib.Nifti1Image], np.ndarray | None]:
    imgs = [nib.load(case.images[m]) for m in MODALITIES]
    lab = None if case.label is None else np.asarray(nib.load(case.label).dataobj)
    return imgs, lab


def test_layout_readable_and_named(injected, src):
    out, sidecars, before = injected
    assert detect_layout(out) == "brats"
    ids = [c.case_id for c in discover_cases(out)]
    assert ids == ["LPS-00001-000-inj0", "LPS-00001-000-inj1", "PHANTOM-00000-000-inj0",
                   "PHANTOM-00000-000-inj1"]
    reports = check_dataset(out)
    assert [r.orientation for r in reports] == ["LPS", "LPS", "RAS", "RAS"]
    assert len(sidecars) == 4 and all(p.is_file() and p.is_relative_to(out) for p in sidecars)
    assert sorted(p.name for p in (out / "preview").iterdir()) == ["LPS-00001-000-inj0.png"]
    assert _hashes(src) == before  # inputs never modified
    side = load_injection_sidecar(out / "PHANTOM-00000-000-inj1" / "PHANTOM-00000-000-inj1-params.json")
    assert side["source"]["case_id"] == "PHANTOM-00000-000" and side["k"] == 1 and side["seed"] == 3
    assert side["case_seed"] == injection_seed(3, "PHANTOM-00000-000", 1)
    assert side["source"]["files"]["seg"]["relative"].endswith("PHANTOM-00000-000-seg.nii.gz")
    assert len(side["injection"]["lesion"]["lesions"]) == 1


def test_geometry_labels_and_untouched_voxels(injected, src):
    out, sidecars, _ = injected
    srcs = {c.case_id: c for c in discover_cases(src)}
    n_new = 0
    for case, sc in zip(discover_cases(out), sorted(sidecars), strict=True):
        s_imgs, s_lab = _case_arrays(srcs[case.case_id.rsplit("-inj", 1)[0]])
        o_imgs, o_lab = _case_arrays(case)
        assert o_lab is not None and o_lab.dtype == np.uint8
        s_lab = np.zeros(SHAPE, np.uint8) if s_lab is None else s_lab.astype(np.uint8)
        for s, o in zip(s_imgs, o_imgs, strict=True):
            assert o.shape == s.shape and np.array_equal(o.affine, s.affine)
            assert o.get_data_dtype() == np.float32
        assert np.array_equal(nib.load(case.label).affine, s_imgs[0].affine)
        # the source label is kept where it was; the new lesion adds ET (and here oedema)
        keep = s_lab > 0
        assert np.array_equal(o_lab[keep], s_lab[keep])
        new = (o_lab > 0) & ~keep
        assert (o_lab[new] == 3).sum() > 20
        n_new += int(new.sum())
        # outside the influence region the files equal the source exactly
        rep = replay_injection(sc, return_influence=True)
        outside = ~rep.influence
        for s, o in zip(s_imgs, o_imgs, strict=True):
            sd = np.asarray(s.dataobj, np.float32)
            od = np.asarray(o.dataobj)
            assert np.array_equal(od[outside], sd[outside])
            assert not np.array_equal(od, sd)
        assert np.array_equal(o_lab[outside], s_lab[outside])
        # ET bright on t1c relative to the brain
        t1c = np.asarray(o_imgs[0].dataobj)
        et = (o_lab == 3) & ~keep
        assert t1c[et].mean() > np.median(t1c[(t1c != 0) & (o_lab == 0)])
    assert n_new > 0


def test_replay_bit_exact(injected, src, tmp_path):
    out, sidecars, _ = injected
    for sc in sidecars:
        side = json.loads(sc.read_text())
        case = next(c for c in discover_cases(out) if c.case_id == side["case_id"])
        rep = replay_injection(sc)
        for c, m in enumerate(MODALITIES):
            assert np.array_equal(rep.image[c], np.asarray(nib.load(case.images[m]).dataobj))
        assert np.array_equal(rep.label, np.asarray(nib.load(case.label).dataobj))
    # the source dataset moved: replay from its new root; a changed source file is refused
    moved = tmp_path / "moved"
    shutil.copytree(src, moved)
    sc = sidecars[0]
    a = replay_injection(sc, src=moved)
    assert np.array_equal(a.image, replay_injection(sc).image)
    t1c = next(moved.rglob("LPS-00001-000-t1c.nii.gz"))
    img = nib.load(t1c)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) + 1, img.affine), t1c)
    with pytest.raises(MensegError, match="changed"):
        replay_injection(sc, src=moved)


def test_variants_differ_and_nnunet_layout(injected, src, tmp_path):
    out, _, _ = injected
    cases = discover_cases(out)
    a = np.asarray(nib.load(cases[0].label).dataobj)
    b = np.asarray(nib.load(cases[1].label).dataobj)
    assert not np.array_equal(a, b)
    nn = inject_dataset(src, tmp_path / "nn", per_scan=1, seed=3, cfg=CFG, layout="nnunet",
                        prefix="INJ")
    assert detect_layout(tmp_path / "nn") == "nnunet"
    got = discover_cases(tmp_path / "nn")
    assert [c.case_id for c in got] == ["INJ-00000-000", "INJ-00001-000"]
    assert all(c.label is not None for c in got)
    assert [p.name for p in nn] == ["INJ-00000-000-params.json", "INJ-00001-000-params.json"]
    # same seed, same variant k=0 -> same lesion as in the brats run (ids differ, data equal)
    side = load_injection_sidecar(nn[0])
    assert side["source"]["case_id"] == "LPS-00001-000"
    assert np.array_equal(np.asarray(nib.load(got[0].label).dataobj), a)


def test_refusals(injected, src, tmp_path):
    out, _, _ = injected
    with pytest.raises(MensegError, match="not empty"):
        inject_dataset(src, out, cfg=CFG)
    with pytest.raises(MensegError, match="inside the source"):
        inject_dataset(src, src / "sub", cfg=CFG)
    with pytest.raises(MensegError, match="layout"):
        inject_dataset(src, tmp_path / "x", layout="longitudinal", cfg=CFG)  # type: ignore[arg-type]
    with pytest.raises(MensegError, match=">= 1"):
        inject_dataset(src, tmp_path / "x", per_scan=0, cfg=CFG)
    assert not (tmp_path / "x").exists()
    assert not list(tmp_path.glob(".x.*"))


def _menseg(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "menseg", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def test_cli_inject(src, tmp_path):
    r = _menseg("synth", str(tmp_path / "o"), "--inject", str(src), "--cases", "2", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "wrote 4 injected case(s)" in r.stdout
    assert len(discover_cases(tmp_path / "o")) == 4
    r = _menseg("synth", str(tmp_path / "p"), "--inject", str(src), "--spacing", "2")
    assert r.returncode == 2 and "--spacing cannot be used with --inject" in r.stderr
    assert not (tmp_path / "p").exists()


@needs_real_unlabeled
def test_inject_real_scan_subsampled(tmp_path):
    """One real scan, 2x subsampled (2 mm) so it runs in ~2 s: lesion placed, rest untouched."""
    case = discover_cases(REAL_UNLABELED)[0]
    ds = tmp_path / "real" / case.case_id
    ds.mkdir(parents=True)
    for m in MODALITIES:
        img = nib.load(case.images[m])
        aff = img.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
        data = np.asarray(img.dataobj)[::2, ::2, ::2]
        nib.save(nib.Nifti1Image(data, aff, img.header), ds / case.images[m].name)
    sc = inject_dataset(tmp_path / "real", tmp_path / "out", per_scan=1, seed=7)
    rep = replay_injection(sc[0], return_influence=True)
    out_case = discover_cases(tmp_path / "out")[0]
    assert out_case.case_id == f"{case.case_id}-inj0"
    t1c_src = np.asarray(nib.load(ds / case.images["t1c"].name).dataobj, np.float32)
    t1c = np.asarray(nib.load(out_case.images["t1c"]).dataobj)
    lab = np.asarray(nib.load(out_case.label).dataobj)
    assert t1c.shape == t1c_src.shape and np.array_equal(rep.image[0], t1c)
    assert np.array_equal(t1c[~rep.influence], t1c_src[~rep.influence])
    brain = np.stack([np.asarray(nib.load(ds / case.images[m].name).dataobj) != 0
                      for m in MODALITIES]).any(0)
    assert (lab == 3).sum() > 0 and not rep.influence[~brain].any()
    assert t1c[lab == 3].mean() > np.percentile(t1c_src[t1c_src != 0], 75)


def test_existing_label_not_moved_by_mass_effect():
    """Large lesions with full mass effect next to the phantom's tumour: its label stays put."""
    from menseg.synth.inject import inject_arrays

    img, lab, aff = make_phantom_case(SHAPE, (SP, SP, SP), np.random.default_rng(0))
    big = LesionConfig(volume_median_cm3=40.0, volume_log_sigma=0.1, mass_effect=(1.0, 1.0))
    keep = lab > 0
    for seed in range(3):
        res = inject_arrays(img, lab, aff, big, seed)
        assert np.array_equal(res.label[keep], lab[keep])
        assert ((res.label > 0) & ~keep).sum() > 0


# ----------------------------------------------------------------------------- one scan (torch)
def _phantom_tensors():
    from menseg.data.phantom import make_phantom_case
    img, lab, _ = make_phantom_case((40, 40, 32), (3.0, 3.0, 3.0), np.random.default_rng(1))
    return torch.from_numpy(img), torch.from_numpy(lab)


def _check_injection(img, lab, sp, seed=0):
    cfg = LesionConfig(volume_median_cm3=15.0, volume_log_sigma=0.2, oedema_p_range=(1.0, 1.0))
    out, lab2, params, infl = inject_into_image(img, lab, torch.Generator().manual_seed(seed), cfg, sp,
                                                return_influence=True)
    assert out.shape == img.shape and lab2.shape == lab.shape
    assert torch.equal(out[:, ~infl], img[:, ~infl])
    assert torch.equal(lab2[~infl], lab[~infl])
    assert bool((lab2 == 3).sum() > (lab == 3).sum())
    changed = (out != img).any(0)
    assert bool(changed[(lab2 != lab)].all())  # label changes only where the image changed
    et_new = (lab2 == 3) & (lab != 3)
    wm_t1c = float(out[0][(lab2 == 0) & (img[1] > img[1][img[1] > 0].median())].mean())
    assert float(out[0][et_new].mean()) > wm_t1c  # enhancing on t1c
    o2, l2, _ = inject_into_image(img, lab, torch.Generator(), cfg, sp, params=params)
    assert torch.equal(o2, out) and torch.equal(l2, lab2)


def test_inject_into_image_phantom():
    img, lab = _phantom_tensors()
    _check_injection(img, lab, (3.0, 3.0, 3.0))



@needs_real_unlabeled
def test_inject_into_image_real_scan():
    from menseg.data.layouts import discover_cases
    from menseg.data.preprocess import load_case
    cases = discover_cases(REAL_UNLABELED)
    img, _, aff = load_case(cases[0])
    img = torch.from_numpy(img)[:, ::3, ::3, ::3].contiguous()  # ~3 mm, fast
    sp = tuple(float(v) * 3 for v in np.linalg.norm(aff[:3, :3], axis=0))
    _check_injection(img, torch.zeros(img.shape[1:], dtype=torch.uint8), sp, seed=2)
