"""menseg review without a browser: cases, display volumes, verdicts, the server's rules, static pages."""

from __future__ import annotations

import csv
import gzip
import hashlib
import http.client
import json
import re
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from menseg.cli import app
from menseg.errors import MensegError
from menseg.review import display
from menseg.review.cases import collect_cases, lesions
from menseg.review.server import ReviewServer
from menseg.review.site import ReviewSite, static_root
from menseg.review.verdicts import read_verdicts, save_verdict
from review_cases import write_case, write_review_set

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def review_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_review_set(tmp_path_factory.mktemp("review"))


def _copy_preds(src: Path, tmp: Path) -> Path:
    """A private copy of the prediction folder (verdict tests write into it)."""
    dst = tmp / "pred"
    dst.mkdir()
    for p in (src / "pred").iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


# -- cases ----------------------------------------------------------------------------------------------
def test_cases_worst_first_with_problems_and_missing_sequences(review_set: Path) -> None:
    cases = collect_cases(review_set / "pred", review_set / "images", review_set / "ref", progress=False)
    ids = [c.case_id for c in cases]
    assert ids[0] == "CASE-BAD"  # lowest lesion-wise Dice first
    assert ids[-1] == "CASE-WRONG"  # no metrics (its prediction does not fit): last
    by = {c.case_id: c for c in cases}
    assert by["CASE-BAD"].metrics["WT_lesion_dice"] < 0.5 < by["CASE-GOOD"].metrics["WT_lesion_dice"]
    assert "shape (40, 40, 40)" in by["CASE-WRONG"].problem
    assert by["CASE-GOOD"].problem is None and by["CASE-LPS"].problem is None
    row = by["CASE-LPS"].row()
    assert row["missing"] == ["t2f"] and row["sequences"] == ["t1c", "t1n", "t2w"]
    # volumes from the label and its voxel size (1 mm): WT = every labelled voxel
    label = np.asarray(nib.load(str(review_set / "pred" / "CASE-GOOD.nii.gz")).dataobj)
    assert row["volumes_ml"]["WT"] == pytest.approx((label > 0).sum() / 1000, abs=1e-3)
    json.dumps(row, allow_nan=False)  # JSON-ready


def test_cases_take_metrics_from_an_evaluation(review_set: Path, tmp_path: Path) -> None:
    (tmp_path / "metrics.csv").write_text("case_id,WT_lesion_dice,WT_n_fp,WT_n_fn\nCASE-GOOD,0.25,3,2\n")
    cases = {c.case_id: c for c in collect_cases(review_set / "pred", review_set / "images",
                                                 metrics=tmp_path, progress=False)}
    row = cases["CASE-GOOD"].row()
    assert row["lesion_dice"]["WT"] == 0.25 and row["false_positives"]["WT"] == 3 and row["missed"]["WT"] == 2
    assert cases["CASE-BAD"].metrics is None  # not in the CSV, no --ref: no metrics invented
    with pytest.raises(MensegError, match="metrics.csv"):
        collect_cases(review_set / "pred", review_set / "images", metrics=tmp_path / "none", progress=False)


def test_cases_refuse_predictions_without_images(review_set: Path, tmp_path: Path) -> None:
    write_case(tmp_path, "OTHER")
    with pytest.raises(MensegError, match="none of the 4 predicted cases has images"):
        collect_cases(review_set / "pred", tmp_path / "images", progress=False)


def test_lesions_largest_first_and_the_same_in_lps(tmp_path: Path) -> None:
    label = np.zeros((30, 30, 30), np.uint8)
    label[2:6, 2:6, 2:6] = 2  # 64 voxels
    label[15:25, 15:25, 15:20] = 3  # 500 voxels
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    found = lesions(label, aff)
    assert [x["volume_ml"] for x in found] == [pytest.approx(500 * 8 / 1000), pytest.approx(64 * 8 / 1000)]
    assert found[0]["labels"] == ["ET"]
    vox = found[0]["voxel"]
    assert label[tuple(vox)] > 0 and np.allclose(found[0]["mm"], aff[:3, :3] @ vox)
    # the same physical label stored LPS: the same world positions
    from nifti_factory import to_lps

    lps, lps_aff = to_lps(label, aff)
    assert np.allclose(lesions(lps, lps_aff)[0]["mm"], found[0]["mm"], atol=2.0)


