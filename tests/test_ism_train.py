"""ISM end to end: the model wrapper, training with mixing / sequence dropout / visit pairs,
replay and resume, prediction with missing sequences and with a prior visit."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from menseg.checkpoint import load_checkpoint, load_model
from menseg.config import Config, load_config
from menseg.data.phantom import write_phantom_dataset
from menseg.errors import MensegError
from menseg.infer.predict import predict
from menseg.ism.model import ISMNet, build_model
from menseg.regions import labels_to_regions
from menseg.train.losses import RegionDiceBCELoss
from menseg.train.trainer import train

TINY = ["model.filters=[4,8,16]", "model.deep_supr_num=1", "train.patch_size=[16,16,16]",
        "train.batch_size=2", "train.val_every=100", "train.checkpoint_every=2", "train.seed=5",
        "infer.overlap=0.25", "infer.min_component_mm3=0", "data.val_fraction=0",
        "ism.spatial.levels=[1]", "ism.temporal.level=1", "ism.spatial.p=1.0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ism-phantoms")
    write_phantom_dataset(root / "data", n_cases=3, shape=(32, 32, 32), seed=2)
    return root


def _cfg(data: Path, out: Path, *extra: str, steps: int = 4) -> Config:
    return load_config("ism-modal", [
        f"data={data / 'data'}", f"data.cache_dir={data / 'cache'}", f"out_dir={out}", f"train.steps={steps}",
        *TINY, "ism.spatial.sources=[batch,location]", *extra])


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "latest.pt")["model"]


# ---------------------------------------------------------------- the model


def test_build_model_plain_without_ism_and_identity_in_eval(data: Path, tmp_path: Path) -> None:
    base = load_config("baseline", [*TINY])
    assert not isinstance(build_model(base), ISMNet)
    cfg = load_config("ism", [*TINY, "ism.modal.enabled=false"])
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, ISMNet) and model.stem is None and model.mixer is not None
    model.eval()
    x = torch.randn(2, 4, 16, 16, 16)
    # spatial mixing is training-only: the eval forward is the plain DynUNet, bit for bit
    assert torch.equal(model(x), model.net(x))


def test_gate_closed_temporal_fusion_is_the_single_visit_network() -> None:
    cfg = load_config("ism-modal", [*TINY])
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    assert isinstance(model, ISMNet) and model.temporal is not None
    x, prior = torch.randn(1, 4, 16, 16, 16), torch.randn(1, 4, 16, 16, 16)
    single = model(x)
    with model.conditioned(gap_days=180.0):
        assert torch.equal(model(torch.cat([x, prior], 1)), single)  # fresh gate: alpha = 0
        with torch.no_grad():
            model.temporal.alpha.fill_(0.5)
        assert not torch.allclose(model(torch.cat([x, prior], 1)), single)
    with pytest.raises(MensegError, match="gap"):
        model(torch.cat([x, prior], 1))


def test_missing_sequence_refused_without_modal_fusion_or_sequence_dropout() -> None:
    cfg = load_config("ism", [*TINY, "ism.modal.enabled=false", "seqdrop.enabled=false"])
    model = build_model(cfg)
    assert isinstance(model, ISMNet)
    with pytest.raises(MensegError, match="t2f"), model.conditioned(present=[True, True, False, True]):
        pass
    dropout = build_model(load_config("ism", [*TINY, "ism.modal.enabled=false", "seqdrop.enabled=true",
                                              "seqdrop.companion_fraction=0"]))  # one network with dropout
    with dropout.conditioned(present=[True, True, False, True]):
        pass


def test_soft_targets_equal_hard_targets_for_one_hot_regions() -> None:
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 4, (2, 8, 8, 8), generator=g)
    logits = torch.randn(2, 2, 3, 8, 8, 8, generator=g)
    loss = RegionDiceBCELoss()
    torch.testing.assert_close(loss(logits, labels_to_regions(label)), loss(logits, label))
    with pytest.raises(ValueError, match="soft targets"):
        loss(logits, torch.rand(2, 2, 8, 8, 8))


# ---------------------------------------------------------------- training


def test_ism_training_replays_and_resumes_bit_exactly(data: Path, tmp_path: Path) -> None:
    a = train(_cfg(data, tmp_path / "a"), progress=False)
    b = train(_cfg(data, tmp_path / "b"), progress=False)
    wa, wb = _weights(a), _weights(b)
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(k.startswith("stem.") for k in wa) and any(k.startswith("mixer.") for k in wa)
    recs = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert all(r["ism_mixed"] == 2.0 for r in recs)  # p = 1: every sample mixed
    # killed after 2 steps, resumed: the same weights as the uninterrupted run
    c_cfg = _cfg(data, tmp_path / "c")
    train(c_cfg, stop_at=2, progress=False)
    c = train(c_cfg, resume=True, progress=False)
    wc = _weights(c)
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    # a different seed trains differently
    d = _weights(train(_cfg(data, tmp_path / "d", "train.seed=6"), progress=False))
    assert not all(torch.equal(wa[k], d[k]) for k in wa)


def test_mixing_changes_training_and_p0_is_plain(data: Path, tmp_path: Path) -> None:
    plain = _cfg(data, tmp_path / "p0", "ism.spatial.p=0.0", "ism.modal.p_drop=0.0")
    run = train(plain, progress=False)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(r["ism_mixed"] == 0.0 and r["ism_dropped"] == 0.0 for r in recs)
    mixed = train(_cfg(data, tmp_path / "p1"), progress=False)
    w0, w1 = _weights(run), _weights(mixed)
    assert not all(torch.equal(w0[k], w1[k]) for k in w0 if k.startswith("net."))


def test_synthetic_partner_pool(data: Path, tmp_path: Path) -> None:
    cfg = load_config("ism", [
        f"data={data / 'data'}", f"out_dir={tmp_path / 'syn'}", "train.steps=2", *TINY,
        "data.spacing=[3,3,3]", "train.patch_size=[8,8,8]", "ism.spatial.sources=[synthetic]",
        "ism.n_synthetic=1", "ism.modal.enabled=false"])
    run = train(cfg, progress=False)
    assert (run / "ism-synthetic" / "done.json").is_file()
    assert len(list((run / "ism-synthetic" / "cases").iterdir())) == 1
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["ism_mixed"] == 2.0


def _spied_step(step, model: ISMNet, sampler) -> tuple:  # noqa: ANN001
    """One ISM step on a 2-sample batch of ``sampler``: ``(image, label, target, stats, captured)``, where
    ``captured`` holds what the model's ``mix_forward`` received (partner ``xb``, fields ``fb``, ``keep``)."""
    img_np, lab_np = sampler.batch(np.random.default_rng(1), 2)
    img, y = torch.from_numpy(img_np), torch.from_numpy(lab_np)
    captured: dict = {}
    orig = model.mix_forward

    def spy(xa, xb, fb, present=None, keep=None):  # noqa: ANN001, ANN202
        captured.update(xb=xb, fb=fb, keep=keep)
        return orig(xa, xb, fb, present, keep)

    model.mix_forward = spy  # type: ignore[method-assign]
    try:
        _, target, stats = step.forward(0, img, y, [0, 1])
    finally:
        model.mix_forward = orig  # type: ignore[method-assign]
    return img, y, target, stats, captured


