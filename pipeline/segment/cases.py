"""Cases: what to segment, found in a folder or a datalist, each with a unique, predictable id.

Without ``--series`` a folder directly holding DICOM files is one case (reports, localizers and
screenshots next to its one image series are passed over by the reader). With ``--series``
rules (:mod:`pipeline.dicom`) every DICOM folder under the input is inventoried and the rules
choose, per study, which series (and which volumes of a multi-phase series) become cases; the
others are listed with the reason they were skipped.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Sequence

from pipeline.readers import is_dicom_series_folder, is_series_reference, list_images, split_series_reference, strip_image_suffix

__all__ = [
    "OUTPUT_MARKER",
    "Case",
    "sanitize",
    "assign_case_ids",
    "discover_cases",
    "cases_from_datalist",
    "record_skipped_series",
    "record_discovery",
    "pseudonymise_cases",
    "pseudonym_key",
    "SKIPPED_SERIES",
    "PHI_MAP",
    "shard",
]

# The lock file every segment run keeps in its output folder; it also marks the folder as
# output, so a later run over a tree that contains it never segments the masks again.
OUTPUT_MARKER = ".segment.lock"


@dataclasses.dataclass
class Case:
    """One input: an image file, a DICOM series folder or series reference
    (``folder?series=UID[&Keyword=value]``, see :func:`pipeline.readers.series_reference`), or
    (from a datalist) a list of channel files.

    ``source`` is the input's path relative to the input folder / dataset_dir (shown in the report).
    ``series_uid`` is the chosen DICOM series when ``--series`` chose it; ``notes`` are what the
    inventory found about it (a geometry correction the reader will make).
    """

    case_id: str
    image: str | list[str]
    source: str
    is_dicom: bool = False
    series_uid: str | None = None
    notes: tuple[str, ...] = ()
    phi: dict | None = None  # with --pseudonymise: what the id stands for (written to phi_map.csv only)

    @property
    def first_path(self) -> str:
        return self.image[0] if isinstance(self.image, list) else self.image


def sanitize(name: str) -> str:
    """Keep case ids and class names safe as file names on every platform."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "case"


def _source_name(source: str) -> tuple[list[str], str]:
    """(folders, name) of a source path; a series reference is named after its folder."""
    folder = split_series_reference(source)[0] if is_series_reference(source) else source
    parts = [p for p in folder.rstrip("/").split("/") if p]
    return parts[:-1], parts[-1] if parts else "case"


def assign_case_ids(entries: Sequence[tuple]) -> list[Case]:
    """Cases with unique, predictable ids from ``(image, source, is_dicom[, name[, series_uid[, notes]]])`` entries.

    ``source`` is the input's path relative to the input root (POSIX separators; a series
    folder ends with ``/``). The id is ``name`` when given, else the file name without its
    extensions, or the series folder's name.
    Ids shared by several inputs (compared case-insensitively, as on macOS/Windows file
    systems) become the source's folder path joined with ``__`` (``a/b/ct.nii.gz`` ->
    ``a__b__ct``); any still shared (``ct.nii.gz`` and ``ct.nrrd`` in one folder) get ``__2``,
    ``__3`` ... in source order. The result is sorted by source, so it does not depend on the
    order of ``entries``.
    """
    entries = sorted([(tuple(e) + (None, None, ()))[:6] for e in entries], key=lambda e: e[1])

    def base(source: str, is_dicom: bool, name: str | None) -> str:
        if name:
            return sanitize(name)
        stem = _source_name(source)[1]
        return sanitize(stem if is_dicom else (strip_image_suffix(stem) or Path(stem).stem))

    def qualified(source: str, is_dicom: bool, name: str | None) -> str:
        return "__".join([sanitize(p) for p in _source_name(source)[0]] + [base(source, is_dicom, name)])

    ids = [base(source, is_dicom, name) for _, source, is_dicom, name, _, _ in entries]
    counts: dict[str, int] = {}
    for case_id in ids:
        counts[case_id.lower()] = counts.get(case_id.lower(), 0) + 1
    ids = [
        qualified(source, is_dicom, name) if counts[case_id.lower()] > 1 else case_id
        for case_id, (_, source, is_dicom, name, _, _) in zip(ids, entries)
    ]
    seen: dict[str, int] = {}
    unique = []
    for case_id in ids:
        key = case_id.lower()
        seen[key] = seen.get(key, 0) + 1
        unique.append(case_id if seen[key] == 1 else f"{case_id}__{seen[key]}")
    return [
        Case(case_id, image, source, is_dicom, series_uid, tuple(notes or ()))
        for case_id, (image, source, is_dicom, _, series_uid, notes) in zip(unique, entries)
    ]


