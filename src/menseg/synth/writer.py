"""Write synthetic cases in the BraTS, nnU-Net v2 or longitudinal layout, with a JSON sidecar each.

Layouts (as :mod:`menseg.data.layouts` reads them)::

    brats:         OUT/<case>/<case>-t1c.nii.gz ... -seg.nii.gz, OUT/<case>/<case>-params.json
    nnunet:        OUT/imagesTr/<case>_0000.nii.gz ..., OUT/labelsTr/<case>.nii.gz, OUT/dataset.json,
                   OUT/params/<case>-params.json
    longitudinal:  OUT/<patient>/<patient>-<ttt>/<patient>-<ttt>-t1c.nii.gz ... + -params.json,
                   OUT/<patient>/timepoints.json  {"<patient>-<ttt>": {"day": d}}

Preview mosaics go to ``OUT/preview/<case>.png``. The whole dataset is written
into a temporary folder beside OUT and renamed onto it when complete (each file
is also written atomically), so an interrupted run leaves no partial dataset.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

from menseg.constants import MODALITIES, SEG_SUFFIX
from menseg.data.io import write_image, write_label
from menseg.data.layouts import TIMEPOINTS_JSON, nnunet_dataset_json
from menseg.errors import MensegError
from menseg.utils import write_json_atomic

if TYPE_CHECKING:
    from menseg.synth.engine import SynthCase

log = logging.getLogger(__name__)

ENDING = ".nii.gz"
#: gzip level of written NIfTI files: 1 is ~3x faster than nibabel's default 6 for ~10 % more bytes.
COMPRESS_LEVEL = 1
PARAMS_DIR = "params"
PREVIEW_DIR = "preview"


def patient_id(prefix: str, index: int) -> str:
    """``<prefix>-<index:05d>`` (BraTS-style patient id); a prefix that is not a safe file name is refused."""
    from menseg.data.layouts import check_case_id

    return check_case_id(f"{prefix}-{index:05d}")


def case_id(prefix: str, index: int, timepoint: int = 0) -> str:
    """``<prefix>-<index:05d>-<timepoint:03d>`` (BraTS ids end with a 3-digit time point)."""
    return f"{patient_id(prefix, index)}-{timepoint:03d}"


def case_paths(case: str, layout: str, patient: str | None = None) -> dict[str, Path]:
    """Relative paths of one case: keys = MODALITIES, ``"seg"`` and ``"params"``."""
    if layout == "nnunet":
        paths = {m: Path("imagesTr") / f"{case}_{i:04d}{ENDING}" for i, m in enumerate(MODALITIES)}
        paths[SEG_SUFFIX] = Path("labelsTr") / f"{case}{ENDING}"
        paths["params"] = Path(PARAMS_DIR) / f"{case}-params.json"
        return paths
    if layout == "brats":
        folder = Path(case)
    elif layout == "longitudinal":
        if patient is None:
            raise ValueError("longitudinal layout needs a patient id")
        folder = Path(patient) / case
    else:
        raise MensegError(f"unknown layout '{layout}' (use brats, nnunet or longitudinal)")
    paths = {m: folder / f"{case}-{m}{ENDING}" for m in (*MODALITIES, SEG_SUFFIX)}
    paths["params"] = folder / f"{case}-params.json"
    return paths


def sidecar_dict(case: SynthCase, case_id: str) -> dict[str, Any]:
    """The JSON sidecar of a case: version, case id, shapes, and ``case.params`` (seed, config, params)."""
    from menseg.synth.engine import SIDECAR_VERSION

    return {
        "menseg_synth_sidecar": SIDECAR_VERSION,
        "case_id": case_id,
        "shape": list(case.label.shape),
        "affine": case.affine.tolist(),
        **case.params,
    }


class DatasetWriter:
    """Context manager writing one dataset into a temporary folder, renamed onto ``out`` on success.

    ``out`` must not exist or be an empty folder. :meth:`write` returns the
    sidecar path *inside the temporary folder*; :meth:`relative` gives paths
    relative to the dataset root.
    """

    def __init__(self, out: str | Path, layout: str) -> None:
        self.out = Path(out)
        self.layout = layout
        if layout not in ("brats", "nnunet", "longitudinal"):
            raise MensegError(f"unknown layout '{layout}' (use brats, nnunet or longitudinal)")
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise MensegError("output exists and is not empty; refusing to write into it", self.out)
        self.tmp: Path | None = None
        self.timepoints: dict[str, dict[str, dict[str, int]]] = {}
        self.n_cases = 0

    def __enter__(self) -> DatasetWriter:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent))
        self._old_level = nib.openers.Opener.default_compresslevel
        nib.openers.Opener.default_compresslevel = COMPRESS_LEVEL
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        nib.openers.Opener.default_compresslevel = self._old_level
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        try:
            self._finish()
            if self.out.exists():
                self.out.rmdir()  # empty (checked in __init__)
            os.replace(self.tmp, self.out)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        log.info("wrote %d synthetic case(s) to %s (%s layout)", self.n_cases, self.out, self.layout)

    def _finish(self) -> None:
        assert self.tmp is not None
        for patient, tp in self.timepoints.items():
            write_json_atomic(self.tmp / patient / TIMEPOINTS_JSON, tp)
        if self.layout == "nnunet":
            write_json_atomic(self.tmp / "dataset.json",
                              nnunet_dataset_json(self.out.name, self.n_cases, ENDING))

    def write(self, case: SynthCase, case_id: str, patient: str | None = None,
              day: int | None = None) -> Path:
        """Write the images, label and sidecar of ``case``; returns the (temporary) sidecar path."""
        assert self.tmp is not None, "use DatasetWriter as a context manager"
        paths = {k: self.tmp / p for k, p in case_paths(case_id, self.layout, patient).items()}
        if paths["params"].exists():
            raise MensegError(f"duplicate case id '{case_id}'", paths["params"])
        image = case.image.detach().cpu().numpy()
        label = case.label.detach().cpu().numpy()
        for c, m in enumerate(MODALITIES):
            write_image(paths[m], image[c], case.affine)
        write_label(paths[SEG_SUFFIX], label, case.affine)
        write_json_atomic(paths["params"], sidecar_dict(case, case_id))
        if self.layout == "longitudinal":
            if patient is None or day is None:
                raise ValueError("longitudinal layout needs patient and day")
            self.timepoints.setdefault(patient, {})[case_id] = {"day": int(day)}
        self.n_cases += 1
        return paths["params"]

    def write_arrays(self, case_id: str, image: np.ndarray, label: np.ndarray,
                     affines: dict[str, np.ndarray], likes: dict[str, Any],
                     sidecar: dict[str, Any]) -> Path:
        """Write one case given as arrays (e.g. an injected real scan); returns the (temporary) sidecar path.

        ``image`` ``(4, X, Y, Z)`` (written float32, MODALITIES order), ``label`` ``(X, Y, Z)``
        (uint8); ``affines`` / ``likes`` per key of MODALITIES and ``"seg"``: the 4x4 affine and
        the NIfTI image or header whose metadata each file keeps.
        """
        assert self.tmp is not None, "use DatasetWriter as a context manager"
        if self.layout == "longitudinal":
            raise MensegError("write_arrays supports the brats and nnunet layouts only")
        paths = {k: self.tmp / p for k, p in case_paths(case_id, self.layout).items()}
        if paths["params"].exists():
            raise MensegError(f"duplicate case id '{case_id}'", paths["params"])
        for c, m in enumerate(MODALITIES):
            write_image(paths[m], image[c], affines[m], like=likes.get(m))
        write_label(paths[SEG_SUFFIX], label, affines[SEG_SUFFIX], like=likes.get(SEG_SUFFIX))
        write_json_atomic(paths["params"], sidecar)
        self.n_cases += 1
        return paths["params"]

    def write_preview(self, case: SynthCase, case_id: str) -> Path:
        """PNG mosaic of ``case`` at ``preview/<case_id>.png``."""
        from menseg.synth.preview import write_preview

        assert self.tmp is not None
        spacing = tuple(float(abs(case.affine[i, i])) or 1.0 for i in range(3))
        return write_preview(self.tmp / PREVIEW_DIR / f"{case_id}.png", case.image, case.label,
                             spacing, title=case_id)

    def relative(self, paths: list[Path]) -> list[Path]:
        """``paths`` (inside the temporary folder) relative to the dataset root."""
        assert self.tmp is not None
        return [p.relative_to(self.tmp) for p in paths]


def read_sidecar(path: str | Path) -> dict[str, Any]:
    """Load a sidecar JSON (see :func:`menseg.synth.engine.load_sidecar` for checks)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise MensegError(f"unreadable sidecar ({e})", path) from None


def read_sidecar_of_kind(
    path: str | Path, kind: str, required: tuple[str, ...], what: str
) -> dict[str, Any]:
    """Load a sidecar and check its ``kind`` and ``required`` keys (``what`` names it in errors)."""
    side = read_sidecar(path)
    if side.get("kind") != kind:
        raise MensegError(f"not {what} sidecar (kind != '{kind}')", path)
    for key in required:
        if key not in side:
            raise MensegError(f"sidecar lacks '{key}'", path)
    return side


__all__ = [
    "COMPRESS_LEVEL",
    "DatasetWriter",
    "case_id",
    "case_paths",
    "patient_id",
    "read_sidecar",
    "read_sidecar_of_kind",
    "sidecar_dict",
]
