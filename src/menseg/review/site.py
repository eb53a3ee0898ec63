"""The review pages: one set of files, served by :mod:`menseg.review.server` or written to a folder.

Layout (the same from the server and on disk)::

    index.html, case.html          the two pages (package files under review/static/)
    static/                        review.js, review.css, vendor/niivue.umd.js (+ licences)
    data/index.js                  menseg.index({...}): one row per case
    data/<case>/case.js            menseg.caseMeta({...}): sequences, lesions, geometry, problem
    data/<case>/<name>.js          menseg.volume(case, name, base64 NIfTI): t1c t1n t2f t2w pred ref

Data travel as scripts rather than fetched files so that a static folder opened from disk
(``file://``, where browsers refuse ``fetch``) shows the same pages as the server.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections import OrderedDict
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from menseg import __version__
from menseg.constants import MODALITIES
from menseg.data.io import read_label
from menseg.errors import MensegError
from menseg.evaluate.metrics import MEN_MIN_LESION_VOLUME_MM3
from menseg.review.cases import ReviewCase, lesions
from menseg.review.display import data_script, geometry, image_for_display, label_for_display, volume_script
from menseg.review.verdicts import VERDICTS, read_verdicts, verdicts_csv

log = logging.getLogger(__name__)

Mode = Literal["server", "static"]
#: Volume names a case page may ask for.
VOLUMES: tuple[str, ...] = (*MODALITIES, "pred", "ref")
#: Label colours (RGB) of the overlays, as the page draws them: BraTS-MEN labels 1, 2, 3.
LABEL_COLOURS: dict[str, tuple[int, int, int]] = {"NETC": (230, 40, 40), "SNFH": (40, 200, 70),
                                                  "ET": (250, 215, 20)}
#: Cases whose display volumes the server keeps in memory.
CACHE_CASES = 6


def static_root() -> Path:
    """The package folder holding the pages, scripts and vendored NiiVue."""
    return Path(str(resources.files("menseg.review") / "static"))


class ReviewSite:
    """The pages' data for a list of cases (:func:`menseg.review.cases.collect_cases`)."""

    def __init__(self, cases: list[ReviewCase], pred_dir: Path, mode: Mode = "server") -> None:
        self.cases = {c.case_id: c for c in cases}
        self.order = [c.case_id for c in cases]
        self.pred_dir = Path(pred_dir)
        self.mode = mode
        self._cache: OrderedDict[str, dict[str, bytes]] = OrderedDict()
        self._locks: dict[str, threading.Lock] = {cid: threading.Lock() for cid in self.order}
        self._cache_lock = threading.Lock()
        self._payloads: dict[str, dict[str, Any]] = {}

    # -- payloads -------------------------------------------------------------------------------
    def index_payload(self) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "mode": self.mode, "version": __version__, "verdict_choices": list(VERDICTS),
            "pred_dir": str(self.pred_dir), "cases": [self.cases[c].row() for c in self.order],
            "colours": LABEL_COLOURS,
        }
        if self.mode == "static":  # the server's pages ask /api/verdicts instead
            payload["verdicts"] = read_verdicts(self.pred_dir)
        return payload

    def case_payload(self, case_id: str) -> dict[str, Any]:
        """The case page's data, with the case's saved verdict in a static folder."""
        payload = dict(self._cached_payload(case_id))
        if self.mode == "static":  # the server's pages ask /api/verdicts instead
            payload["verdicts"] = {k: v for k, v in read_verdicts(self.pred_dir).items() if k == case_id}
        return payload

    def _cached_payload(self, case_id: str) -> dict[str, Any]:
        """:meth:`_case_payload`, computed once per case (lesions of a 512^3 label take a second)."""
        with self._locks[case_id]:
            if case_id not in self._payloads:
                self._payloads[case_id] = self._case_payload(case_id)
            return self._payloads[case_id]

    def _case_payload(self, case_id: str) -> dict[str, Any]:
        case = self.cases[case_id]
        i = self.order.index(case_id)
        payload: dict[str, Any] = {
            "mode": self.mode, "version": __version__, "verdict_choices": list(VERDICTS),
            "case": case_id, "row": case.row(), "colours": LABEL_COLOURS,
            "sequences": {m: m in case.images for m in MODALITIES},
            "previous": self.order[i - 1] if i > 0 else None,
            "next": self.order[i + 1] if i + 1 < len(self.order) else None,
            "problem": case.problem, "geometry": None, "lesions": {"prediction": [], "reference": []},
            # components this small are folded in the lists (the lesion-wise metrics ignore reference
            # lesions of this volume or less)
            "small_ml": MEN_MIN_LESION_VOLUME_MM3 / 1000.0,
        }
        if case.problem is None:
            payload["geometry"] = geometry(case.prediction).as_dict()
            for key, path in (("prediction", case.prediction), ("reference", case.reference)):
                if path is not None:
                    payload["lesions"][key] = lesions(*read_label(path))
        return payload

    def volume(self, case_id: str, name: str) -> bytes:
        """The script of one display volume (cached for the last :data:`CACHE_CASES` cases)."""
        case = self.cases[case_id]
        if case.problem is not None:
            raise MensegError(f"case {case_id} is not displayed: {case.problem}")
        factor = self._cached_payload(case_id)["geometry"]["factor"]  # the header is read once per case
        with self._locks[case_id]:
            with self._cache_lock:
                held = self._cache.get(case_id)
                if held is not None:
                    self._cache.move_to_end(case_id)
                    if name in held:
                        return held[name]
            if name in MODALITIES:
                if name not in case.images:
                    raise MensegError(f"case {case_id} has no {name} sequence")
                nifti = image_for_display(case.images[name], factor)
            elif name == "pred":
                nifti = label_for_display(case.prediction, factor)
            elif case.reference is not None:
                nifti = label_for_display(case.reference, factor)
            else:
                raise MensegError(f"case {case_id} has no reference")
            script = volume_script(case_id, name, nifti)
            with self._cache_lock:
                self._cache.setdefault(case_id, {})[name] = script
                self._cache.move_to_end(case_id)
                while len(self._cache) > CACHE_CASES:
                    self._cache.popitem(last=False)
            return script

    def volume_names(self, case_id: str) -> list[str]:
        case = self.cases[case_id]
        return [*case.sequences, "pred", *(["ref"] if case.reference is not None else [])]

    # -- routing (GET) ----------------------------------------------------------------------------
    def get(self, path: str) -> tuple[bytes, str] | None:
        """``(body, content type)`` for a decoded URL path, or None (404). Never reads outside the
        package's static folder and the cases' own files."""
        if path in ("/", "/index.html"):
            return (static_root() / "index.html").read_bytes(), "text/html; charset=utf-8"
        if path == "/case.html":
            return (static_root() / "case.html").read_bytes(), "text/html; charset=utf-8"
        if path.startswith("/static/"):
            return _static_file(path[len("/static/"):])
        if path == "/data/index.js":
            return data_script("index", self.index_payload()), JS
        parts = path.split("/")
        if len(parts) == 4 and parts[1] == "data" and parts[2] in self.cases and parts[3].endswith(".js"):
            case_id, name = parts[2], parts[3][: -len(".js")]
            if name == "case":
                return data_script("caseMeta", self.case_payload(case_id)), JS
            if name in self.volume_names(case_id) and self.cases[case_id].problem is None:
                return self.volume(case_id, name), JS
        return None

    # -- static folder --------------------------------------------------------------------------
    def write(self, out: Path, overwrite: bool = False, progress: bool = True) -> Path:
        """Write every page, script and volume under ``out``; returns ``out/index.html``."""
        out = Path(out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            if not overwrite:
                raise MensegError("output folder exists and is not empty (use --overwrite)", out)
            if (out / "data" / "index.js").is_file():
                shutil.rmtree(out)
            else:
                raise MensegError("refusing to replace a folder that is not a menseg review site", out)
        tmp = out.with_name(f".{out.name}.partial")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(static_root(), tmp / "static", ignore=shutil.ignore_patterns("*.html", "__pycache__"))
        for page in ("index.html", "case.html"):
            shutil.copy2(static_root() / page, tmp / page)
        (tmp / "data").mkdir()
        (tmp / "data" / "index.js").write_bytes(data_script("index", self.index_payload()))
        verdicts = read_verdicts(self.pred_dir)
        if verdicts:
            (tmp / "review.csv").write_text(verdicts_csv(verdicts))
        for cid in tqdm(self.order, desc="review pages", unit="case", disable=None if progress else True):
            folder = tmp / "data" / cid
            folder.mkdir()
            (folder / "case.js").write_bytes(data_script("caseMeta", self.case_payload(cid)))
            if self.cases[cid].problem is not None:
                continue
            for name in self.volume_names(cid):
                (folder / f"{name}.js").write_bytes(self.volume(cid, name))
            with self._cache_lock:
                self._cache.pop(cid, None)
        tmp.rename(out)
        return out / "index.html"


JS = "application/javascript; charset=utf-8"
_TYPES = {".js": JS, ".css": "text/css; charset=utf-8", ".json": "application/json",
          ".txt": "text/plain; charset=utf-8", ".html": "text/html; charset=utf-8", ".png": "image/png"}


def _static_file(rel: str) -> tuple[bytes, str] | None:
    root = static_root().resolve()
    target = (root / rel).resolve()
    if not target.is_relative_to(root) or not target.is_file() or target.suffix not in _TYPES:
        return None
    return target.read_bytes(), _TYPES[target.suffix]

