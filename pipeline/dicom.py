"""What is in a DICOM export, and which series to use: ``python -m pipeline dicom scan IN``.

Labs get PACS exports, not one clean series per folder: a localizer, the axial series (often two
slice thicknesses), reformats, a dose report (SR), a screenshot (secondary capture), sometimes a
``DICOMDIR`` and files named ``IM000001`` without a suffix, flat or in folders with meaningless
names. This module lists every series of such an export (:func:`scan`), says what would be done
with each and why, and applies the ``--series`` rules that ``segment`` and ``datalist build`` take
(:class:`SeriesSelection`). Reading itself is :mod:`pipeline.readers`' job: a chosen series is
read through its path, the folder or a series reference ``folder?series=UID[&Keyword=value]``.

Rules (``--series``, repeatable; filters narrow, then one picker chooses, per study):

=========================  =====================================================================
``modality=CT``            only this modality (``modality=CT,MR`` for several)
``description~venous``     the series description matches this (case-insensitive regular expression)
``description=Abd 2.0``    the description is exactly this (case-insensitive)
``orientation=axial``      axial, coronal, sagittal or oblique
``number=3``               the SeriesNumber
``uid=1.2.840...``         the SeriesInstanceUID
``axial-thinnest``         picker: of the axial series, the one with the thinnest slices
                           (then the finest spacing, most slices, lowest number)
``all``                    picker: every image series is its own case (the picker when only filters are given)
=========================  =====================================================================

Localizers, reports (SR), secondary captures, presentation states, label objects (SEG,
RTSTRUCT) and other non-image objects are always skipped with their reason; a series with
repeated positions (multi-phase, 4D) is split into one volume per phase, each its own case.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from pipeline.readers import (
    DataError,
    DicomSeriesGroup,
    DicomVolume,
    dicom_series_in_folder,
    is_dicom_series_folder,
    plan_series,
    series_reference,
)

__all__ = ["SeriesEntry", "SeriesSelection", "scan", "scan_folders", "dicom_folders", "select", "format_table", "main"]


@dataclasses.dataclass
class SeriesEntry:
    """One row of an inventory: one volume of one series in one folder (or a series that is no volume).

    ``action`` is ``"use"`` (read and segment / list it), ``"skip"`` (not an image volume, or not
    chosen by the rules) or ``"refuse"`` (an image that cannot be read as a volume);
    ``why`` says why. ``path`` is what reads it: the folder when it holds only this series
    (and the series is one volume), else a series reference.
    """

    folder: str
    series_uid: str
    study_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    series_number: int | None
    modality: str
    description: str
    kind: str
    files: int
    transfer_syntax: str = ""
    orientation: str = ""
    rows: int | None = None
    columns: int | None = None
    slices: int | None = None
    frames_per_position: int | None = None
    spacing: tuple[float, float, float] | None = None
    thickness: float | None = None
    split_by: str | None = None
    split: dict[str, str] = dataclasses.field(default_factory=dict)
    geometry: list[str] = dataclasses.field(default_factory=list)
    problem: str = ""
    action: str = "use"
    why: str = ""
    path: str = ""
    volume: DicomVolume | None = dataclasses.field(default=None, repr=False)
    object_files: list[str] = dataclasses.field(default_factory=list)  # a label object's (SEG, RTSTRUCT) files

    @property
    def is_volume(self) -> bool:
        return self.kind == "image" and not self.problem and self.volume is not None

    @property
    def slice_thickness(self) -> float:
        """SliceThickness, else the spacing between slices (for ranking ``axial-thinnest``)."""
        if self.thickness:
            return self.thickness
        return self.spacing[2] if self.spacing else float("inf")

    def label(self) -> str:
        """``series 3 (CT 'Abdomen 2.0 venous')`` with the volume's tag when split."""
        text = f"series {self.series_number if self.series_number is not None else '?'} ({self.modality} '{self.description}')"
        if self.split:
            text += " " + ", ".join(f"{k}={v}" for k, v in self.split.items())
        return text


# --------------------------------------------------------------------------------------------
# scanning
# --------------------------------------------------------------------------------------------


