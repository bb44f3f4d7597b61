"""Batch volume segmentation: a folder (or datalist) of CT/MRI volumes in, masks and a report out.

Command line (``python -m pipeline segment ...`` or ``unetpp-pipeline segment ...``)::

    python -m pipeline segment --bundle bundles/unetpp_3d_seg --input IN --output OUT \\
        [--mode accurate|fast --prune-level K] [--device cpu|cuda] [--precision fp32|bf16|fp16] \\
        [--format nifti|dicom-seg] [--qa-png] [--overwrite] [--quiet] [--override ID=VALUE ...]

What it does, in the order a case goes through it:

* **Cases.** ``IN`` is a folder searched recursively for NIfTI / NRRD / MetaImage files and
  DICOM series folders (a folder holding ``.dcm`` files or files with the DICOM preamble), or
  an MSD-style datalist (``--section``, default ``test``). The case id is the file name
  without its extensions or the series folder's name; ids shared by several inputs are
  qualified with their folder path relative to ``IN`` (``siteA/ct.nii.gz`` ->
  ``siteA__ct``), then numbered in path order if still ambiguous (``ct``, ``ct__2``).
* **Model.** ``network_def``, ``preprocessing``, ``inferer`` and ``postprocessing`` are parsed
  from the bundle's ``configs/inference.json`` with :class:`monai.bundle.ConfigParser`, so a
  lab's overrides of the bundle apply here too (``--override`` passes more, with the same
  ``id#key=value`` syntax as ``python -m monai.bundle run``). The checkpoint (the network's
  ``state_dict``) is loaded with ``weights_only=True``.
* **Pipeline.** A :class:`torch.utils.data.DataLoader` reads and preprocesses the next cases
  in background worker processes while the network runs; a background thread inverts each
  prediction to its input's grid and writes it. A case costs about its network time.
* **Outputs** (all under ``OUT``): ``<case>_seg.nii.gz`` on the input's own grid (same shape and
  affine; for NIfTI inputs the input's qform/sform are copied), ``<case>_seg.dcm`` (DICOM SEG
  referencing the source series, ``--format dicom-seg``, DICOM inputs only), ``qa/<case>.png``
  and ``qa/index.html`` (``--qa-png``), ``records/<case>.json`` (what was written, with
  SHA-256 digests), ``summary.csv`` and ``summary.json``. Files are written under a temporary
  name and renamed; the case's record is written just before the renames, so a mask that
  exists always has a record that vouches for it.
* **Resume.** A case is skipped ("existing") only when its record lists every requested output,
  each file's digest matches, the input is unchanged (size and mtime) and the settings (model,
  checkpoint digest, mode, precision, overrides) are the same; otherwise it is redone. An
  output file not vouched for by a record is never replaced unless ``--overwrite``.
* **Failures.** A case that cannot be read, has the wrong dimensionality, or fails later is
  recorded with its reason (``records/<case>.failed.json``) and the batch goes on; the exit
  code is 1 when any case failed, 2 for a usage or setup error.
* **Scale-out.** Under ``torchrun`` (``RANK``/``WORLD_SIZE``) rank 0 discovers the cases and
  broadcasts the list, rank ``r`` takes cases ``r, r + N, ...``; when every rank has written its
  completion file rank 0 writes one summary from every case's record.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import dataclasses
import datetime
import hashlib
import html
import io
import json
import os
import re
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipeline import __version__
from pipeline.readers import DataError, is_nifti, strip_image_suffix

__all__ = [
    "Case",
    "IMAGE_SUFFIXES",
    "discover_cases",
    "cases_from_datalist",
    "assign_case_ids",
    "load_bundle",
    "LoadedBundle",
    "SegmentOptions",
    "run_segmentation",
    "main",
]

# Single-file image formats searched for in an input folder (.dcm files make their folder a series).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
MASK_SUFFIX = "_seg.nii.gz"
SEG_SUFFIX = "_seg.dcm"
RECORDS_DIR = "records"
QA_DIR = "qa"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
_TMP_PREFIX = ".tmp."
MAX_WRITES_IN_FLIGHT = 2  # predictions waiting for the writer thread (bounds memory)


# ============================================================================================
# cases
# ============================================================================================


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


def _is_dicom_file(path: Path) -> bool:
    """``.dcm``-like suffix, or the 128-byte preamble followed by ``DICM`` (files often have no suffix)."""
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    if strip_image_suffix(path.name, IMAGE_SUFFIXES) is not None:
        return False
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _sanitize(name: str) -> str:
    """Keep case ids safe as file names on every platform."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return cleaned or "case"


def assign_case_ids(entries: Sequence[tuple[str | list[str], str, bool]]) -> list[Case]:
    """Cases with unique, predictable ids from ``(image, source, is_dicom)`` entries.

    ``source`` is the input's path relative to the input root (POSIX separators). The id is
    the file name without its extensions, or the series folder's name. Ids shared by several
    inputs (compared case-insensitively, as on macOS/Windows file systems) become the source's
    folder path joined with ``__`` (``a/b/ct.nii.gz`` -> ``a__b__ct``); any still shared (e.g.
    ``ct.nii.gz`` and ``ct.nrrd`` in one folder) get ``__2``, ``__3`` ... in source order. The
    result is sorted by source, so it does not depend on the order of ``entries``.
    """
    entries = sorted(entries, key=lambda e: e[1])

    def base(source: str, is_dicom: bool) -> str:
        name = source.rstrip("/").split("/")[-1]
        return _sanitize(name if is_dicom else (strip_image_suffix(name, IMAGE_SUFFIXES) or Path(name).stem))

    def qualified(source: str, is_dicom: bool) -> str:
        parts = [p for p in source.rstrip("/").split("/") if p][:-1]
        return "__".join([_sanitize(p) for p in parts] + [base(source, is_dicom)])

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
    """Cases under ``root``: image files (``IMAGE_SUFFIXES``) and DICOM series folders, recursively.

    Hidden files and folders and the folders in ``exclude`` (e.g. an output folder inside
    ``root``) are skipped. A folder that directly holds DICOM files is one series case (a
    folder holding several series fails later with the reader's message); its sub-folders are
    searched too. Symbolic links to folders are not followed.
    """
    root = Path(root)
    excluded = {os.path.realpath(p) for p in exclude}
    entries: list[tuple[str, str, bool]] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and os.path.realpath(Path(folder) / d) not in excluded)
        folder_path = Path(folder)
        relative = folder_path.relative_to(root).as_posix()
        has_dicom = False
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = folder_path / name
            if strip_image_suffix(name, IMAGE_SUFFIXES) is not None:
                entries.append((str(path), (path.relative_to(root)).as_posix(), False))
            elif not has_dicom and _is_dicom_file(path):
                has_dicom = True
        if has_dicom:
            name = folder_path.name if relative != "." else root.resolve().name
            source = (relative if relative != "." else name) + "/"
            entries.append((str(folder_path) + os.sep, source, True))
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


