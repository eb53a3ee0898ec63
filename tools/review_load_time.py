#!/usr/bin/env python3
"""Page load time of ``menseg review``'s case page, for a 240x240x155 and a 512x512x400 case.

Generates each case (four sequences, a prediction and a reference, int16 on disk), serves it with
``menseg review``'s server on 127.0.0.1, opens the case page in headless Chromium (Debian's chromium
and chromium-driver) and prints the time from navigation to the first drawn frame with the first
sequence and the prediction, cold (the server converts the files for display) and warm (converted
volumes cached by the server, the browser's own cache off). Needs the test extra (selenium).

    python tools/review_load_time.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from menseg.constants import MODALITIES  # noqa: E402
from menseg.review.cases import collect_cases  # noqa: E402
from menseg.review.server import ReviewServer  # noqa: E402
from menseg.review.site import ReviewSite  # noqa: E402
from nifti_factory import save  # noqa: E402
from review_cases import CHROME_ARGS, head  # noqa: E402

SHAPES = {"240x240x155": (240, 240, 155), "512x512x400": (512, 512, 400)}


def write(root: Path, case: str, shape: tuple[int, int, int]) -> None:
    images, label, affine = head(shape, spacing=240.0 / shape[0])
    for c, m in enumerate(MODALITIES):
        save(root / "images" / case / f"{case}-{m}.nii.gz", images[c].astype(np.int16), affine, np.int16)
    save(root / "pred" / f"{case}.nii.gz", label, affine, np.uint8)
    save(root / "ref" / f"{case}.nii.gz", label, affine, np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name, shape in SHAPES.items():
            t = time.perf_counter()
            write(root, f"LOAD-{name}", shape)
            print(f"generated {name} in {time.perf_counter() - t:.0f} s", flush=True)  # noqa: T201
        cases = collect_cases(root / "pred", root / "images", root / "ref", progress=False)
        srv = ReviewServer(ReviewSite(cases, root / "pred"), 0)
        srv.start_background()
        opts = webdriver.ChromeOptions()
        for a in (*CHROME_ARGS, "--disk-cache-size=1"):
            opts.add_argument(a)
        opts.binary_location = "/usr/bin/chromium"
        d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
        try:
            for name in SHAPES:
                times = []
                for i in range(args.repeats + 1):
                    d.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
                    d.get(f"{srv.url}case.html?case=LOAD-{name}")
                    while not d.execute_script("return !!(window.menseg && menseg.state.ready)"):
                        time.sleep(0.05)
                    ms = d.execute_script("return menseg.state.loadMs")
                    note = d.execute_script("return document.getElementById('banner').innerText")
                    times.append(ms / 1000)
                    print(f"{name} {'cold' if i == 0 else 'warm'}: {ms / 1000:.2f} s {note!r}",  # noqa: T201
                          flush=True)
                print(f"{name}: cold {times[0]:.2f} s, warm median {statistics.median(times[1:]):.2f} s "  # noqa: T201
                      f"({args.repeats} loads)", flush=True)
        finally:
            d.quit()
            srv.shutdown()


if __name__ == "__main__":
    main()