# -- display volumes -------------------------------------------------------------------------------------
def test_display_factor_brings_large_volumes_under_the_limit() -> None:
    assert display.display_factor((240, 240, 155)) == 1
    assert display.display_factor((512, 512, 400)) == 2
    assert display.display_factor((100, 100, 100), max_voxels=30**3) == 4


def test_display_volume_decimated_keeps_world_space(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_case(tmp_path, "BIG", shape=(40, 44, 36), lps=True)
    img_path = tmp_path / "images" / "BIG" / "BIG-t1c.nii.gz"
    src = nib.load(str(img_path))
    monkeypatch.setattr(display, "DISPLAY_MAX_VOXELS", 20**3)
    geo = display.geometry(img_path)
    assert geo.factor == 2 and "downsampled 2x" in geo.note()  # 20x22x18 <= 20^3
    shown = nib.Nifti1Image.from_bytes(gzip.decompress(display.image_for_display(img_path, geo.factor)))
    assert shown.shape == geo.display_shape and shown.get_data_dtype() == np.uint8
    assert np.asarray(shown.dataobj).max() == 255
    # voxel (i, j, k) of the display is voxel (2i, 2j, 2k) of the file, at the same world position
    assert np.allclose(shown.affine @ [2, 3, 4, 1], src.affine @ [4, 6, 8, 1])
    lab_path = tmp_path / "pred" / "BIG.nii.gz"
    lab = nib.Nifti1Image.from_bytes(gzip.decompress(display.label_for_display(lab_path, geo.factor)))
    full = np.asarray(nib.load(str(lab_path)).dataobj)
    assert np.array_equal(np.asarray(lab.dataobj), full[::2, ::2, ::2])


def test_display_window_ignores_a_constant_background(tmp_path: Path) -> None:
    data = np.full((20, 20, 20), -4.8, np.float32)
    data[5:15, 5:15, 5:15] = np.linspace(0, 10, 1000, dtype=np.float32).reshape(10, 10, 10)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "z.nii.gz"))
    shown = np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(
        display.image_for_display(tmp_path / "z.nii.gz", 1))).dataobj)
    assert shown[0, 0, 0] == 0 and shown[10, 10, 10] > 100  # the head spans the window, not the -4.8 fill