def test_unlabelled_partners_target_the_networks_own_prediction(data: Path, tmp_path: Path) -> None:
    """The ``unlabelled`` source: partner patches from data.unlabeled_root, whose targets are the
    network's own probabilities on the partner alone (a consistency term), not a label."""
    from menseg.data.sampling import PatchSampler
    from menseg.train.ism import ISMStep

    rng = np.random.default_rng(3)
    lab = np.zeros((24, 24, 24), np.uint8)
    lab[8:14, 8:14, 8:14] = 3
    real = PatchSampler([(rng.normal(size=(4, 24, 24, 24)).astype(np.float32), lab) for _ in range(2)],
                        (16, 16, 16), 1.0)
    unl = PatchSampler([(rng.normal(size=(4, 24, 24, 24)).astype(np.float32), np.zeros_like(lab))],
                       (16, 16, 16), 0.0)
    cfg = load_config("ism", [*TINY, "ism.modal.enabled=false", "ism.spatial.sources=[unlabelled]",
                              "ism.spatial.keep_tumour=false", "aug.p_flip=0", "aug.p_rotate=0",
                              "aug.p_scale=0", "aug.p_elastic=0"])
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # a network that predicts something: its output layer's bias raised
        for name, prm in model.named_parameters():
            if name.startswith("net.output_block") and name.endswith("bias"):
                prm.add_(2.0)
    img, y, target, stats, captured = _spied_step(ISMStep(cfg, model, real, None, unl), model, real)
    assert stats["ism_mixed"] == 2.0 and stats["ism_unlabelled"] == 2.0
    xb, fb = captured["xb"], captured["fb"]
    with torch.no_grad():
        own = torch.sigmoid(model(xb)[:, 0].float())  # the partner's prediction alone
    lam = fb.on_grid(img.shape[2:])
    expected = lam * labels_to_regions(y) + (1 - lam) * own
    assert torch.allclose(target, expected, atol=1e-6)
    assert float(own.mean()) > 0.5  # not the partner's (empty) label: its prediction is the target
    # without data.unlabeled_root the source is refused in one line, before any work
    with pytest.raises(MensegError, match="data.unlabeled_root"):
        train(load_config("ism", [f"data={data / 'data'}", f"out_dir={tmp_path / 'x'}", *TINY,
                                  "ism.spatial.sources=[unlabelled]"]), progress=False)


