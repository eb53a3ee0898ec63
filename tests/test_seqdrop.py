"""Sequence dropout (``seqdrop``): the draw, the presence input, training on incomplete cases, prediction
from any subset, and what older runs and checkpoints (made before it existed) still do."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from menseg.checkpoint import load_model, save_checkpoint
from menseg.config import Config, ModelConfig, accepts_subsets, load_config, presence_input, to_dict
from menseg.data.phantom import write_phantom_dataset
from menseg.errors import MensegError
from menseg.nets import PresenceStem, build_network
from menseg.nets import accepts_subsets as model_accepts_subsets
from menseg.train.seqdrop import SeqDropPart, present_channels

TINY = ["model.filters=[4,8,16]", "model.deep_supr_num=1", "train.patch_size=[16,16,16]",
        "train.batch_size=2", "train.checkpoint_every=2", "data.val_fraction=0", "infer.overlap=0"]


def _part(seed: int = 0, shard: range = range(4), **seqdrop: object) -> SeqDropPart:
    cfg = load_config(None, [f"train.seed={seed}", "seqdrop.enabled=true",  # the dataclass's schedule
                             *(f"seqdrop.{k}={v}" for k, v in seqdrop.items())])
    part = SeqDropPart(cfg)
    part.shard = shard
    return part


def test_packaged_configs_train_a_companion_and_modal_fusion_replaces_it() -> None:
    from menseg.config import companion_steps, has_companion

    assert not presence_input(Config()) and not accepts_subsets(Config())  # the dataclass: no dropout
    base = load_config("baseline")
    assert has_companion(base) and accepts_subsets(base) and not presence_input(base)
    assert companion_steps(base) == base.train.steps // 4
    assert companion_steps(load_config("baseline", ["seqdrop.companion_steps=7"])) == 7
    joint = load_config("baseline", ["seqdrop.companion_fraction=0"])
    assert presence_input(joint) and accepts_subsets(joint) and not has_companion(joint)
    modal = load_config("ism-modal")
    assert not presence_input(modal) and not has_companion(modal) and accepts_subsets(modal)
    assert not accepts_subsets(load_config("baseline", ["seqdrop.enabled=false"]))
    with pytest.raises(MensegError, match=r"seqdrop.p_drop must be in \[0, 1\]"):
        load_config("baseline", ["seqdrop.p_drop=1.5"])


def test_the_draw_replays_never_empties_a_sample_and_follows_the_global_index() -> None:
    img = torch.randn(4, 4, 8, 8, 8)
    a, _ = _part(p_drop=1.0).mix_batch(7, img, torch.zeros(4, 8, 8, 8), torch.zeros(4))
    b, _ = _part(p_drop=1.0).mix_batch(7, img, torch.zeros(4, 8, 8, 8), torch.zeros(4))
    torch.testing.assert_close(a, b)  # replayable from the seed and the step
    kept = present_channels(a)
    assert kept.any(dim=1).all() and not kept.all(dim=1).any()  # every sample lost 1-3, kept >= 1
    for b_, c in zip(*torch.nonzero(~kept, as_tuple=True), strict=True):
        assert bool((a[b_, c] == 0).all())
    for b_, c in zip(*torch.nonzero(kept, as_tuple=True), strict=True):
        torch.testing.assert_close(a[b_, c], img[b_, c])  # kept sequences are untouched
    # DDP: a rank holding global samples 2 and 3 drops exactly what one process dropped for them
    rank1 = _part(p_drop=1.0, shard=range(2, 4))
    half, _ = rank1.mix_batch(7, img[2:], torch.zeros(2, 8, 8, 8), torch.zeros(2))
    torch.testing.assert_close(half, a[2:])
    c, _ = _part(p_drop=1.0).mix_batch(8, img, torch.zeros(4, 8, 8, 8), torch.zeros(4))
    assert not torch.equal(present_channels(c), kept)  # another step, another draw
    # a sample that has only t1c (an incomplete case) is never left with nothing
    only = img.clone()
    only[:, 1:] = 0
    for step in range(20):
        out, _ = _part(p_drop=1.0).mix_batch(step, only, torch.zeros(4, 8, 8, 8), torch.zeros(4))
        torch.testing.assert_close(out, only)
    none, _ = _part(p_drop=0.0).mix_batch(3, img, torch.zeros(4, 8, 8, 8), torch.zeros(4))
    assert none is img


def test_archive_subsets_late_start_and_unseen_regions() -> None:
    """The schedule options: a dropping sample keeps one of seqdrop.subsets; nothing is dropped before
    seqdrop.start_fraction of the steps; with mask_unseen a sample without t1c supervises WT only."""
    img = torch.randn(4, 4, 8, 8, 8)
    lab = torch.zeros(4, 8, 8, 8)
    part = _part(p_drop=1.0, subsets="[t1c,t2f,t1n+t2f+t2w]", mask_unseen="true")
    allowed = {(True, False, False, False), (False, False, True, False), (False, True, True, True)}
    seen = set()
    for step in range(30):
        out, _ = part.mix_batch(step, img, lab, torch.zeros(4))
        kept = present_channels(out)
        seen |= {tuple(bool(v) for v in row) for row in kept}
        regions = part.supervised_regions(lab)
        assert torch.equal(regions[:, 0], kept[:, 0]) and torch.equal(regions[:, 1], kept[:, 0])
        assert bool(regions[:, 2].all())  # WT always supervised
        twin = _part(p_drop=1.0, subsets="[t1c,t2f,t1n+t2f+t2w]")
        again, _ = twin.mix_batch(step, img, lab, torch.zeros(4))
        torch.testing.assert_close(again, out)  # replayable
    assert seen == allowed  # only those subsets, each drawn
    late = _part(p_drop=1.0, start_fraction=0.5)
    steps = late.cfg.train.steps
    before, _ = late.mix_batch(steps // 2 - 1, img, lab, torch.zeros(4))
    assert before is img
    after, _ = late.mix_batch(steps // 2, img, lab, torch.zeros(4))
    assert not present_channels(after).all()
    assert _part(p_drop=1.0).supervised_regions(lab) is None  # off by default: every region counts
    for bad, why in (("[t1c,flair]", "seqdrop.subsets"), ("[' ']", "seqdrop.subsets")):
        with pytest.raises(MensegError, match=why):
            load_config("baseline", [f"seqdrop.subsets={bad}"])
    with pytest.raises(MensegError, match="seqdrop.start_fraction"):
        load_config("baseline", ["seqdrop.start_fraction=1.0"])


def test_region_mask_leaves_unseen_regions_out_of_the_loss() -> None:
    """A region a sample does not supervise gets no gradient and does not change the loss."""
    from menseg.train.losses import RegionDiceBCELoss

    loss = RegionDiceBCELoss()
    lab = torch.zeros(2, 8, 8, 8, dtype=torch.long)
    lab[:, 2:6, 2:6, 2:6] = 3
    logits = torch.randn(2, 3, 8, 8, 8, requires_grad=True)
    regions = torch.tensor([[False, False, True], [True, True, True]])
    loss(logits, lab, None, regions).backward()
    assert float(logits.grad[0, :2].abs().sum()) == 0.0 and float(logits.grad[0, 2].abs().sum()) > 0
    assert float(logits.grad[1].abs().sum()) > 0
    moved = logits.detach().clone()
    moved[0, :2] += 5.0  # sample 0's ET / TC outputs do not count
    torch.testing.assert_close(loss(moved, lab, None, regions), loss(logits.detach(), lab, None, regions))
    everything = torch.ones(2, 3, dtype=torch.bool)  # all regions: the unmasked loss
    torch.testing.assert_close(loss(logits.detach(), lab, None, everything), loss(logits.detach(), lab))


def test_visit_pairs_lose_the_same_sequences_in_both_visits() -> None:
    img = torch.randn(4, 8, 8, 8, 8)
    out, _ = _part(p_drop=1.0).mix_batch(0, img, torch.zeros(4, 8, 8, 8), torch.zeros(4))
    assert torch.equal(present_channels(out[:, :4]), present_channels(out[:, 4:]))


def test_the_presence_stem_appends_which_sequences_a_sample_has() -> None:
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x)
            return x

    x = torch.randn(2, 4, 6, 6, 6)
    x[0, 2] = 0.0
    x[1, 0, :3] = 0.0  # zero only in part of the patch: still present
    PresenceStem(Probe())(x)
    (y,) = seen
    assert y.shape == (2, 8, 6, 6, 6)
    torch.testing.assert_close(y[:, :4], x)
    assert y[0, 4:].flatten(1).mean(1).tolist() == [1.0, 1.0, 0.0, 1.0]
    assert y[1, 4:].flatten(1).mean(1).tolist() == [1.0, 1.0, 1.0, 1.0]
    net = build_network(ModelConfig(filters=(4, 8, 16), deep_supr_num=1), patch_size=(16,) * 3, presence=True)
    assert model_accepts_subsets(net) and net.input_block is net.skip_layers.downsample
    plain = build_network(ModelConfig(filters=(4, 8, 16), deep_supr_num=1), patch_size=(16,) * 3)
    assert not model_accepts_subsets(plain)
    assert net.eval()(torch.randn(1, 4, 16, 16, 16)).shape == (1, 3, 16, 16, 16)


def _incomplete_dataset(root: Path) -> Path:
    """Four labelled phantoms; one lacks t2f and t2w, one has t1c only."""
    write_phantom_dataset(root, n_cases=4, shape=(24, 24, 24), seed=5)
    cases = sorted(p for p in root.iterdir() if p.is_dir())
    for folder, drop in ((cases[1], ("t2f", "t2w")), (cases[2], ("t1n", "t2f", "t2w"))):
        for m in drop:
            (folder / f"{folder.name}-{m}.nii.gz").unlink()
    return root


def test_training_on_incomplete_cases_and_predicting_any_subset(tmp_path: Path) -> None:
    from menseg.infer.predict import predict, sidecar_path
    from menseg.train.trainer import train

    data = _incomplete_dataset(tmp_path / "data")
    run = tmp_path / "run"
    train(load_config("baseline", [*TINY, f"data={data}", f"out_dir={run}", "train.steps=4",
                                   "seqdrop.enabled=true", "seqdrop.companion_fraction=0"]), progress=False)
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("seqdrop_dropped" in r for r in recs)
    model, _ = load_model(run / "latest.pt")
    assert model_accepts_subsets(model)
    full = sorted(p for p in data.iterdir() if p.is_dir())[0]
    case = tmp_path / "in" / full.name
    shutil.copytree(full, case)
    for m in ("t1n", "t2f", "t2w"):
        (case / f"{full.name}-{m}.nii.gz").unlink()
    (out,) = predict(run / "latest.pt", case, tmp_path / "t1c-only.nii.gz", progress=False)
    side = json.loads(sidecar_path(out).read_text())
    assert side["sequences_used"] == ["t1c"] and side["sequences_missing"] == ["t1n", "t2f", "t2w"]
    # without dropout the same incomplete dataset is refused at discovery, as before
    with pytest.raises(MensegError, match="missing modality"):
        train(load_config("baseline", [*TINY, f"data={data}", f"out_dir={tmp_path / 'off'}",
                                       "train.steps=1", "seqdrop.enabled=false"]), progress=False)


def test_a_companion_predicts_incomplete_scans_and_the_network_complete_ones(tmp_path: Path) -> None:
    from menseg.checkpoint import load_checkpoint
    from menseg.infer.predict import predict, sidecar_path
    from menseg.train.trainer import train

    data = _incomplete_dataset(tmp_path / "data")
    run = tmp_path / "run"
    cfg = load_config("baseline", [*TINY, f"data={data}", f"out_dir={run}", "train.steps=4",
                                   "seqdrop.enabled=true", "seqdrop.companion_steps=3", "seqdrop.p_drop=1.0"])
    assert accepts_subsets(cfg) and not presence_input(cfg)  # the network itself trains without dropout
    train(cfg, progress=False, stop_at=2)  # killed during the network: no companion yet
    assert not (run / "companion").exists()
    train(cfg, resume=True, progress=False)
    main, _ = load_model(run / "latest.pt")
    comp, ccfg = load_model(run / "companion" / "latest.pt")
    assert not model_accepts_subsets(main) and model_accepts_subsets(comp)
    assert ccfg.train.steps == 3 and ccfg.train.lr == cfg.seqdrop.companion_lr and ccfg.model.init
    recs = [json.loads(x) for x in (run / "companion" / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 3 and all(r["seqdrop_dropped"] >= 1 for r in recs)  # p_drop 1 (a t1c-only case
    # has nothing to lose)
    assert "seqdrop_dropped" not in json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert load_checkpoint(run / "companion" / "latest.pt")["step"] == 3
    full = sorted(p for p in data.iterdir() if p.is_dir())[0]
    case = tmp_path / "in" / full.name
    shutil.copytree(full, case)
    (out,) = predict(run, case, tmp_path / "complete.nii.gz", progress=False)
    assert json.loads(sidecar_path(out).read_text())["model"] == str(run / "latest.pt")
    for m in ("t1n", "t2f", "t2w"):
        (case / f"{full.name}-{m}.nii.gz").unlink()
    (out,) = predict(run, case, tmp_path / "t1c-only.nii.gz", progress=False)
    assert json.loads(sidecar_path(out).read_text())["model"] == str(run / "companion" / "latest.pt")
    # an exported model carries its companion in the one file
    from menseg.models import export_model

    entry = export_model(run, "with-companion", tmp_path / "lib")
    (out,) = predict(entry.weights, case, tmp_path / "exported.nii.gz", progress=False)
    assert json.loads(sidecar_path(out).read_text())["model"] == f"{entry.weights}#companion"
    shutil.rmtree(run / "companion")
    with pytest.raises(MensegError, match="a companion for incomplete scans, but .*companion is missing"):
        export_model(run, "without", tmp_path / "lib")
    with pytest.raises(MensegError, match="a companion for incomplete scans, but .*companion is missing"):
        predict(run, case, tmp_path / "again.nii.gz", progress=False)


def test_checkpoints_and_runs_from_before_sequence_dropout(tmp_path: Path) -> None:
    from menseg.train.trainer import train

    # a checkpoint written before the key existed: its stored config has no seqdrop section
    cfg = load_config("baseline", [*TINY, "seqdrop.enabled=false"])
    net = build_network(cfg.model, patch_size=cfg.train.patch_size)
    stored = to_dict(cfg)
    del stored["seqdrop"]
    path = tmp_path / "old.pt"
    save_checkpoint(path, {"model": net.state_dict(), "config": stored, "step": 0})
    model, loaded = load_model(path)
    assert not loaded.seqdrop.enabled and not model_accepts_subsets(model)
    # an old run folder resumes as what it was; switching dropout on for it is refused in one line
    data = tmp_path / "data"
    write_phantom_dataset(data, n_cases=2, shape=(24, 24, 24), seed=1)
    run = tmp_path / "run"
    old = [*TINY, f"data={data}", f"out_dir={run}", "train.steps=4", "seqdrop.enabled=false"]
    train(load_config("baseline", old), stop_at=2, progress=False)
    ck = torch.load(run / "latest.pt", weights_only=False)
    del ck["config"]["seqdrop"]
    save_checkpoint(run / "latest.pt", ck)
    with pytest.raises(MensegError, match=r"cannot resume: config differs from the run's in .*seqdrop\.enab"):
        train(load_config("baseline", [*old, "seqdrop.enabled=true"]), resume=True, progress=False)
    train(load_config("baseline", old), resume=True, progress=False)
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_a_benchmark_started_before_the_key_pins_it_and_goes_on(tmp_path: Path) -> None:
    from menseg.bench import efficiency as eff

    older = {"train.steps": 3}
    assert eff._protocol_value("budget", {"train.steps": 3, "seqdrop.enabled": False}, older) == older
    assert eff._protocol_value("budget", {"train.steps": 3, "seqdrop.enabled": True}, older) != older
    assert eff._protocol_value("budget", {"train.steps": 4}, older) != older
    data = tmp_path / "data"
    write_phantom_dataset(data, n_cases=4, shape=(16, 16, 16), seed=0)
    prof = eff.load_profile("quick")
    bench = eff.resolve_data(prof, data, None, 2, [1])
    (run,) = eff.plan_runs(tmp_path / "b", ["baseline"], [1], [0], prof, bench, ["seqdrop.enabled=false"])
    before = {k: v for k, v in run.identity().items() if not k.startswith("seqdrop.")}
    assert run.differences(before) == []  # a run finished before the key: it had no dropout
    (now,) = eff.plan_runs(tmp_path / "b", ["baseline"], [1], [0], prof, bench, ["seqdrop.enabled=true"])
    assert "seqdrop.enabled" in now.differences(before)  # with dropout it is another run


def test_every_packaged_config_takes_the_baselines_sequence_handling() -> None:
    names = ("baseline", "ism", "sim2real", "both", "carvemix", "tumorcp", "demo", "pretrain")
    assert all(load_config(n).seqdrop == load_config("baseline").seqdrop for n in names)


def test_the_demo_reports_the_test_cases_from_t1c_alone(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "menseg", "demo", "--out", str(out), "--steps", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(line for line in r.stdout.splitlines() if "lesion_dice, t1c alone" in line)
    assert len([x for x in row.replace("│", " ").split() if x.replace(".", "").isdigit()]) == 3
    sides = [json.loads(p.read_text()) for p in (out / "predictions-t1c").glob("*.json")]
    assert sides and all(s["sequences_used"] == ["t1c"] and s["sequences_ignored"] == ["t1n", "t2f", "t2w"]
                         for s in sides)
    assert (out / "evaluation-t1c" / "metrics.csv").is_file()
