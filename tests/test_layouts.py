"""Dataset layouts: discovery, single-file cases, lossless conversion."""

from __future__ import annotations

import filecmp
import json

import numpy as np
import pytest

from menseg.constants import MODALITIES
from menseg.data.layouts import (
    case_from_files,
    convert_dataset,
    detect_layout,
    discover_cases,
    discover_inputs,
)
from menseg.errors import MensegError
from nifti_factory import save, write_brats_case, write_nnunet_case


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


@pytest.fixture
def brats(tmp_path):
    root = tmp_path / "brats"
    write_brats_case(root, "BraTS-MEN-00002-000", seed=2)
    write_brats_case(root, "BraTS-MEN-00001-000", seed=1)
    write_brats_case(root, "BraTS-MEN-00003-000", seed=3, labelled=False)
    return root


def test_discover_brats(brats):
    assert detect_layout(brats) == "brats"
    cases = discover_cases(brats)
    assert [c.case_id for c in cases] == [
        "BraTS-MEN-00001-000", "BraTS-MEN-00002-000", "BraTS-MEN-00003-000"]
    c = cases[0]
    assert list(c.images) == list(MODALITIES)
    assert c.images["t2f"].name == "BraTS-MEN-00001-000-t2f.nii.gz"
    assert c.label is not None and c.label.name == "BraTS-MEN-00001-000-seg.nii.gz"
    assert cases[2].label is None
    assert len(c.files) == 5


def test_discover_nnunet(tmp_path):
    root = tmp_path / "Dataset001_MEN"
    write_nnunet_case(root, "men_002")
    write_nnunet_case(root, "men_001")
    write_nnunet_case(root, "men_009", labelled=False, images="imagesTs")
    assert detect_layout(root) == "nnunet"
    cases = discover_cases(root)
    assert [c.case_id for c in cases] == ["men_001", "men_002", "men_009"]
    assert cases[0].images["t1c"].name == "men_001_0000.nii.gz"
    assert cases[0].images["t2w"].name == "men_001_0003.nii.gz"
    assert cases[0].label.name == "men_001.nii.gz"
    assert cases[2].label is None


def test_nnunet_channel_names_mapped(tmp_path):
    root = tmp_path / "ds"
    write_nnunet_case(root, "c1")
    (root / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "FLAIR", "1": "T1", "2": "T1Gd", "3": "T2"}}))
    c = discover_cases(root)[0]
    assert c.images["t2f"].name == "c1_0000.nii.gz"
    assert c.images["t1n"].name == "c1_0001.nii.gz"
    assert c.images["t1c"].name == "c1_0002.nii.gz"
    assert c.images["t2w"].name == "c1_0003.nii.gz"


def test_single_case_folder_is_a_dataset(brats):
    cases = discover_cases(brats / "BraTS-MEN-00002-000")
    assert [c.case_id for c in cases] == ["BraTS-MEN-00002-000"]


