"""Copy-paste competitors: CarveMix's carved region on hand-drawn masks, its lambda range, replay of the
part's mixing, labels carried with the pasted voxels, and a training run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from menseg.config import load_config
from menseg.data.phantom import write_phantom_dataset
from menseg.data.sampling import PatchSampler
from menseg.train.copypaste import (
    CarveMixPart,
    TumorCPPart,
    carve_region,
    sample_lambda,
    shift_volume,
    signed_distance,
)
from menseg.train.parts import TrainSetup, build_parts

SP = (2.0, 2.0, 2.0)


def _ball(shape: tuple[int, int, int], centre: tuple[int, int, int], radius_vox: float) -> np.ndarray:
    g = np.indices(shape)
    return sum((g[i] - centre[i]) ** 2 for i in range(3)) <= radius_vox**2


def test_signed_distance_is_negative_inside_positive_outside_in_mm() -> None:
    m = np.zeros((9, 9, 9), bool)
    m[4, 4, 2:7] = True  # a 5-voxel rod along z
    d = signed_distance(m, (1.0, 2.0, 3.0))
    assert d[4, 4, 4] == -1.0  # inside: the nearest outside voxel is 1 voxel away along x, 1 mm
    assert d[5, 4, 4] == 1.0 and d[4, 5, 4] == 2.0 and d[4, 4, 7] == 3.0  # one voxel off, per axis spacing
    assert np.isinf(signed_distance(np.zeros((3, 3, 3), bool), SP)).all()


def test_carved_region_is_the_lesion_at_zero_grown_or_eroded_by_lambda_mm() -> None:
    lab = np.zeros((24, 24, 24), np.uint8)
    ball = _ball(lab.shape, (12, 12, 12), 5)
    lab[ball] = 2
    lab[_ball(lab.shape, (12, 12, 12), 3)] = 3
    assert np.array_equal(carve_region(lab, 0.0, SP), ball)
    grown = carve_region(lab, 4.0, SP)  # 4 mm = 2 voxels at 2 mm
    assert (grown >= ball).all() and np.array_equal(grown, signed_distance(ball, SP) < 4.0)
    assert grown[12, 12, 12 + 6] and not grown[12, 12, 12 + 8]  # 1 and 3 voxels outside the ball
    eroded = carve_region(lab, -4.0, SP)
    assert (eroded <= ball).all() and eroded[12, 12, 12] and not eroded[12, 12, 12 + 4]
    rng = np.random.default_rng(0)
    r = float(-signed_distance(ball, SP).min())
    lams = [sample_lambda(rng, lab, SP) for _ in range(400)]
    assert -r / 2 <= min(lams) < -r / 4 and r * 0.75 < max(lams) <= r  # U(-r/2, r)
    assert sample_lambda(rng, np.zeros_like(lab), SP) == 0.0


def _part(p: float = 1.0, seed: int = 3, name: str = "carvemix") -> CarveMixPart:
    cfg = load_config(name, [f"{name}.p={p}", f"train.seed={seed}", "train.patch_size=[16,16,16]",
                             "data.spacing=[2.0,2.0,2.0]"])
    part = build_parts(cfg)[0]
    assert isinstance(part, CarveMixPart if name == "carvemix" else TumorCPPart)
    cases = []
    for k in range(3):
        img = np.random.default_rng(k).normal(size=(4, 20, 20, 20)).astype(np.float32)
        lab = np.zeros((20, 20, 20), np.uint8)
        lab[_ball(lab.shape, (10, 10, 10), 3 + k)] = 2
        lab[_ball(lab.shape, (10, 10, 10), 2)] = 3
        cases.append((img, lab))
    run = TrainSetup(cfg, cfg, Path("."), Path("."), torch.device("cpu"), shard=range(2))
    run.sampler = PatchSampler(cases, (16, 16, 16), 0.33)
    part.setup(run)
    return part


def test_carvemix_replays_and_carries_labels_with_the_pasted_voxels() -> None:
    part = _part()
    img = torch.zeros(2, 4, 16, 16, 16)
    lab = torch.zeros(2, 16, 16, 16, dtype=torch.uint8)
    meta = torch.zeros(2, dtype=torch.int64)
    a_img, a_lab = part.mix_batch(5, img, lab, meta)
    b_img, b_lab = part.mix_batch(5, img, lab, meta)
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)  # a pure function of (seed, step)
    assert part.batch_stats(meta) == {"carvemix_mixed": 2.0}
    assert torch.equal(img, torch.zeros_like(img))  # the input batch is not modified
    pasted = (a_img != 0).any(1)
    assert pasted.any() and (a_lab > 0).any()
    assert not ((a_lab > 0) & ~pasted).any()  # a label only where voxels were pasted (the rest was 0)
    c_img, _ = part.mix_batch(6, img, lab, meta)
    assert not torch.equal(a_img, c_img)  # another step, another draw
    # the global sample index decides: rank 1 of 2 (shard [1, 2)) mixes sample 1 as one process does
    other = _part()
    other.shard = range(1, 2)
    s_img, s_lab = other.mix_batch(5, img[1:], lab[1:], meta[1:])
    assert torch.equal(s_img[0], a_img[1]) and torch.equal(s_lab[0], a_lab[1])
    none = _part(p=0.0)
    n_img, n_lab = none.mix_batch(5, img, lab, meta)
    assert n_img is img and n_lab is lab and none.batch_stats(meta) == {"carvemix_mixed": 0.0}


def test_shift_volume_moves_content_and_fills_zeros() -> None:
    x = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(1, 4, 5, 6) + 1
    y = shift_volume(x, (1, -2, 0))
    assert torch.equal(y[0, 1:, :3, :], x[0, :3, 2:, :])
    assert (y[0, 0] == 0).all() and (y[0, :, 3:] == 0).all()
    assert (shift_volume(x, (9, 0, 0)) == 0).all()


def test_tumorcp_pastes_a_jittered_tumour_into_the_head_and_replays() -> None:
    part = _part(name="tumorcp")
    img = torch.zeros(2, 4, 16, 16, 16)
    img[:, :, 4:12, 4:12, 4:12] = 0.5  # the head: a box in the middle
    lab = torch.zeros(2, 16, 16, 16, dtype=torch.uint8)
    meta = torch.zeros(2, dtype=torch.int64)
    a_img, a_lab = part.mix_batch(7, img, lab, meta)
    b_img, b_lab = part.mix_batch(7, img, lab, meta)
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    assert part.batch_stats(meta) == {"tumorcp_mixed": 2.0}
    for b in range(2):
        pasted = a_lab[b] > 0
        assert pasted.any() and set(a_lab[b].unique().tolist()) <= {0, 2, 3}
        centre = torch.nonzero(pasted).double().mean(0)
        assert ((centre > 2.5) & (centre < 12.5)).all()  # centred in (or at the edge of) the head box
        assert torch.equal(a_img[b][:, ~pasted], img[b][:, ~pasted])  # nothing else changed
        assert not torch.isclose(a_img[b][:, pasted], torch.full_like(a_img[b][:, pasted], 0.5)).all()
    c_img, _ = part.mix_batch(8, img, lab, meta)
    assert not torch.equal(a_img, c_img)
    obj = part.object_config()
    assert obj.p_rotate == obj.p_scale == obj.p_flip == 0.5 and obj.p_elastic == obj.p_gamma == 0.0
    empty = torch.zeros_like(img)  # no head: nothing to paste into
    e_img, e_lab = part.mix_batch(7, empty, lab, meta)
    assert torch.equal(e_img, empty) and not e_lab.any()


@pytest.mark.parametrize("name", ["carvemix", "tumorcp"])
def test_copy_paste_configs_train_and_log_their_mixes(tmp_path: Path, name: str) -> None:
    from menseg.train.trainer import train

    write_phantom_dataset(tmp_path / "data", n_cases=2, shape=(24, 24, 24), seed=3)
    cfg = load_config(name, ["model.filters=[4,8,16]", "model.deep_supr_num=1", "train.steps=3",
                             "train.patch_size=[16,16,16]", "data.val_fraction=0", f"{name}.p=1.0",
                             f"data={tmp_path / 'data'}", f"out_dir={tmp_path / 'run'}"])
    train(cfg, progress=False)
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r[f"{name}_mixed"] for r in recs] == [2.0, 2.0, 2.0]


@pytest.mark.parametrize("name, bad, fragment", [
    ("carvemix", "carvemix.p=1.5", "carvemix.p must be in"), ("carvemix", "carvemix.p=-0.1", "carvemix.p"),
    ("tumorcp", "tumorcp.p=2", "tumorcp.p and p_transform"), ("tumorcp", "tumorcp.scale_range=[1.2,0.9]",
                                                              "scale_range and gain_range"),
])
def test_bad_copy_paste_settings_are_refused(name: str, bad: str, fragment: str) -> None:
    from menseg.errors import MensegError

    with pytest.raises(MensegError, match=fragment):
        load_config(name, [bad])