def test_unlabelled_partner_training_replays(data: Path, tmp_path: Path) -> None:
    def cfg(out: str) -> Config:
        return load_config("ism", [
            f"data={data / 'data'}", f"data.cache_dir={data / 'cache'}", f"out_dir={tmp_path / out}",
            "train.steps=3", *TINY, "ism.modal.enabled=false", "ism.spatial.sources=[batch,unlabelled]",
            f"data.unlabeled_root={data / 'data'}"])

    a, b = train(cfg("a"), progress=False), train(cfg("b"), progress=False)
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    recs = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["ism_unlabelled"] for r in recs) > 0


# ---------------------------------------------------------------- prediction


@pytest.fixture(scope="module")
def modal_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("modal") / "run"
    return train(_cfg(data, out, "ism.spatial.enabled=false"), progress=False)


def _case_without(data: Path, tmp_path: Path, drop: tuple[str, ...]) -> Path:
    src = sorted((data / "data").iterdir())[0]
    dst = tmp_path / "in" / src.name
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        if any(f.name.endswith(f"-{m}.nii.gz") for m in drop) or f.name.endswith("-seg.nii.gz"):
            f.unlink()
    return dst


@pytest.mark.parametrize("drop", [("t2f",), ("t1c", "t1n", "t2w")])
def test_predict_with_missing_sequences(modal_run: Path, data: Path, tmp_path: Path, drop: tuple[str, ...],
                                        caplog: pytest.LogCaptureFixture) -> None:
    case = _case_without(data, tmp_path, drop)
    with caplog.at_level(logging.WARNING, logger="menseg.infer.predict"):
        out = predict(modal_run / "latest.pt", case, tmp_path / "out", progress=False)
    assert len(out) == 1 and out[0].is_file()
    ref = next(f for f in case.iterdir())
    assert nib.load(str(out[0])).shape == nib.load(str(ref)).shape
    assert "missing " + ", ".join(drop) in caplog.text


