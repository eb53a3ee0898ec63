"""Dataset layouts: BraTS folder layout, nnU-Net v2 raw layout, longitudinal layout.

BraTS (2023+)::

    root/<case>/<case>-t1c.nii.gz, -t1n, -t2f, -t2w [, -seg]

Longitudinal (BraTS case folders grouped by patient; BraTS ids end with a
3-digit time point)::

    root/<patient>/timepoints.json         {"<patient>-000": {"day": 0}, "<patient>-001": {"day": 182}}
    root/<patient>/<patient>-000/<patient>-000-t1c.nii.gz ...

(``{"date": "YYYY-MM-DD"}`` is accepted instead of ``"day"``: days then count
from the patient's first date.)

nnU-Net v2 raw::

    root/dataset.json
    root/imagesTr/<case>_0000.nii.gz .. _0003   (channels in MODALITIES order)
    root/labelsTr/<case>.nii.gz
    root/imagesTs/<case>_0000.nii.gz ..         (unlabelled cases, optional)

Discovery checks the file structure only (missing modality, duplicate case
ids); :mod:`menseg.data.validate` checks the voxel contents.

Missing sequences: by default every case must have all four MODALITIES. With
``allow_missing=True`` (:func:`discover_inputs`, :func:`discover_cases`,
:func:`discover_series`, :func:`case_from_files`) a case may hold any non-empty
subset; its :class:`CaseFiles` then lacks the absent keys (see
:attr:`CaseFiles.present`, :attr:`CaseFiles.reference`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from menseg.constants import LABEL_NAMES, MODALITIES, SEG_SUFFIX
from menseg.data.io import is_nifti, nifti_ending, nifti_stem
from menseg.errors import MensegError

log = logging.getLogger(__name__)

Layout = Literal["brats", "nnunet", "longitudinal"]

#: Per-patient file of the longitudinal layout: ``{case_id: {"day": int}}``.
TIMEPOINTS_JSON = "timepoints.json"

_BRATS_RE = re.compile(rf"^(?P<id>.+)-(?P<key>{'|'.join((*MODALITIES, SEG_SUFFIX))})$")
_NNUNET_RE = re.compile(r"^(?P<id>.+)_(?P<ch>\d{4})$")
#: Looser pattern for single files given by the user (``t1c.nii.gz``, ``x_t1c.nii.gz``).
_LOOSE_RE = re.compile(rf"^(?:(?P<id>.*?)[-_.])?(?P<key>{'|'.join((*MODALITIES, SEG_SUFFIX))})$")

#: Channel names other tools use for our modalities (dataset.json channel_names).
_CHANNEL_ALIASES: dict[str, str] = {
    **{m: m for m in MODALITIES},
    "t1ce": "t1c", "t1gd": "t1c", "t1-gd": "t1c", "t1c": "t1c", "t1+c": "t1c",
    "t1": "t1n", "t1w": "t1n", "native": "t1n", "t1-native": "t1n",
    "flair": "t2f", "t2-flair": "t2f", "t2flair": "t2f",
    "t2": "t2w",
}  # fmt: skip


def check_case_id(case_id: str, where: str | Path | None = None) -> str:
    """``case_id`` if it is safe as a file name, else a :class:`MensegError`.

    Outputs are written as ``<folder>/<case_id>...``, so an id with a path separator, ``.`` / ``..``,
    a NUL byte, or nothing in it could write outside the output folder or clobber it.
    """
    if not isinstance(case_id, str) or not case_id.strip():
        raise MensegError(f"empty case id {case_id!r}", where)
    bad = [c for c in ("/", "\\", "\x00") if c in case_id]
    if bad or case_id in (".", "..") or case_id != case_id.strip():
        raise MensegError(f"case id {case_id!r} is not a safe file name (path separators, '..', NUL or "
                          "surrounding spaces would place outputs outside their folder)", where)
    return case_id


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case: images keyed by modality (MODALITIES order), optional label.

    ``images`` holds all four MODALITIES, or, for a case discovered with
    ``allow_missing=True``, a non-empty subset of them (absent keys are missing
    sequences).
    """

    case_id: str
    images: dict[str, Path]
    label: Path | None = None

    def __post_init__(self) -> None:
        check_case_id(self.case_id, self.reference if self.images else None)

    @property
    def present(self) -> tuple[str, ...]:
        """The modalities this case has, in MODALITIES order."""
        return tuple(m for m in MODALITIES if m in self.images)

    @property
    def missing(self) -> tuple[str, ...]:
        """The modalities this case lacks, in MODALITIES order (empty for a full case)."""
        return tuple(m for m in MODALITIES if m not in self.images)

    @property
    def complete(self) -> bool:
        """True if all four modalities are present."""
        return not self.missing

    @property
    def reference(self) -> Path:
        """The image whose grid outputs are written in: t1c if present, else the first present."""
        present = self.present
        if not present:
            raise MensegError(f"case '{self.case_id}' has no image ({', '.join(MODALITIES)})")
        return self.images[present[0]]

    @property
    def files(self) -> list[Path]:
        """All files of the case (present images in MODALITIES order, then the label if any)."""
        return [self.images[m] for m in self.present] + ([self.label] if self.label else [])