# short names of the tags that split a series into volumes, for case ids (``ct__s3_t2``)
_SPLIT_ABBREVIATIONS = {
    "TemporalPositionIdentifier": "t", "TemporalPositionIndex": "t", "AcquisitionNumber": "acq", "StackID": "stack",
    "DiffusionBValue": "b", "EchoNumbers": "echo", "EffectiveEchoTime": "te", "EchoTime": "te", "TriggerTime": "tt",
}


def discover_cases(
    root: str | os.PathLike,
    exclude: Sequence[str | os.PathLike] = (),
    series: Sequence[str] | None = None,
    skipped: list | None = None,
) -> list[Case]:
    """Cases under ``root``, recursively, by :func:`pipeline.readers.list_images` in every folder.

    Volume files are one case each; a folder that directly holds DICOM files is one series case
    (a folder holding several image series fails later with the reader's message) and its
    sub-folders are searched too. Hidden entries, symbolic links to folders, the folders in
    ``exclude`` (the output folder) and any earlier segment output folder (it holds
    :data:`OUTPUT_MARKER`) are skipped: outputs are never inputs.

    With ``series`` (``--series`` rules, see :mod:`pipeline.dicom`) the DICOM folders are
    inventoried instead and the rules choose per study: each chosen series, and each volume of
    a series with repeated positions, is a case (the folder when it holds only that image series,
    else a series reference); ``skipped`` (a list) receives a row per series not used, with why.
    ValueError for rules that do not parse.
    """
    from pipeline import dicom

    selection = dicom.SeriesSelection.parse(series)
    root = Path(root)
    excluded = {os.path.realpath(p) for p in exclude}
    entries: list[tuple] = []
    dicom_folders: list[Path] = []
    if is_dicom_series_folder(root):
        dicom_folders.append(root)
    for folder, dirs, files in os.walk(root):
        if OUTPUT_MARKER in files:
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(Path(folder) / d) not in excluded)
        for path in list_images(folder):
            if os.path.realpath(path) in excluded:
                continue
            if path.is_dir():
                dicom_folders.append(path)
            else:
                entries.append((str(path), path.relative_to(root).as_posix(), False))
    if selection is None:
        for path in dicom_folders:
            relative = path.resolve().name if path == root else path.relative_to(root).as_posix()
            entries.append((str(path) + os.sep, relative + "/", True))
        return assign_case_ids(entries)
    inventory = dicom.select(dicom.scan_folders(dicom_folders), selection)
    used_per_folder: dict[str, int] = {}
    for entry in inventory:
        if entry.action == "use":
            used_per_folder[entry.folder] = used_per_folder.get(entry.folder, 0) + 1
    for entry in inventory:
        folder = Path(entry.folder)
        relative = folder.resolve().name if folder == root else folder.relative_to(root).as_posix()
        is_folder = entry.path == entry.folder
        source = relative + "/" if is_folder else relative + entry.path[len(entry.folder):]
        if entry.action != "use":
            if skipped is not None:
                skipped.append({"source": relative + "/", "series": entry.label(), "series_uid": entry.series_uid,
                                "kind": entry.kind, "action": entry.action, "why": entry.why})
            continue
        name = None
        if used_per_folder[entry.folder] > 1 or entry.split:
            number = entry.series_number if entry.series_number is not None else "X"
            name = f"{folder.name}__s{number}" + "".join(
                f"_{_SPLIT_ABBREVIATIONS.get(key, key)}{value}" for key, value in entry.split.items()
            )
        image = entry.path + (os.sep if is_folder else "")
        entries.append((image, source, True, name, entry.series_uid, tuple(entry.geometry)))
    return assign_case_ids(entries)