# ============================================================================================
# bundle
# ============================================================================================


@dataclasses.dataclass
class LoadedBundle:
    """What segmentation needs from a bundle, parsed from its inference config."""

    network: torch.nn.Module
    preprocessing: Any
    inferer: Any
    postprocessing: Any
    device: torch.device
    checkpoint: str
    checkpoint_sha256: str
    class_names: dict[int, str]
    spatial_dims: int | None
    in_channels: int | None


def parse_override(text: str) -> tuple[str, Any]:
    """``id#key=value`` -> (id, value); the value is JSON, else a Python literal, else a string."""
    if "=" not in text:
        raise ValueError(f"--override needs ID=VALUE (e.g. network_def#features=[8,16,32]), got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ValueError(f"--override needs an id before '=', got {text!r}")
    for parse in (json.loads, ast.literal_eval):
        try:
            return key, parse(raw)
        except (ValueError, SyntaxError):
            pass
    return key, raw


def _strip_save_transforms(config: Any) -> Any:
    """Drop ``SaveImage``-like items from a postprocessing config (we write the masks ourselves).

    Handles ``pipeline.transforms.postprocessing`` (``output_dir`` -> None) and model-zoo style
    ``Compose`` lists of ``{"_target_": "SaveImaged", ...}``. Parsing either unchanged would
    create the bundle's output folder, outside ``OUT``.
    """
    if isinstance(config, dict):
        config = {k: _strip_save_transforms(v) for k, v in config.items()}
        target = str(config.get("_target_", ""))
        if target.endswith("postprocessing") and "output_dir" in config:
            config["output_dir"] = None
        return config
    if isinstance(config, list):
        return [
            _strip_save_transforms(item)
            for item in config
            if not (isinstance(item, dict) and "SaveImage" in str(item.get("_target_", "")))
        ]
    return config


def _without_save(postprocessing: Any) -> Any:
    """Second guard: remove SaveImage/SaveImaged instances from a parsed Compose."""
    from monai.transforms import Compose, SaveImage, SaveImaged

    if isinstance(postprocessing, Compose):
        kept = [t for t in postprocessing.transforms if not isinstance(t, (SaveImage, SaveImaged))]
        if len(kept) != len(postprocessing.transforms):
            return Compose(kept)
    return postprocessing


def _class_names(bundle: Path, out_channels: int | None) -> dict[int, str]:
    """Foreground class names from ``metadata.json`` (``network_data_format.outputs.pred.channel_def``)."""
    names: dict[int, str] = {}
    try:
        meta = json.loads((bundle / "configs" / "metadata.json").read_text())
        outputs = meta.get("network_data_format", {}).get("outputs", {})
        output = outputs.get("pred") or next(iter(outputs.values()), {})
        # "foreground (logit; sigmoid > 0.5)" -> "foreground"
        names = {int(k): re.split(r"\s*\(", str(v))[0] for k, v in output.get("channel_def", {}).items()}
    except (OSError, ValueError, StopIteration, AttributeError, TypeError):
        names = {}
    if (out_channels or 1) == 1:  # one sigmoid channel: channel 0 is class 1
        return {1: _sanitize(names.get(0) or "foreground")}
    return {k: _sanitize(names.get(k) or f"class_{k}") for k in range(1, int(out_channels))}


def _find_checkpoint(parser, bundle: Path) -> str:
    for key in ("ckpt_path", "checkpoint", "checkpoint_path", "model_path"):
        if key in parser:
            value = parser.get_parsed_content(key)
            if isinstance(value, (str, os.PathLike)):
                return str(value)
    return str(bundle / "models" / "model.pt")


def _sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_bundle(
    bundle: str | os.PathLike,
    config_files: Sequence[str] = ("configs/inference.json",),
    overrides: dict[str, Any] | None = None,
    checkpoint: str | None = None,
    device: str | None = None,
) -> LoadedBundle:
    """Parse the network, preprocessing, inferer and postprocessing from a bundle and load its weights.

    Args:
        bundle: the bundle folder (``bundle_root``).
        config_files: config files relative to ``bundle`` (later ones override earlier ones).
        overrides: ``{"id#key": value}`` applied after reading, e.g. ``{"network_def#mode": "fast"}``.
        checkpoint: weights file; default: the config's ``ckpt_path`` or ``models/model.pt``.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``; default: the config's ``device``.
    """
    from monai.bundle import ConfigParser
    from monai.bundle.reference_resolver import ReferenceResolver

    from pipeline.engines import load_weights

    bundle = Path(bundle)
    files = [str(f if Path(f).is_absolute() else bundle / f) for f in config_files]
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"bundle config {path} not found (is --bundle a MONAI bundle folder?)")
    parser = ConfigParser()
    parser.read_config(files if len(files) > 1 else files[0])
    meta = bundle / "configs" / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))
    parser["bundle_root"] = str(bundle)
    for key, value in (overrides or {}).items():
        top = ReferenceResolver.normalize_id(key).split(ReferenceResolver.sep)[0]
        if top not in parser:
            raise KeyError(f"override {key!r}: the bundle config has no id {top!r} (a typo?)")
        parser[key] = value
    if device is not None:
        parser["device"] = f"$torch.device({str(device)!r})"
    missing = [key for key in ("network_def", "preprocessing", "inferer") if key not in parser]
    if missing:
        raise KeyError(f"{files[-1]}: the config has no {', '.join(missing)} (needed to segment)")
    if "postprocessing" in parser:
        parser["postprocessing"] = _strip_save_transforms(parser["postprocessing"])

    resolved_device = torch.device(parser.get_parsed_content("device")) if "device" in parser else torch.device("cpu")
    network = parser.get_parsed_content("network_def")
    checkpoint = checkpoint or _find_checkpoint(parser, bundle)
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"{checkpoint}: no trained weights; train the bundle first or pass --checkpoint PATH")
    load_weights(network, checkpoint)  # weights_only=True, clear error for another architecture
    network = network.to(resolved_device).eval()
    preprocessing = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    if "postprocessing" in parser:
        postprocessing = _without_save(parser.get_parsed_content("postprocessing"))
    else:
        from pipeline.transforms import postprocessing as default_postprocessing

        postprocessing = default_postprocessing(preprocessing, getattr(network, "out_channels", 1))
    return LoadedBundle(
        network=network,
        preprocessing=preprocessing,
        inferer=inferer,
        postprocessing=postprocessing,
        device=resolved_device,
        checkpoint=os.path.abspath(checkpoint),
        checkpoint_sha256=_sha256(checkpoint),
        class_names=_class_names(bundle, getattr(network, "out_channels", None)),
        spatial_dims=getattr(network, "spatial_dims", None),
        in_channels=getattr(network, "in_channels", None),
    )


