"""Sim2Real translator (menseg.sim2real.translator) and domain-gap measures (menseg.sim2real.gap)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from menseg.checkpoint import load_checkpoint
from menseg.config import TranslatorConfig
from menseg.constants import MODALITIES
from menseg.errors import MensegError
from menseg.kmeans import kmeans_1d
from menseg.sim2real.gap import domain_gap, gap_table, pseudo_tissues
from menseg.sim2real.translator import (
    Generator,
    fit_translator,
    load_segmenter,
    load_translator,
    translate_dataset,
    translate_image,
    translator_config,
)
from nifti_factory import write_brats_case

N = 24


def _ball_case(rng: np.random.Generator, shift: float = 0.0, scale: float = 1.0,
               lesion: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed-like case: image (4, N, N, N) zero outside a head ball, noise inside, and a
    bright spherical lesion (label 1, core label 3) at a random place; intensities ``scale * x + shift``."""
    g = np.stack(np.meshgrid(*[np.arange(N) - (N - 1) / 2] * 3, indexing="ij"))
    head = np.sqrt((g ** 2).sum(0)) < N / 2 - 1
    img = rng.normal(0.0, 0.3, (4, N, N, N))
    lab = np.zeros((N, N, N), np.uint8)
    if lesion:
        c = rng.integers(-3, 4, 3)[:, None, None, None]
        d = np.sqrt(((g - c) ** 2).sum(0))
        img[:, d < 4] += 2.0
        lab[d < 4] = 1
        lab[d < 2] = 3
    img = (img * scale + shift) * head
    return img.astype(np.float32), lab


def _cfg(**kw) -> TranslatorConfig:
    base = dict(steps=40, patch_size=(16, 16, 16), batch_size=2, channels=8, lr=5e-3, identity_weight=1.0,
                semantic_warmup=10, preview_every=20, checkpoint_every=20)
    base.update(kw)
    return TranslatorConfig(**base)


def _data(seed: int = 0, n: int = 3):
    rng = np.random.default_rng(seed)
    syn = [_ball_case(rng) for _ in range(n)]
    real = [_ball_case(rng, shift=0.8, scale=1.5)[0] for _ in range(n)]
    return syn, real


#: torch's thread count when this module was imported; floating-point results depend on it (e.g. the
#: weight-digest guard's), so no fixture here may leave it changed for the modules that run later.
THREADS = torch.get_num_threads()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    syn, real = _data()
    out = tmp_path_factory.mktemp("translator")
    torch.set_num_threads(1)  # tiny volumes: one thread is much faster on a busy shared machine
    try:
        fit_translator(syn, real, _cfg(), out, seed=0, device="cpu", progress=False, spacing=(1.0, 1.0, 1.0))
    finally:
        torch.set_num_threads(THREADS)
    return out


def _segment(S: torch.nn.Module, image: np.ndarray) -> torch.Tensor:
    """Region logits (3, X, Y, Z) of the patch-trained segmenter, applied window by window as in inference."""
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        return sliding_window_inference(torch.from_numpy(image)[None], (16, 16, 16), 4, S, overlap=0.5)[0]


def _wt_dice(logits: torch.Tensor, label: np.ndarray) -> float:
    pred = (logits[2] > 0).numpy()
    t = label > 0
    return float(2 * (pred & t).sum() / max(pred.sum() + t.sum(), 1))


# ---------------------------------------------------------------- generator


def test_untrained_generator_is_identity():
    torch.manual_seed(0)
    G = Generator(channels=4)
    img, _ = _ball_case(np.random.default_rng(1))
    out = translate_image(G, img)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, img)


def test_background_stays_zero_and_shape_kept():
    torch.manual_seed(0)
    G = Generator(channels=4)
    torch.nn.init.normal_(G.head.weight, std=1.0)  # a generator that changes everything it may
    torch.nn.init.normal_(G.head.bias, std=1.0)
    img = np.random.default_rng(2).normal(0, 1, (4, 13, 18, 10)).astype(np.float32)
    img[:, :4] = 0.0
    img[:, :, -3:] = 0.0
    before = img.copy()
    out = translate_image(G, img)
    assert out.shape == img.shape
    np.testing.assert_array_equal(img, before)  # input untouched
    head = np.any(img != 0, axis=0)
    assert np.all(out[:, ~head] == 0)
    assert np.abs(out[:, head] - img[:, head]).mean() > 0.1
    assert np.abs(out - img).max() <= G.max_delta + 1e-5
    img[2] = 0.0  # a missing sequence stays missing
    out = translate_image(G, img)
    assert np.all(out[2] == 0) and np.abs(out[0] - img[0]).mean() > 0.1


