"""Sim2Real inside the trainer: source schedule, injection pool, masked loss, end-to-end runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from menseg.checkpoint import load_checkpoint
from menseg.config import Config, load_config, with_overrides
from menseg.data.phantom import make_phantom_case
from menseg.errors import MensegError
from menseg.synth.inject import inject_arrays
from menseg.synth.lesion import LesionConfig
from menseg.train import sim2real as s2r_mod
from menseg.train.losses import RegionDiceBCELoss
from menseg.train.sim2real import UNKNOWN, inject_pool, known_mask, sample_sources, source_shares
from menseg.train.trainer import train
from menseg.utils import derive_seed
from nifti_factory import write_phantom_pools

TINY = ["model.filters=[4,8,16]", "model.deep_supr_num=1", "train.patch_size=[16,16,16]",
        "train.batch_size=2", "train.val_every=100", "train.checkpoint_every=2", "train.seed=3",
        "infer.overlap=0.25", "infer.min_component_mm3=0", "data.val_fraction=0",
        "sim2real.align.levels=[1,2]", "sim2real.inject.per_scan=1", "sim2real.n_synthetic=2",
        "sim2real.translator.enabled=false",
        # every mechanism on (the packaged sim2real.yaml leaves injection off and aligns by MMD)
        "sim2real.align.method=adversarial", "sim2real.inject.enabled=true"]


def _s2r(*extra: str) -> Config:
    return load_config("sim2real", [*TINY, *extra])


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize("real,inject_share", [(0.5, 0.5), (0.25, 0.0), (0.8, 1.0)])
def test_ratio_schedule_yields_configured_proportions(real: float, inject_share: float) -> None:
    cfg = _s2r(f"sim2real.schedule.real_start={real}", f"sim2real.schedule.real_end={real}",
               f"sim2real.inject.share={inject_share}").sim2real
    total, bsz = 1000, 2
    counts = np.zeros(3)
    for t in range(total):
        for k in sample_sources(cfg, 7, t, bsz, total):
            counts[k] += 1
    want = np.array(source_shares(cfg, 0, total))
    assert np.allclose(counts / (total * bsz), want, atol=0.005)
    assert want.sum() == pytest.approx(1.0)


def test_linear_and_pretrain_schedules_follow_the_step() -> None:
    lin = _s2r("sim2real.schedule.real_start=0.2", "sim2real.schedule.real_end=0.8").sim2real
    total = 2000
    first = [k for t in range(0, 200) for k in sample_sources(lin, 1, t, 2, total)]
    last = [k for t in range(1800, 2000) for k in sample_sources(lin, 1, t, 2, total)]
    assert first.count(0) / len(first) == pytest.approx(0.23, abs=0.02)  # mean share over steps 0..199
    assert last.count(0) / len(last) == pytest.approx(0.77, abs=0.02)
    pre = _s2r("sim2real.schedule.mode=pretrain", "sim2real.schedule.switch=0.25",
               "sim2real.schedule.real_end=1.0").sim2real
    assert all(k != 0 for t in range(0, 500) for k in sample_sources(pre, 1, t, 2, total))
    assert all(k == 0 for t in range(500, 2000) for k in sample_sources(pre, 1, t, 2, total))
    # without labelled cases nothing is drawn from 'real', whatever the schedule
    assert all(k != 0 for t in range(600, 700) for k in sample_sources(pre, 1, t, 2, total, has_real=False))


def test_sources_are_a_pure_function_of_seed_and_step() -> None:
    cfg = _s2r().sim2real
    assert sample_sources(cfg, 4, 17, 2, 100) == sample_sources(cfg, 4, 17, 2, 100)
    runs = {tuple(k for t in range(20) for k in sample_sources(cfg, s, t, 2, 100)) for s in range(4)}
    assert len(runs) > 1  # the offset depends on the seed


# ---------------------------------------------------------------- injection


def _scan(seed: int, lesion: bool = True) -> tuple[np.ndarray, np.ndarray]:
    img, lab, _ = make_phantom_case((40, 40, 32), (2.0, 2.0, 2.0), np.random.default_rng(seed), lesion=lesion)
    return img.astype(np.float32), lab


def test_injection_changes_image_and_label_together_and_leaves_the_rest() -> None:
    cfg = _s2r("data.spacing=[2.0,2.0,2.0]", "sim2real.inject.known_margin_mm=6")
    img, lab = _scan(0)
    uimg, _ = _scan(1, lesion=False)
    pool = inject_pool(cfg, [("L0", img, lab)], [("U0", uimg)], progress=False)
    assert len(pool) == 2
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    for (out_img, out_lab), (cid, src_img, src_lab) in zip(pool, [("L0", img, lab), ("U0", uimg, None)],
                                                          strict=True):
        ref = inject_arrays(src_img, src_lab, affine, LesionConfig(), derive_seed(3, "s2r-inject", cid, 0),
                            return_influence=True)
        infl = ref.influence
        assert np.array_equal(out_img, ref.image)
        changed_img = (out_img != src_img).any(0)
        base_lab = src_lab if src_lab is not None else np.zeros_like(out_lab)
        known_lab = np.where(out_lab == UNKNOWN, base_lab, out_lab)
        changed_lab = known_lab != base_lab
        assert changed_img.any() and changed_lab.any()
        assert not (changed_img & ~infl).any() and not (changed_lab & ~infl).any()  # the rest untouched
        new_lesion = (ref.label > 0) & (base_lab == 0)
        assert changed_img[new_lesion].mean() > 0.9  # the new lesion is in the image where its label is
    # the unlabelled scan: known = lesion + margin + outside the head; unknown elsewhere
    u_img, u_lab = pool[1]
    head = (u_img != 0).any(0)
    want = known_mask((u_lab != UNKNOWN) & (u_lab > 0), head, 6.0, (2.0, 2.0, 2.0))
    assert np.array_equal(u_lab != UNKNOWN, want)
    assert (u_lab == UNKNOWN).any() and not (u_lab[~head] == UNKNOWN).any()


def test_masked_voxels_do_not_change_the_loss() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, 8)
    lab = torch.randint(0, 4, (2, 8, 8, 8))
    mask = torch.rand(2, 8, 8, 8) > 0.4
    loss = RegionDiceBCELoss()
    a = loss(logits, lab, mask)
    other = torch.where(mask[:, None], logits, torch.randn_like(logits) * 5)
    other_lab = torch.where(mask, lab, torch.randint(0, 4, lab.shape))
    assert torch.allclose(a, loss(other, other_lab, mask))
    assert torch.allclose(loss(logits, lab, torch.ones_like(mask)), loss(logits, lab))


# ---------------------------------------------------------------- training


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("s2r-phantoms")
    write_phantom_pools(root, n_labelled=2)
    return root


@pytest.fixture()
def tiny_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2-case 'synthetic' pool of phantoms on another intensity scale (the engine's pool has its own
    tests; here it would cost a minute)."""

    def pool(cfg: Config, cache: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
        out = []
        for i in range(cfg.sim2real.n_synthetic):
            img, lab = _scan(100 + i)
            out.append((f"SYN-{i}", (img * 1.7 - 0.2 * (img != 0)).astype(np.float32), lab))
        return out

    monkeypatch.setattr(s2r_mod, "synthetic_pool", pool)


def _cfg(data: Path, out: Path, *extra: str, steps: int = 4, labelled: bool = True) -> Config:
    return _s2r(f"data.root={data / 'labeled' if labelled else 'null'}",
                f"data.unlabeled_root={data / 'unlabeled'}",
                f"data.cache_dir={data / 'cache'}", "data.spacing=[2.0,2.0,2.0]", f"out_dir={out}",
                f"train.steps={steps}", *extra)


@pytest.mark.usefixtures("tiny_pool")
def test_sim2real_run_logs_sources_alignment_and_resumes_exactly(data: Path, tmp_path: Path) -> None:
    cfg = _cfg(data, tmp_path / "a", "train.deterministic=true")
    train(cfg, progress=False)
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    import json

    recs = [json.loads(x) for x in lines]
    assert len(recs) == 4
    for r in recs:
        assert r["s2r_real"] + r["s2r_synthetic"] + r["s2r_injected"] == 2
        assert 0.0 <= r["s2r_domain_acc"] <= 1.0 and r["s2r_align_loss"] > 0
    state = load_checkpoint(tmp_path / "a" / "latest.pt")
    assert state["aligner"] is not None
    # killed after step 2, resumed: the same weights (model and domain classifier) as uninterrupted
    b = with_overrides(cfg, [f"out_dir={tmp_path / 'b'}"])
    train(b, progress=False, stop_at=3)
    train(b, resume=True, progress=False)
    other = load_checkpoint(tmp_path / "b" / "latest.pt")
    for k, v in state["model"].items():
        assert torch.equal(v, other["model"][k]), k
    for k, v in state["aligner"].items():
        assert torch.equal(v, other["aligner"][k]), k


@pytest.mark.usefixtures("tiny_pool")
@pytest.mark.parametrize("method", ["mmd", "coral"])
def test_moment_matching_alignment_trains(data: Path, tmp_path: Path, method: str) -> None:
    train(_cfg(data, tmp_path / method, f"sim2real.align.method={method}", "sim2real.align.schedule=constant",
               steps=2), progress=False)
    import json

    recs = [json.loads(line) for line in (tmp_path / method / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "s2r_align_loss" in r]
    assert len(recs) == 2  # one per step
    for rec in recs:
        # synthetic and real patches give different features: a strictly positive, finite distance
        # (an alignment term fed one domain twice, or skipped, logs 0)
        assert 0 < rec["s2r_align_loss"] < float("inf")
        assert rec["s2r_align_weight"] == pytest.approx(0.1)


@pytest.mark.usefixtures("tiny_pool")
def test_zero_labelled_cases_train_on_synthetic_and_injected_only(data: Path, tmp_path: Path) -> None:
    cfg = _cfg(data, tmp_path / "z", labelled=False, steps=3)
    train(cfg, progress=False)
    import json

    recs = [json.loads(x) for x in (tmp_path / "z" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["s2r_real"] == 0 for r in recs)
    assert sum(r["s2r_injected"] for r in recs) > 0 and sum(r["s2r_synthetic"] for r in recs) > 0
    # the baseline still needs labelled cases
    with pytest.raises(MensegError, match="data.root"):
        train(load_config("baseline", [*TINY[:9], f"out_dir={tmp_path / 'base'}"]), progress=False)


@pytest.mark.usefixtures("tiny_pool")
def test_injection_only_without_unlabelled_scans_and_a_missing_source_is_refused(
    data: Path, tmp_path: Path
) -> None:
    cfg = _cfg(data, tmp_path / "i", "sim2real.inject.share=1.0", "sim2real.align.method=none", steps=2)
    cfg = with_overrides(cfg, ["data.unlabeled_root=null"])
    train(cfg, progress=False)
    # injection only, but no real scan to inject into
    bad = with_overrides(cfg, [f"out_dir={tmp_path / 'j'}", "data.root=null"])
    with pytest.raises(MensegError, match="injected"):
        train(bad, progress=False)


def test_both_config_combines_ism_and_sim2real() -> None:
    both = load_config("both")
    ism, s2r = load_config("ism"), load_config("sim2real")
    assert both.ism == ism.ism and both.sim2real == s2r.sim2real
    assert (both.model, both.train, both.aug) == (ism.model, ism.train, ism.aug) == (s2r.model, s2r.train,
                                                                                      s2r.aug)


@pytest.mark.usefixtures("tiny_pool")
def test_injection_into_labelled_scans_only(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    cfg = _cfg(data, tmp_path / "l", "sim2real.inject.enabled=true", "sim2real.inject.into=labelled",
               "sim2real.align.method=none", steps=1)
    with caplog.at_level(logging.INFO, logger="menseg.train.sim2real"):
        train(cfg, progress=False)
    assert "from 2 labelled and 0 unlabelled real scans" in caplog.text
    caplog.clear()
    # no labels: unlabelled hosts
    zero = with_overrides(cfg, [f"out_dir={tmp_path / 'l0'}", "data.root=null"])
    with caplog.at_level(logging.INFO, logger="menseg.train.sim2real"):
        train(zero, progress=False)
    assert "from 0 labelled and 2 unlabelled real scans" in caplog.text


@pytest.mark.usefixtures("tiny_pool")
def test_both_trains_ism_mixing_on_mixed_batches(data: Path, tmp_path: Path) -> None:
    import json

    cfg = load_config("both", [
        *TINY, f"data.root={data / 'labeled'}", f"data.unlabeled_root={data / 'unlabeled'}",
        f"data.cache_dir={data / 'cache'}", "data.spacing=[2.0,2.0,2.0]", f"out_dir={tmp_path / 'both'}",
        "train.steps=2", "ism.spatial.levels=[1]", "ism.temporal.level=1", "ism.spatial.p=1.0",
        "ism.spatial.sources=[batch,location]"])
    train(cfg, progress=False)
    recs = [json.loads(x) for x in (tmp_path / "both" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["ism_mixed"] == 2 for r in recs)
    assert all(r["s2r_real"] + r["s2r_synthetic"] + r["s2r_injected"] == 2 for r in recs)
    assert all("s2r_align_loss" in r for r in recs)