# ============================================================================================
# small file helpers: atomic writes, fingerprints
# ============================================================================================


def _tmp_name(final: Path) -> Path:
    """Temporary sibling of ``final`` (same folder, so the rename is atomic; keeps the suffix)."""
    return final.with_name(f"{_TMP_PREFIX}{os.getpid()}.{final.name}")


def _remove_stale_tmp(final: Path) -> None:
    """Delete temporaries of ``final`` left by a killed run (only this exact file's, any pid)."""
    pattern = re.compile(re.escape(_TMP_PREFIX) + r"\d+\." + re.escape(final.name) + "$")
    if final.parent.is_dir():
        for path in final.parent.iterdir():
            if pattern.match(path.name):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    with open(tmp, "w", newline="") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def input_fingerprint(image: str | list[str]) -> list:
    """Cheap identity of an input (sizes and mtimes; a series folder: its files), to detect changes."""
    fingerprint = []
    for path in image if isinstance(image, list) else [image]:
        if os.path.isdir(path):
            stats = [os.stat(p) for p in sorted(Path(path).iterdir()) if p.is_file() and not p.name.startswith(".")]
            fingerprint.append([len(stats), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)])
        else:
            stat = os.stat(path)
            fingerprint.append([stat.st_size, stat.st_mtime_ns])
    return fingerprint


def _read_json(path: Path) -> dict | None:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


# ============================================================================================
# writing one case
# ============================================================================================


def _nifti_header(case: Case):
    """The input's NIfTI header (geometry copied to the mask), or None for other formats."""
    if case.is_dicom or not is_nifti(case.first_path):
        return None
    import nibabel as nib

    return nib.load(case.first_path).header


def write_mask_nifti(mask: np.ndarray, affine: np.ndarray, path: Path, header=None) -> np.ndarray:
    """Write a mask as NIfTI; returns the affine a reader will see.

    With the input's NIfTI ``header`` its qform and sform (and their codes) are copied, so
    every viewer places the mask exactly as it places the image; otherwise ``affine`` is
    stored as both (code 1, scanner).
    """
    import nibabel as nib

    if header is not None:
        header = header.copy()
        header.set_data_dtype(mask.dtype)
        header.set_slope_inter(1.0, 0.0)
        header["cal_min"], header["cal_max"] = 0, 0
        header["intent_code"] = 0
        image = nib.Nifti1Image(mask, None, header=header)
    else:
        image = nib.Nifti1Image(mask, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        image.header.set_xyzt_units("mm")
        image.header.set_data_dtype(mask.dtype)
    nib.save(image, str(path))
    return np.asarray(image.header.get_best_affine(), dtype=float)


def _require_highdicom():
    try:
        import highdicom  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "--format dicom-seg needs the 'highdicom' package: pip install 'unetpp-pipeline[dicom-seg]' "
            "(or pip install highdicom)"
        ) from err
    return highdicom


def write_dicom_seg(mask: np.ndarray, series_folder: str, class_names: dict[int, str], path: Path) -> None:
    """Write a DICOM SEG (highdicom) of an ``(i, j, k)`` class-value mask on its source series' grid.

    Frames follow the series' slices sorted along the normal, the order the reader stacks them
    in, so frame ``k`` is ``mask[:, :, k]`` (rows = ``j``, columns = ``i``).
    """
    hd = _require_highdicom()
    import pydicom
    from pydicom.sr.codedict import codes

    from pipeline.readers import dicom_series_files

    files, _ = dicom_series_files(series_folder)
    sources = [pydicom.dcmread(f) for f in files]
    if "FrameOfReferenceUID" not in sources[0]:
        raise DataError(f"{series_folder}: the series has no FrameOfReferenceUID, which a DICOM SEG must reference")
    frames = np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8)  # (k, rows, cols)
    if len(sources) == 1 and int(getattr(sources[0], "NumberOfFrames", 1)) == 1:
        frames = frames[:1]
    algorithm = hd.AlgorithmIdentificationSequence(
        name="UNet++", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=name,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for number, name in sorted(class_names.items())
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # highdicom's remarks on the source's patient name etc.
        seg = _build_seg(hd, sources, frames, descriptions)
    seg.save_as(str(path))


def _build_seg(hd, sources, frames, descriptions):
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="unetpp-pipeline",
        manufacturer_model_name="UNet++",
        software_versions=__version__,
        device_serial_number="0",
        series_description="UNet++ segmentation",
        omit_empty_frames=False,
    )