def _niftis(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _is_longitudinal(root: Path) -> bool:
    """``root/<patient>/timepoints.json`` exists for some patient folder (or ``root`` is one)."""
    return (root / TIMEPOINTS_JSON).is_file() or any(
        (sub / TIMEPOINTS_JSON).is_file() for sub in _subdirs(root)
    )


def detect_layout(root: str | Path) -> Layout:
    """Return ``"nnunet"`` (imagesTr/ or dataset.json present), ``"longitudinal"`` (patient
    folders with ``timepoints.json``) or ``"brats"`` (case folders)."""
    root = Path(root)
    if not root.exists():
        raise MensegError("dataset folder not found", root)
    if not root.is_dir():
        raise MensegError("not a folder", root)
    if (root / "imagesTr").is_dir() or (root / "dataset.json").is_file():
        return "nnunet"
    if (root / "imagesTs").is_dir():
        return "nnunet"
    if _is_longitudinal(root):
        return "longitudinal"
    for sub in [root, *_subdirs(root)]:  # the root itself may be a single case folder
        if any(_BRATS_RE.match(nifti_stem(p)) for p in _niftis(sub)):
            return "brats"
    raise MensegError(
        "no dataset found: expected BraTS case folders (<case>/<case>-t1c.nii.gz ...) "
        "or an nnU-Net raw dataset (imagesTr/, labelsTr/, dataset.json)",
        root,
    )


def _no_image_error(where: Path, case_id: str) -> MensegError:
    return MensegError(
        f"case '{case_id}' has no image file (need at least one of {', '.join(MODALITIES)})", where
    )


def _brats_case(folder: Path, allow_missing: bool = False) -> CaseFiles | None:
    """Parse one BraTS case folder; None if it holds no NIfTI files.

    Without ``allow_missing`` all four modalities must be there; with it at least one.
    """
    files = _niftis(folder)
    if not files:
        return None
    found: dict[str, Path] = {}
    ids: set[str] = set()
    for p in files:
        m = _BRATS_RE.match(nifti_stem(p))
        if m is None:
            log.debug("ignoring %s (not <case>-<t1c|t1n|t2f|t2w|seg>)", p)
            continue
        key = m["key"]
        if key in found:
            raise MensegError(f"two files for '{key}' ({found[key].name} and {p.name})", folder)
        found[key] = p
        ids.add(m["id"])
    if not found:
        raise MensegError(
            "no BraTS files in case folder (expected <case>-t1c.nii.gz, -t1n, -t2f, -t2w)", folder
        )
    if len(ids) > 1:
        raise MensegError(f"files of several cases in one folder: {', '.join(sorted(ids))}", folder)
    case_id = ids.pop()
    ending = nifti_ending(next(iter(found.values())))
    if not allow_missing:
        for mod in MODALITIES:
            if mod not in found:
                raise MensegError(f"missing modality {mod}", folder / f"{case_id}-{mod}{ending}")
    images = {m: found[m] for m in MODALITIES if m in found}
    if not images:
        raise _no_image_error(folder, case_id)
    if len(images) < len(MODALITIES):
        log.debug("%s: case %s lacks %s", folder, case_id,
                  ", ".join(m for m in MODALITIES if m not in images))
    return CaseFiles(case_id, images, found.get(SEG_SUFFIX))


def _channel_map(root: Path) -> list[str]:
    """Modality of each nnU-Net channel index, from dataset.json channel_names if present."""
    dj = root / "dataset.json"
    if not dj.is_file():
        return list(MODALITIES)
    try:
        meta = json.loads(dj.read_text())
    except (OSError, ValueError) as e:
        raise MensegError(f"unreadable dataset.json ({e})", dj) from None
    names = meta.get("channel_names") or meta.get("modality")
    if not isinstance(names, dict):
        return list(MODALITIES)
    try:
        ordered = [str(names[k]).strip().lower() for k in sorted(names, key=int)]
    except (ValueError, KeyError):
        raise MensegError("channel_names keys must be channel indices '0'..'3'", dj) from None
    if len(ordered) != len(MODALITIES):
        raise MensegError(
            f"{len(ordered)} channels in channel_names, expected {len(MODALITIES)} "
            f"({', '.join(MODALITIES)})",
            dj,
        )
    mapped = [_CHANNEL_ALIASES.get(n) for n in ordered]
    if sorted(m for m in mapped if m) == sorted(MODALITIES):
        return [m for m in mapped if m]
    log.warning(
        "%s: channel names %s not recognised; assuming channel order %s", dj, ordered, MODALITIES
    )
    return list(MODALITIES)


def _nnunet_images(
    folder: Path, channels: list[str], allow_missing: bool = False
) -> dict[str, dict[str, Path]]:
    """Group ``<case>_XXXX`` files of an images folder by case id.

    Without ``allow_missing`` every case must have every channel; with it a case
    may lack some (it has at least one file, or it would not exist).
    """
    cases: dict[str, dict[str, Path]] = {}
    for p in _niftis(folder):
        m = _NNUNET_RE.match(nifti_stem(p))
        if m is None:
            raise MensegError("image file name must end with a channel suffix _0000.._0003", p)
        ch = int(m["ch"])
        if ch >= len(channels):
            raise MensegError(f"channel {ch:04d} but only {len(channels)} channels expected", p)
        files = cases.setdefault(m["id"], {})
        mod = channels[ch]
        if mod in files:
            raise MensegError(
                f"duplicate case id '{m['id']}': two files for channel {ch:04d} "
                f"({files[mod].name} and {p.name})",
                p,
            )
        files[mod] = p
    if not allow_missing:
        for cid, files in cases.items():
            for ch, mod in enumerate(channels):
                if mod not in files:
                    end = nifti_ending(next(iter(files.values())))
                    raise MensegError(f"missing modality {mod}", folder / f"{cid}_{ch:04d}{end}")
    return cases


def _discover_nnunet(root: Path, allow_missing: bool = False) -> list[CaseFiles]:
    channels = _channel_map(root)
    labels: dict[str, Path] = {}
    lab_dir = root / "labelsTr"
    if lab_dir.is_dir():
        for p in _niftis(lab_dir):
            cid = nifti_stem(p)
            if cid in labels:
                raise MensegError(
                    f"duplicate case id '{cid}' ({labels[cid].name} and {p.name})", p
                )
            labels[cid] = p
    out: dict[str, CaseFiles] = {}
    for sub in ("imagesTr", "imagesTs"):
        folder = root / sub
        if not folder.is_dir():
            continue
        for cid, files in _nnunet_images(folder, channels, allow_missing).items():
            if cid in out:
                raise MensegError(f"duplicate case id '{cid}' (in imagesTr and imagesTs)", folder)
            label = labels.pop(cid, None) if sub == "imagesTr" else None
            out[cid] = CaseFiles(cid, {m: files[m] for m in MODALITIES if m in files}, label)
    if labels:
        cid, p = sorted(labels.items())[0]
        raise MensegError(f"label of case '{cid}' has no images in imagesTr", p)
    return [out[k] for k in sorted(out)]


def discover_cases(
    root: str | Path, allow_missing: bool = False, errors: list[tuple[str, str]] | None = None
) -> list[CaseFiles]:
    """All cases of a dataset folder (BraTS, nnU-Net or longitudinal layout), sorted by case id.

    For the longitudinal layout every visit of every patient is one case.

    Raises MensegError for: no dataset, missing modality (unless ``allow_missing``:
    then a case needs at least one image), duplicate case ids, labels without images.
    ``errors``: in the BraTS layout, a case folder that cannot be read is appended to it as
    ``(folder name, one-line error)`` and left out instead of raising (archives with bad cases).
    """
    root = Path(root)
    layout = detect_layout(root)
    if layout == "nnunet":
        cases = _discover_nnunet(root, allow_missing)
    elif layout == "longitudinal":
        cases = sorted(
            (case for visits in discover_series(root, allow_missing).values()
             for case, _ in visits),
            key=lambda c: c.case_id,
        )
    else:
        by_id: dict[str, CaseFiles] = {}
        own = [p for p in _niftis(root) if _BRATS_RE.match(nifti_stem(p))]
        for sub in ([root] if own else []) + _subdirs(root):
            try:
                case = _brats_case(sub, allow_missing)
            except MensegError as e:
                if errors is None:
                    raise
                errors.append((sub.name, " ".join(str(e).split())))
                continue
            if case is None:
                log.debug("skipping %s: no NIfTI files", sub)
                continue
            if case.case_id in by_id:
                other = by_id[case.case_id].reference.parent
                raise MensegError(
                    f"duplicate case id '{case.case_id}' (also in folder {other.name})", sub
                )
            by_id[case.case_id] = case
        cases = [by_id[k] for k in sorted(by_id)]
    if not cases and not errors:
        raise MensegError("dataset holds no cases", root)
    return cases


def _read_timepoints(path: Path) -> dict[str, int]:
    """``{case_id: day}`` from a patient's timepoints.json (``day`` int, or ``date`` ISO)."""
    import datetime as dt

    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MensegError(f"unreadable {TIMEPOINTS_JSON} ({e})", path) from None
    if not isinstance(meta, dict) or not meta:
        raise MensegError(
            f'{TIMEPOINTS_JSON} must be an object {{"<case id>": {{"day": <int>}}, ...}}', path
        )
    days: dict[str, int] = {}
    dates: dict[str, dt.date] = {}
    for cid, entry in meta.items():
        if not isinstance(entry, dict) or ("day" not in entry and "date" not in entry):
            raise MensegError(f"time point of case '{cid}' needs a 'day' (or 'date')", path)
        if "day" in entry:
            day = entry["day"]
            if isinstance(day, bool) or not isinstance(day, int | float) or day != int(day):
                raise MensegError(f"day of case '{cid}' must be an integer, got {day!r}", path)
            days[cid] = int(day)
        else:
            try:
                dates[cid] = dt.date.fromisoformat(str(entry["date"]))
            except ValueError:
                raise MensegError(
                    f"date of case '{cid}' must be YYYY-MM-DD, got {entry['date']!r}", path
                ) from None
    if days and dates:
        raise MensegError("mix of 'day' and 'date' time points; use one kind per patient", path)
    if dates:
        first = min(dates.values())
        days = {cid: (d - first).days for cid, d in dates.items()}
    return days


def _patient_series(folder: Path, allow_missing: bool = False) -> list[tuple[CaseFiles, int]]:
    """Visits of one patient folder, sorted by day then case id."""
    tp = folder / TIMEPOINTS_JSON
    if not tp.is_file():
        raise MensegError(f"patient folder without {TIMEPOINTS_JSON}", tp)
    days = _read_timepoints(tp)
    visits: dict[str, CaseFiles] = {}
    for sub in _subdirs(folder):
        case = _brats_case(sub, allow_missing)
        if case is None:
            log.debug("skipping %s: no NIfTI files", sub)
            continue
        if case.case_id in visits:
            raise MensegError(f"duplicate case id '{case.case_id}'", sub)
        if case.case_id not in days:
            raise MensegError(f"case '{case.case_id}' has no time point in {TIMEPOINTS_JSON}", sub)
        visits[case.case_id] = case
    missing = sorted(set(days) - set(visits))
    if missing:
        raise MensegError(
            f"{TIMEPOINTS_JSON} lists case(s) without a case folder: {', '.join(missing)}", tp
        )
    return sorted(((c, days[c.case_id]) for c in visits.values()), key=lambda v: (v[1], v[0].case_id))


def discover_series(
    root: str | Path, allow_missing: bool = False
) -> dict[str, list[tuple[CaseFiles, int]]]:
    """Patients of a longitudinal dataset: ``{patient: [(case, day), ...]}`` sorted by day.

    ``root`` holds patient folders (``root/<patient>/timepoints.json`` plus one
    BraTS case folder per visit), or is itself one patient folder. Days are
    offsets in days (int). Patients are sorted by name. Raises MensegError for a
    patient folder without timepoints.json, a case missing from it or an entry
    without a case folder, duplicate case ids, a missing modality (unless
    ``allow_missing``: then a visit needs at least one image).
    """
    root = Path(root)
    if not root.is_dir():
        raise MensegError("dataset folder not found" if not root.exists() else "not a folder", root)
    if (root / TIMEPOINTS_JSON).is_file():
        patients = [root]
    else:
        patients = []
        for sub in _subdirs(root):
            if (sub / TIMEPOINTS_JSON).is_file() or any(_subdirs(sub)):
                patients.append(sub)
            elif _niftis(sub):
                log.warning("%s: NIfTI files directly in a patient folder; ignored", sub)
        if not any((p / TIMEPOINTS_JSON).is_file() for p in patients):
            raise MensegError(
                f"not a longitudinal dataset: expected <patient>/{TIMEPOINTS_JSON} and "
                "<patient>/<case>/ folders",
                root,
            )
    out: dict[str, list[tuple[CaseFiles, int]]] = {}
    seen: dict[str, str] = {}
    for folder in patients:
        visits = _patient_series(folder, allow_missing)
        if not visits:
            raise MensegError("patient folder holds no cases", folder)
        for case, _ in visits:
            if case.case_id in seen:
                raise MensegError(
                    f"duplicate case id '{case.case_id}' (also in patient {seen[case.case_id]})",
                    folder,
                )
            seen[case.case_id] = folder.name
        out[folder.name] = visits
    return out


def case_from_files(paths: Iterable[str | Path], allow_missing: bool = False) -> CaseFiles:
    """One case from four image files (and optionally a label file).

    Modalities come from the file names: BraTS suffixes (``-t1c`` ... ``-seg``,
    also ``_t1c`` or a bare ``t1c.nii.gz``) or nnU-Net channel suffixes
    (``_0000`` ... ``_0003``, MODALITIES order; a fifth file without a channel
    suffix is the label). With ``allow_missing`` 1-4 image files are accepted
    (a label without a channel suffix is then only recognised beside all four).
    """
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists():
            raise MensegError("file not found", p)
        if not is_nifti(p):
            raise MensegError("not a NIfTI file (.nii or .nii.gz)", p)
    found: dict[str, Path] = {}
    ids: list[str] = []
    unknown: list[Path] = []
    for p in paths:
        stem = nifti_stem(p)
        m = _BRATS_RE.match(stem) or _LOOSE_RE.match(stem)
        if m is not None:
            key, cid = m["key"], m["id"]
        elif (n := _NNUNET_RE.match(stem)) is not None and int(n["ch"]) < len(MODALITIES):
            key, cid = MODALITIES[int(n["ch"])], n["id"]
        else:
            unknown.append(p)
            continue
        if key in found:
            raise MensegError(f"two files given for '{key}' ({found[key]} and {p})", p)
        found[key] = p
        if cid:
            ids.append(cid)
    if len(unknown) == 1 and SEG_SUFFIX not in found and len(found) == len(MODALITIES):
        found[SEG_SUFFIX] = unknown.pop()
    if unknown:
        raise MensegError(
            "cannot tell the modality from the file name (expected a -t1c/-t1n/-t2f/-t2w/-seg "
            "or _0000.._0003 suffix)",
            unknown[0],
        )
    if not paths:
        raise MensegError("no image files given")
    case_id = max(set(ids), key=ids.count) if ids else (paths[0].resolve().parent.name or "case")
    given = ", ".join(p.name for p in paths)
    if not allow_missing:
        for mod in MODALITIES:
            if mod not in found:
                expected = paths[0].parent / f"{case_id}-{mod}{nifti_ending(paths[0])}"
                raise MensegError(
                    f"missing modality {mod} among the given files ({given})", expected
                )
    images = {m: found[m] for m in MODALITIES if m in found}
    if not images:
        raise MensegError(
            f"no image file among the given files ({given}); need at least one of "
            f"{', '.join(MODALITIES)}",
            paths[0],
        )
    return CaseFiles(case_id, images, found.get(SEG_SUFFIX))


def discover_inputs(
    path: str | Path | Sequence[str | Path], allow_missing: bool = False,
    errors: list[tuple[str, str]] | None = None,
) -> list[CaseFiles]:
    """Cases to predict on.

    ``path`` may be a dataset folder (BraTS or nnU-Net layout; for nnU-Net,
    imagesTr and imagesTs), one BraTS case folder, a flat folder of nnU-Net
    channel files (like ``imagesTs/``), or a list of four image files.

    With ``allow_missing`` a case may lack some sequences (1-4 image files; the
    absent keys are missing from ``CaseFiles.images``); a case with no image is
    still an error. Without it a missing sequence is a MensegError. ``errors``: see
    :func:`discover_cases` (bad case folders of a dataset are listed there instead of raising).
    """
    if not isinstance(path, str | os.PathLike):
        return [case_from_files(path, allow_missing)]
    p = Path(path)
    if not p.exists():
        raise MensegError("input not found", p)
    if p.is_file():
        raise MensegError(
            "a single file is not a case: give a case folder, a dataset folder or four files", p
        )
    files = _niftis(p)
    if files:
        if any(_BRATS_RE.match(nifti_stem(f)) for f in files):
            case = _brats_case(p, allow_missing)
            assert case is not None
            return [case]
        if all(_NNUNET_RE.match(nifti_stem(f)) for f in files):
            cases = _nnunet_images(p, list(MODALITIES), allow_missing)
            return [
                CaseFiles(cid, {m: cases[cid][m] for m in MODALITIES if m in cases[cid]})
                for cid in sorted(cases)
            ]
        return [case_from_files(files, allow_missing)]
    return discover_cases(p, allow_missing, errors)


def nnunet_dataset_json(name: str, n_training: int, ending: str = ".nii.gz") -> dict:
    """nnU-Net v2 ``dataset.json`` content: channels in MODALITIES order, BraTS-MEN labels."""
    return {
        "name": name,
        "description": "written by menseg (BraTS-MEN labels)",
        "channel_names": {str(i): m for i, m in enumerate(MODALITIES)},
        "labels": {LABEL_NAMES[k]: k for k in sorted(LABEL_NAMES)},
        "numTraining": n_training,
        "file_ending": ending,
    }


def _target_files(cases: list[CaseFiles], dst: Path, layout: Layout) -> list[tuple[Path, Path]]:
    """(source, destination relative to dst) pairs for a conversion."""
    pairs: list[tuple[Path, Path]] = []
    any_labelled = any(c.label is not None for c in cases)
    for c in cases:
        if layout == "brats":
            for m in MODALITIES:
                src = c.images[m]
                pairs.append((src, Path(c.case_id) / f"{c.case_id}-{m}{nifti_ending(src)}"))
            if c.label is not None:
                rel = Path(c.case_id) / f"{c.case_id}-{SEG_SUFFIX}{nifti_ending(c.label)}"
                pairs.append((c.label, rel))
        else:
            # nnU-Net wants a label for every imagesTr case: unlabelled cases go to imagesTs
            # unless the whole dataset is unlabelled.
            sub = "imagesTr" if (c.label is not None or not any_labelled) else "imagesTs"
            for i, m in enumerate(MODALITIES):
                src = c.images[m]
                pairs.append((src, Path(sub) / f"{c.case_id}_{i:04d}{nifti_ending(src)}"))
            if c.label is not None:
                pairs.append((c.label, Path("labelsTr") / f"{c.case_id}{nifti_ending(c.label)}"))
    return pairs


def convert_dataset(src: str | Path, dst: str | Path, layout: Layout) -> int:
    """Convert a dataset to ``layout`` ("brats" or "nnunet") by copying files byte for byte.

    The source is validated fully first (:func:`menseg.data.validate.check_dataset`);
    ``dst`` must not exist or be empty. Files are written to a temporary folder
    beside ``dst`` which is renamed onto ``dst`` at the end, so an error leaves
    nothing behind. Returns the number of cases converted.
    """
    from menseg.data.validate import check_case

    src, dst = Path(src), Path(dst)
    if layout not in ("brats", "nnunet"):
        raise MensegError(f"cannot convert to layout '{layout}' (use brats or nnunet)")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise MensegError("destination exists and is not empty; refusing to write into it", dst)
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise MensegError("destination must be outside the source dataset", dst)
    cases = discover_cases(src)
    for case in cases:
        check_case(case)
    pairs = _target_files(cases, dst, layout)
    endings = {nifti_ending(s) for s, _ in pairs}
    if layout == "nnunet" and len(endings) > 1:
        raise MensegError("mixed .nii and .nii.gz files; nnU-Net needs one file ending", src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent))
    try:
        for s, rel in pairs:
            out = tmp / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(s, out)
        if layout == "nnunet":
            from menseg.utils import write_json_atomic

            n_tr = sum(1 for _, rel in pairs if rel.parts[0] == "labelsTr")
            if n_tr == 0:
                n_tr = len(cases)
            write_json_atomic(
                tmp / "dataset.json", nnunet_dataset_json(dst.name, n_tr, endings.pop())
            )
        if dst.exists():
            dst.rmdir()  # empty (checked above)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("converted %d cases from %s to %s (%s layout)", len(cases), src, dst, layout)
    return len(cases)