def test_predict_missing_sequence_refused_by_a_baseline_without_dropout(data: Path, tmp_path: Path) -> None:
    cfg = load_config("baseline", [f"data={data / 'data'}", f"data.cache_dir={data / 'cache'}",
                                   f"out_dir={tmp_path / 'base'}", "train.steps=1", "seqdrop.enabled=false",
                                   *TINY])
    run = train(cfg, progress=False)
    case = _case_without(data, tmp_path, ("t2w",))
    with pytest.raises(MensegError, match="lacks t2w.*trained without sequence dropout"):
        predict(run / "latest.pt", case, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_predict_prior_needs_temporal_model_and_gap(modal_run: Path, data: Path, tmp_path: Path) -> None:
    cases = sorted((data / "data").iterdir())
    with pytest.raises(MensegError, match="gap"):
        predict(modal_run / "latest.pt", cases[0], tmp_path / "o", prior=cases[1], progress=False)
    with pytest.raises(MensegError, match="one case"):
        predict(modal_run / "latest.pt", data / "data", tmp_path / "o", prior=cases[1], gap_days=10,
                progress=False)
    model, _ = load_model(modal_run / "latest.pt")
    assert isinstance(model, ISMNet) and model.temporal is not None


# ---------------------------------------------------------------- longitudinal


@pytest.fixture(scope="module")
def longitudinal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from menseg.synth.engine import SynthConfig, synth_dataset, with_spacing

    root = tmp_path_factory.mktemp("long") / "data"
    synth_dataset(root, 3, "longitudinal", seed=1, cfg=with_spacing(SynthConfig(), 4.0), visits=2,
                  device="cpu")
    return root


def test_longitudinal_training_and_prior_prediction(longitudinal: Path, tmp_path: Path) -> None:
    cfg = load_config("ism", [f"data={longitudinal}", f"out_dir={tmp_path / 'run'}", "train.steps=3",
                              *TINY, "data.spacing=[4,4,4]", "ism.temporal.p_mix=1.0",
                              "data.val_fraction=0.34", "train.val_every=3",
                              "seqdrop.enabled=true", "seqdrop.p_drop=1.0",
                              "seqdrop.companion_fraction=0"])  # visit pairs lose sequences too
    run = train(cfg, progress=False)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["ism_temporal_mixed"] for r in recs) >= 1  # visit pairs were mixed
    assert sum(r["seqdrop_dropped"] for r in recs) >= 1
    assert "val_mean_dice" in recs[-1]
    assert len(list((run / "preprocessed" / "pairs").glob("*.json"))) == 3  # one per later visit
    patient = sorted(p for p in longitudinal.iterdir() if p.is_dir())[0]
    days = json.loads((patient / "timepoints.json").read_text())
    first, last = sorted(days, key=lambda c: days[c]["day"])
    gap = days[last]["day"] - days[first]["day"]
    with_prior = predict(run / "latest.pt", patient / last, tmp_path / "with.nii.gz", prior=patient / first,
                         gap_days=gap, progress=False)
    without = predict(run / "latest.pt", patient / last, tmp_path / "without.nii.gz", progress=False)
    a, b = (np.asarray(nib.load(str(p[0])).dataobj) for p in (with_prior, without))
    assert a.shape == b.shape
    # an incomplete prior visit (no FLAIR, no T2) is used as it is
    partial = tmp_path / "partial" / first
    shutil.copytree(patient / first, partial)
    for m in ("t2f", "t2w"):
        (partial / f"{first}-{m}.nii.gz").unlink()
    (c,) = predict(run / "latest.pt", patient / last, tmp_path / "partial.nii.gz", prior=partial,
                   gap_days=gap, progress=False)
    assert np.asarray(nib.load(str(c)).dataobj).shape == a.shape
    lone = tmp_path / "lone" / first  # a prior with only T2: nothing to register on against a t1c-only case
    shutil.copytree(patient / first, lone)
    for m in ("t1c", "t1n", "t2f"):
        (lone / f"{first}-{m}.nii.gz").unlink()
    cur = tmp_path / "cur" / last
    shutil.copytree(patient / last, cur)
    for m in ("t1n", "t2f", "t2w"):
        (cur / f"{last}-{m}.nii.gz").unlink()
    with pytest.raises(MensegError, match="shares no sequence"):
        predict(run / "latest.pt", cur, tmp_path / "lone.nii.gz", prior=lone, gap_days=gap, progress=False)


