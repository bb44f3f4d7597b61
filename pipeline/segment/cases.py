"""Cases: what to segment, found in a folder or a datalist, each with a unique, predictable id."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Sequence

from pipeline.readers import is_dicom_series_folder, list_images, strip_image_suffix

__all__ = ["OUTPUT_MARKER", "Case", "sanitize", "assign_case_ids", "discover_cases", "cases_from_datalist", "shard"]

# The lock file every segment run keeps in its output folder; it also marks the folder as
# output, so a later run over a tree that contains it never segments the masks again.
OUTPUT_MARKER = ".segment.lock"


@dataclasses.dataclass
class Case:
    """One input: an image file, a DICOM series folder, or (from a datalist) a list of channel files.

    ``source`` is the input's path relative to the input folder / dataset_dir (shown in the report).
    """

    case_id: str
    image: str | list[str]
    source: str
    is_dicom: bool = False

    @property
    def first_path(self) -> str:
        return self.image[0] if isinstance(self.image, list) else self.image


def sanitize(name: str) -> str:
    """Keep case ids and class names safe as file names on every platform."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "case"


def assign_case_ids(entries: Sequence[tuple[str | list[str], str, bool]]) -> list[Case]:
    """Cases with unique, predictable ids from ``(image, source, is_dicom)`` entries.

    ``source`` is the input's path relative to the input root (POSIX separators; a series
    folder ends with ``/``). The id is the file name without its extensions, or the series folder's name.
    Ids shared by several inputs (compared case-insensitively, as on macOS/Windows file
    systems) become the source's folder path joined with ``__`` (``a/b/ct.nii.gz`` ->
    ``a__b__ct``); any still shared (``ct.nii.gz`` and ``ct.nrrd`` in one folder) get ``__2``,
    ``__3`` ... in source order. The result is sorted by source, so it does not depend on the
    order of ``entries``.
    """
    entries = sorted(entries, key=lambda e: e[1])

    def base(source: str, is_dicom: bool) -> str:
        name = source.rstrip("/").split("/")[-1]
        return sanitize(name if is_dicom else (strip_image_suffix(name) or Path(name).stem))

    def qualified(source: str, is_dicom: bool) -> str:
        parts = [p for p in source.rstrip("/").split("/") if p][:-1]
        return "__".join([sanitize(p) for p in parts] + [base(source, is_dicom)])

    ids = [base(source, is_dicom) for _, source, is_dicom in entries]
    counts: dict[str, int] = {}
    for case_id in ids:
        counts[case_id.lower()] = counts.get(case_id.lower(), 0) + 1
    ids = [
        qualified(source, is_dicom) if counts[case_id.lower()] > 1 else case_id
        for case_id, (_, source, is_dicom) in zip(ids, entries)
    ]
    seen: dict[str, int] = {}
    unique = []
    for case_id in ids:
        key = case_id.lower()
        seen[key] = seen.get(key, 0) + 1
        unique.append(case_id if seen[key] == 1 else f"{case_id}__{seen[key]}")
    return [Case(case_id, image, source, is_dicom) for case_id, (image, source, is_dicom) in zip(unique, entries)]


def discover_cases(root: str | os.PathLike, exclude: Sequence[str | os.PathLike] = ()) -> list[Case]:
    """Cases under ``root``, recursively, by :func:`pipeline.readers.list_images` in every folder.

    Volume files are one case each; a folder that directly holds DICOM files is one series case
    (a folder holding several series fails later with the reader's message) and its sub-folders
    are searched too. Hidden entries, symbolic links to folders, the folders in ``exclude`` (the
    output folder) and any earlier segment output folder (it holds :data:`OUTPUT_MARKER`) are
    skipped: outputs are never inputs.
    """
    root = Path(root)
    excluded = {os.path.realpath(p) for p in exclude}
    entries: list[tuple[str, str, bool]] = []
    if is_dicom_series_folder(root):
        entries.append((str(root) + os.sep, root.resolve().name + "/", True))
    for folder, dirs, files in os.walk(root):
        if OUTPUT_MARKER in files:
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(Path(folder) / d) not in excluded)
        for path in list_images(folder):
            if os.path.realpath(path) in excluded:
                continue
            relative = path.relative_to(root).as_posix()
            if path.is_dir():
                entries.append((str(path) + os.sep, relative + "/", True))
            else:
                entries.append((str(path), relative, False))
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
        is_dicom = os.path.isdir(first)
        source = os.path.relpath(first, root).replace(os.sep, "/") + ("/" if is_dicom else "")
        entries.append((image, source, is_dicom))
    return assign_case_ids(entries)


def shard(cases: Sequence[Case], rank: int, world_size: int) -> list[Case]:
    """Round-robin share of ``rank``: cases ``rank, rank + world_size, ...`` (disjoint, complete)."""
    return list(cases[rank::world_size])