def cases_from_datalist(
    datalist: str | os.PathLike, dataset_dir: str | os.PathLike | None = None, section: str = "test"
) -> list[Case]:
    """Cases from one section of an MSD-style datalist (labels, if any, are ignored)."""
    from pipeline.data import load_datalist

    root = os.path.abspath(dataset_dir if dataset_dir is not None else Path(datalist).parent)
    entries = []
    for entry in load_datalist(datalist, root, section):
        image = entry["image"]
        first = image[0] if isinstance(image, list) else image
        is_dicom = os.path.isdir(first) or is_series_reference(first)
        source = os.path.relpath(first, root).replace(os.sep, "/") + ("/" if is_dicom else "")
        entries.append((image, source, is_dicom))
    return assign_case_ids(entries)


SKIPPED_SERIES = "skipped_series.json"
PHI_MAP = "phi_map.csv"
PSEUDONYM_KEY_ENV = "PIPELINE_PSEUDONYM_KEY"
PSEUDONYM_KEY_FILE = ".pseudonym.key"
PHI_FIELDS = ("case_id", "source", "input", "patient_id", "patient_name", "study_date", "study_uid", "series_uid",
              "series_number", "series_description")


def pseudonym_key(out: str | os.PathLike) -> tuple[bytes, bool]:
    """``(key, new)``: the secret the pseudonyms are keyed with, so that they cannot be recomputed
    from a guessed patient or UID. ``$PIPELINE_PSEUDONYM_KEY`` when set (the same ids across output
    folders), else ``OUT/.pseudonym.key`` (reruns into ``OUT`` keep their ids), else a new random
    key (``new``: :func:`record_discovery` stores it, mode 600)."""
    import secrets

    text = os.environ.get(PSEUDONYM_KEY_ENV)
    if text:
        return text.encode("utf-8"), False
    stored = Path(out) / PSEUDONYM_KEY_FILE
    if stored.is_file():
        try:
            return bytes.fromhex(stored.read_text(encoding="ascii").strip()), False
        except ValueError:
            raise ValueError(f"{stored}: not a hex key; restore it from a backup or set ${PSEUDONYM_KEY_ENV}") from None
    return secrets.token_bytes(32), True


def _phi_of(case: Case) -> tuple[str, dict]:
    """(identity to hash, identifying fields) of a case: a DICOM case's Study/Series UIDs (and the
    volume's split tag), else its source path."""
    phi = {"source": case.source, "input": case.first_path}
    if not case.is_dicom:
        return "path:" + case.source, phi
    import pydicom

    from pipeline.readers import DataError, resolve_dicom_volume

    try:
        volume, _ = resolve_dicom_volume(case.first_path.rstrip("/" + os.sep))
        header = pydicom.dcmread(volume.slices[0].path, stop_before_pixels=True)
    except (DataError, OSError, ValueError) as err:  # fails again, with its reason, when read
        phi["error"] = str(err)
        return "path:" + case.source, phi
    phi.update(
        patient_id=str(header.get("PatientID", "")),
        patient_name=str(header.get("PatientName", "")),
        study_date=str(header.get("StudyDate", "")),
        study_uid=str(header.get("StudyInstanceUID", "")),
        series_uid=volume.series_uid,
        series_number=str(header.get("SeriesNumber", "")),
        series_description=str(header.get("SeriesDescription", "")),
    )
    split = "".join(f"&{k}={v}" for k, v in sorted(volume.split.items()))
    return f"dicom:{phi['study_uid']}/{volume.series_uid}{split}", phi