def test_keep_tumour_mix_keeps_the_own_lesion_and_partners_bring_tumour() -> None:
    from menseg.data.sampling import PatchSampler
    from menseg.train.ism import ISMStep

    rng = np.random.default_rng(0)
    lab = np.zeros((24, 24, 24), np.uint8)
    lab[8:14, 8:14, 8:14] = 3
    lab[6:8, 8:14, 8:14] = 2
    cases = [(rng.normal(size=(4, 24, 24, 24)).astype(np.float32), lab) for _ in range(2)]
    sampler = PatchSampler(cases, (16, 16, 16), 1.0)
    cfg = load_config("ism", [*TINY, "ism.modal.enabled=false", "ism.spatial.keep_tumour=true",
                              "ism.spatial.sources=[location]", "ism.spatial.keep_margin_mm=0",
                              "aug.p_flip=0", "aug.p_rotate=0", "aug.p_scale=0", "aug.p_elastic=0"])
    torch.manual_seed(0)
    model = build_model(cfg)
    assert isinstance(model, ISMNet)
    step = ISMStep(cfg, model, sampler)
    img, y, target, stats, captured = _spied_step(step, model, sampler)
    assert stats["ism_mixed"] == 2.0 and target.is_floating_point()
    wt = labels_to_regions(y)
    inside = wt[:, 2] > 0
    assert torch.equal(target[:, 2][inside], wt[:, 2][inside])  # own tumour kept exactly
    assert captured["keep"] is not None and torch.equal(captured["keep"][:, 0] > 0, inside)
    # partner_fg = 1: every location partner is centred on tumour
    xb_lab = [step._location(0, b, b)[1] for b in range(2)]
    assert all((p > 0).any() for p in xb_lab)


def test_bf16_autocast_keeps_mixed_targets_in_fp32(data: Path, longitudinal: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast (native on some CPUs, the default there) the network runs in bf16 but the soft
    targets of spatial mixing and the interpolated labels of temporal mixing stay fp32 / integer: a bf16
    field rounds mixing weights to 8 bits, and numpy cannot read bf16 label fields at all."""
    import menseg.train.losses as losses

    seen: list[torch.dtype] = []
    forward = losses.RegionDiceBCELoss.forward

    def spy(self, outputs, target, mask=None, regions=None):  # type: ignore[no-untyped-def]
        seen.append(target.dtype)
        return forward(self, outputs, target, mask, regions)

    monkeypatch.setattr(losses.RegionDiceBCELoss, "forward", spy)
    train(_cfg(data, tmp_path / "spatial", "train.amp_dtype=bf16", steps=2), progress=False)
    assert seen and all(d == torch.float32 for d in seen)  # p = 1: every step mixed, soft targets
    seen.clear()
    cfg = load_config("ism", [f"data={longitudinal}", f"out_dir={tmp_path / 'visits'}", "train.steps=2",
                              *TINY,
                              "data.spacing=[4,4,4]", "ism.temporal.p_mix=1.0", "data.val_fraction=0",
                              "train.amp_dtype=bf16"])
    train(cfg, progress=False)
    assert seen and all(not d.is_floating_point for d in seen)  # interpolated integer labels


def test_sequences_option_predicts_as_if_the_others_were_absent(modal_run: Path, data: Path,
                                                                tmp_path: Path) -> None:
    import json

    from menseg.infer.predict import sidecar_path

    full = _case_without(data, tmp_path / "full", ())
    (chosen,) = predict(modal_run / "latest.pt", full, tmp_path / "chosen.nii.gz", progress=False,
                        sequences=["t1c", "T2F "])
    absent = _case_without(data, tmp_path / "absent", ("t1n", "t2w"))
    (without,) = predict(modal_run / "latest.pt", absent, tmp_path / "without.nii.gz", progress=False)
    np.testing.assert_array_equal(nib.load(str(chosen)).get_fdata(), nib.load(str(without)).get_fdata())
    side = json.loads(sidecar_path(chosen).read_text())
    assert (side["sequences_used"], side["sequences_missing"], side["sequences_ignored"]) == (
        ["t1c", "t2f"], [], ["t1n", "t2w"])
    side = json.loads(sidecar_path(without).read_text())
    assert (side["sequences_used"], side["sequences_missing"], side["sequences_ignored"]) == (
        ["t1c", "t2f"], ["t1n", "t2w"], [])