def _orientation(volume: DicomVolume | None) -> str:
    if volume is None or volume.direction is None:
        return ""
    normal = np.abs(volume.direction[:, 2])
    axis = int(np.argmax(normal))
    name = ("sagittal", "coronal", "axial")[axis]
    return name if normal[axis] > np.cos(np.radians(10)) else f"oblique ({name})"


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _entries_of(group: DicomSeriesGroup, tolerance: float) -> list[SeriesEntry]:
    first = group.first
    syntax = getattr(getattr(first, "file_meta", None), "TransferSyntaxUID", None)
    base = dict(
        folder=group.folder,
        series_uid=group.series_uid,
        study_uid=str(first.get("StudyInstanceUID", "")),
        patient_id=str(first.get("PatientID", "")),
        patient_name=str(first.get("PatientName", "")),
        study_date=str(first.get("StudyDate", "")),
        series_number=_int_or_none(first.get("SeriesNumber")),
        modality=str(first.get("Modality", "")),
        description=str(first.get("SeriesDescription", "")),
        kind=group.kind,
        files=len(group.headers),
        transfer_syntax=getattr(syntax, "name", str(syntax or "")),
        rows=_int_or_none(first.get("Rows")),
        columns=_int_or_none(first.get("Columns")),
    )
    if group.kind != "image":
        action = "skip"
        return [SeriesEntry(**base, action=action, why=group.reason, object_files=[path for path, _ in group.headers])]
    try:
        split_by, volumes = plan_series(group, tolerance)
    except DataError as err:
        problem = str(err).removeprefix(f"{group.folder}: ")
        return [SeriesEntry(**base, problem=problem, action="refuse", why=problem)]
    base["thickness"] = next((s.thickness for v in volumes for s in v.slices if s.thickness), None)
    entries = []
    for volume in volumes:
        entries.append(
            SeriesEntry(
                **base,
                orientation=_orientation(volume),
                slices=volume.num_slices,
                frames_per_position=len(volumes),
                spacing=volume.spacing,
                split_by=split_by,
                split=dict(volume.split),
                geometry=volume.geometry_notes(),
                volume=volume,
            )
        )
    return entries


def dicom_folders(root: str | os.PathLike, exclude: Iterable[str | os.PathLike] = (), skip_marker: str | None = None) -> list[Path]:
    """Folders under ``root`` (itself included) that directly hold DICOM files, sorted; the rule of
    :func:`pipeline.readers.is_dicom_series_folder`. Hidden folders, symbolic links to folders,
    ``exclude`` and folders holding ``skip_marker`` (a segment output) are not entered."""
    root = Path(root)
    excluded = {os.path.realpath(p) for p in exclude}
    found = []
    for folder, dirs, files in os.walk(root):
        if skip_marker and skip_marker in files:
            dirs[:] = []
            continue
        dirs[:] = sorted(
            d for d in dirs
            if not d.startswith(".") and not os.path.islink(Path(folder) / d) and os.path.realpath(Path(folder) / d) not in excluded
        )
        if is_dicom_series_folder(folder):
            found.append(Path(folder))
    return sorted(found)


def scan_folders(folders: Iterable[str | os.PathLike], tolerance: float = 1e-2) -> list[SeriesEntry]:
    """The inventory of the series directly in each of ``folders``, with the default actions:
    one image series in a folder is used (reports, localizers and screenshots next to it are
    skipped); several image series in one folder, or a series of several volumes, need a rule."""
    entries: list[SeriesEntry] = []
    for folder in folders:
        damaged: dict[str, str] = {}
        try:
            groups = dicom_series_in_folder(folder, damaged)
        except DataError as err:  # a header that cannot be parsed: the folder is refused, the scan goes on
            entries.append(SeriesEntry(str(folder), "", "", "", "", "", None, "", "", "unreadable", 0, action="refuse", why=str(err), path=str(folder)))
            continue
        folder_entries = [entry for group in groups for entry in _entries_of(group, tolerance)]
        if damaged:
            names = ", ".join(f"{Path(p).name} ({why})" for p, why in list(damaged.items())[:3])
            for entry in folder_entries:
                if entry.action == "use":
                    entry.action, entry.why = "refuse", f"damaged file(s) in this folder: {names}"
        images = {e.series_uid for e in folder_entries if e.kind == "image"}
        for entry in folder_entries:
            # the folder itself when the reader's default picks this volume (its one image series)
            alone = len(images) == 1 and not entry.split and entry.kind == "image"
            entry.path = entry.folder if alone else series_reference(entry.folder, entry.series_uid, entry.split)
            if entry.action != "use":
                continue
            if len(images) > 1:
                entry.action, entry.why = "skip", f"{len(images)} image series in this folder: choose with --series"
            elif entry.split:
                entry.action, entry.why = "skip", f"one of {entry.frames_per_position} volumes (by {entry.split_by}): split with --series"
            else:
                entry.why = "the folder's one image series"
        entries += folder_entries
    return entries


