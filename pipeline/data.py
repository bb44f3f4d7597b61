"""MSD-style datalists: load, validate before training, build from a folder, split into folds.

A datalist is the JSON of the Medical Segmentation Decathlon's ``dataset.json``::

    {"name": "...", "tensorImageSize": "3D", "modality": {"0": "CT"},
     "labels": {"0": "background", "1": "tumour"},
     "training":   [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...],
     "validation": [...],
     "test":       ["imagesTs/c.nii.gz", {"image": "imagesTs/d/"}]}

Paths are relative to a ``dataset_dir``; an ``image`` may be a file (``.nii``,
``.nii.gz``, ``.nrrd``, ``.mha``, ``.mhd``, ``.dcm``), a folder holding one DICOM
series, or a list of files (channels). Command line::

    python -m pipeline datalist validate DATALIST --dataset_dir D [--allow-outside]
    python -m pipeline datalist build DIR [--output F] [--folds K] [--series RULE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from pipeline.fileio import read_json
from pipeline.readers import (
    LABEL_CLASSES_KEY,
    LABEL_OBJECT_KINDS,
    DataError,
    dicom_label_kind,
    dicom_series_in_folder,
    image_name,
    is_dicom_file,
    is_dicom_series_folder,
    is_series_reference,
    label_object_names,
    label_object_references,
    list_images,
    read_label,
    read_volume,
    split_series_reference,
)

__all__ = [
    "DataError",
    "SECTIONS",
    "load_datalist",
    "validate_datalist",
    "check_datalist",
    "declared_labels",
    "label_classes",
    "build_datalist",
    "select_fold",
    "intensity_fingerprint",
    "datalist_main",
]

SECTIONS = ("training", "validation", "test")
PATH_KEYS = ("image", "label")
LABEL_SUFFIXES = ("_seg", "_label", "_labels", "_mask", "_gt")  # paired names: case.nii.gz + case_seg.nii.gz


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def _read_json(datalist_path: str | os.PathLike) -> dict:
    try:
        return read_json(datalist_path)
    except FileNotFoundError:
        raise DataError(f"{datalist_path}: datalist not found") from None
    except ValueError as err:
        raise DataError(str(err)) from err


def _resolve(value: str, root: str, allow_outside: bool, where: str) -> str:
    """Absolute, normalised path of ``value`` under ``root``; refuse an escape unless allowed.

    ``normpath`` (not ``realpath``): a symlink inside ``dataset_dir`` is the user's choice.
    """
    if not isinstance(value, str) or not value:
        raise DataError(f"{where}: expected a path string, got {value!r}")
    path = os.path.normpath(os.path.join(root, os.path.expanduser(value)))
    if not allow_outside and os.path.commonpath([root, path]) != root:
        raise DataError(
            f"{where}: path {value!r} resolves to {path}, outside dataset_dir {root} "
            "(point dataset_dir at a folder that holds every path; `datalist validate` also accepts --allow-outside)"
        )
    return path


def _entries(
    content: dict, dataset_dir: str, section: str, allow_outside: bool, name: str, problems: list | None = None
) -> list[dict]:
    """Entries of one section with absolute paths; path problems raise, or go to ``problems``."""
    items = content.get(section)
    if items is None:
        raise DataError(f"{name}: no {section!r} section (sections: {', '.join(k for k in content if k in SECTIONS)})")
    if not isinstance(items, list):
        raise DataError(f"{name}: {section!r} must be a list")
    root = os.path.normpath(os.path.abspath(os.path.expanduser(str(dataset_dir))))
    classes = label_classes(content) if "labels" in content else None
    entries = []
    for index, item in enumerate(items):
        where = f"{name} {section}[{index}]"
        try:
            item = {"image": item} if isinstance(item, str) else item  # MSD test entries are bare paths
            if not isinstance(item, dict) or "image" not in item:
                raise DataError(f"{where}: an entry needs an 'image' (got {item!r})")
            entry = dict(item)
            for key in PATH_KEYS:
                if key in entry:
                    value = entry[key]
                    if isinstance(value, list):
                        entry[key] = [_resolve(v, root, allow_outside, where) for v in value]
                    else:
                        entry[key] = _resolve(value, root, allow_outside, where)
            if classes is not None and isinstance(entry.get("label"), str) and is_dicom_file(entry["label"]):
                entry[LABEL_CLASSES_KEY] = classes  # a SEG / RTSTRUCT's names become classes through these
        except DataError as err:
            if problems is None:
                raise
            problems.append(str(err))
            continue
        entries.append(entry)
    return entries


def load_datalist(
    datalist_path: str | os.PathLike,
    dataset_dir: str | os.PathLike | None,
    section: str = "training",
    allow_outside: bool = False,
) -> list[dict]:
    """Entries of one section, with absolute paths.

    Args:
        datalist_path: the JSON file.
        dataset_dir: folder the paths are relative to (``None``: the datalist's folder).
        section: ``"training"``, ``"validation"``, ``"test"`` (or any list in the file).
        allow_outside: accept paths that leave ``dataset_dir`` (``../``, absolute elsewhere).

    Returns:
        ``[{"image": "/abs/...", "label": "/abs/...", ...}, ...]`` (bare test paths become
        ``{"image": ...}``; other keys such as ``"fold"`` are kept).

    Raises:
        DataError: missing/invalid file, missing section, bad entry, path outside ``dataset_dir``.
    """
    dataset_dir = Path(datalist_path).parent if dataset_dir is None else dataset_dir
    return _entries(_read_json(datalist_path), str(dataset_dir), section, allow_outside, str(datalist_path))


def declared_labels(content: dict) -> set[int] | None:
    """Class values from the datalist's ``labels`` mapping, or ``None`` when absent.

    Accepts MSD's ``{"0": "background", "1": "liver"}`` and nnU-Net v2's
    ``{"background": 0, "liver": 1}``.
    """
    labels = content.get("labels")
    if labels is None:
        return None
    if isinstance(labels, dict) and labels and all(re.fullmatch(r"\d+", str(k)) for k in labels):
        return {int(k) for k in labels}
    if isinstance(labels, dict) and labels and all(isinstance(v, int) for v in labels.values()):
        return set(labels.values())
    raise DataError(f"'labels' must map class values to names, e.g. {{\"0\": \"background\"}}, got {labels!r}")


def label_classes(content: dict) -> dict[str, int]:
    """Class name -> value from the datalist's ``labels`` (MSD or nnU-Net v2 form): how a DICOM SEG's
    segment labels and an RTSTRUCT's ROI names become class values (compared case-insensitively)."""
    declared_labels(content)  # the form is checked there
    labels = content["labels"]
    if all(isinstance(v, int) for v in labels.values()):
        return {str(name): int(value) for name, value in labels.items()}
    return {str(name): int(value) for value, name in labels.items()}


# --------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------


def _canonical_grid(shape: Sequence[int], affine: np.ndarray) -> tuple[tuple, np.ndarray, np.ndarray, np.ndarray]:
    """(shape, spacing, direction, origin) after reorienting to the closest RAS axes.

    Two files on the same physical grid but stored in different axis orders agree here,
    and they do after the pipeline's ``Orientationd`` too.
    """
    import nibabel.orientations as orient

    shape3 = tuple(shape) + (1,) * (3 - len(shape))
    ornt = orient.io_orientation(affine)
    affine = affine @ orient.inv_ornt_aff(ornt, shape3)
    shape3 = tuple(int(shape3[int(axis)]) for axis in ornt[:, 0])
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return shape3, spacing, affine[:3, :3] / spacing, affine[:3, 3]


def _split_channels(shape: tuple) -> tuple[tuple, int]:
    """Spatial shape and channel count of an array read by :func:`read_volume`."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:  # (X, Y, Z, 1) is a plain 3D volume
        shape = shape[:-1]
    return shape[:3], int(np.prod(shape[3:], dtype=int))


class _Summary:
    """What validation needs from one file, without keeping its voxels."""

    def __init__(self, path: str, array: np.ndarray, affine: np.ndarray, want_values: bool):
        self.path = path
        self.spatial, self.channels = _split_channels(array.shape)
        self.affine = affine
        self.values = np.unique(array) if want_values else None  # NaN/Inf are refused by the reader


def _summarize(path: str, is_label: bool, image: str | None = None, classes: dict | None = None) -> _Summary:
    """Read one file (in a worker process: see :class:`_IsolatedReader`) and keep what validation needs.

    A label is read by :func:`pipeline.readers.read_label`: a DICOM SEG / RTSTRUCT onto ``image``'s
    grid, after checking that it references that series (the problem names both files and UIDs).
    """
    array, affine = read_label(path, image, classes) if is_label else read_volume(path)
    return _Summary(path, array, affine, want_values=is_label)


def _reader_context():
    """``spawn`` inside a DDP process (forking a process that holds a process group's threads is
    unsafe: the copies' C++ threads can abort at exit); the platform's default elsewhere (fast)."""
    import multiprocessing

    import torch.distributed as dist

    return multiprocessing.get_context("spawn") if dist.is_available() and dist.is_initialized() else None


class _IsolatedReader:
    """Reads files in one worker process, so a decoder that crashes (a segfault in a DICOM or image
    library) costs one file: it is reported as a problem and the next file gets a fresh worker."""

    def __init__(self):
        self.pool = None

    def __call__(self, path: str, is_label: bool, image: str | None = None, classes: dict | None = None) -> _Summary:
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        if self.pool is None:
            self.pool = ProcessPoolExecutor(max_workers=1, mp_context=_reader_context())
        try:
            return self.pool.submit(_summarize, path, is_label, image, classes).result()
        except BrokenProcessPool:
            self.close()
            raise DataError(f"{path}: the reader crashed on this file (a corrupt file that breaks the decoder)") from None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)
            self.pool = None


def _grid_problems(image: _Summary, label: _Summary, tolerance: float) -> list[str]:
    """Differences between two grids, relative tolerance on spacing, origin in voxels."""
    shape_a, spacing_a, dir_a, origin_a = _canonical_grid(image.spatial, image.affine)
    shape_b, spacing_b, dir_b, origin_b = _canonical_grid(label.spatial, label.affine)
    problems = []
    if shape_a != shape_b:
        problems.append(f"shape {label.spatial} vs image {image.spatial}")
    if np.abs(spacing_a - spacing_b).max() > tolerance * spacing_a.max():
        problems.append(f"spacing {np.round(spacing_b, 5).tolist()} vs image {np.round(spacing_a, 5).tolist()}")
    if np.abs(dir_a - dir_b).max() > tolerance:
        problems.append("direction (orientation) differs from the image")
    if np.linalg.norm(origin_a - origin_b) > tolerance * spacing_a.min() * 10:
        problems.append(f"origin {np.round(origin_b, 4).tolist()} vs image {np.round(origin_a, 4).tolist()} (mm)")
    return problems


_DIMS = {"2D": (2, 1), "3D": (3, 1), "4D": (3, None)}  # tensorImageSize -> (spatial dims, channels; None = any)


def validate_datalist(
    datalist_path: str | os.PathLike,
    dataset_dir: str | os.PathLike | None,
    sections: Iterable[str] | None = None,
    allow_outside: bool = False,
    tolerance: float = 1e-3,
) -> list[str]:
    """Every problem of a datalist at once; an empty list means it is clean.

    Checked per entry: paths stay in ``dataset_dir``; files exist and are readable (not
    truncated, not a text file named ``.nii``); no NaN/inf; dimensionality matches
    ``tensorImageSize``; label values are integers within ``labels``; image and label share
    a grid (shape, spacing, direction, origin; ``tolerance`` relative to the spacing, origin
    within ``10 * tolerance`` of a voxel). Each problem starts with the file it is about.
    Each file is read once, whole (``validate`` reads the dataset once before training).

    Args:
        sections: sections to check (default: those of ``training``/``validation``/``test`` present).
    """
    name = str(datalist_path)
    try:
        content = _read_json(datalist_path)
        labels = declared_labels(content)
    except DataError as err:
        return [str(err) if str(err).startswith(name) else f"{name}: {err}"]
    dataset_dir = Path(datalist_path).parent if dataset_dir is None else dataset_dir
    if not Path(dataset_dir).is_dir():
        return [f"{dataset_dir}: dataset_dir not found"]
    sections = [s for s in SECTIONS if s in content] if sections is None else list(sections)
    if not sections:
        return [f"{name}: no 'training', 'validation' or 'test' section"]
    dims = content.get("tensorImageSize")
    if dims is not None and dims not in _DIMS:
        return [f"{name}: tensorImageSize must be one of {sorted(_DIMS)}, got {dims!r}"]

    problems: list[str] = []
    cache: dict[str, _Summary | None] = {}
    read = _IsolatedReader()

    def summary(path: str, is_label: bool, image: str | None = None, classes: dict | None = None) -> _Summary | None:
        key = f"{path}\n{image}" if image else path  # a label object is read on its entry's image
        if key not in cache:
            try:
                cache[key] = read(path, is_label, image, classes)
            except DataError as err:
                problems.append(str(err))
                cache[key] = None
        return cache[key]

    try:
        for section in sections:
            try:
                entries = _entries(content, str(dataset_dir), section, allow_outside, name, problems)
            except DataError as err:
                problems.append(str(err))
                continue
            for entry in entries:
                channels = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
                images = [summary(path, False) for path in channels]
                label = None
                if "label" in entry and (images[0] is not None or not is_dicom_file(entry["label"])):
                    label = summary(entry["label"], True, channels[0], entry.get(LABEL_CLASSES_KEY))
                for image in images:
                    if image is not None:
                        problems += _image_problems(image, dims, multi_file=len(channels) > 1)
                first = images[0]
                for image in images[1:]:
                    if first is not None and image is not None:
                        problems += [f"{image.path}: channel grid differs from {first.path}: {p}" for p in _grid_problems(first, image, tolerance)]
                if label is not None:
                    problems += _label_problems(label, labels)
                    if first is not None:
                        problems += [f"{label.path}: label grid differs from image {first.path}: {p}" for p in _grid_problems(first, label, tolerance)]
    finally:
        read.close()
    # a file shared by several entries reports once
    return list(dict.fromkeys(problems))


def _image_problems(image: _Summary, dims: str | None, multi_file: bool) -> list[str]:
    problems = []
    if dims is not None:
        spatial, channels = _DIMS[dims]
        rank = len(image.spatial) - (1 if spatial == 2 and len(image.spatial) == 3 and image.spatial[2] == 1 else 0)
        if rank != spatial or (channels is not None and image.channels != channels and not multi_file):
            shape = image.spatial + ((image.channels,) if image.channels > 1 else ())
            problems.append(f"{image.path}: shape {shape} is not {dims} as the datalist's tensorImageSize says")
    return problems


def _label_problems(label: _Summary, labels: set[int] | None) -> list[str]:
    problems = []
    if label.channels > 1:
        problems.append(f"{label.path}: label has {label.channels} channels; expected one map of class values")
    values = label.values
    fractional = values[values != np.round(values)]
    if fractional.size:
        problems.append(f"{label.path}: label has non-integer values {fractional[:5].tolist()} (resampled with interpolation?)")
    if labels is not None:
        outside = sorted(set(np.round(values).astype(int).tolist()) - labels)
        if outside:
            problems.append(f"{label.path}: label values {outside[:10]} are not in the declared classes {sorted(labels)}")
    return problems


def check_datalist(
    datalist_path: str | os.PathLike,
    dataset_dir: str | os.PathLike | None,
    sections: Iterable[str] | None = None,
    allow_outside: bool = False,
    tolerance: float = 1e-3,
) -> str:
    """Validate and raise :class:`DataError` listing every problem; returns ``datalist_path``.

    Meant for bundle configs, before training starts, e.g.
    ``"datalist": "$pipeline.data.check_datalist(@datalist_path, @dataset_dir)"``.
    """
    problems = validate_datalist(datalist_path, dataset_dir, sections, allow_outside, tolerance)
    if problems:
        raise DataError(f"{datalist_path}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return str(datalist_path)


# --------------------------------------------------------------------------------------------
# building from a folder
# --------------------------------------------------------------------------------------------


def _cases(folder: Path, selection=None, skipped: list | None = None) -> dict[str, list]:
    """Case name -> image paths (one per channel) in ``folder``; ``_0000`` suffixes are channels.

    Images are found by :func:`pipeline.readers.list_images`, the rule batch segmentation uses too.
    With a ``--series`` ``selection`` (:class:`pipeline.dicom.SeriesSelection`) a series folder
    holding several image series gives the chosen ones (``folder__s<number>`` when several),
    as series references; ``skipped`` receives the others with why.
    """
    if is_dicom_series_folder(folder):
        raise DataError(
            f"{folder}: holds DICOM files directly; put each series in a sub-folder of its own "
            "(the sub-folder's name is the case name)"
        )
    cases: dict[str, list[tuple[int, object]]] = {}
    for path in list_images(folder):
        if path.is_dir() and selection is not None:
            chosen = _chosen_series([path], selection, skipped, path.parent)
            for name, image in _series_names(path.name, chosen):
                cases.setdefault(name, []).append((0, image))
            continue
        stem = image_name(path)
        match = re.fullmatch(r"(.+)_(\d{4})", stem)
        case, channel = (match.group(1), int(match.group(2))) if match else (stem, 0)
        cases.setdefault(case, []).append((channel, path))
    return {case: [p for _, p in sorted(items, key=lambda item: item[0])] for case, items in cases.items()}


def _chosen_series(folders: list[Path], selection, skipped: list | None, root: Path) -> list:
    """The series of ``folders`` that ``selection`` uses (inventory entries); the rest go to ``skipped``."""
    from pipeline import dicom

    chosen = []
    for entry in dicom.select(dicom.scan_folders(folders), selection):
        if entry.action == "use":
            chosen.append(entry)
        elif skipped is not None:
            skipped.append({"folder": _relative(Path(entry.folder), root), "series": entry.label(), "why": entry.why})
    return chosen


def _series_names(name: str, chosen: list) -> list[tuple[str, object]]:
    """(case name, image) per chosen series entry: the folder (or a series reference) named
    ``name``, or ``name__s<number>[_<tag><value>]`` when one folder gives several."""
    if len(chosen) == 1 and not chosen[0].split:
        entry = chosen[0]
        return [(name, Path(entry.path) if entry.path == entry.folder else entry.path)]
    named = []
    for entry in chosen:
        suffix = "".join(f"_{key}{value}" for key, value in entry.split.items())
        image = Path(entry.path) if entry.path == entry.folder else entry.path
        named.append((f"{name}__s{entry.series_number if entry.series_number is not None else 'X'}{suffix}", image))
    return named


def _relative(path, root: Path) -> str:
    """A path (or series reference) relative to ``root``, POSIX; a folder ends with ``/``."""
    text = str(path)
    folder, uid, _ = split_series_reference(text)
    if uid is not None:
        return Path(folder).relative_to(root).as_posix() + text[len(folder):]
    return Path(text).relative_to(root).as_posix() + ("/" if Path(text).is_dir() else "")


def _unmatched_labels(labels: dict, images: dict, where: Path) -> None:
    missing = sorted(set(labels) - set(images))
    if missing:
        raise DataError(
            f"{where}: {len(missing)} label(s) without an image of the same name: "
            + ", ".join(str(labels[name]) for name in missing[:10])
            + " (a label is never dropped silently: add or rename the image, or move the label away)"
        )


def _pair(images: dict[str, list], label_folder: Path | None) -> tuple[list, list]:
    """(labelled, unlabelled) entries of (case, images, label); a label without an image is an error."""
    labels = {}
    if label_folder is not None and label_folder.is_dir():
        labels = {case: paths[0] for case, paths in _cases(label_folder).items()}
        _unmatched_labels(labels, images, label_folder)
    labelled, unlabelled = [], []
    for case, paths in sorted(images.items()):
        (labelled if case in labels else unlabelled).append((case, paths, labels.get(case)))
    return labelled, unlabelled


def _objects_only(folder: Path) -> bool:
    """A folder with sub-folders whose own DICOM files are no image series, e.g. a patient folder
    ``p1/`` holding ``p1/CT/...`` and ``p1/seg.dcm``: a patient folder, not a series."""
    if not any(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir()):
        return False
    return all(group.kind != "image" for group in dicom_series_in_folder(folder))


def _label_objects_in(folder: Path, series_uid: str | None) -> list[Path]:
    """The DICOM SEG / RTSTRUCT files directly in a series folder; with ``series_uid`` (one series of
    several in the folder), those referencing it (or not saying which series they label)."""
    files = [Path(path) for group in dicom_series_in_folder(folder) if group.kind in LABEL_OBJECT_KINDS for path, _ in group.headers]
    if series_uid is not None:
        files = [f for f in files if not (refs := label_object_references(f)) or series_uid in refs]
    return files


def _flat_pairs(folder: Path, selection=None, skipped: list | None = None) -> tuple[list, list]:
    """Paired names in one folder: ``case.nii.gz`` + ``case_seg.nii.gz`` (or _label, _mask, _gt)."""
    cases = _cases(folder, selection, skipped)
    cases = {c: p for c, p in cases.items() if not (len(p) == 1 and isinstance(p[0], Path) and p[0].is_dir() and _objects_only(p[0]))}
    label_of = {}
    for case in list(cases):
        for suffix in LABEL_SUFFIXES:
            if case.endswith(suffix) and case[: -len(suffix)] in cases:
                label_of[case[: -len(suffix)]] = cases.pop(case)[0]
                break
    for case, paths in cases.items():  # a series folder may hold its own label file or label object
        if case in label_of or len(paths) != 1:
            continue
        series_folder, uid, _ = split_series_reference(paths[0])
        if not Path(series_folder).is_dir():
            continue
        inside = [p for p in list_images(series_folder) if p.is_file() and _is_label_name(p)] if uid is None else []
        inside += _label_objects_in(Path(series_folder), uid)
        if len(inside) > 1:
            raise DataError(f"{paths[0]}: {len(inside)} label files ({', '.join(p.name for p in inside)}); keep one")
        if inside:
            label_of[case] = inside[0]
    labelled = [(c, p, label_of[c]) for c, p in sorted(cases.items()) if c in label_of]
    unlabelled = [(c, p, None) for c, p in sorted(cases.items()) if c not in label_of]
    return labelled, unlabelled


LABEL_WORDS = ("label", "labels", "seg", "segmentation", "segmentations", "mask", "masks", "gt", "groundtruth", "ground_truth", "annotation")


def _is_label_name(path: Path) -> bool:
    """A volume file named like a label (``label.nii.gz``, ``liver_mask.nrrd``, ``seg.mha``...) or
    lying in a folder named like one (``labels/``, ``masks/``, ``segmentations/``)."""
    stem = image_name(path).lower()
    words = re.split(r"[^a-z0-9]+", stem)
    return bool(set(words) & set(LABEL_WORDS)) or path.parent.name.lower() in LABEL_WORDS


def _patient_case(folder: Path, root: Path, selection, skipped: list | None) -> tuple[list, object] | None:
    """``(images, label)`` of a patient folder (``p1/CT/*.dcm`` + ``p1/label.nii.gz``), searched
    recursively; None when it holds no image and no label. A DICOM SEG / RTSTRUCT object found in it
    is a label (its file). DataError when it cannot be one case: several images and no rule
    choosing, several labels, a label without an image, a label object that references another
    series than the image."""
    from pipeline import dicom

    files, series_folders = [], []
    for sub, dirs, _ in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and not os.path.islink(Path(sub) / d))
        if is_dicom_series_folder(sub):
            series_folders.append(Path(sub))
        files += [p for p in list_images(sub) if p.is_file()]
    labels = [p for p in files if _is_label_name(p)]
    images: list = [p for p in files if not _is_label_name(p)]
    inventory = dicom.select(dicom.scan_folders(series_folders), selection)
    labels += [Path(f) for e in inventory if e.kind in LABEL_OBJECT_KINDS for f in e.object_files]
    ambiguous = [e for e in inventory if e.kind == "image" and e.action == "skip" and "--series" in e.why]
    for entry in inventory:
        if entry.action == "use":
            images.append(Path(entry.path) if entry.path == entry.folder else entry.path)
        elif skipped is not None and entry.kind not in ("segmentation", "rtstruct"):
            skipped.append({"folder": _relative(Path(entry.folder), root), "series": entry.label(), "why": entry.why})
    if not images and not labels and not ambiguous:
        return None
    name = _relative(folder, root)
    if len(labels) > 1:
        raise DataError(f"{name}: {len(labels)} label files ({', '.join(_relative(p, root) for p in labels)}); keep one")
    if ambiguous and selection is None:
        series = "; ".join(f"{_relative(Path(e.folder), root)} {e.label()}" for e in ambiguous)
        raise DataError(f"{name}: several image series ({series}); choose with --series (see python -m pipeline dicom scan)")
    if len(images) > 1:
        listed = ", ".join(_relative(p, root) for p in images)
        raise DataError(f"{name}: {len(images)} images ({listed}); keep one, or choose among DICOM series with --series")
    refused = [e for e in inventory if e.action == "refuse"]
    if not images and refused:
        raise DataError(f"{name}: its image series cannot be read: " + "; ".join(f"{e.label()}: {e.why}" for e in refused))
    if not images:
        raise DataError(f"{name}: a label ({', '.join(_relative(p, root) for p in labels)}) but no image "
                        "(a label is never dropped silently)")
    if labels and dicom_label_kind(labels[0]):
        _check_label_object(name, labels[0], images[0], inventory, root)
    return images, (labels[0] if labels else None)


def _check_label_object(name: str, label: Path, image, inventory: list, root: Path) -> None:
    """A SEG / RTSTRUCT label must label the case's image: a DICOM series it references."""
    used = [e for e in inventory if e.action == "use"]
    if not used:
        raise DataError(f"{name}: the label {_relative(label, root)} is a DICOM label object; its image "
                        f"{_relative(image, root)} must be the DICOM series it was drawn on")
    referenced = label_object_references(label)
    if referenced and used[0].series_uid not in referenced:
        raise DataError(
            f"{name}: the label {_relative(label, root)} references series {', '.join(sorted(referenced))}, but the "
            f"image {_relative(image, root)} is series {used[0].series_uid}; choose that series with --series uid=..."
        )


def _patient_pairs(root: Path, taken: set[str], selection, skipped: list | None) -> tuple[list, list]:
    """Patient folders directly under ``root`` (sub-folders that are not themselves a series)."""
    labelled, unlabelled, problems = [], [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and not p.is_symlink()):
        if folder.name in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            continue
        if is_dicom_series_folder(folder) and not _objects_only(folder):
            continue
        try:
            found = _patient_case(folder, root, selection, skipped)
        except DataError as err:
            problems.append(str(err))
            continue
        if found is None:
            continue
        if folder.name in taken:
            problems.append(f"{folder.name}/: a patient folder and an image of the same case name {folder.name!r} in {root}")
            continue
        images, label = found
        (labelled if label is not None else unlabelled).append((folder.name, images, label))
    if problems:
        raise DataError(f"{root}: {len(problems)} patient folder(s) cannot be listed:\n  " + "\n  ".join(problems))
    return labelled, unlabelled


def _entry(root: Path, paths: list, label: Path | None) -> dict:
    rel = [_relative(p, root) for p in paths]
    entry = {"image": rel[0] if len(rel) == 1 else rel}
    if label is not None:
        entry["label"] = label.relative_to(root).as_posix()
    return entry


def _found_labels(labels: list) -> dict[str, str]:
    """A ``labels`` map from the labels themselves: ``class_<v>`` per value found in label volumes,
    then each segment label / ROI name of the DICOM label objects (first seen first)."""
    values: set[int] = set()
    names: dict[str, str] = {}  # lower -> as first written
    for label in labels:
        if dicom_label_kind(label):
            for name in label_object_names(label):
                names.setdefault(name.lower(), name)
        else:
            array, _ = read_volume(label)
            values |= set(np.unique(array).astype(int).tolist())
    if names:
        values.add(0)
    found = {str(v): ("background" if v == 0 else f"class_{v}") for v in sorted(values)}
    for value, name in enumerate(names.values(), start=max(values, default=0) + 1):
        found[str(value)] = name
    return found


def build_datalist(
    directory: str | os.PathLike, folds: int | None = None, val_fold: int = 0, seed: int = 0, series: Sequence[str] | None = None
) -> dict:
    """Build an MSD-style datalist from a folder (paths relative to ``directory``).

    Layouts, tried in order:

    * nnU-Net / MSD: ``imagesTr/`` + ``labelsTr/`` (training), ``imagesTs/`` (+ ``labelsTs/``)
      (test); ``case_0000.nii.gz``, ``case_0001.nii.gz`` are channels of ``case``;
    * ``images/`` + ``labels/`` (or ``masks/``) with the same case names;
    * paired names in one folder: ``case.nii.gz`` + ``case_seg.nii.gz`` (``_label``, ``_mask``, ``_gt``);
      a series folder's own label file (``case/IM0001...`` + ``case/label.nii.gz``) pairs with it;
    * patient folders: ``p1/`` holding an image somewhere inside (a volume file or a DICOM series
      folder, ``p1/CT/IM0001...``) and optionally a label file named like one (``label``, ``seg``,
      ``mask``, ``gt``... or in a ``labels/`` folder) or a DICOM SEG / RTSTRUCT object (any file
      name: found by its SOP class), searched recursively; the case is ``p1``.

    Images are found with :func:`pipeline.readers.list_images` (the rule ``segment`` uses too):
    volume files, and sub-folders directly holding DICOM files (by suffix or the ``DICM``
    preamble), each one series named after its folder. ``labels``, ``modality``, ``tensorImageSize`` and ``name`` come from a
    ``dataset.json`` in ``directory`` when there is one; otherwise the classes are the
    values found in the labels (rename them in the file) and the segment labels / ROI names of
    the DICOM label objects.

    A label is never dropped silently: a label without an image, several labels for one case, a
    patient folder with several images (or several DICOM image series and no ``series`` rule
    choosing) and a DICOM SEG/RTSTRUCT label of another series than the case's image are
    one :class:`DataError` per problem, naming the folder.

    Args:
        folds: when given, each training entry gets ``"fold"`` (0..folds-1, shuffled with
            ``seed``) and the entries of ``val_fold`` form the ``validation`` section
            (:func:`select_fold` re-splits without rebuilding).
        series: ``--series`` rules (:mod:`pipeline.dicom`) choosing among the DICOM series of a
            folder; a chosen series in a folder holding several is listed as a series reference
            ``folder?series=UID``. The series not used are listed under ``"skipped_series"``.
    """
    from pipeline.dicom import SeriesSelection

    try:
        selection = SeriesSelection.parse(series)
    except ValueError as err:
        raise DataError(str(err)) from None
    skipped: list = []
    root = Path(directory)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    if (root / "imagesTr").is_dir():
        labelled, unlabelled_tr = _pair(_cases(root / "imagesTr", selection, skipped), root / "labelsTr")
        if (root / "imagesTs").is_dir():
            test_l, test_u = _pair(_cases(root / "imagesTs", selection, skipped), root / "labelsTs")
        else:
            test_l, test_u = [], []
        test = test_l + test_u + unlabelled_tr
    elif (root / "images").is_dir():
        label_folder = next((root / n for n in ("labels", "masks", "segmentations") if (root / n).is_dir()), None)
        labelled, test = _pair(_cases(root / "images", selection, skipped), label_folder)
    else:
        labelled, test = _flat_pairs(root, selection, skipped)
        taken = {case for case, _, _ in labelled + test}
        patients_labelled, patients_test = _patient_pairs(root, taken, selection, skipped)
        labelled = sorted(labelled + patients_labelled, key=lambda item: item[0])
        test = sorted(test + patients_test, key=lambda item: item[0])
    if not labelled and not test:
        raise DataError(
            f"{root}: no images found (expected imagesTr/ + labelsTr/, images/ + labels/, case.nii.gz + case_seg.nii.gz, "
            "or patient folders p1/ holding an image and a label)"
        )

    content: dict = {"name": root.resolve().name, "description": "built by `python -m pipeline datalist build`"}
    dataset_json = root / "dataset.json"
    if dataset_json.is_file():
        meta = _read_json(dataset_json)
        content.update({k: meta[k] for k in ("name", "description", "tensorImageSize", "modality", "channel_names", "labels") if k in meta})
    if "labels" not in content and labelled:
        content["labels"] = _found_labels([label for _, _, label in labelled])
    training = [_entry(root, paths, label) for _, paths, label in labelled]
    if folds is not None:
        if folds < 2 or folds > len(training):
            raise DataError(f"{root}: --folds must be between 2 and the number of labelled cases ({len(training)}), got {folds}")
        order = np.random.RandomState(seed).permutation(len(training))
        for rank, index in enumerate(order):
            training[index]["fold"] = int(rank % folds)
    content["training"] = training
    content["test"] = [_entry(root, paths, label) for _, paths, label in test]
    if folds is not None:
        content = select_fold(content, val_fold)
    content["numTraining"], content["numTest"] = len(content["training"]), len(content["test"])
    if selection is not None:
        content["series_rules"] = list(series)
        content["skipped_series"] = skipped
    return content


def select_fold(content: dict, fold: int) -> dict:
    """Re-split a datalist whose entries carry ``"fold"``: fold ``fold`` becomes ``validation``."""
    entries = content.get("training", []) + content.get("validation", [])
    if not entries or any("fold" not in e for e in entries):
        raise DataError("select_fold needs every training/validation entry to carry a 'fold'")
    folds = sorted({e["fold"] for e in entries})
    if fold not in folds:
        raise DataError(f"fold {fold} not in the datalist's folds {folds}")
    out = dict(content)
    out["training"] = [e for e in entries if e["fold"] != fold]
    out["validation"] = [e for e in entries if e["fold"] == fold]
    return out


# --------------------------------------------------------------------------------------------
# dataset intensity statistics (CT "dataset percentiles")
# --------------------------------------------------------------------------------------------


def intensity_fingerprint(
    datalist_path: str | os.PathLike,
    dataset_dir: str | os.PathLike | None,
    section: str = "training",
    percentiles: Sequence[float] = (0.5, 99.5),
    samples_per_case: int = 100_000,
    seed: int = 0,
) -> dict:
    """nnU-Net-style CT statistics over the foreground (label > 0) voxels of a section.

    Returns ``{"a_min", "a_max", "mean", "std"}``: pass it as ``intensity`` to the CT
    preset (add ``"output": "zscore"`` for nnU-Net's clip + z-score).
    """
    rng = np.random.RandomState(seed)
    values = []
    for entry in load_datalist(datalist_path, dataset_dir, section):
        image, _ = read_volume(entry["image"] if isinstance(entry["image"], str) else entry["image"][0])
        image = image[..., 0] if image.ndim == 4 else image  # first channel of a 4D image
        first = entry["image"] if isinstance(entry["image"], str) else entry["image"][0]
        foreground = image[read_label(entry["label"], first, entry.get(LABEL_CLASSES_KEY))[0] > 0] if "label" in entry else image.ravel()
        if foreground.size > samples_per_case:
            foreground = rng.choice(foreground, samples_per_case, replace=False)
        values.append(foreground.astype(np.float64))
    values = np.concatenate(values) if values else np.zeros(0)
    if values.size == 0:
        raise DataError(f"{datalist_path}: no foreground voxels in {section!r} to compute intensity statistics")
    low, high = np.percentile(values, percentiles)
    clipped = np.clip(values, low, high)
    return {"a_min": float(low), "a_max": float(high), "mean": float(clipped.mean()), "std": float(clipped.std())}


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def datalist_main(argv: list[str] | None = None) -> int:
    """``python -m pipeline datalist {validate,build} ...``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m pipeline datalist", description="Build or validate an MSD-style datalist.")
    commands = parser.add_subparsers(dest="command", required=True)
    validate = commands.add_parser("validate", help="check every entry; exit 0 only when clean")
    validate.add_argument("datalist")
    validate.add_argument("--dataset_dir", "--dataset-dir", dest="dataset_dir", default=None, help="default: the datalist's folder")
    validate.add_argument("--sections", nargs="+", default=None, help="default: all present")
    validate.add_argument("--allow-outside", action="store_true", help="accept paths outside dataset_dir")
    validate.add_argument("--tolerance", type=float, default=1e-3)
    build = commands.add_parser("build", help="write a datalist for a folder of images (and labels)")
    build.add_argument("directory")
    build.add_argument("--output", default=None, help="JSON file to write (default: print to stdout)")
    build.add_argument("--folds", type=int, default=None, help="assign K cross-validation folds")
    build.add_argument("--val-fold", type=int, default=0, help="fold used as the validation section")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    build.add_argument("--series", action="append", default=None, metavar="RULE",
                       help="DICOM folders: which series to list, per study (repeatable, as for segment): modality=CT, "
                            "description~venous, orientation=axial, number=3, uid=..., axial-thinnest, all")
    args = parser.parse_args(argv)

    if args.command == "validate":
        problems = validate_datalist(args.datalist, args.dataset_dir, args.sections, args.allow_outside, args.tolerance)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            print(f"{args.datalist}: {len(problems)} problem(s)", file=sys.stderr)
            return 1
        print(f"{args.datalist}: OK")
        return 0

    try:
        if args.output and Path(args.output).exists() and not args.overwrite:
            raise DataError(f"{args.output}: exists; pass --overwrite to replace it")
        content = build_datalist(args.directory, folds=args.folds, val_fold=args.val_fold, seed=args.seed, series=args.series)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    text = json.dumps(content, indent=2) + "\n"
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text, encoding="utf-8")
        print(f"{args.output}: {content['numTraining']} training, {len(content.get('validation', []))} validation, {content['numTest']} test")
    else:
        sys.stdout.write(text)
    return 0
