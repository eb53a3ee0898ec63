"""menseg review as a person uses it: headless Chromium (Debian's chromium + chromium-driver) drives the
pages served on 127.0.0.1 and reads back what the canvas shows (WebGL through the software renderer).

Skipped, with the reason, where Chromium, ChromeDriver or selenium is missing; .ci/run installs them.
"""

from __future__ import annotations

import csv
import io
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from menseg.review import display
from menseg.review.cases import collect_cases
from menseg.review.server import ReviewServer
from menseg.review.site import ReviewSite
from review_cases import CHROME_ARGS, write_case, write_review_set

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
except ImportError:  # pragma: no cover - the test extra installs it
    webdriver = None

if webdriver is None or CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("browser tests need Chromium, ChromeDriver and selenium (apt-get install chromium "
                "chromium-driver; pip install -e '.[test]')", allow_module_level=True)


@pytest.fixture(scope="module")
def driver():
    opts = webdriver.ChromeOptions()
    for arg in CHROME_ARGS:
        opts.add_argument(arg)
    opts.binary_location = CHROMIUM
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    d.set_page_load_timeout(60)
    yield d
    d.quit()


@pytest.fixture(scope="module")
def review_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_review_set(tmp_path_factory.mktemp("review"))
    write_case(root, "CASE-BIG", shape=(72, 80, 64), speck=True)
    write_case(root, "CASE-OBLIQUE", rotate_deg=12.0)
    return root


@pytest.fixture(scope="module")
def server(review_set: Path):
    cases = collect_cases(review_set / "pred", review_set / "images", review_set / "ref", progress=False)
    srv = ReviewServer(ReviewSite(cases, review_set / "pred"), 0)
    srv.start_background()
    yield srv
    srv.shutdown()
    srv.server_close()