def scan(root: str | os.PathLike, tolerance: float = 1e-2, exclude: Iterable[str | os.PathLike] = ()) -> list[SeriesEntry]:
    """Every series under ``root`` (recursively; any file names, with or without ``DICOMDIR``)."""
    return scan_folders(dicom_folders(root, exclude), tolerance)


# --------------------------------------------------------------------------------------------
# selection rules
# --------------------------------------------------------------------------------------------

_FIELDS = {
    "modality": lambda e: e.modality,
    "description": lambda e: e.description,
    "orientation": lambda e: e.orientation.split(" ")[0],
    "number": lambda e: "" if e.series_number is None else str(e.series_number),
    "uid": lambda e: e.series_uid,
}
PICKERS = ("axial-thinnest", "all")


@dataclasses.dataclass
class _Filter:
    text: str
    field: str
    op: str
    values: tuple[str, ...]

    def why_not(self, entry: SeriesEntry) -> str | None:
        value = _FIELDS[self.field](entry)
        if self.op == "~":
            ok = re.search(self.values[0], value, re.I) is not None
        else:
            ok = value.lower() in {v.lower() for v in self.values}
        return None if ok else f"{self.field} '{value}' does not match --series {self.text}"


@dataclasses.dataclass
class SeriesSelection:
    """Parsed ``--series`` rules: filters (all must hold) and one picker (``all`` by default)."""

    filters: list[_Filter]
    picker: str = "all"

    @classmethod
    def parse(cls, rules: Sequence[str] | str | None) -> "SeriesSelection | None":
        """``None`` for no rules (the default behaviour: one image series per folder). ValueError
        naming the rule and the known ones for anything else."""
        if rules is None:
            return None
        rules = [rules] if isinstance(rules, str) else list(rules)
        if not rules:
            return None
        filters, pickers = [], []
        for rule in rules:
            text = rule.strip()
            if text.lower() in PICKERS:
                pickers.append(text.lower())
                continue
            match = re.fullmatch(r"\s*([A-Za-z]+)\s*(=|~)\s*(.*?)\s*", text)
            if not match or match.group(1).lower() not in _FIELDS or not match.group(3):
                raise ValueError(
                    f"--series {rule!r}: not a rule; use {', '.join(PICKERS)}, or FIELD=VALUE / FIELD~REGEX "
                    f"with FIELD one of {', '.join(_FIELDS)} (e.g. modality=CT, description~venous)"
                )
            field, op, value = match.group(1).lower(), match.group(2), match.group(3)
            if op == "~":
                try:
                    re.compile(value)
                except re.error as err:
                    raise ValueError(f"--series {rule!r}: not a regular expression ({err})") from None
                values = (value,)
            else:
                values = tuple(v.strip() for v in value.split(",") if v.strip())
            filters.append(_Filter(text, field, op, values))
        if len(set(pickers)) > 1:
            raise ValueError(f"--series: choose one of {', '.join(PICKERS)}, not {', '.join(sorted(set(pickers)))}")
        return cls(filters, pickers[0] if pickers else "all")

    def describe(self) -> str:
        return " ".join([f.text for f in self.filters] + [self.picker])


def _study_key(entry: SeriesEntry) -> str:
    return entry.study_uid or f"folder:{entry.folder}"