def test_no_dataset(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(MensegError, match="no dataset found"):
        discover_cases(tmp_path)
    with pytest.raises(MensegError, match="not found"):
        discover_cases(tmp_path / "missing")


def test_missing_modality_brats(brats):
    (brats / "BraTS-MEN-00002-000" / "BraTS-MEN-00002-000-t2w.nii.gz").unlink()
    with pytest.raises(MensegError) as ei:
        discover_cases(brats)
    msg = str(ei.value)
    assert "missing modality t2w" in msg and "BraTS-MEN-00002-000-t2w.nii.gz" in msg


def test_missing_modality_nnunet(tmp_path):
    root = tmp_path / "ds"
    write_nnunet_case(root, "c1")
    (root / "imagesTr" / "c1_0002.nii.gz").unlink()
    with pytest.raises(MensegError) as ei:
        discover_cases(root)
    assert "missing modality t2f" in str(ei.value) and "c1_0002.nii.gz" in str(ei.value)


def test_duplicate_ids_brats(tmp_path):
    root = tmp_path / "ds"
    write_brats_case(root, "CASE-1")
    write_brats_case(root, "CASE-1", folder="copy_of_case")
    with pytest.raises(MensegError, match="duplicate case id 'CASE-1'"):
        discover_cases(root)


def test_duplicate_ids_nnunet(tmp_path):
    root = tmp_path / "ds"
    write_nnunet_case(root, "c1")
    save(root / "imagesTr" / "c1_0000.nii", np.random.rand(4, 4, 4))
    with pytest.raises(MensegError, match="duplicate case id 'c1'"):
        discover_cases(root)
    (root / "imagesTr" / "c1_0000.nii").unlink()
    write_nnunet_case(root, "c1", labelled=False, images="imagesTs")
    with pytest.raises(MensegError, match="duplicate case id 'c1'"):
        discover_cases(root)


def test_label_without_images(tmp_path):
    root = tmp_path / "ds"
    write_nnunet_case(root, "c1")
    save(root / "labelsTr" / "ghost.nii.gz", np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(MensegError, match="ghost"):
        discover_cases(root)


def test_case_from_files(brats, tmp_path):
    folder = brats / "BraTS-MEN-00001-000"
    files = sorted(folder.iterdir())
    c = case_from_files(files)
    assert c.case_id == "BraTS-MEN-00001-000" and c.label is not None
    c = case_from_files([p for p in files if "seg" not in p.name])
    assert c.label is None
    # nnU-Net names, plus a label without channel suffix
    root = tmp_path / "nn"
    write_nnunet_case(root, "x1")
    nn_files = sorted((root / "imagesTr").iterdir()) + [root / "labelsTr" / "x1.nii.gz"]
    c = case_from_files(nn_files)
    assert c.case_id == "x1" and c.images["t2f"].name == "x1_0002.nii.gz"
    assert c.label == root / "labelsTr" / "x1.nii.gz"
    with pytest.raises(MensegError, match="missing modality t2w"):
        case_from_files([p for p in files if "t2w" not in p.name])


def test_discover_inputs(brats, tmp_path):
    assert len(discover_inputs(brats)) == 3
    one = discover_inputs(brats / "BraTS-MEN-00002-000")
    assert [c.case_id for c in one] == ["BraTS-MEN-00002-000"]
    root = tmp_path / "nn"
    write_nnunet_case(root, "a", labelled=False, images="imagesTs")
    write_nnunet_case(root, "b", labelled=False, images="imagesTs")
    assert [c.case_id for c in discover_inputs(root / "imagesTs")] == ["a", "b"]
    files = [str(p) for p in sorted((brats / "BraTS-MEN-00003-000").iterdir())]
    assert discover_inputs(files)[0].case_id == "BraTS-MEN-00003-000"
    with pytest.raises(MensegError, match="not found"):
        discover_inputs(tmp_path / "nothing")


def test_convert_roundtrip_byte_identical(brats, tmp_path):
    nn = tmp_path / "nn"
    assert convert_dataset(brats, nn, "nnunet") == 3
    meta = json.loads((nn / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "t1c", "1": "t1n", "2": "t2f", "3": "t2w"}
    assert meta["labels"] == {"background": 0, "NETC": 1, "SNFH": 2, "ET": 3}
    assert meta["file_ending"] == ".nii.gz" and meta["numTraining"] == 2
    assert (nn / "imagesTr" / "BraTS-MEN-00001-000_0003.nii.gz").is_file()
    assert (nn / "labelsTr" / "BraTS-MEN-00001-000.nii.gz").is_file()
    assert (nn / "imagesTs" / "BraTS-MEN-00003-000_0000.nii.gz").is_file()  # unlabelled
    back = tmp_path / "back"
    assert convert_dataset(nn, back, "brats") == 3
    assert _files(back) == _files(brats)
    for rel in _files(brats):
        assert filecmp.cmp(brats / rel, back / rel, shallow=False), rel
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_convert_unlabelled_dataset(tmp_path):
    root = tmp_path / "u"
    write_brats_case(root, "U-1", labelled=False)
    nn = tmp_path / "nn"
    convert_dataset(root, nn, "nnunet")
    assert (nn / "imagesTr" / "U-1_0000.nii.gz").is_file()
    assert not (nn / "labelsTr").exists()
    assert [c.case_id for c in discover_cases(nn)] == ["U-1"]


def test_convert_refuses_non_empty_destination(brats, tmp_path):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(MensegError, match="not empty"):
        convert_dataset(brats, dst, "nnunet")
    assert _files(dst) == [dst.relative_to(dst) / "keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert convert_dataset(brats, empty, "nnunet") == 3  # an empty folder is fine


def test_convert_bad_source_writes_nothing(brats, tmp_path):
    bad = brats / "BraTS-MEN-00002-000" / "BraTS-MEN-00002-000-t1n.nii.gz"
    data = np.random.rand(16, 16, 12).astype(np.float32)
    data[0, 0, 0] = np.nan
    save(bad, data)
    dst = tmp_path / "out"
    with pytest.raises(MensegError) as ei:
        convert_dataset(brats, dst, "nnunet")
    assert bad.name in str(ei.value) and "NaN" in str(ei.value)
    assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["brats"]


@pytest.mark.parametrize("bad", ["../evil", "/abs/path", "a/b", "a\\b", "..", ".", "", " x", "x\x00y"])
def test_case_ids_that_would_escape_the_output_folder_are_refused(bad: str, tmp_path) -> None:
    from pathlib import Path

    from menseg.data.layouts import CaseFiles, check_case_id

    with pytest.raises(MensegError):
        check_case_id(bad)
    with pytest.raises(MensegError):
        CaseFiles(bad, {"t1c": Path(tmp_path / "x-t1c.nii.gz")})
    assert check_case_id("BraTS-MEN-00001-000") == "BraTS-MEN-00001-000"


def test_synthetic_prefix_that_escapes_is_refused(tmp_path) -> None:
    from menseg.synth.writer import case_id

    with pytest.raises(MensegError, match="safe file name"):
        case_id("../../evil", 0)
