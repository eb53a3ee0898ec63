"""Learned post-processing: the choice on hand-drawn predictions, the nesting of its result, the rules in
the final checkpoint, their use by predict, and a run killed before they were written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from menseg.checkpoint import load_checkpoint
from menseg.config import load_config
from menseg.data.phantom import write_phantom_dataset
from menseg.infer.postprocess import apply_learned, learn_postprocess

SP = (1.0, 1.0, 1.0)


def _case(fp: tuple[slice, slice, slice] | None = None) -> tuple[np.ndarray, np.ndarray]:
    ref = np.zeros((40, 40, 40), np.uint8)
    ref[10:20, 10:20, 10:20] = 2  # SNFH shell, ET core: WT 1000 voxels
    ref[13:17, 13:17, 13:17] = 3
    pred = ref.copy()
    if fp is not None:
        pred[fp] = 2  # a false-positive oedema component
    return pred, ref


def test_a_small_false_positive_learns_a_size_filter_and_nothing_else_changes() -> None:
    preds, refs = zip(*[_case((slice(30, 32), slice(30, 32), slice(30, 32))) for _ in range(3)], strict=True)
    rules = learn_postprocess(preds, refs, SP)
    wt = rules["WT"]
    assert wt["dice_without"] == pytest.approx(0.5) and wt["dice"] == pytest.approx(1.0)
    assert 8 < wt["min_mm3"] <= 30 and wt["keep_largest"] is False  # the gentlest filter that removes 8 mm3
    # ET and TC had no false positive: nothing chosen there
    assert rules["ET"]["min_mm3"] == 0.0 and not rules["ET"]["keep_largest"]
    out = apply_learned(preds[0], SP, rules)
    assert np.array_equal(out, refs[0])


def test_a_large_false_positive_learns_keep_largest() -> None:
    preds, refs = zip(*[_case((slice(25, 33), slice(25, 33), slice(25, 33))) for _ in range(2)], strict=True)
    rules = learn_postprocess(preds, refs, SP, candidates=(0.0, 10.0, 100.0))  # 512 voxels: above them all
    assert rules["WT"]["keep_largest"] is True and rules["WT"]["dice"] == pytest.approx(1.0)
    clean = [_case() for _ in range(2)]
    same = learn_postprocess([p for p, _ in clean], [r for _, r in clean], SP)
    assert all(v["min_mm3"] == 0.0 and not v["keep_largest"] for v in same.values())  # no gain: no rule
    with pytest.raises(ValueError):
        learn_postprocess([], [], SP)


def test_rules_keep_the_regions_nested() -> None:
    pred, _ = _case()
    pred[30:33, 30:33, 30:33] = 3  # an isolated ET speck of 27 voxels (ET, TC and WT at once)
    rules = {r: {"min_mm3": 0.0, "keep_largest": False} for r in ("ET", "TC", "WT")}
    rules["WT"] = {"min_mm3": 100.0, "keep_largest": False}
    out = apply_learned(pred, SP, rules)
    assert not out[30:33, 30:33, 30:33].any()  # its WT component went, so its ET and TC went with it
    assert (out[13:17, 13:17, 13:17] == 3).all()


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pp")
    write_phantom_dataset(root / "data", n_cases=3, shape=(32, 32, 24), seed=6)
    return root


def _cfg(data: Path, out: Path, *extra: str):  # type: ignore[no-untyped-def]
    return load_config("baseline", [
        "model.filters=[4,8,16]", "model.deep_supr_num=1", "train.patch_size=[16,16,16]", "train.steps=4",
        "train.batch_size=2", "train.val_every=100", "train.checkpoint_every=2", "data.val_fraction=0.34",
        f"data={data / 'data'}", f"data.cache_dir={data / 'cache'}", f"out_dir={out}",
        "postprocess.learn=true", *extra])


def test_a_run_stores_its_rules_and_predict_applies_them(data: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from menseg.infer.predict import predict
    from menseg.train.trainer import train

    run = train(_cfg(data, tmp_path / "run"), progress=False)
    pp = load_checkpoint(run / "latest.pt")["postprocess"]
    assert pp["chosen_on"] == "validation" and pp["n_cases"] == 1
    assert set(pp["rules"]) == {"ET", "TC", "WT"}
    assert all(set(v) == {"min_mm3", "keep_largest", "dice", "dice_without"} for v in pp["rules"].values())
    assert all(v["dice"] >= v["dice_without"] for v in pp["rules"].values())
    case = sorted((data / "data").iterdir())[0]
    with caplog.at_level(logging.INFO, logger="menseg.infer.predict"):
        predict(run / "latest.pt", case, tmp_path / "a.nii.gz", device="cpu", progress=False)
    assert "learned post-processing" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="menseg.infer.predict"):
        predict(run / "latest.pt", case, tmp_path / "b.nii.gz", device="cpu", progress=False,
                learned_postprocess=False)
    assert "components < 10 mm3 removed" in caplog.text
    # without learn, no rules: predict falls back to the fixed filter
    plain = train(_cfg(data, tmp_path / "plain", "postprocess.learn=false"), progress=False)
    assert "postprocess" not in load_checkpoint(plain / "latest.pt")


def test_a_run_killed_before_its_rules_were_written_gets_them_on_resume(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from menseg.train import postprocess as pp_mod
    from menseg.train.trainer import train

    cfg = _cfg(data, tmp_path / "k", "data.val_fraction=0", "data.val_cases=[]")

    def killed(self, run, model):  # type: ignore[no-untyped-def]
        raise RuntimeError("killed")

    monkeypatch.setattr(pp_mod.PostprocessPart, "finish", killed)
    with pytest.raises(RuntimeError, match="killed"):
        train(cfg, progress=False)
    assert "postprocess" not in load_checkpoint(tmp_path / "k" / "latest.pt")  # the step-2 checkpoint
    monkeypatch.undo()
    train(cfg, resume=True, progress=False)
    pp = load_checkpoint(tmp_path / "k" / "latest.pt")["postprocess"]
    assert pp["chosen_on"] == "training" and pp["n_cases"] == 3  # no validation cases: the training ones