def _to_display_orientation(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip voxel axes to the closest RAS axes; returns the array and voxel sizes."""
    import nibabel.orientations as orient

    ornt = orient.io_orientation(affine)
    zooms = np.linalg.norm(affine[:3, :3], axis=0)[ornt[:, 0].astype(int)]
    return orient.apply_orientation(array, ornt), zooms


def write_qa_png(image: np.ndarray, mask: np.ndarray, affine: np.ndarray, path: Path, title: str, class_names: dict[int, str]) -> None:
    """Three orthogonal mid-slices (axial, coronal, sagittal in RAS) of the image with the mask's contour."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    image = np.asarray(image, dtype=np.float32)
    mask = np.asarray(mask)
    if image.ndim == 2:
        image, mask = image[..., None], mask[..., None]
    image, zooms = _to_display_orientation(image, affine)
    mask, _ = _to_display_orientation(mask, affine)
    finite = image[np.isfinite(image)]
    low, high = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    centre = [s // 2 for s in image.shape]
    views = [
        ("axial", lambda a: a[:, :, centre[2]], zooms[1] / zooms[0]),
        ("coronal", lambda a: a[:, centre[1], :], zooms[2] / zooms[0]),
        ("sagittal", lambda a: a[centre[0], :, :], zooms[2] / zooms[1]),
    ]
    if image.shape[2] == 1:
        views = views[:1]
    figure = Figure(figsize=(4 * len(views), 4.4), dpi=80)
    colours = ["red", "cyan", "yellow", "lime", "magenta", "orange"]
    for index, (name, take, aspect) in enumerate(views):
        axis = figure.add_subplot(1, len(views), index + 1)
        axis.imshow(take(image).T, cmap="gray", origin="lower", vmin=low, vmax=high if high > low else low + 1, aspect=aspect)
        plane = take(mask)
        for number, colour in zip(sorted(class_names), colours * 8):
            selected = (plane == number).astype(np.float32)
            if selected.any() and min(selected.shape) > 1:
                axis.contour(selected.T, levels=[0.5], colors=[colour], linewidths=1.0, origin="lower")
        axis.set_title(name)
        axis.set_axis_off()
    legend = ", ".join(f"{name} ({colour})" for (number, name), colour in zip(sorted(class_names.items()), colours * 8))
    figure.suptitle(f"{title}\n{legend}", fontsize=9)
    figure.tight_layout()
    figure.savefig(str(path), format="png")


def _qa_image(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """The input image on its own grid (first channel), for the QA picture."""
    from pipeline.readers import read_volume

    array, affine = read_volume(case.first_path)
    while array.ndim > 3:
        array = array[..., 0]
    return array, affine


# ============================================================================================
# resume: is a case finished?
# ============================================================================================


def _record_path(out: Path, case_id: str) -> Path:
    return out / RECORDS_DIR / f"{case_id}.json"


def _failed_path(out: Path, case_id: str) -> Path:
    return out / RECORDS_DIR / f"{case_id}.failed.json"


def _output_paths(out: Path, case: Case, options: "SegmentOptions") -> dict[str, Path]:
    paths = {"mask": out / f"{case.case_id}{MASK_SUFFIX}"}
    if options.dicom_seg and case.is_dicom:
        paths["dicom_seg"] = out / f"{case.case_id}{SEG_SUFFIX}"
    if options.qa_png:
        paths["qa_png"] = out / QA_DIR / f"{case.case_id}.png"
    return paths


def _vouched(record: dict | None, name: str, path: Path, out: Path, previous: bool = False) -> bool:
    """True when ``path`` exists and is the file the record lists (same relative path and digest).

    ``previous=True`` also accepts the outputs the record replaced: a run killed between writing
    a record and renaming its files leaves the earlier run's files, still ours to replace.
    """
    if not record or not path.is_file():
        return False
    relative, digest = path.relative_to(out).as_posix(), None
    for key in ("outputs", "previous_outputs") if previous else ("outputs",):
        listed = (record.get(key) or {}).get(name)
        if listed and listed.get("path") == relative:
            digest = digest or _sha256(path)
            if listed.get("sha256") == digest:
                return True
    return False


def plan_case(case: Case, out: Path, options: "SegmentOptions", settings: dict) -> tuple[str, str]:
    """Decide what to do with a case: ``("existing", "")``, ``("todo", "")`` or ``("failed", reason)``."""
    record = _read_json(_record_path(out, case.case_id))
    paths = _output_paths(out, case, options)
    if options.overwrite:
        return "todo", ""
    if record and record.get("status") == "done" and all(_vouched(record, n, p, out) for n, p in paths.items()):
        try:
            changed = record.get("input_fingerprint") != input_fingerprint(case.image)
        except OSError as err:
            return "failed", f"input unreadable: {err}"
        if changed:
            return "failed", "the input changed since its mask was written; pass --overwrite to redo it"
        if record.get("settings") != settings:
            differing = sorted(k for k in set(settings) | set(record.get("settings", {})) if settings.get(k) != record.get("settings", {}).get(k))
            return "failed", (
                f"segmented earlier with other settings ({', '.join(differing)}); pass --overwrite to redo it "
                "or choose another --output"
            )
        return "existing", ""
    for name, path in paths.items():
        if path.exists() and not _vouched(record, name, path, out, previous=True):
            return "failed", (
                f"{path.relative_to(out).as_posix()} exists and no record of this command vouches for it; "
                "pass --overwrite to replace it"
            )
    return "todo", ""


# ============================================================================================
# the pipeline
# ============================================================================================


@dataclasses.dataclass
class SegmentOptions:
    """Run options (the command line's, minus the model)."""

    output: Path
    overwrite: bool = False
    dicom_seg: bool = False
    qa_png: bool = False
    precision: str = "fp32"
    workers: int = 1
    quiet: bool = False
    rank: int = 0
    world_size: int = 1


def _root_cause(err: BaseException) -> BaseException:
    """The error worth showing: MONAI wraps transform errors ("applying transform ..."), so take
    the first :class:`DataError` in the chain (it names the file), else the innermost error."""
    chain = [err]
    while chain[-1].__cause__ is not None and len(chain) < 20:
        chain.append(chain[-1].__cause__)
    return next((e for e in chain if isinstance(e, DataError)), chain[-1])


def _reason(stage: str, err: BaseException) -> str:
    root = _root_cause(err)
    message = str(root).strip().splitlines()
    text = message[0] if message else ""
    if isinstance(root, DataError):
        return f"{stage}: {text}"
    return f"{stage}: {type(root).__name__}: {text}"


class _PreprocessedCases(torch.utils.data.Dataset):
    """Loads and preprocesses a case; errors come back as data so one bad case never stops the loader."""

    def __init__(self, cases: Sequence[Case], preprocessing, spatial_dims: int | None, in_channels: int | None):
        self.cases = list(cases)
        self.preprocessing = preprocessing
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> dict:
        case = self.cases[index]
        start = time.perf_counter()
        try:
            data = self.preprocessing({"image": case.image})
            self._check(case, data["image"])
        except Exception as err:  # noqa: BLE001 - any failure of one case is reported, not raised
            return {"index": index, "error": _reason("read", err), "read_s": time.perf_counter() - start}
        return {"index": index, "data": data, "error": None, "read_s": time.perf_counter() - start}

    def _check(self, case: Case, image) -> None:
        meta = getattr(image, "meta", {})
        rank = len(np.atleast_1d(np.asarray(meta.get("spatial_shape", image.shape[1:]))))
        if self.spatial_dims == 3 and rank < 3:
            raise DataError(f"{case.first_path}: a {rank}D image, but the bundle's network is 3D (use a 2D bundle)")
        if self.in_channels is not None and image.shape[0] != self.in_channels:
            raise DataError(
                f"{case.first_path}: {image.shape[0]} channels after loading (a 4D volume?), "
                f"the network expects {self.in_channels}"
            )


def _passthrough(item):
    return item


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _voxel_ml(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(np.asarray(affine, dtype=float)[:3, :3])) / 1000.0)


class _Progress:
    """tqdm bar with ETA (rank 0, not --quiet), or one log line per case."""

    def __init__(self, total: int, initial: int, options: SegmentOptions):
        self.options = options
        self.total = total
        self.count = initial
        self.bar = None
        if not options.quiet and options.rank == 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="case", desc="segment", dynamic_ncols=True)

    def log(self, message: str) -> None:
        prefix = f"[rank {self.options.rank}] " if self.options.world_size > 1 else ""
        if self.bar is not None:
            self.bar.write(prefix + message, file=sys.stderr)
        else:
            print(prefix + message, file=sys.stderr, flush=True)

    def case_finished(self, row: dict) -> None:
        self.count += 1
        if row["status"] == "failed":
            self.log(f"{row['case_id']}: FAILED: {row['reason']}")
        elif self.bar is None and (self.options.quiet or self.options.rank != 0):
            timing = row.get("timings", {})
            self.log(
                f"[{self.count}/{self.total}] {row['case_id']}: done "
                f"(read {timing.get('read_s', 0):.2f} s, network {timing.get('infer_s', 0):.2f} s, write {timing.get('write_s', 0):.2f} s)"
            )
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _CaseWriter:
    """Postprocessing and writing of one case (runs in the writer thread)."""

    def __init__(self, bundle: LoadedBundle, options: SegmentOptions, settings: dict, run_id: str):
        self.bundle = bundle
        self.options = options
        self.settings = settings
        self.run_id = run_id
        self.out = options.output

    def __call__(self, case: Case, data: dict, logits: torch.Tensor, timings: dict) -> dict:
        start = time.perf_counter()
        try:
            row = self._write(case, data, logits, timings)
        except Exception as err:  # noqa: BLE001 - reported per case
            timings["write_s"] = time.perf_counter() - start
            return self.fail(case, _reason("write", err), timings, detail=traceback.format_exc())
        return row

    def _write(self, case: Case, data: dict, logits: torch.Tensor, timings: dict) -> dict:
        start = time.perf_counter()
        image = data["image"]
        original_affine = np.asarray(image.meta["original_affine"], dtype=float)
        original_shape = tuple(int(s) for s in np.atleast_1d(np.asarray(image.meta["spatial_shape"])))
        data = dict(data)
        data["pred"] = logits
        pred = self.bundle.postprocessing(data)["pred"]
        mask = torch.as_tensor(pred).detach().cpu().numpy()
        if mask.ndim == len(original_shape) + 1:
            mask = mask[0]
        if tuple(mask.shape) != original_shape:
            raise RuntimeError(f"inverted mask has shape {mask.shape}, the input {original_shape} (postprocessing must invert to the input grid)")
        inverted_affine = getattr(pred, "affine", None)
        if inverted_affine is not None and not np.allclose(np.asarray(inverted_affine, dtype=float), original_affine, atol=1e-3):
            raise RuntimeError("inverted mask's affine differs from the input's (postprocessing must invert to the input grid)")
        mask = np.rint(mask).astype(np.uint8 if mask.max(initial=0) < 256 else np.uint16)
        header = _nifti_header(case)

        finals = _output_paths(self.out, case, self.options)
        temps = {name: _tmp_name(path) for name, path in finals.items()}
        for name, path in finals.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_tmp(path)
        try:
            written_affine = write_mask_nifti(mask, original_affine, temps["mask"], header=header)
            if not np.allclose(written_affine, original_affine, atol=1e-4):
                raise RuntimeError(f"the mask's header affine {written_affine.tolist()} would differ from the input's {original_affine.tolist()}")
            if "dicom_seg" in temps:
                write_dicom_seg(mask, case.first_path, self.bundle.class_names, temps["dicom_seg"])
            if "qa_png" in temps:
                qa_image, qa_affine = _qa_image(case)
                write_qa_png(qa_image, mask, qa_affine, temps["qa_png"], case.case_id, self.bundle.class_names)
            for temp in temps.values():
                _fsync(temp)
            # The commit: check nothing foreign appeared meanwhile, write the record, then rename.
            record = _read_json(_record_path(self.out, case.case_id))
            for name, path in finals.items():
                if path.exists() and not self.options.overwrite and not _vouched(record, name, path, self.out, previous=True):
                    raise FileExistsError(f"{path.relative_to(self.out).as_posix()} appeared meanwhile; not replacing it")
            voxel_ml = _voxel_ml(original_affine)
            counts = np.bincount(mask.ravel(), minlength=max(self.bundle.class_names, default=1) + 1)
            volumes = {name: round(float(counts[number]) * voxel_ml, 4) for number, name in sorted(self.bundle.class_names.items())}
            timings["write_s"] = time.perf_counter() - start
            row = {
                "case_id": case.case_id,
                "input": case.image,
                "source": case.source,
                "status": "done",
                "reason": "",
                "run_id": self.run_id,
                "rank": self.options.rank,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "timings": {k: round(float(v), 4) for k, v in timings.items()},
                "shape": list(original_shape),
                "spacing_mm": [round(float(s), 6) for s in np.linalg.norm(original_affine[:3, :3], axis=0)][: len(original_shape)],
                "volumes_ml": volumes,
                "input_fingerprint": input_fingerprint(case.image),
                "settings": self.settings,
                "outputs": {
                    name: {"path": path.relative_to(self.out).as_posix(), "sha256": _sha256(temps[name])}
                    for name, path in finals.items()
                },
            }
            if record and record.get("outputs"):
                row["previous_outputs"] = record["outputs"]
            if self.options.dicom_seg and not case.is_dicom:
                row["notes"] = "no DICOM SEG: the input is not a DICOM series"
            _write_text_atomic(_record_path(self.out, case.case_id), json.dumps(row, indent=1) + "\n")
            for name, path in finals.items():
                os.replace(temps[name], path)
        finally:
            for temp in temps.values():
                with contextlib.suppress(FileNotFoundError):
                    temp.unlink()
        with contextlib.suppress(FileNotFoundError):
            _failed_path(self.out, case.case_id).unlink()
        return row

    def fail(self, case: Case, reason: str, timings: dict | None = None, detail: str = "") -> dict:
        row = {
            "case_id": case.case_id,
            "input": case.image,
            "source": case.source,
            "status": "failed",
            "reason": reason,
            "run_id": self.run_id,
            "rank": self.options.rank,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "timings": {k: round(float(v), 4) for k, v in (timings or {}).items()},
        }
        if detail:
            row["traceback"] = detail
        _write_text_atomic(_failed_path(self.out, case.case_id), json.dumps(row, indent=1) + "\n")
        return row


def run_segmentation(
    cases: Sequence[Case], bundle: LoadedBundle, options: SegmentOptions, settings: dict, run_id: str
) -> dict:
    """Segment this rank's ``cases``: plan (skip finished ones), read in background, infer, write in background.

    Returns batch statistics (``wall_s``, ``network_s``, ``input_wait_s``, counts). Per-case
    results are in ``OUT/records``.
    """
    out = options.output
    writer = _CaseWriter(bundle, options, settings, run_id)
    todo, existing, rows = [], 0, []
    for case in cases:
        decision, reason = plan_case(case, out, options, settings)
        if decision == "existing":
            existing += 1
        elif decision == "failed":
            rows.append(writer.fail(case, f"skip: {reason}"))
        else:
            todo.append(case)
    progress = _Progress(len(cases), existing + len(rows), options)
    for row in rows:
        progress.log(f"{row['case_id']}: FAILED: {row['reason']}")
    stats = {"cases": len(cases), "existing": existing, "planned_failures": len(rows), "todo": len(todo)}
    start = time.perf_counter()
    network_s = wait_s = 0.0
    dataset = _PreprocessedCases(todo, bundle.preprocessing, bundle.spatial_dims, bundle.in_channels)

    def loader_from(first: int, isolated: bool = False):
        """Reader over ``todo[first:]``; ``isolated``: one worker holding one case at a time."""
        subset = torch.utils.data.Subset(dataset, range(first, len(dataset)))
        workers = min(options.workers, 1) if isolated else options.workers
        loader = torch.utils.data.DataLoader(
            subset,
            batch_size=None,
            shuffle=False,
            num_workers=workers,
            collate_fn=_passthrough,
            prefetch_factor=(1 if isolated else 2) if workers > 0 else None,
        )
        # PyTorch's SIGCHLD handler raises "DataLoader worker ... exited" in the main thread
        # wherever it happens to be (in the network, in the middle of another case), which would
        # blame the wrong case. Without it, a dead reader is reported by the next `next()`.
        in_main = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGCHLD")
        previous = signal.getsignal(signal.SIGCHLD) if in_main else None
        iterator = iter(loader)
        if in_main and previous is not None:
            signal.signal(signal.SIGCHLD, previous)
        return iterator

    pending: deque[Future] = deque()

    def harvest(limit: int) -> None:
        """Report finished writes; block while more than ``limit`` are pending."""
        while pending and (pending[0].done() or len(pending) > limit):
            progress.case_finished(pending.popleft().result())

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="segment-writer") as pool:
        iterator, expected, isolated = loader_from(0), 0, False
        while True:
            tick = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                break
            except RuntimeError as err:
                if options.workers == 0 or "DataLoader worker" not in str(err) or expected >= len(todo):
                    raise
                # A reader process died (a segfault in a DICOM decoder, killed for memory...). With
                # prefetching it may have held several cases, and results it had queued die with it,
                # so go on from the next expected case with one reader holding one case at a time:
                # if it dies again, that case is the culprit (a transient failure just passes).
                wait_s += time.perf_counter() - tick
                if isolated:
                    reason = f"read: the reader process died on this case ({str(err).splitlines()[0]})"
                    progress.case_finished(writer.fail(todo[expected], reason))
                    expected += 1
                else:
                    progress.log("a reader process died; going on with one reader, one case at a time")
                    isolated = True
                iterator = loader_from(expected, isolated=True)
                continue
            wait_s += time.perf_counter() - tick
            expected = item["index"] + 1
            case = todo[item["index"]]
            timings = {"read_s": item["read_s"]}
            if item["error"] is not None:
                progress.case_finished(writer.fail(case, item["error"], timings))
                continue
            data = item["data"]
            tick = time.perf_counter()
            try:
                # A plain tensor: MetaTensor's per-op bookkeeping slows the network down (2x on small
                # networks) and Invertd only needs the trace kept on data["image"].
                batch = torch.as_tensor(data["image"]).as_subclass(torch.Tensor).unsqueeze(0).to(bundle.device)
                with torch.no_grad(), _autocast(bundle.device, options.precision):
                    logits = bundle.inferer(batch, bundle.network)
                del batch
                logits = logits[0].float().cpu()
            except Exception as err:  # noqa: BLE001 - e.g. out of memory on one huge case
                timings["infer_s"] = time.perf_counter() - tick
                progress.case_finished(writer.fail(case, _reason("network", err), timings, detail=traceback.format_exc()))
                continue
            timings["infer_s"] = time.perf_counter() - tick
            network_s += timings["infer_s"]
            pending.append(pool.submit(writer, case, data, logits, timings))
            del data, logits, item
            harvest(MAX_WRITES_IN_FLIGHT)
        harvest(0)
    progress.close()
    stats.update(wall_s=time.perf_counter() - start, network_s=network_s, input_wait_s=wait_s)
    return stats