def select(entries: Sequence[SeriesEntry], selection: SeriesSelection | None) -> list[SeriesEntry]:
    """Apply ``selection`` to an inventory (in place; returns it): per study, the image volumes
    passing every filter, then the picker. Without rules the default actions of
    :func:`scan_folders` stay. Entries that are no volume keep their ``skip``/``refuse``."""
    if selection is None:
        return list(entries)
    studies: dict[str, list[SeriesEntry]] = {}
    for entry in entries:
        if entry.kind != "image" or entry.action == "refuse" or not entry.is_volume:
            continue
        entry.action, entry.why = "use", ""
        for rule in selection.filters:
            reason = rule.why_not(entry)
            if reason:
                entry.action, entry.why = "skip", reason
                break
        if entry.action == "use":
            studies.setdefault(_study_key(entry), []).append(entry)
    for candidates in studies.values():
        if selection.picker == "all":
            for entry in candidates:
                entry.why = "--series " + selection.describe()
            continue
        axial = [e for e in candidates if e.orientation == "axial"]
        if not axial:
            for entry in candidates:
                entry.action, entry.why = "skip", f"not axial ({entry.orientation or 'no geometry'}); --series axial-thinnest found no axial series in this study"
            continue
        best = min(axial, key=lambda e: (round(e.slice_thickness, 3), round(e.spacing[2], 3), -(e.slices or 0), e.series_number or 0, e.series_uid))
        for entry in candidates:
            if entry.series_uid == best.series_uid and entry.folder == best.folder:
                entry.why = f"axial-thinnest: {entry.slice_thickness:g} mm slices"
            else:
                entry.action = "skip"
                entry.why = f"not chosen: axial-thinnest picked {best.label()} ({best.slice_thickness:g} mm)"
    return list(entries)


# --------------------------------------------------------------------------------------------
# the table
# --------------------------------------------------------------------------------------------


class _Pseudonyms:
    """Short ordinal ids (P1, P1-S1) for patients and studies, in the order of the listing: they
    let a reader tell rows apart without printing a name, an id or a UID."""

    def __init__(self):
        self.patients: dict[str, str] = {}
        self.studies: dict[str, str] = {}

    def patient(self, entry: SeriesEntry) -> str:
        key = entry.patient_id + "\0" + entry.patient_name
        return self.patients.setdefault(key, f"P{len(self.patients) + 1}")

    def study(self, entry: SeriesEntry) -> str:
        patient = self.patient(entry)
        key = _study_key(entry)
        if key not in self.studies:
            count = sum(1 for v in self.studies.values() if v.startswith(patient + "-"))
            self.studies[key] = f"{patient}-S{count + 1}"
        return self.studies[key]


def rows_for(entries: Sequence[SeriesEntry], root: str | os.PathLike, show_phi: bool = False) -> list[dict]:
    """The inventory as JSON-ready rows (identifiers pseudonymised unless ``show_phi``)."""
    names = _Pseudonyms()
    root = Path(root)
    rows = []
    for entry in entries:
        folder = Path(entry.folder)
        relative = folder.relative_to(root).as_posix() if folder != root and root in folder.parents else "."
        row = {
            "patient": names.patient(entry),
            "study": names.study(entry),
            "series_number": entry.series_number,
            "modality": entry.modality,
            "description": entry.description,
            "kind": entry.kind,
            "orientation": entry.orientation,
            "files": entry.files,
            "slices": entry.slices,
            "frames_per_position": entry.frames_per_position,
            "matrix": [entry.columns, entry.rows] if entry.rows else None,
            "spacing_mm": [round(float(s), 4) for s in entry.spacing] if entry.spacing else None,
            "thickness_mm": entry.thickness,
            "split": entry.split or None,
            "geometry": entry.geometry,
            "transfer_syntax": entry.transfer_syntax,
            "folder": relative,
            "action": entry.action,
            "why": entry.why,
        }
        if show_phi:
            row.update(
                patient_id=entry.patient_id,
                patient_name=entry.patient_name,
                study_date=entry.study_date,
                study_uid=entry.study_uid,
                series_uid=entry.series_uid,
                path=entry.path,
            )
        rows.append(row)
    return rows