# ---------------------------------------------------------------- fit


def test_translation_keeps_lesion_geometry(fitted):
    G = load_translator(fitted)
    S = load_segmenter(fitted)
    rng = np.random.default_rng(123)  # unseen synthetic cases
    changes, dices = [], []
    for _ in range(2):
        img, lab = _ball_case(rng)
        y = translate_image(G, img)
        changes.append(np.abs(y - img).mean())
        dices.append(_wt_dice(_segment(S, y), lab))
    assert min(changes) > 1e-3, changes  # the fitted translator is not the identity
    assert min(dices) >= 0.5, dices


def test_fit_folder_contents(fitted):
    assert (fitted / "preview" / "step_000020.png").is_file()
    assert (fitted / "preview" / "step_000040.png").is_file()
    lines = [json.loads(s) for s in (fitted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 41))
    for key in ("step", "loss_G", "loss_D", "loss_cycle", "loss_identity", "loss_semantic", "seg_dice",
                "time"):
        assert key in lines[-1]
    stored = json.loads((fitted / "config.json").read_text())
    assert stored["seed"] == 0 and stored["spacing"] == [1.0, 1.0, 1.0]
    cfg, seed, spacing = translator_config(fitted / "translator.pt")
    assert cfg == _cfg() and seed == 0 and spacing == (1.0, 1.0, 1.0)
    state = torch.load(fitted / "translator.pt", weights_only=True)
    assert {"generator", "segmenter", "config", "seed", "spacing"} <= set(state)


def test_refusals(fitted, tmp_path):
    syn, real = _data(n=1)
    # a finished fit of the same settings is reused, a different one refused
    assert fit_translator(syn, real, _cfg(), fitted, progress=False, spacing=(1.0, 1.0, 1.0)) == \
        fitted / "translator.pt"
    with pytest.raises(MensegError, match="differ"):
        fit_translator(syn, real, _cfg(steps=41), fitted, progress=False, spacing=(1.0, 1.0, 1.0))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("x")
    with pytest.raises(MensegError, match="not empty"):
        fit_translator(syn, real, _cfg(), busy, progress=False)
    with pytest.raises(MensegError, match="nothing to resume"):
        fit_translator(syn, real, _cfg(), tmp_path / "new", resume=True, progress=False)
    bad = [
        ([], real, "synthetic"),
        (syn, [], "real"),
        ([(syn[0][0][:3], syn[0][1])], real, r"\(4, X, Y, Z\)"),
        (syn, [real[0][0]], r"\(4, X, Y, Z\)"),
        ([(syn[0][0], syn[0][1][:-1])], real, "label shape"),
        ([(syn[0][0], np.zeros_like(syn[0][1]))], real, "lesion"),
    ]
    for i, (s, r, msg) in enumerate(bad):
        with pytest.raises(MensegError, match=msg):
            fit_translator(s, r, _cfg(), tmp_path / f"bad{i}", progress=False)
    with pytest.raises(MensegError, match="divisible"):
        fit_translator(syn, real, _cfg(patch_size=(16, 16, 18)), tmp_path / "odd", progress=False)
    with pytest.raises(MensegError):
        load_translator(tmp_path / "busy")


