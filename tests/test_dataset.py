"""Preprocessed dataset cache: reuse, invalidation, atomic files."""

from __future__ import annotations

import os

import numpy as np
import pytest

import menseg.data.dataset as dsmod
from menseg.data.dataset import preprocess_dataset
from menseg.data.layouts import discover_cases
from menseg.data.preprocess import preprocess_case
from menseg.errors import MensegError
from nifti_factory import write_brats_case


@pytest.fixture
def cases(tmp_path):
    root = tmp_path / "ds"
    write_brats_case(root, "A", shape=(16, 16, 12), seed=1)
    write_brats_case(root, "B", shape=(16, 16, 12), seed=2, labelled=False)
    return discover_cases(root)


@pytest.fixture
def counter(monkeypatch):
    calls: list[str] = []

    def counting(case, spacing, *a, **k):
        calls.append(case.case_id)
        return preprocess_case(case, spacing, *a, **k)

    monkeypatch.setattr(dsmod, "preprocess_case", counting)
    return calls


def test_cache_written_and_reused(cases, tmp_path, counter):
    cache = tmp_path / "cache"
    first = preprocess_dataset(cases, cache, (1.0, 1.0, 1.0), progress=False)
    assert counter == ["A", "B"]
    assert sorted(p.name for p in cache.iterdir()) == [
        "A.json", "A.npy", "A_seg.npy", "B.json", "B.npy"]
    a = first[0]
    assert a.case_id == "A" and a.image.dtype == np.float32 and a.label.dtype == np.uint8
    assert a.image.shape[0] == 4 and a.image.shape[1:] == a.label.shape
    assert first[1].label is None
    img, lab, props = preprocess_case(cases[0], (1.0, 1.0, 1.0))
    np.testing.assert_array_equal(a.image, img)
    np.testing.assert_array_equal(a.label, lab)
    assert a.props["shape"] == props["shape"] and a.spacing == (1.0, 1.0, 1.0)

    again = preprocess_dataset(cases, cache, (1.0, 1.0, 1.0), progress=False)
    assert counter == ["A", "B"]  # nothing recomputed
    assert isinstance(again[0].image, np.memmap)
    np.testing.assert_array_equal(again[0].image, img)


def test_cache_invalidated_by_spacing_and_source_change(cases, tmp_path, counter):
    cache = tmp_path / "cache"
    preprocess_dataset(cases, cache, (1.0, 1.0, 1.0), progress=False)
    preprocess_dataset(cases, cache, (2.0, 2.0, 2.0), progress=False)
    assert counter == ["A", "B", "A", "B"]
    src = cases[1].images["t2w"]
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    out = preprocess_dataset(cases, cache, (2.0, 2.0, 2.0), progress=False)
    assert counter[4:] == ["B"]
    crop = np.asarray(out[0].props["cropped_shape"])
    assert out[0].image.shape[1:] == tuple(np.round(crop / 2).astype(int))
    assert out[0].props["target_spacing"] == [2.0, 2.0, 2.0]


def test_incomplete_entry_is_recomputed(cases, tmp_path, counter):
    cache = tmp_path / "cache"
    preprocess_dataset(cases, cache, progress=False)
    (cache / "A.json").unlink()  # as if killed before the entry was complete
    (cache / "B.npy").write_bytes(b"garbage")
    preprocess_dataset(cases, cache, progress=False)
    assert counter == ["A", "B", "A", "B"]
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]


def test_duplicate_ids_rejected(cases, tmp_path):
    with pytest.raises(MensegError, match="duplicate case id 'A'"):
        preprocess_dataset([cases[0], cases[0]], tmp_path / "c", progress=False)