def format_table(rows: Sequence[dict], show_phi: bool = False) -> str:
    """A fixed-width text table of :func:`rows_for`'s rows."""
    columns = [
        ("patient", "patient"), ("study", "study"), ("series", "ser"), ("modality", "mod"), ("description", "description"),
        ("orientation", "orient"), ("slices", "slices"), ("frames_per_position", "fr/pos"), ("spacing", "spacing mm"),
        ("thickness", "thick"), ("action", "action"), ("why", "why"),
    ]
    if len({row["folder"] for row in rows}) > 1:
        columns.insert(2, ("folder", "folder"))
    if show_phi:
        columns = [("patient_id", "patient id"), ("patient_name", "name"), ("study_date", "date")] + columns[1:] + [("series_uid", "series uid")]
    cells = []
    for row in rows:
        spacing = "x".join(f"{s:.3g}" for s in row["spacing_mm"]) if row["spacing_mm"] else ""
        values = {
            **row,
            "series": "" if row["series_number"] is None else str(row["series_number"]),
            "description": row["description"][:28],
            "orientation": row["orientation"],
            "slices": "" if row["slices"] is None else str(row["slices"]),
            "frames_per_position": "" if row["frames_per_position"] is None else str(row["frames_per_position"]),
            "spacing": spacing,
            "thickness": "" if row["thickness_mm"] is None else f"{row['thickness_mm']:g}",
            "why": row["why"] + (f" [{', '.join(f'{k}={v}' for k, v in row['split'].items())}]" if row["split"] else ""),
        }
        if row["geometry"]:
            values["why"] += " (" + "; ".join(row["geometry"]) + ")"
        cells.append([str(values.get(key, "") if values.get(key) is not None else "") for key, _ in columns])
    widths = [max([len(title)] + [len(c[i]) for c in cells]) for i, (_, title) in enumerate(columns)]
    widths[-1] = len(columns[-1][1])  # the last column is not padded
    lines = ["  ".join(title.ljust(w) for (_, title), w in zip(columns, widths)).rstrip()]
    for c in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline dicom scan IN [--series RULE ...] [--json] [--show-phi]``.

    Exit code: 0 at least one series would be used, 1 none would, 2 usage error.
    """
    parser = argparse.ArgumentParser(prog="python -m pipeline dicom", description="Inventory of DICOM exports.")
    commands = parser.add_subparsers(dest="command", required=True)
    scan_parser = commands.add_parser(
        "scan",
        help="list every series of an export and what segment / datalist build would do with it",
        description="List every series under IN (any file names, flat or nested, with or without DICOMDIR): "
        "modality, description, orientation, slices, spacing, thickness, frames per position, and what "
        "segment / datalist build would do with it (with --series: under those rules) and why.",
    )
    scan_parser.add_argument("input", help="the export's folder")
    scan_parser.add_argument("--series", action="append", default=None, metavar="RULE",
                             help="selection rule as for segment/datalist build (repeatable): modality=CT, "
                                  "description~venous, orientation=axial, number=3, uid=..., axial-thinnest, all")
    scan_parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    scan_parser.add_argument("--show-phi", action="store_true",
                             help="print patient ids and names, study dates and UIDs (default: P1, P1-S1 pseudonyms)")
    scan_parser.add_argument("--tolerance", type=float, default=1e-2, help="relative slice-spacing tolerance")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        selection = SeriesSelection.parse(args.series)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    root = Path(args.input)
    if not root.is_dir():
        print(f"error: {root}: not a folder", file=sys.stderr)
        return 2
    entries = select(scan(root, args.tolerance), selection)
    rows = rows_for(entries, root, args.show_phi)
    used = sum(1 for row in rows if row["action"] == "use")
    if args.json:
        print(json.dumps({"input": str(root), "series_rules": args.series or [], "series": rows}, indent=1))
    else:
        if rows:
            print(format_table(rows, args.show_phi))
        rules = f" with --series {selection.describe()}" if selection else ""
        series = len({(e.folder, e.series_uid) for e in entries})
        volumes = f" ({len(rows)} rows: volumes of split series count apart)" if len(rows) != series else ""
        print(f"\n{series} series{volumes} in {len({r['folder'] for r in rows})} folder(s); {used} to use{rules}")
    return 0 if used else 1