def test_resume_equals_uninterrupted(tmp_path):
    syn, real = _data(seed=5, n=2)
    cfg = _cfg(steps=6, channels=4, checkpoint_every=2, preview_every=0, semantic_warmup=2)
    kw = dict(seed=3, device="cpu", progress=False)
    full = fit_translator(syn, real, cfg, tmp_path / "full", **kw)
    part = tmp_path / "part"
    fit_translator(syn, real, cfg, part, stop_at=5, **kw)  # killed after step 5, last checkpoint at 4
    assert not (part / "translator.pt").exists()
    assert len((part / "metrics.jsonl").read_text().splitlines()) == 5
    with pytest.raises(MensegError, match="differ"):
        fit_translator(syn, real, _cfg(steps=6, channels=4, checkpoint_every=2, preview_every=0,
                                       semantic_warmup=3), part, resume=True, **kw)
    resumed = fit_translator(syn, real, cfg, part, resume=True, **kw)
    a = torch.load(full, weights_only=True)
    b = torch.load(resumed, weights_only=True)
    for key in ("generator", "segmenter"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), (key, name)
    steps = [json.loads(s)["step"] for s in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- datasets


def test_translate_dataset(fitted, tmp_path):
    from menseg.data.dataset import preprocess_dataset
    from menseg.data.layouts import discover_cases

    src = tmp_path / "src"
    write_brats_case(src, "BraTS-MEN-00001-000", shape=(18, 16, 14), seed=1)
    write_brats_case(src, "BraTS-MEN-00002-000", shape=(16, 16, 12), seed=2, labelled=False)
    out = tmp_path / "out"
    ids = translate_dataset(fitted, src, out, progress=False)
    assert ids == ["BraTS-MEN-00001-000", "BraTS-MEN-00002-000"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folders left
    pre = {c.case_id: c for c in preprocess_dataset(discover_cases(src, allow_missing=True),
                                                    tmp_path / "cache", (1.0, 1.0, 1.0), progress=False)}
    for cid in ids:
        case = pre[cid]
        imgs = []
        for m in MODALITIES:
            nii = nib.load(out / cid / f"{cid}-{m}.nii.gz")
            np.testing.assert_allclose(nii.affine, np.asarray(case.props["affine"]), atol=1e-5)
            imgs.append(np.asarray(nii.dataobj, np.float32))
        img = np.stack(imgs)
        head = np.any(np.asarray(case.image) != 0, axis=0)
        assert np.all(img[:, ~head] == 0)
        seg = out / cid / f"{cid}-seg.nii.gz"
        if case.label is not None:
            np.testing.assert_array_equal(np.asarray(nib.load(seg).dataobj), np.asarray(case.label))
        else:
            assert not seg.exists()
    with pytest.raises(MensegError, match="not empty"):
        translate_dataset(fitted, src, out, progress=False)


# ---------------------------------------------------------------- domain gap


def _tissue_case(rng: np.random.Generator, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    """Three concentric 'tissues' (means -1, 0, 1) with noise, zero outside the head."""
    g = np.stack(np.meshgrid(*[np.arange(N) - (N - 1) / 2] * 3, indexing="ij"))
    r = np.sqrt((g ** 2).sum(0))
    mean = np.select([r < 5, r < 8, r < N / 2 - 1], [1.0, 0.0, -1.0], 0.0)
    img = (mean + rng.normal(0, 0.3, (4, N, N, N))) * scale + shift
    return (img * (r < N / 2 - 1)).astype(np.float32)


def test_kmeans_tissues():
    v = np.concatenate([np.full(50, -2.0), np.full(30, 0.5), np.full(20, 3.0)])
    np.testing.assert_allclose(kmeans_1d(v), [-2.0, 0.5, 3.0])
    tis = pseudo_tissues(_tissue_case(np.random.default_rng(0)), np.random.default_rng(0))
    assert tis[0, 0, 0] == -1 and tis[N // 2, N // 2, N // 2] == 2


def test_domain_gap_separates_shifted_sets():
    rng = np.random.default_rng(7)
    real = [_tissue_case(rng) for _ in range(4)]
    same = [_tissue_case(rng) for _ in range(4)]
    shifted = [_tissue_case(rng, shift=0.7, scale=1.4) for _ in range(4)]
    res = domain_gap(real, {"same": same, "shifted": shifted}, seed=0, patch=(16, 16, 16), steps=40)
    assert res["same"]["classifier_acc"] <= 0.75
    assert res["shifted"]["classifier_acc"] >= 0.9
    assert res["shifted"]["classifier_auc"] >= 0.9
    assert res["same"]["tissue_w1"] < 0.1
    assert res["shifted"]["tissue_w1"] > 3 * res["same"]["tissue_w1"]
    keys = {"classifier_acc", "classifier_auc", "tissue_w1", *[f"w1_{m}" for m in MODALITIES]}
    assert set(res["same"]) >= keys
    table = gap_table(res)
    assert "| same |" in table and "| shifted |" in table and "tissue_w1" in table
    with pytest.raises(MensegError):
        domain_gap([], {"x": same})
    with pytest.raises(MensegError):
        domain_gap(real, {"x": [same[0][0]]})


def test_gap_leaves_lesions_out_of_every_set():
    """``away_from_lesions``: bright FLAIR / T1c regions of at least 1 cm3 (and known labels), grown by a
    margin, are never inside a classifier patch nor in the tissue statistics; small bright specks stay."""
    from menseg.data.sampling import choose_start, crop_pad
    from menseg.sim2real.gap import LESION_MARGIN_MM, lesion_free_centres, lesion_mask

    rng = np.random.default_rng(3)
    n = 40
    g = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2] * 3, indexing="ij"))
    head = np.sqrt((g ** 2).sum(0)) < n / 2 - 1
    img = (rng.normal(0, 0.3, (4, n, n, n)) * head).astype(np.float32)
    t2f, t1c = MODALITIES.index("t2f"), MODALITIES.index("t1c")
    img[t2f, 8:14, 18:24, 18:24] = 3.0   # 216 voxels at 2 mm: 1.7 cm3, a lesion
    img[t1c, 28:30, 20:22, 20:22] = 4.0  # 8 voxels: a bright speck (a vessel), kept
    label = np.zeros((n, n, n), np.uint8)
    label[20:23, 30:33, 18:21] = 1       # a known lesion that is not bright
    m = lesion_mask(img, 2.0)
    margin = round(LESION_MARGIN_MM / 2.0)
    assert m[8:14, 18:24, 18:24].all() and m[8 - margin, 20, 20] and not m[8 - margin - 1, 20, 20]
    assert not m[28:30, 20:22, 20:22].any() and not m[20:23, 30:33, 18:21].any()
    ml = lesion_mask(img, 2.0, label)
    assert ml[20:23, 30:33, 18:21].all()
    patch = (8, 8, 8)
    centres = lesion_free_centres(img, ml, patch)
    assert len(centres) > 0
    for _ in range(50):  # no patch drawn from these centres holds a lesion voxel
        start = choose_start(img.shape[1:], patch, rng, centres)
        assert not crop_pad(ml[None], start, patch).any()
    real = [img, img.copy()]
    res = domain_gap(real, {"syn": [img, img.copy()]}, seed=0, patch=patch, steps=2, away_from_lesions=True,
                     spacing_mm=2.0, labels={"syn": [label, label]})
    assert res["syn"]["excluded"] > res["real"]["excluded"] > 0
    table = gap_table(res)
    assert "| real | - |" in table and "excluded" in table


# ---------------------------------------------------------------- fit folder: one writer, damaged checkpoint


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process that holds ``folder``'s fit lock until it is killed (e.g. a fit started elsewhere)."""
    ready = folder.parent / f"{folder.name}.ready"
    code = ("import sys, time, pathlib; from menseg.utils import folder_lock\n"
            "with folder_lock(sys.argv[1], 'translator'):\n"
            "    pathlib.Path(sys.argv[2]).touch(); time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), str(ready)],
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "lock holder did not start"
        time.sleep(0.05)
    return proc


def test_second_fitter_on_one_folder_fails_with_one_line(tmp_path):
    syn, real = _data(seed=5, n=1)
    cfg = _cfg(steps=2, channels=4, checkpoint_every=1, preview_every=0)
    out = tmp_path / "fit"
    holder = _hold_lock(out)
    try:
        for resume in (False, True):
            if resume:
                (out / "latest.pt").write_bytes(b"a checkpoint being written by the other fitter")
            with pytest.raises(MensegError, match="another process is using this translator folder") as e:
                fit_translator(syn, real, cfg, out, seed=1, device="cpu", progress=False, resume=resume)
            assert "\n" not in str(e.value)
            assert sorted(p.name for p in out.iterdir()) == [".lock"] + (["latest.pt"] if resume else [])
    finally:
        holder.kill()
        holder.wait()
    (out / "latest.pt").unlink()
    # the lock went with its holder: the folder is free (and counts as empty) again
    assert fit_translator(syn, real, cfg, out, seed=1, device="cpu", progress=False).is_file()


def test_damaged_latest_resumes_from_previous_with_a_warning(tmp_path, caplog):
    syn, real = _data(seed=5, n=1)
    cfg = _cfg(steps=6, channels=4, checkpoint_every=2, preview_every=0, semantic_warmup=2)
    kw = dict(seed=3, device="cpu", progress=False)
    full = fit_translator(syn, real, cfg, tmp_path / "full", **kw)
    part = tmp_path / "part"
    fit_translator(syn, real, cfg, part, stop_at=5, **kw)  # checkpoints at 2 and 4: latest = 4, prev = 2
    assert load_checkpoint(part / "latest.prev.pt")["step"] == 2
    latest = part / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:-100])  # cut short, as by a full disk
    with caplog.at_level("WARNING"):
        resumed = fit_translator(syn, real, cfg, part, resume=True, **kw)
    assert any("latest.prev.pt" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    a, b = load_checkpoint(full), load_checkpoint(resumed)
    for key in ("generator", "segmenter"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), (key, name)  # steps 3..6 redone from step 2: same weights
    steps = [json.loads(s)["step"] for s in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_fixtures_leave_the_thread_count_as_they_found_it(fitted):
    assert torch.get_num_threads() == THREADS