# ============================================================================================
# summary
# ============================================================================================

SUMMARY_FIELDS = ["case_id", "status", "reason", "source", "mask", "dicom_seg", "qa_png", "rank", "read_s", "infer_s", "write_s", "total_s", "shape", "spacing_mm"]


def collect_rows(cases: Sequence[Case], out: Path, run_id: str) -> list[dict]:
    """One row per case from its records: done (this run), existing (earlier run), failed, or missing."""
    rows = []
    for case in cases:
        failed = _read_json(_failed_path(out, case.case_id))
        record = _read_json(_record_path(out, case.case_id))
        if failed and failed.get("run_id") == run_id:
            row = dict(failed)
        elif record and record.get("status") == "done":
            row = dict(record)
            if row.get("run_id") != run_id:
                row["status"] = "existing"
        else:
            row = {"case_id": case.case_id, "source": case.source, "status": "missing", "reason": "no record: the run did not reach this case"}
        row.pop("traceback", None)
        rows.append(row)
    return rows


def write_summary(rows: list[dict], out: Path, class_names: dict[int, str], batch: dict) -> None:
    """``summary.json`` (every case, batch statistics) and ``summary.csv`` (one line per case)."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    content = {"counts": counts, "batch": batch, "cases": rows}
    _write_text_atomic(out / "summary.json", json.dumps(content, indent=1, default=str) + "\n")
    volume_fields = [f"volume_ml_{name}" for _, name in sorted(class_names.items())]
    buffer = io.StringIO()
    table = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS + volume_fields, extrasaction="ignore")
    table.writeheader()
    for row in rows:
        timings = row.get("timings", {})
        outputs = row.get("outputs", {})
        flat = {
            **{k: row.get(k, "") for k in ("case_id", "status", "reason", "source", "rank")},
            "mask": outputs.get("mask", {}).get("path", ""),
            "dicom_seg": outputs.get("dicom_seg", {}).get("path", ""),
            "qa_png": outputs.get("qa_png", {}).get("path", ""),
            **{k: timings.get(k, "") for k in ("read_s", "infer_s", "write_s")},
            "total_s": round(sum(timings.values()), 4) if timings else "",
            "shape": "x".join(str(s) for s in row.get("shape", [])),
            "spacing_mm": "x".join(f"{s:g}" for s in row.get("spacing_mm", [])),
        }
        for name in class_names.values():
            flat[f"volume_ml_{name}"] = row.get("volumes_ml", {}).get(name, "")
        table.writerow(flat)
    _write_text_atomic(out / "summary.csv", buffer.getvalue())


def write_qa_index(rows: list[dict], out: Path) -> None:
    """``qa/index.html``: every case with its status and QA picture."""
    items = []
    for row in rows:
        png = row.get("outputs", {}).get("qa_png", {}).get("path")
        status = html.escape(row["status"])
        reason = f"<br><small>{html.escape(row.get('reason', ''))}</small>" if row.get("reason") else ""
        volumes = ", ".join(f"{html.escape(k)} {v:g} ml" for k, v in row.get("volumes_ml", {}).items())
        picture = f'<a href="{html.escape(Path(png).name)}"><img src="{html.escape(Path(png).name)}" width="600"></a>' if png else ""
        items.append(
            f"<tr><td><b>{html.escape(row['case_id'])}</b><br>{html.escape(str(row.get('source', '')))}"
            f"<br>{status}{reason}<br>{volumes}</td><td>{picture}</td></tr>"
        )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Segmentation QA</title>"
        "<style>body{font-family:sans-serif}td{vertical-align:top;padding:6px;border-bottom:1px solid #ccc}</style>"
        f"</head><body><h1>Segmentation QA ({len(rows)} cases)</h1><table>{''.join(items)}</table></body></html>\n"
    )
    _write_text_atomic(out / QA_DIR / "index.html", page)


# ============================================================================================
# distributed helpers
# ============================================================================================


def _dist_env() -> tuple[int, int, int]:
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", rank))
    return rank, world, local


def _init_dist(world_size: int, timeout_s: float = 1800) -> bool:
    """Process group for broadcasting the case list and run id at the start (gloo: CPU objects only).

    The end of the run is synchronised through files in ``OUT/records`` instead (see
    :func:`_wait_for_ranks`): ranks finish hours apart on uneven shards, and a collective with a
    timeout that long would also turn any start-up problem into a hang.
    """
    if world_size <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun")
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def _rank_done_path(out: Path, run_id: str, rank: int) -> Path:
    return out / RECORDS_DIR / f".rank{rank}.{run_id}.json"


def _wait_for_ranks(out: Path, run_id: str, world_size: int, timeout_s: float) -> list[dict | None]:
    """Rank 0: wait until every rank has written its completion file (its statistics), or time out.

    Returns each rank's statistics (``None`` for a rank that never finished; its cases show as
    ``missing``) and removes the files.
    """
    deadline = time.monotonic() + timeout_s
    paths = [_rank_done_path(out, run_id, r) for r in range(world_size)]
    while time.monotonic() < deadline and not all(p.exists() for p in paths):
        time.sleep(0.5)
    stats = [_read_json(p) for p in paths]
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return stats


def _broadcast(value: Any, distributed: bool) -> Any:
    if not distributed:
        return value
    import torch.distributed as dist

    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


# ============================================================================================
# command line
# ============================================================================================


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline segment",
        description="Batch-segment a folder (NIfTI/NRRD/MHA files, DICOM series folders) or a datalist with a MONAI bundle.",
        epilog="Exit code: 0 all cases done, 1 some case failed (see OUT/summary.csv), 2 usage or setup error.",
    )
    parser.add_argument("--bundle", required=True, help="bundle folder, e.g. bundles/unetpp_3d_seg")
    parser.add_argument("--input", required=True, help="input folder (searched recursively), a datalist .json, or one image file")
    parser.add_argument("--output", required=True, help="output folder (nothing is written outside it)")
    parser.add_argument("--config", nargs="+", default=["configs/inference.json"], help="bundle config file(s), later ones override")
    parser.add_argument("--override", action="append", default=[], metavar="ID=VALUE",
                        help="config override as for `monai.bundle run`, e.g. network_def#features=[8,16,32] (repeatable)")
    parser.add_argument("--checkpoint", default=None, help="weights (state_dict); default: the bundle's ckpt_path / models/model.pt")
    parser.add_argument("--section", default="test", help="datalist section to segment (default: test)")
    parser.add_argument("--dataset-dir", "--dataset_dir", dest="dataset_dir", default=None, help="datalist paths root (default: its folder)")
    parser.add_argument("--mode", choices=("accurate", "fast"), default=None, help="UNet++ eval mode (default: the bundle's)")
    parser.add_argument("--prune-level", type=int, default=None, help="fast mode: compute nodes X(i,j) with i+j <= K only")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the bundle's; under torchrun cuda means cuda:LOCAL_RANK)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast dtype for the network (fp16: CUDA only)")
    parser.add_argument("--format", choices=("nifti", "dicom-seg"), default="nifti",
                        help="dicom-seg: also write a DICOM SEG for DICOM series inputs (needs highdicom)")
    parser.add_argument("--qa-png", action="store_true", help="write qa/<case>.png (3 mid-slices + mask contour) and qa/index.html")
    parser.add_argument("--overwrite", action="store_true", help="redo every case and replace existing outputs")
    parser.add_argument("--workers", type=int, default=1, help="background reader processes (0: read in the main process)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar; one log line per case")
    parser.add_argument("--dist-timeout", type=float, default=24 * 3600,
                        help="torchrun: seconds rank 0 waits for the other ranks to finish their shares")
    return parser


def _settings(args, bundle: LoadedBundle, overrides: dict) -> dict:
    """What makes two runs' masks comparable (stored in each record, checked on resume)."""
    return {
        "bundle": os.path.basename(os.path.normpath(args.bundle)),
        "config": list(args.config),
        "checkpoint_sha256": bundle.checkpoint_sha256,
        "overrides": {k: overrides[k] for k in sorted(overrides)},
        "precision": args.precision,
    }


