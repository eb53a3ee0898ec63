"""evaluate_folders: layouts, CSV + summary outputs, errors naming the case."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from menseg.data.io import write_label
from menseg.errors import MensegError
from menseg.evaluate.metrics import metric_names
from menseg.evaluate.runner import evaluate_folders, find_reference_labels

SHAPE = (20, 20, 12)
AFFINE = np.diag([2.0, 1.0, 1.0, 1.0])  # 2 mm along x


def _ref_label() -> np.ndarray:
    lab = np.zeros(SHAPE, np.uint8)
    lab[2:8, 2:8, 2:8] = 2
    lab[3:7, 3:7, 3:7] = 1
    lab[4:6, 4:6, 4:6] = 3
    return lab


def _write_brats_refs(root: Path, cases: dict[str, np.ndarray]) -> Path:
    for cid, lab in cases.items():
        write_label(root / cid / f"{cid}-seg.nii.gz", lab, AFFINE)
    return root


def _write_flat(root: Path, cases: dict[str, np.ndarray], suffix: str = "", affine=AFFINE):
    for cid, lab in cases.items():
        write_label(root / f"{cid}{suffix}.nii.gz", lab, affine)
    return root


@pytest.fixture
def refs() -> dict[str, np.ndarray]:
    return {"MEN-001": _ref_label(), "MEN-002": _ref_label()}


def test_brats_layout_csv_and_summary(tmp_path, refs):
    ref_dir = _write_brats_refs(tmp_path / "ref", refs)
    fp = _ref_label()
    fp[14:17, 14:17, 8:11] = 3  # a false-positive ET lesion in case 2
    pred_dir = _write_flat(tmp_path / "pred", {"MEN-001": _ref_label(), "MEN-002": fp})
    _write_flat(tmp_path / "pred", {"MEN-999": _ref_label()})  # no reference: skipped
    out = tmp_path / "eval"
    summary = evaluate_folders(pred_dir, ref_dir, out)

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["case_id"] for r in rows] == ["MEN-001", "MEN-002"]
    assert list(rows[0]) == ["case_id", *metric_names()]
    assert float(rows[0]["ET_lesion_dice"]) == 1.0
    # 8 ET voxels of 2 mm^3 = 16 mm^3 (spacing from the reference affine): the ET lesion
    # is <= 50 mm^3 and ignored, so case 1 scores 1 (nothing counted, no FP) and case 2's
    # ET score is the FP alone: 0 / (0 + 1).
    assert float(rows[0]["ET_ref_volume_mm3"]) == 16.0
    assert float(rows[1]["ET_lesion_dice"]) == 0.0
    assert float(rows[1]["ET_lesion_hd95"]) == 374.0
    # WT lesion (216 voxels = 432 mm^3) is counted: 1 / (1 + 1 FP)
    assert float(rows[1]["WT_lesion_dice"]) == pytest.approx(0.5)

    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["n_cases"] == summary["n_cases"] == 2
    assert on_disk["mean"]["WT_lesion_dice"] == pytest.approx(0.75)
    assert on_disk["median"]["WT_lesion_dice"] == pytest.approx(0.75)
    assert on_disk["std"]["WT_lesion_dice"] == pytest.approx(np.std([1.0, 0.5], ddof=1))
    assert on_disk["mean"]["WT_dice"] < 1.0
    assert set(on_disk["mean"]) == set(metric_names())
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("suffix", ["", "-seg"])
def test_flat_reference_folder(tmp_path, refs, suffix):
    ref_dir = _write_flat(tmp_path / "ref", refs, suffix)
    pred_dir = _write_flat(tmp_path / "pred", refs)
    summary = evaluate_folders(pred_dir, ref_dir, tmp_path / "eval")
    assert summary["n_cases"] == 2
    assert summary["mean"]["WT_dice"] == 1.0 and summary["std"]["WT_dice"] == 0.0


def test_duplicate_case_ids_rejected(tmp_path, refs):
    ref_dir = _write_flat(tmp_path / "ref", refs)
    _write_flat(ref_dir, {"MEN-001": _ref_label()}, "-seg")
    with pytest.raises(MensegError, match="duplicate case id 'MEN-001'"):
        find_reference_labels(ref_dir)


def test_missing_prediction_names_case(tmp_path, refs):
    ref_dir = _write_brats_refs(tmp_path / "ref", refs)
    pred_dir = _write_flat(tmp_path / "pred", {"MEN-001": _ref_label()})
    out = tmp_path / "eval"
    with pytest.raises(MensegError, match="MEN-002"):
        evaluate_folders(pred_dir, ref_dir, out)
    assert not (out / "metrics.csv").exists() and not (out / "summary.json").exists()


def test_shape_mismatch_names_case(tmp_path, refs):
    ref_dir = _write_brats_refs(tmp_path / "ref", refs)
    pred_dir = _write_flat(tmp_path / "pred", {"MEN-001": _ref_label()})
    _write_flat(pred_dir, {"MEN-002": np.zeros((20, 20, 10), np.uint8)})
    with pytest.raises(MensegError, match="case MEN-002: prediction shape"):
        evaluate_folders(pred_dir, ref_dir, tmp_path / "eval")
    assert not (tmp_path / "eval" / "metrics.csv").exists()


def test_affine_mismatch_names_case(tmp_path, refs):
    ref_dir = _write_brats_refs(tmp_path / "ref", refs)
    pred_dir = _write_flat(tmp_path / "pred", {"MEN-001": _ref_label()})
    _write_flat(pred_dir, {"MEN-002": _ref_label()}, affine=np.eye(4))
    with pytest.raises(MensegError, match="case MEN-002: prediction affine"):
        evaluate_folders(pred_dir, ref_dir, tmp_path / "eval")


def test_missing_folders_and_seg(tmp_path, refs):
    with pytest.raises(MensegError, match="reference folder not found"):
        evaluate_folders(tmp_path / "pred", tmp_path / "nope", tmp_path / "eval")
    ref_dir = _write_brats_refs(tmp_path / "ref", refs)
    with pytest.raises(MensegError, match="prediction folder not found"):
        evaluate_folders(tmp_path / "nope", ref_dir, tmp_path / "eval")
    # folders without any NIfTI (previews, sidecars) are not cases and are skipped
    (ref_dir / "preview").mkdir()
    (ref_dir / "preview" / "MEN-001.png").write_bytes(b"png")
    assert list(find_reference_labels(ref_dir)) == ["MEN-001", "MEN-002"]
    # a case folder with images but no label is an error naming the missing file
    write_label(ref_dir / "MEN-003" / "MEN-003-t1c.nii.gz", _ref_label(), AFFINE)
    with pytest.raises(MensegError, match="MEN-003-seg.nii.gz"):
        find_reference_labels(ref_dir)