def _ready(d, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if d.execute_script("return !!(window.menseg && menseg.state.ready)"):
            time.sleep(0.3)  # the frame after the last draw
            return
        time.sleep(0.1)
    raise AssertionError(f"page not ready after {timeout} s: {d.get_log('browser')[-5:]}")


def _open_case(d, base: str, case: str) -> None:
    d.get(f"{base}case.html?case={case}")
    _ready(d)


def _canvas(d) -> np.ndarray:
    """The canvas as RGB pixels (H, W, 3)."""
    from PIL import Image

    shot = np.asarray(Image.open(io.BytesIO(d.get_screenshot_as_png())).convert("RGB")).astype(int)
    r = d.execute_script("const r = document.getElementById('gl').getBoundingClientRect();"
                         "return [r.left, r.top, r.width, r.height];")
    x, y, w, h = (int(round(v)) for v in r)
    return shot[y:y + h, x:x + w]


def _lesion_pixels(px: np.ndarray) -> np.ndarray:
    """Label-coloured pixels: saturated, and not the blue of the crosshair."""
    sat = px.max(-1) - px.min(-1)
    return (sat > 60) & (px[..., 2] < px.max(-1))


def _brain_pixels(px: np.ndarray) -> np.ndarray:
    return (px.max(-1) - px.min(-1) < 25) & (px.mean(-1) > 25)


def _axial_position(d) -> np.ndarray:
    """Lesion centroid in the axial view, as a fraction of the brain's box on screen (x right, y down)."""
    d.execute_script("menseg.state.setView(0)")
    time.sleep(0.5)
    px = _canvas(d)
    brain, lesion = _brain_pixels(px), _lesion_pixels(px)
    assert brain.sum() > 2000, "no image drawn"
    assert lesion.sum() > 50, "no label drawn"
    by, bx = np.nonzero(brain | lesion)
    ly, lx = np.nonzero(lesion)
    return np.array([(lx.mean() - bx.min()) / (bx.max() - bx.min()),
                     (ly.mean() - by.min()) / (by.max() - by.min())])


def test_index_lists_cases_worst_first_and_marks_problems(driver, server: ReviewServer) -> None:
    driver.get(server.url)
    _ready(driver)
    rows = driver.find_elements(By.CSS_SELECTOR, "#rows tr")
    ids = [r.get_attribute("data-case") for r in rows]
    assert ids[0] == "CASE-BAD"
    assert set(ids) == {"CASE-BAD", "CASE-GOOD", "CASE-LPS", "CASE-WRONG", "CASE-BIG", "CASE-OBLIQUE"}
    wrong = rows[ids.index("CASE-WRONG")]
    assert "problem" in wrong.get_attribute("class") and "differs" in wrong.text
    assert "(no t2f)" in rows[ids.index("CASE-LPS")].text
    for _ in range(2):  # sortable: by case id, then descending
        headers = driver.find_elements(By.CSS_SELECTOR, "#head th")
        next(h for h in headers if h.text.startswith("case")).click()
    rows = driver.find_elements(By.CSS_SELECTOR, "#rows tr")
    assert [r.get_attribute("data-case") for r in rows][:2] == ["CASE-WRONG", "CASE-OBLIQUE"]
    driver.find_element(By.CSS_SELECTOR, '#rows tr[data-case="CASE-GOOD"] a').click()
    _ready(driver)
    assert driver.find_element(By.ID, "title").text == "CASE-GOOD"


def test_case_page_draws_image_and_label_in_the_right_place(driver, server: ReviewServer) -> None:
    _open_case(driver, server.url, "CASE-GOOD")
    ras = _axial_position(driver)
    # the lesion is right of and anterior to the centre (RAS fraction 0.68, 0.62): neurological view,
    # anterior up -> right half, upper half of the brain's box
    assert ras[0] > 0.55 and ras[1] < 0.45, ras
    assert "mm" in driver.find_element(By.ID, "location").text
    _open_case(driver, server.url, "CASE-LPS")  # the same head stored L-P-S: drawn the same way
    lps = _axial_position(driver)
    assert np.allclose(ras, lps, atol=0.05), (ras, lps)
    _open_case(driver, server.url, "CASE-OBLIQUE")  # tilted 12 degrees about z: still right-anterior
    oblique = _axial_position(driver)
    assert oblique[0] > 0.55 and oblique[1] < 0.45 and np.allclose(ras, oblique, atol=0.12), (ras, oblique)


def test_reference_flips_and_sequences_switch(driver, server: ReviewServer) -> None:
    _open_case(driver, server.url, "CASE-BAD")  # prediction 12 voxels to the patient's left
    pred = _axial_position(driver)
    driver.find_element(By.TAG_NAME, "body").send_keys("r")
    time.sleep(0.5)
    assert driver.execute_script("return menseg.state.overlay") == "ref"
    ref = _axial_position(driver)
    assert ref[0] > pred[0] + 0.1, (pred, ref)
    before = _canvas(driver)
    driver.find_element(By.TAG_NAME, "body").send_keys("2")
    time.sleep(0.5)
    assert driver.execute_script("return menseg.state.sequence") == "t1n"
    assert np.abs(_canvas(driver) - before).sum() > 0  # another image drawn
    driver.find_element(By.TAG_NAME, "body").send_keys("o")
    time.sleep(0.5)
    assert _lesion_pixels(_canvas(driver)).sum() == 0  # overlay hidden


def test_missing_sequence_and_problem_case(driver, server: ReviewServer) -> None:
    _open_case(driver, server.url, "CASE-LPS")
    t2f = driver.find_element(By.CSS_SELECTOR, 'button[data-seq="t2f"]')
    assert not t2f.is_enabled() and "missing" in t2f.text
    assert "missing sequence: t2f" in driver.find_element(By.ID, "banner").text
    _open_case(driver, server.url, "CASE-WRONG")
    assert "not displayed" in driver.find_element(By.ID, "banner").text
    assert _lesion_pixels(_canvas(driver)).sum() == 0 and _brain_pixels(_canvas(driver)).sum() == 0


def test_large_case_is_downsampled_and_says_so(driver, server: ReviewServer,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(display, "DISPLAY_MAX_VOXELS", 40**3)  # the server runs in this process
    _open_case(driver, server.url, "CASE-BIG")
    assert "downsampled 2x" in driver.find_element(By.ID, "banner").text
    assert _lesion_pixels(_canvas(driver)).sum() > 20
    # the one-voxel speck is listed, folded under the lesion
    lesions = driver.find_element(By.ID, "lesions")
    assert "predicted: 2 components" in lesions.text and "1 under 50 mm³" in lesions.text
    speck = driver.find_elements(By.CSS_SELECTOR, '#lesions ul[data-kind="prediction"] li')[1]
    assert not speck.is_displayed()
    lesions.find_element(By.CSS_SELECTOR, "a.more").click()
    assert speck.is_displayed() and "0.00 mL" in speck.text


def test_verdicts_saved_survive_reload_and_two_tabs(driver, server: ReviewServer, review_set: Path) -> None:
    csv_path = review_set / "pred" / "review.csv"
    _open_case(driver, server.url, "CASE-BAD")
    driver.find_element(By.CSS_SELECTOR, 'button[data-verdict="needs correction"]').click()
    driver.find_element(By.ID, "note").send_keys("prediction sits left of the lesion")
    driver.find_element(By.ID, "save").click()
    _wait_text(driver, "saved", "saved: needs correction")
    first = driver.current_window_handle
    driver.switch_to.new_window("tab")  # a second tab on the same folder
    _open_case(driver, server.url, "CASE-GOOD")
    driver.find_element(By.CSS_SELECTOR, 'button[data-verdict="accept"]').click()
    driver.find_element(By.ID, "save").click()
    _wait_text(driver, "saved", "saved: accept")
    driver.close()
    driver.switch_to.window(first)
    driver.refresh()
    _ready(driver)
    _wait_text(driver, "saved", "saved: needs correction")
    assert driver.find_element(By.ID, "note").get_attribute("value") == "prediction sits left of the lesion"
    picked = driver.find_element(By.CSS_SELECTOR, 'button[data-verdict="needs correction"]')
    assert "on" in picked.get_attribute("class")
    with csv_path.open(newline="") as f:
        rows = {r["case"]: r for r in csv.DictReader(f)}
    assert rows["CASE-BAD"]["verdict"] == "needs correction"
    assert rows["CASE-BAD"]["note"] == "prediction sits left of the lesion"
    assert rows["CASE-GOOD"]["verdict"] == "accept" and rows["CASE-GOOD"]["menseg_version"]
    driver.get(server.url)
    _ready(driver)
    assert "needs correction" in driver.find_element(By.CSS_SELECTOR, '#rows tr[data-case="CASE-BAD"]').text


def _wait_text(d, element_id: str, text: str, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if text in d.find_element(By.ID, element_id).text:
            return
        time.sleep(0.1)
    raise AssertionError(f"#{element_id} never showed {text!r}: {d.find_element(By.ID, element_id).text!r}")


def test_static_folder_opens_from_disk(driver, review_set: Path, tmp_path: Path) -> None:
    cases = collect_cases(review_set / "pred", review_set / "images", review_set / "ref", progress=False)
    index = ReviewSite(cases, review_set / "pred", mode="static").write(tmp_path / "site", progress=False)
    base = index.parent.as_uri() + "/"
    driver.get(base + "index.html")
    _ready(driver)
    assert len(driver.find_elements(By.CSS_SELECTOR, "#rows tr")) == 6
    assert driver.find_element(By.ID, "download").is_displayed()
    _open_case(driver, base, "CASE-GOOD")
    assert _axial_position(driver)[0] > 0.55
    driver.find_element(By.CSS_SELECTOR, 'button[data-verdict="reject"]').click()
    driver.find_element(By.ID, "save").click()
    _wait_text(driver, "saved", "saved: reject")
    driver.refresh()
    _ready(driver)
    _wait_text(driver, "saved", "saved: reject")  # kept in this browser until downloaded