# -- verdicts --------------------------------------------------------------------------------------------
def test_verdicts_one_row_per_case_atomic_and_concurrent(tmp_path: Path) -> None:
    save_verdict(tmp_path, "A", "reject", "misses the falx lesion")
    save_verdict(tmp_path, "A", "accept", 'fine, "really"')
    threads = [threading.Thread(target=save_verdict,
                                args=(tmp_path, f"C{i:02d}", "needs correction", f"n{i}")) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = read_verdicts(tmp_path)
    assert len(rows) == 17 and rows["A"]["verdict"] == "accept" and rows["A"]["note"] == 'fine, "really"'
    assert all(rows[f"C{i:02d}"]["note"] == f"n{i}" for i in range(16))
    with (tmp_path / "review.csv").open(newline="") as f:
        assert next(csv.reader(f)) == ["case", "verdict", "note", "time", "menseg_version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["review.csv"]  # no lock or temporary file left
    with pytest.raises(MensegError, match="verdict must be one of"):
        save_verdict(tmp_path, "A", "maybe")


# -- the server ------------------------------------------------------------------------------------------
@pytest.fixture()
def server(review_set: Path, tmp_path: Path):
    pred = _copy_preds(review_set, tmp_path)
    cases = collect_cases(pred, review_set / "images", review_set / "ref", progress=False)
    srv = ReviewServer(ReviewSite(cases, pred), 0)
    srv.start_background()
    yield srv
    srv.shutdown()
    srv.server_close()


def _request(srv: ReviewServer, method: str, path: str, body: bytes | None = None,
             headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    hdrs = {"Host": srv.host_header, **(headers or {})}
    conn.request(method, path, body=body, headers=hdrs)
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


def test_server_binds_loopback_and_serves_pages_and_volumes(server: ReviewServer) -> None:
    assert server.server_address[0] == "127.0.0.1" and server.url == f"http://127.0.0.1:{server.port}/"
    status, body = _request(server, "GET", "/")
    assert status == 200 and b"menseg review" in body
    status, body = _request(server, "GET", "/data/index.js")
    payload = json.loads(re.fullmatch(rb"menseg\.index\((.*)\);\n", body, re.S).group(1))
    assert [r["case"] for r in payload["cases"]][0] == "CASE-BAD" and payload["mode"] == "server"
    status, body = _request(server, "GET", "/data/CASE-LPS/case.js")
    meta = json.loads(re.fullmatch(rb"menseg\.caseMeta\((.*)\);\n", body, re.S).group(1))
    assert meta["sequences"]["t2f"] is False and meta["lesions"]["prediction"]
    assert _request(server, "GET", "/data/CASE-LPS/t1c.js")[0] == 200
    assert _request(server, "GET", "/data/CASE-LPS/t2f.js")[0] == 404  # missing: not a black volume
    assert _request(server, "GET", "/data/CASE-WRONG/pred.js")[0] == 404  # not drawn wrongly
    assert _request(server, "GET", "/static/vendor/niivue.umd.js")[0] == 200


@pytest.mark.parametrize("path", [
    "/static/../cases.py", "/static/%2e%2e/cases.py", "/static/..%2f..%2f..%2fpyproject.toml",
    "/static//etc/passwd", "/static/vendor/../../server.py", "/data/../pred/CASE-GOOD.nii.gz",
    "/data/CASE-GOOD/../../../images/CASE-GOOD/CASE-GOOD-t1c.nii.gz", "/data/CASE-GOOD/CASE-GOOD.nii.gz.js",
    "/data/%2e%2e/index.js", "/../../etc/passwd", "/review.csv", "/pred/CASE-GOOD.nii.gz", "/etc/passwd",
])
def test_server_refuses_path_traversal(server: ReviewServer, path: str) -> None:
    status, body = _request(server, "GET", path)
    assert status == 404 and b"root:" not in body and b"import" not in body


def test_server_refuses_other_hosts_and_foreign_writes(server: ReviewServer) -> None:
    for host in (f"localhost:{server.port}", f"evil.example:{server.port}", "127.0.0.1"):
        assert _request(server, "GET", "/", headers={"Host": host})[0] == 403
    body = json.dumps({"case": "CASE-GOOD", "verdict": "accept", "note": ""}).encode()
    js = {"Content-Type": "application/json"}
    assert _request(server, "POST", "/api/verdict", body, {"Host": "evil.example", **js})[0] == 403
    assert _request(server, "POST", "/api/verdict", body, {"Origin": "http://evil.example", **js})[0] == 403
    assert _request(server, "POST", "/api/verdict", body,
                    {"Content-Type": "application/x-www-form-urlencoded"})[0] == 415
    assert _request(server, "POST", "/review.csv", body, js)[0] == 404
    assert _request(server, "PUT", "/api/verdict", body, js)[0] == 405
    unknown = json.dumps({"case": "../x", "verdict": "accept"}).encode()
    assert _request(server, "POST", "/api/verdict", unknown, js)[0] == 404
    bad = json.dumps({"case": "CASE-GOOD", "verdict": "maybe"}).encode()
    assert _request(server, "POST", "/api/verdict", bad, js)[0] == 400
    assert not (server.site.pred_dir / "review.csv").exists()  # nothing refused was written


def test_server_saves_verdicts_to_review_csv_only(server: ReviewServer) -> None:
    before = {p.name: p.read_bytes() for p in server.site.pred_dir.iterdir()}
    js = {"Content-Type": "application/json", "Origin": server.url.rstrip("/")}
    for case, verdict in (("CASE-GOOD", "accept"), ("CASE-BAD", "reject")):
        status, body = _request(server, "POST", "/api/verdict",
                                json.dumps({"case": case, "verdict": verdict, "note": "n"}).encode(), js)
        assert status == 200 and json.loads(body)["verdict"] == verdict
    status, body = _request(server, "GET", "/api/verdicts")
    saved = {k: v["verdict"] for k, v in json.loads(body).items()}
    assert saved == {"CASE-GOOD": "accept", "CASE-BAD": "reject"}
    after = {p.name: p.read_bytes() for p in server.site.pred_dir.iterdir()}
    assert set(after) - set(before) == {"review.csv"}
    assert all(after[k] == v for k, v in before.items())  # the predictions untouched


# -- static folder, CLI, vendored viewer ------------------------------------------------------------------
def test_static_folder_holds_every_page_and_refuses_to_overwrite(review_set: Path, tmp_path: Path) -> None:
    cases = collect_cases(review_set / "pred", review_set / "images", review_set / "ref", progress=False)
    site = ReviewSite(cases, review_set / "pred", mode="static")
    index = site.write(tmp_path / "site", progress=False)
    out = index.parent
    assert index.is_file() and (out / "case.html").is_file()
    assert (out / "static" / "vendor" / "niivue.umd.js").is_file()
    assert b'"mode": "static"' in (out / "data" / "index.js").read_bytes()
    assert sorted(p.name for p in (out / "data" / "CASE-LPS").iterdir()) == [
        "case.js", "pred.js", "ref.js", "t1c.js", "t1n.js", "t2w.js"]
    assert sorted(p.name for p in (out / "data" / "CASE-WRONG").iterdir()) == ["case.js"]
    with pytest.raises(MensegError, match="not empty"):
        site.write(out, progress=False)
    site.write(out, overwrite=True, progress=False)  # its own folder: replaced
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(MensegError, match="not a menseg review site"):
        site.write(tmp_path / "other", overwrite=True, progress=False)
    assert (tmp_path / "other" / "keep.txt").read_text() == "x"


def test_cli_review_out_and_one_line_errors(review_set: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["review", str(review_set / "pred"), "--images", str(review_set / "images"),
                            "--out", str(tmp_path / "site")])
    assert r.exit_code == 0, r.output
    assert "wrote 4 case(s)" in r.output and (tmp_path / "site" / "index.html").is_file()
    r = runner.invoke(app, ["review", str(tmp_path / "nothing"), "--images", str(review_set / "images")])
    assert isinstance(r.exception, MensegError) and "prediction folder not found" in str(r.exception)
    r = runner.invoke(app, ["review", str(review_set / "pred"), "--images", str(review_set / "images"),
                            "--port", "70000"])
    assert isinstance(r.exception, MensegError) and "--port must be" in str(r.exception)
    r = runner.invoke(app, ["review", "--help"])
    assert r.exit_code == 0 and "--images" in r.output and "review.csv" in r.output


def test_vendored_niivue_matches_its_manifest_and_licence() -> None:
    vendor = static_root() / "vendor"
    manifest = json.loads((vendor / "niivue.json").read_text())
    assert hashlib.sha256((vendor / "niivue.umd.js").read_bytes()).hexdigest() == manifest["sha256"]
    assert manifest["license"] == "BSD-2-Clause"
    assert "BSD 2-Clause" in (vendor / "LICENSE-niivue.txt").read_text()
    notices = (vendor / "THIRD_PARTY_NOTICES.txt").read_text()
    assert all(dep in notices for dep in manifest["bundled_dependencies"])
    tool = (ROOT / "tools" / "vendor_niivue.py").read_text()
    assert f'NIIVUE_VERSION = "{manifest["version"]}"' in tool  # the script pins what is vendored
    page = (static_root() / "case.html").read_text()
    assert "static/vendor/niivue.umd.js" in page and "http" not in page  # nothing from the network