def _usage_error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline segment ...``; returns the exit code (0 ok, 1 some case failed, 2 usage/setup)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    rank, world_size, local_rank = _dist_env()
    try:
        overrides = dict(parse_override(text) for text in args.override)
    except ValueError as err:
        return _usage_error(str(err))
    if args.prune_level is not None and args.mode != "fast":
        return _usage_error("--prune-level needs --mode fast")
    if args.mode is not None:
        overrides["network_def#mode"] = args.mode
    if args.prune_level is not None:
        overrides["network_def#prune_level"] = args.prune_level
    if args.workers < 0:
        return _usage_error("--workers must be >= 0")
    device = args.device
    if device is not None:
        try:
            resolved = torch.device(device)
        except RuntimeError as err:
            return _usage_error(f"--device {device!r}: {err}")
        if resolved.type == "cuda":
            if not torch.cuda.is_available():
                return _usage_error(f"--device {device}: CUDA is not available on this machine")
            if world_size > 1 and resolved.index is None:
                device = f"cuda:{local_rank}"
    if args.format == "dicom-seg":
        try:
            _require_highdicom()
        except ImportError as err:
            return _usage_error(str(err))
    input_path, out = Path(args.input), Path(args.output).absolute()
    if not input_path.exists():
        return _usage_error(f"--input {input_path}: not found")
    if out.exists() and not out.is_dir():
        return _usage_error(f"--output {out}: exists and is not a folder")

    try:
        bundle = load_bundle(args.bundle, args.config, overrides, checkpoint=args.checkpoint, device=device)
    except Exception as err:  # noqa: BLE001 - any setup problem is one clear line
        return _usage_error(f"cannot load bundle {args.bundle}: {_root_cause(err)}")
    if args.precision == "fp16" and bundle.device.type != "cuda":
        return _usage_error("--precision fp16 needs a CUDA device (on CPU use bf16 or fp32)")
    if args.precision == "bf16" and bundle.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return _usage_error("--precision bf16 is not supported by this GPU (use fp16)")

    try:
        distributed = _init_dist(world_size)
    except RuntimeError as err:
        return _usage_error(str(err))
    try:
        cases = None
        if rank == 0:
            try:
                if input_path.is_file() and input_path.suffix.lower() == ".json":
                    cases = cases_from_datalist(input_path, args.dataset_dir, args.section)
                elif input_path.is_file():
                    cases = assign_case_ids([(str(input_path), input_path.name, False)])
                else:
                    cases = discover_cases(input_path, exclude=[out])
            except DataError as err:
                cases = str(err)
        cases = _broadcast(cases, distributed)
        if isinstance(cases, str):
            return _usage_error(cases)
        if not cases:
            return _usage_error(f"no images found under {input_path} (NIfTI/NRRD/MHA files or DICOM series folders)")
        run_id = _broadcast(f"{datetime.datetime.now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}", distributed)
        out.mkdir(parents=True, exist_ok=True)
        (out / RECORDS_DIR).mkdir(exist_ok=True)
        options = SegmentOptions(
            output=out,
            overwrite=args.overwrite,
            dicom_seg=args.format == "dicom-seg",
            qa_png=args.qa_png,
            precision=args.precision,
            workers=args.workers,
            quiet=args.quiet,
            rank=rank,
            world_size=world_size,
        )
        settings = _settings(args, bundle, overrides)
        mine = shard(cases, rank, world_size)
        stats = run_segmentation(mine, bundle, options, settings, run_id)
        all_stats: list = [stats]
        if distributed:
            import torch.distributed as dist

            _write_text_atomic(_rank_done_path(out, run_id, rank), json.dumps(stats) + "\n")
            dist.destroy_process_group()
            distributed = False
            if rank != 0:  # rank 0 writes the summary; each rank's exit code covers its own share
                own = collect_rows(mine, out, run_id)
                return EXIT_FAILED if any(row["status"] in ("failed", "missing") for row in own) else EXIT_OK
            all_stats = _wait_for_ranks(out, run_id, world_size, args.dist_timeout)
        finished = [s for s in all_stats if s]
        rows = collect_rows(cases, out, run_id)
        batch = {
            "run_id": run_id,
            "world_size": world_size,
            "device": str(bundle.device),
            "precision": args.precision,
            "settings": settings,
            "wall_s": round(max(s["wall_s"] for s in finished), 3),
            "network_s": round(sum(s["network_s"] for s in finished), 3),
            "input_wait_s": round(sum(s["input_wait_s"] for s in finished), 3),
            "per_rank": all_stats,
        }
        write_summary(rows, out, bundle.class_names, batch)
        if args.qa_png:
            write_qa_index(rows, out)
        statuses = [row["status"] for row in rows]
        counts = ", ".join(f"{statuses.count(k)} {k}" for k in sorted(set(statuses)))
        print(f"segment: {len(rows)} cases ({counts}); summary in {out / 'summary.csv'}", file=sys.stderr)
        return EXIT_FAILED if any(row["status"] in ("failed", "missing") for row in rows) else EXIT_OK
    finally:
        if distributed:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
