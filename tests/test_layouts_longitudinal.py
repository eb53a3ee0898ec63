"""Longitudinal layout: patient folders with timepoints.json and BraTS case folders per visit."""

from __future__ import annotations

import json

import pytest

from menseg.constants import MODALITIES
from menseg.data.layouts import (
    convert_dataset,
    detect_layout,
    discover_cases,
    discover_inputs,
    discover_series,
)
from menseg.errors import MensegError
from nifti_factory import write_brats_case


def _patient(root, patient, days, entries=None):
    folder = root / patient
    for t, _ in enumerate(days):
        cid = f"{patient}-{t:03d}"
        write_brats_case(folder, cid, seed=t)
    tp = entries if entries is not None else {
        f"{patient}-{t:03d}": {"day": d} for t, d in enumerate(days)
    }
    (folder / "timepoints.json").write_text(json.dumps(tp))
    return folder


@pytest.fixture
def longi(tmp_path):
    root = tmp_path / "longi"
    _patient(root, "PAT-00002", [0, 200])
    # Visit 001 happened before visit 000 (ids need not follow time): sorting is by day.
    _patient(root, "PAT-00001", [0, 400, 120])
    return root


def test_detect_and_discover(longi):
    assert detect_layout(longi) == "longitudinal"
    cases = discover_cases(longi)
    assert [c.case_id for c in cases] == [
        "PAT-00001-000", "PAT-00001-001", "PAT-00001-002", "PAT-00002-000", "PAT-00002-001"]
    assert list(cases[0].images) == list(MODALITIES)
    assert cases[0].label is not None
    assert [c.case_id for c in discover_inputs(longi)] == [c.case_id for c in cases]


def test_discover_series_sorted_by_day(longi):
    series = discover_series(longi)
    assert list(series) == ["PAT-00001", "PAT-00002"]
    p1 = series["PAT-00001"]
    assert [(c.case_id, d) for c, d in p1] == [
        ("PAT-00001-000", 0), ("PAT-00001-002", 120), ("PAT-00001-001", 400)]
    assert all(isinstance(d, int) for _, d in p1)


def test_single_patient_folder_and_dates(tmp_path):
    folder = _patient(tmp_path, "P1", [0, 0], entries={
        "P1-000": {"date": "2020-01-31"}, "P1-001": {"date": "2020-03-01"}})
    series = discover_series(folder)
    assert [(c.case_id, d) for c, d in series["P1"]] == [("P1-000", 0), ("P1-001", 30)]


def test_convert_longitudinal_to_brats(longi, tmp_path):
    n = convert_dataset(longi, tmp_path / "flat", "brats")
    assert n == 5
    assert detect_layout(tmp_path / "flat") == "brats"
    assert len(discover_cases(tmp_path / "flat")) == 5


@pytest.mark.parametrize(
    ("entries", "msg"),
    [
        ({"P-000": {"day": 0}}, "no time point"),
        ({"P-000": {"day": 0}, "P-001": {"day": 9}, "P-002": {"day": 20}}, "without a case folder"),
        ({"P-000": {"day": 0}, "P-001": {"day": 1.5}}, "must be an integer"),
        ({"P-000": {"day": 0}, "P-001": {}}, "needs a 'day'"),
        ({"P-000": {"day": 0}, "P-001": {"date": "2020-01-01"}}, "mix of"),
        ([], "must be an object"),
    ],
)
def test_bad_timepoints(tmp_path, entries, msg):
    _patient(tmp_path / "d", "P", [0, 1], entries=entries)
    with pytest.raises(MensegError, match=msg):
        discover_cases(tmp_path / "d")


def test_patient_without_timepoints(longi):
    write_brats_case(longi / "PAT-00003", "PAT-00003-000")
    with pytest.raises(MensegError, match="without timepoints.json"):
        discover_series(longi)


def test_duplicate_case_across_patients(longi):
    write_brats_case(longi / "PAT-00002", "PAT-00001-000", folder="PAT-00001-000")
    tp = longi / "PAT-00002" / "timepoints.json"
    meta = json.loads(tp.read_text())
    meta["PAT-00001-000"] = {"day": 5}
    tp.write_text(json.dumps(meta))
    with pytest.raises(MensegError, match="duplicate case id"):
        discover_series(longi)


def test_not_longitudinal(tmp_path):
    write_brats_case(tmp_path / "b", "C-000")
    with pytest.raises(MensegError, match="not a longitudinal dataset"):
        discover_series(tmp_path / "b")