def pseudonymise_cases(cases: Sequence[Case], key: bytes) -> list[Case]:
    """The same cases with ids (and sources) ``case-<12 hex>`` from a keyed hash (HMAC-SHA256) of
    their Study/Series UIDs (a file's: its path), so that no folder or file name, which may be a
    patient's name, reaches an output name, the summary, a QA picture or a log line. Each case keeps
    what its id stands for in ``phi`` (:func:`record_discovery` writes ``phi_map.csv``, mode 600)."""
    import hashlib
    import hmac

    named, seen = [], {}
    for case in cases:
        identity, phi = _phi_of(case)
        case_id = "case-" + hmac.new(key, identity.encode("utf-8"), hashlib.sha256).hexdigest()[:12]
        seen[case_id] = seen.get(case_id, 0) + 1
        if seen[case_id] > 1:  # one input listed twice (a datalist): keep the ids unique
            case_id = f"{case_id}__{seen[case_id]}"
        named.append(dataclasses.replace(case, case_id=case_id, source=case_id, phi={"case_id": case_id, **phi}))
    return named


def record_discovery(out: str | os.PathLike, skipped: Sequence[dict], cases: Sequence[Case], key: tuple[bytes, bool] | None = None) -> None:
    """What discovery decided, in ``OUT``: ``skipped_series.json`` (:func:`record_skipped_series`)
    and, for pseudonymised cases, ``phi_map.csv`` (case id -> source, patient, study, series) and a
    new ``.pseudonym.key``, both readable by the owner only (mode 600)."""
    record_skipped_series(out, skipped, private=key is not None)
    rows = [case.phi for case in cases if case.phi]
    if not rows and not (key and key[1]):
        return
    import csv
    import io

    from pipeline.fileio import atomic_write

    def private(data: bytes):
        def write(handle) -> None:
            os.fchmod(handle.fileno(), 0o600)  # before a byte of it is written
            handle.write(data)

        return write

    if key and key[1]:
        atomic_write(Path(out) / PSEUDONYM_KEY_FILE, private((key[0].hex() + "\n").encode()))
    if rows:
        earlier = Path(out) / PHI_MAP
        if earlier.is_file():  # earlier batches into OUT keep their links back
            with open(earlier, newline="", encoding="utf-8") as handle:
                new_ids = {row["case_id"] for row in rows}
                rows = [row for row in csv.DictReader(handle) if row.get("case_id") not in new_ids] + list(rows)
        buffer = io.StringIO()
        table = csv.DictWriter(buffer, fieldnames=list(PHI_FIELDS) + ["error"], extrasaction="ignore")
        table.writeheader()
        table.writerows(rows)
        atomic_write(Path(out) / PHI_MAP, private(buffer.getvalue().encode("utf-8")))


def record_skipped_series(out: Path, skipped: Sequence[dict], private: bool = False) -> None:
    """``OUT/skipped_series.json``: the DICOM series ``--series`` did not use, each with why (also
    one line each on stderr). Nothing is written when nothing was skipped. ``private``
    (``--pseudonymise``): without their folders and UIDs, which may identify the patient."""
    if not skipped:
        return
    import json
    import sys

    from pipeline.fileio import atomic_write_text

    rows = [{k: v for k, v in row.items() if k not in ("source", "series_uid")} if private else dict(row) for row in skipped]
    for row in rows:
        where = f"{row['source']} " if "source" in row else ""
        print(f"segment: skipped {where}{row['series']}: {row['why']}", file=sys.stderr)
    try:
        atomic_write_text(Path(out) / SKIPPED_SERIES, json.dumps(rows, indent=1) + "\n")
    except OSError as err:  # the cases' own records matter more; their writes report a full disk
        print(f"segment: {SKIPPED_SERIES} could not be written: {err}", file=sys.stderr)


def shard(cases: Sequence[Case], rank: int, world_size: int) -> list[Case]:
    """Round-robin share of ``rank``: cases ``rank, rank + world_size, ...`` (disjoint, complete)."""
    return list(cases[rank::world_size])
