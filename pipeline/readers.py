"""Image readers that keep full geometry: DICOM series, NRRD, MetaImage (and NIfTI).

Why our own reader: MONAI's ``ITKReader`` needs the 555 MB ``itk`` package and
``PydicomReader`` stacks slices by instance number (wrong when numbers run
against z) and mishandles multi-frame files. SimpleITK (already a dependency)
reads every format here with full geometry; this module wraps it as a MONAI
:class:`~monai.data.ImageReader` and does the DICOM series discovery itself so
the rules are explicit and tested:

* files are grouped by ``SeriesInstanceUID``; a folder holding several series is
  rejected unless ``series_uid=`` picks one;
* slices are sorted by their position along the slice normal
  (``ImagePositionPatient . (row x col)``), never by ``InstanceNumber``;
* an empty folder, duplicate positions and non-uniform slice spacing (a missing
  slice) are errors that name the folder.

Conventions (the same as MONAI's ``NibabelReader``/``ITKReader``): arrays are
indexed ``(i, j, k[, c])`` i.e. x fastest in the file, and the affine maps
``(i, j, k, 1)`` to RAS millimetres; ``affine``/``original_affine`` are always
4x4 (a 2D image is embedded in 3D like a 2D NIfTI).
"""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import SimpleITK as sitk
from monai.data import ImageReader, NibabelReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

__all__ = [
    "DataError",
    "check_image_size",
    "check_claimed_size",
    "GuardedNibabelReader",
    "check_finite",
    "SimpleITKReader",
    "dicom_series_files",
    "read_dicom_series",
    "read_volume",
    "is_nifti",
    "strip_image_suffix",
    "VOLUME_SUFFIXES",
    "DICOM_SUFFIXES",
    "is_dicom_file",
    "is_dicom_series_folder",
    "list_images",
    "image_name",
    "sitk_image_from_array",
    "write_dicom_series",
    "LPS_TO_RAS",
]

# Flip of the first two axes: ITK/DICOM world coordinates are LPS, NIfTI/MONAI's are RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

# The one suffix table. Single-file volumes: found by scanning folders, one case per file.
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
# DICOM files (many have no suffix at all: see is_dicom_file); they make their folder a series.
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# What SimpleITKReader accepts as a file (NIfTI too, when asked explicitly).
SITK_SUFFIXES = VOLUME_SUFFIXES + DICOM_SUFFIXES


def strip_image_suffix(name: str, suffixes: tuple = VOLUME_SUFFIXES) -> str | None:
    """``name`` without the first of ``suffixes`` it ends with (case-insensitive); ``None`` if none."""
    lower = name.lower()
    for suffix in suffixes:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


class DataError(ValueError):
    """Bad input data; the message names the offending file. Re-exported as ``pipeline.data.DataError``."""


def is_nifti(path: str | os.PathLike) -> bool:
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


# --------------------------------------------------------------------------------------------
# the one rule for finding images in a folder
# --------------------------------------------------------------------------------------------


def is_dicom_file(path: str | os.PathLike) -> bool:
    """A DICOM suffix, or the 128-byte preamble followed by ``DICM`` (exports often have no suffix).

    Files with a volume suffix (``.nii.gz``, ``.nrrd``...) and hidden files are never DICOM here.
    """
    path = Path(path)
    if path.name.startswith(".") or path.name.upper() == "DICOMDIR":
        return False
    if path.name.lower().endswith(DICOM_SUFFIXES):
        return True
    if strip_image_suffix(path.name) is not None:
        return False
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_series_folder(path: str | os.PathLike) -> bool:
    """A folder that directly holds at least one DICOM file (see :func:`is_dicom_file`)."""
    path = Path(path)
    if not path.is_dir():
        return False
    return any(child.is_file() and is_dicom_file(child) for child in sorted(path.iterdir()))


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The images directly in ``folder``, sorted: volume files and DICOM series sub-folders.

    This is the one rule every part of the pipeline uses (datalist building, batch
    segmentation): a volume file is one image; a folder that directly holds DICOM files is
    one series image; hidden entries are skipped; anything else (a README, a thumbnail, a
    folder of other files) is not an image. DICOM files lying directly in ``folder`` make
    ``folder`` itself a series, so they are not listed here (see :func:`is_dicom_series_folder`).
    """
    found = []
    for path in sorted(Path(folder).iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_file() and strip_image_suffix(path.name) is not None:
            found.append(path)
        elif path.is_dir() and not path.is_symlink() and is_dicom_series_folder(path):
            found.append(path)
    return found


def image_name(path: str | os.PathLike) -> str:
    """The name of an image: a volume file's name without its suffix, or a series folder's name."""
    path = Path(path)
    return path.name if path.is_dir() else (strip_image_suffix(path.name) or path.stem)


# --------------------------------------------------------------------------------------------
# size guards: a header can claim anything, so check the claim before allocating
# --------------------------------------------------------------------------------------------

# Limits for one image, read from the environment so that every reader process (DataLoader
# workers, validation workers) applies the same ones: ``segment``/``datalist validate`` set
# them from ``--max-voxels``/``--max-gb``.
MAX_VOXELS_ENV, MAX_GB_ENV = "PIPELINE_MAX_VOXELS", "PIPELINE_MAX_GB"
DEFAULT_MAX_VOXELS = 2**31  # 2.1 G voxels: a 1024 x 1024 x 2048 volume


def _available_gb() -> float | None:
    """MemAvailable from ``/proc/meminfo`` in GB (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1e6
    except OSError:
        return None
    return None


def check_claimed_size(path: str | os.PathLike, voxels: int, file_bytes: int | None = None, data_offset: int = 0) -> None:
    """Refuse an image before reading its pixels when its header claims too much.

    Args:
        voxels: the header's claimed voxel count (all channels/frames).
        file_bytes: for an uncompressed file, the bytes the header says its pixel data take;
            the file must hold ``data_offset + file_bytes`` bytes (a 1 KB file claiming 13 GB
            is refused at once instead of being allocated).

    Raises:
        DataError naming the file and the claimed size: more voxels than ``PIPELINE_MAX_VOXELS``
        (default 2**31), more float32 gigabytes than ``PIPELINE_MAX_GB`` (default: 80 % of the
        memory available now), or a file shorter than its header says.
    """
    max_voxels = int(float(os.environ.get(MAX_VOXELS_ENV) or DEFAULT_MAX_VOXELS))
    if voxels <= 0:
        raise DataError(f"{path}: the header claims an image with no voxels (a zero-size axis)")
    if voxels > max_voxels:
        raise DataError(
            f"{path}: the header claims {voxels:,} voxels, above the limit of {max_voxels:,} "
            "(--max-voxels; a corrupt or hostile header, or a volume to crop first)"
        )
    gigabytes = voxels * 4 / 1e9  # read as float32
    limit = os.environ.get(MAX_GB_ENV)
    available = _available_gb()
    max_gb = float(limit) if limit else (0.8 * available if available else None)
    if max_gb is not None and gigabytes > max_gb:
        raise DataError(
            f"{path}: reading it needs about {gigabytes:.1f} GB as float32, above the limit of {max_gb:.1f} GB "
            f"({'--max-gb' if limit else '80 % of the memory available now; raise it with --max-gb'})"
        )
    if file_bytes is not None:
        actual = os.path.getsize(path)
        if actual < data_offset + file_bytes:
            raise DataError(
                f"{path}: truncated: the header claims {data_offset + file_bytes:,} bytes of image data, "
                f"the file holds {actual:,}"
            )


def _check_nifti_size(path: str) -> None:
    """Header-only size check of a NIfTI file (nibabel reads the header, not the pixels)."""
    import nibabel as nib

    try:
        image = nib.load(path)  # the header only: pixels are read on demand
        shape = tuple(int(s) for s in image.header.get_data_shape())
        itemsize = image.header.get_data_dtype().itemsize
        offset = int(image.dataobj.offset)
    except Exception as err:  # nibabel raises many types for corrupt/truncated/text files
        raise DataError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from err
    voxels = int(np.prod(shape, dtype=np.int64)) if shape else 0
    compressed = str(path).lower().endswith(".gz")
    check_claimed_size(path, voxels, None if compressed else voxels * itemsize, offset)


def _check_sitk_size(path: str) -> None:
    """Header-only size check of a file SimpleITK reads (NRRD, MetaImage, a single DICOM file)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise DataError(f"{path}: SimpleITK cannot read it ({_first_line(err)})") from err
    voxels = int(np.prod(reader.GetSize(), dtype=np.int64)) * int(reader.GetNumberOfComponents())
    check_claimed_size(path, voxels)


def check_image_size(path: str | os.PathLike) -> None:
    """The size guard for any supported file, by format (series folders are checked when listed)."""
    path = str(path)
    if Path(path).is_file():
        (_check_nifti_size if is_nifti(path) else _check_sitk_size)(path)


def check_finite(path: str | os.PathLike, array: np.ndarray) -> None:
    """The pipeline's one policy for NaN/Inf voxels: the image is refused, naming the file and the count.

    A single NaN turns a z-score (and so the whole prediction) into NaN, which thresholds to an
    empty mask; repairing it silently would hide a damaged file. Fix or mask the voxels first.
    """
    if np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.complexfloating):
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            raise DataError(f"{path}: {bad:,} NaN/Inf voxel(s) of {array.size:,}; fix or mask them before using this image")


class GuardedNibabelReader(NibabelReader):
    """MONAI's ``NibabelReader`` with the pipeline's guards: header size checked before reading,
    NaN/Inf voxels refused (see :func:`check_image_size`, :func:`check_finite`)."""

    def read(self, data, **kwargs):
        for name in ensure_tuple(data):
            _check_nifti_size(str(name))
        return super().read(data, **kwargs)

    def get_data(self, img):
        array, meta = super().get_data(img)
        check_finite(ensure_tuple(img)[0].get_filename() or "image", array)
        return array, meta


# --------------------------------------------------------------------------------------------
# DICOM series discovery
# --------------------------------------------------------------------------------------------


def _pixel_data_problem(path: Path, header: Any, pixel_tag_at: int) -> str | None:
    """Why ``path``'s native (uncompressed) PixelData cannot be the image its header describes, or None.

    SimpleITK reads a file whose pixel data is cut short without a word, mostly as zeros; the
    PixelData element's declared length and the file's real size tell. Compressed
    (encapsulated) data is left to the decoder, whose errors are reported as read errors.
    """
    if "Rows" not in header or "Columns" not in header:
        return None  # not an image
    file_meta = getattr(header, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if syntax is None or syntax.is_compressed:
        return None
    expected = (
        int(header.Rows) * int(header.Columns) * int(header.get("SamplesPerPixel", 1) or 1)
        * int(header.get("BitsAllocated", 16) or 16) // 8 * int(header.get("NumberOfFrames", 1) or 1)
    )
    size = path.stat().st_size
    with open(path, "rb") as handle:
        handle.seek(pixel_tag_at)
        raw = handle.read(12)
    endian = "<" if syntax.is_little_endian else ">"
    if len(raw) < 8 or struct.unpack(endian + "HH", raw[:4]) != (0x7FE0, 0x0010):
        return f"no PixelData: the header describes a {header.Rows}x{header.Columns} image but the file has no pixels"
    start = pixel_tag_at + (8 if syntax.is_implicit_VR else 12)
    length = struct.unpack(endian + "I", raw[4:8] if syntax.is_implicit_VR else raw[8:12])[0]
    if length == 0xFFFFFFFF:
        return None
    if length < expected:
        return f"PixelData holds {length:,} bytes; Rows x Columns x samples x bits x frames needs {expected:,}"
    if size < start + length:
        return f"truncated: PixelData declares {length:,} bytes, the file ends after {max(size - start, 0):,}"
    return None


def _dicom_headers(folder: Path) -> list[tuple[str, Any]]:
    """(file, pydicom header without pixels) for every DICOM file directly in ``folder``.

    Raises DataError naming the file when an image file's pixel data is damaged (see
    :func:`_pixel_data_problem`): a series with a short slice must not be read as zeros.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    headers = []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name.upper() == "DICOMDIR":
            continue
        try:
            with open(path, "rb") as handle:
                header = pydicom.dcmread(handle, stop_before_pixels=True)
                pixel_tag_at = handle.tell()
        except (InvalidDicomError, OSError, ValueError, EOFError, struct.error):
            continue  # not DICOM (a README, a thumbnail...): series folders often hold such files
        if "SeriesInstanceUID" in header:
            problem = _pixel_data_problem(path, header, pixel_tag_at)
            if problem:
                raise DataError(f"{path}: {problem}")
            headers.append((str(path), header))
    return headers


def dicom_series_files(
    folder: str | os.PathLike, series_uid: str | None = None, tolerance: float = 1e-2
) -> tuple[list[str], dict]:
    """Files of one DICOM series in ``folder``, sorted along the slice normal.

    Args:
        folder: a folder holding the files of one series (other non-DICOM files are ignored).
        series_uid: the ``SeriesInstanceUID`` to read when the folder holds several series.
        tolerance: relative tolerance on the slice spacing (duplicates: gap below
            ``tolerance * median gap``; non-uniform: any gap differing from the median
            by more than ``tolerance * median gap``).

    Returns:
        ``(files, geometry)``; ``geometry`` has ``direction`` (3x3, columns row/col/normal,
        LPS), ``origin`` (LPS mm), ``slice_spacing`` (mm) and a few descriptive tags; it
        is empty for a single-file series (multi-frame or one slice), read as is.

    Raises:
        DataError: empty folder, several series without ``series_uid``, unknown
            ``series_uid``, inconsistent orientation, duplicate positions, non-uniform spacing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    headers = _dicom_headers(folder)
    if not headers:
        raise DataError(f"{folder}: no DICOM files in this folder (empty, or not a DICOM series folder)")

    series: dict[str, list[tuple[str, Any]]] = {}
    for path, header in headers:
        series.setdefault(str(header.SeriesInstanceUID), []).append((path, header))
    if series_uid is None:
        if len(series) > 1:
            described = "; ".join(
                f"{uid} ({len(items)} files, {items[0][1].get('Modality', '?')} "
                f"'{items[0][1].get('SeriesDescription', '')}')"
                for uid, items in series.items()
            )
            raise DataError(
                f"{folder}: holds {len(series)} DICOM series, choose one with series_uid=...: {described}"
            )
        series_uid = next(iter(series))
    if series_uid not in series:
        raise DataError(f"{folder}: no series with SeriesInstanceUID {series_uid} (found: {', '.join(series)})")
    items = series[series_uid]
    first = items[0][1]
    if "Rows" in first and "Columns" in first:
        frames = sum(int(h.get("NumberOfFrames", 1) or 1) for _, h in items)
        check_claimed_size(folder, int(first.Rows) * int(first.Columns) * int(first.get("SamplesPerPixel", 1) or 1) * frames)
    info = {
        "series_instance_uid": series_uid,
        "modality": str(first.get("Modality", "")),
        "series_description": str(first.get("SeriesDescription", "")),
    }
    if len(items) == 1:
        return [items[0][0]], info

    orientations, positions = [], []
    for path, header in items:
        iop, ipp = header.get("ImageOrientationPatient"), header.get("ImagePositionPatient")
        if iop is None or ipp is None:
            raise DataError(f"{folder}: {Path(path).name} has no ImageOrientationPatient/ImagePositionPatient")
        orientations.append(np.asarray(iop, dtype=float))
        positions.append(np.asarray(ipp, dtype=float))
    orientations = np.stack(orientations)
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        raise DataError(f"{folder}: slices of series {series_uid} have different ImageOrientationPatient")
    row, col = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    along = np.stack(positions) @ normal
    order = np.argsort(along, kind="stable")
    along = along[order]
    gaps = np.diff(along)
    median_gap = float(np.median(gaps))
    files = [items[i][0] for i in order]
    if gaps.min() <= tolerance * max(median_gap, 1e-3):
        k = int(np.argmin(gaps))
        raise DataError(
            f"{folder}: duplicate slice position {along[k]:.4f} mm along the normal in "
            f"{Path(files[k]).name} and {Path(files[k + 1]).name}"
        )
    if np.abs(gaps - median_gap).max() > tolerance * median_gap:
        raise DataError(
            f"{folder}: non-uniform slice spacing (gaps from {gaps.min():.4f} to {gaps.max():.4f} mm, "
            f"median {median_gap:.4f}); a slice is probably missing"
        )
    info.update(
        direction=np.stack([row, col, normal], axis=1),
        origin=positions[order[0]],
        slice_spacing=float((along[-1] - along[0]) / (len(along) - 1)),
    )
    return files, info


def read_dicom_series(
    folder: str | os.PathLike, series_uid: str | None = None, tolerance: float = 1e-2
) -> tuple[sitk.Image, dict]:
    """Read one DICOM series folder into a SimpleITK image with the geometry DICOM defines.

    Returns ``(image, info)`` with ``info`` as in :func:`dicom_series_files`.
    """
    files, info = dicom_series_files(folder, series_uid=series_uid, tolerance=tolerance)
    try:
        if len(files) == 1:
            image = sitk.ReadImage(files[0])
        else:
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(files)
            image = reader.Execute()
    except RuntimeError as err:
        raise DataError(f"{folder}: SimpleITK cannot read the series: {_first_line(err)}") from err
    if "direction" in info and image.GetDimension() == 3:
        # State the geometry from the headers explicitly rather than trusting the reader's
        # first-to-last-file heuristic: origin = first slice, third axis = the slice normal.
        image.SetDirection(tuple(info["direction"].ravel()))
        image.SetOrigin(tuple(float(v) for v in info["origin"]))
        image.SetSpacing(tuple(image.GetSpacing()[:2]) + (info["slice_spacing"],))
    info = {k: v for k, v in info.items() if isinstance(v, str)}
    info["dicom_num_files"] = len(files)
    return image, info


def _first_line(err: Exception) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    # SimpleITK puts the useful sentence last ("... Unable to determine ImageIO reader for ...").
    return lines[-1] if lines else type(err).__name__


# --------------------------------------------------------------------------------------------
# geometry helpers
# --------------------------------------------------------------------------------------------


def sitk_affine(image: sitk.Image) -> np.ndarray:
    """4x4 RAS affine of a SimpleITK image (index (i, j, k) -> RAS mm)."""
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(dim, dim)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    origin = np.asarray(image.GetOrigin(), dtype=float)
    affine = np.eye(4)
    n = min(dim, 3)
    affine[:n, :n] = direction[:n, :n] * spacing[:n]
    affine[:n, 3] = origin[:n]
    affine[:3] = LPS_TO_RAS @ affine[:3]
    return affine


def sitk_image_from_array(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """SimpleITK image from an ``(i, j, k)`` array and its 4x4 RAS affine (no resampling).

    The affine's columns must be orthogonal (any rotation, flips and spacing are fine).
    """
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D array (i, j, k), got shape {array.shape}")
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=float)[:3]
    spacing = np.linalg.norm(lps[:, :3], axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple((lps[:, :3] / spacing).ravel()))
    image.SetOrigin(tuple(float(v) for v in lps[:, 3]))
    return image


def write_dicom_series(
    array: np.ndarray,
    affine: np.ndarray,
    out_dir: str | os.PathLike,
    modality: str = "MR",
    series_uid: str | None = None,
    study_uid: str | None = None,
    series_description: str = "pipeline export",
    name_prefix: str = "slice",
) -> list[str]:
    """Write an ``(i, j, k)`` volume as a DICOM series (one file per k slice) with SimpleITK.

    Values are stored as int16 (round them first; the caller checks the range). Each slice
    is written as a one-slice 3D slab with modality CT/MR: that is what makes GDCM keep
    ImagePositionPatient/ImageOrientationPatient (2D slices or modality OT lose them).
    UIDs default to deterministic ones derived from ``out_dir``'s name so reruns are
    byte-identical.

    Returns:
        the written file paths, in k order.
    """
    import pydicom.uid

    if modality not in ("CT", "MR"):
        raise ValueError(f"modality must be CT or MR to keep the geometry, got {modality!r}")
    array = np.asarray(array)
    if np.issubdtype(array.dtype, np.floating) and not np.array_equal(array, np.round(array)):
        raise ValueError("write_dicom_series stores int16: round the array first")
    if array.min() < np.iinfo(np.int16).min or array.max() > np.iinfo(np.int16).max:
        raise ValueError(f"values {array.min()}..{array.max()} do not fit int16")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed = out_dir.name
    study_uid = study_uid or pydicom.uid.generate_uid(entropy_srcs=["pipeline-study", seed])
    series_uid = series_uid or pydicom.uid.generate_uid(entropy_srcs=["pipeline-series", seed])
    # A frame of reference lets derived objects (e.g. a DICOM SEG) reference this series.
    frame_uid = pydicom.uid.generate_uid(entropy_srcs=["pipeline-frame", seed])
    volume = sitk_image_from_array(array.astype(np.int16), affine)
    direction = np.asarray(volume.GetDirection()).reshape(3, 3)
    iop = "\\".join(f"{v:.10g}" for v in np.concatenate([direction[:, 0], direction[:, 1]]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()  # keep our Study/Series UIDs
    paths = []
    for k in range(volume.GetSize()[2]):
        slab = volume[:, :, k : k + 1]
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": modality,
            "0008|0008": "DERIVED\\SECONDARY",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4" if modality == "MR" else "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": pydicom.uid.generate_uid(entropy_srcs=["pipeline-sop", seed, str(k)]),
            "0008|103e": series_description,
            "0010|0010": "Anonymous",
            "0010|0020": "pipeline-demo",
            "0020|000d": study_uid,
            "0020|000e": series_uid,
            "0020|0052": frame_uid,
            "0020|0011": "1",
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.10g}" for v in position),
            "0020|0037": iop,
            "0018|0050": f"{volume.GetSpacing()[2]:.10g}",
            "0028|1050": "0",  # window tags keep viewers from guessing
            "0028|1051": "1000",
        }
        for key, value in tags.items():
            slab.SetMetaData(key, value)
        path = out_dir / f"{name_prefix}_{k:04d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(slab)
        paths.append(str(path))
    return paths


# --------------------------------------------------------------------------------------------
# MONAI reader
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedImage:
    """What :meth:`SimpleITKReader.read` returns per file: the image and where it came from."""

    image: sitk.Image
    path: str
    info: dict


class SimpleITKReader(ImageReader):
    """MONAI ImageReader on SimpleITK: DICOM series folders, single ``.dcm``, NRRD, MHA/MHD, NIfTI.

    Use it like any MONAI reader::

        LoadImaged(keys="image", reader=SimpleITKReader())        # or reader="pipeline.readers.SimpleITKReader"
        img = LoadImage(reader=SimpleITKReader(), image_only=True)("ct_series_folder/")
        img.shape        # (i, j, k) = (columns, rows, slices) for a DICOM series
        img.affine       # 4x4, RAS, like NibabelReader

    Args:
        channel_dim: channel axis of the array; default: none for scalar images, last for
            vector pixels (RGB).
        series_uid: SeriesInstanceUID to read when a folder holds several series.
        tolerance: relative slice-spacing tolerance for DICOM series (see :func:`dicom_series_files`).
    """

    def __init__(self, channel_dim: int | str | None = None, series_uid: str | None = None, tolerance: float = 1e-2):
        super().__init__()
        self.channel_dim = float("nan") if channel_dim == "no_channel" else channel_dim
        self.series_uid = series_uid
        self.tolerance = tolerance

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        """True for folders (DICOM series) and the suffixes in ``SITK_SUFFIXES``."""
        return all(Path(f).is_dir() or str(f).lower().endswith(SITK_SUFFIXES) for f in ensure_tuple(filename))

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs) -> LoadedImage | list[LoadedImage]:
        """Read one path (or several, stacked as channels by :meth:`get_data`)."""
        names = ensure_tuple(data)
        loaded = [self._read_one(str(name)) for name in names]
        return loaded if len(names) > 1 else loaded[0]

    def _read_one(self, path: str) -> LoadedImage:
        if Path(path).is_dir():
            image, info = read_dicom_series(path, series_uid=self.series_uid, tolerance=self.tolerance)
            return LoadedImage(image, path, info)
        if not Path(path).exists():
            raise DataError(f"{path}: file not found")
        _check_sitk_size(path)
        try:
            image = sitk.ReadImage(path)
        except RuntimeError as err:
            raise DataError(f"{path}: SimpleITK cannot read it ({_first_line(err)})") from err
        return LoadedImage(image, path, {})

    def get_data(self, img: LoadedImage | Sequence[LoadedImage]) -> tuple[np.ndarray, dict]:
        """Array ``(i, j, k[, c])`` (channels stacked first when several files) and MONAI metadata."""
        arrays, meta = [], {}
        for item in ensure_tuple(img):
            image = item.image
            array = sitk.GetArrayFromImage(image)  # (k, j, i[, c]) in SimpleITK
            dim = image.GetDimension()
            spatial = tuple(range(dim))[::-1]
            array = array.transpose(spatial + tuple(range(dim, array.ndim)))  # -> (i, j, k[, c])
            affine = sitk_affine(image)
            header = dict(item.info)
            header.update(
                {
                    "spacing": np.asarray(image.GetSpacing(), dtype=float),
                    MetaKeys.ORIGINAL_AFFINE: affine,
                    MetaKeys.AFFINE: affine.copy(),
                    MetaKeys.SPATIAL_SHAPE: np.asarray(image.GetSize()[:3]),
                    MetaKeys.SPACE: SpaceKeys.RAS,
                    "filename_or_obj": item.path,
                }
            )
            if self.channel_dim is None:
                header[MetaKeys.ORIGINAL_CHANNEL_DIM] = float("nan") if array.ndim == dim else -1
            else:
                header[MetaKeys.ORIGINAL_CHANNEL_DIM] = self.channel_dim
            if meta:
                if not np.allclose(meta[MetaKeys.AFFINE], affine, atol=1e-4) or not np.array_equal(
                    meta[MetaKeys.SPATIAL_SHAPE], header[MetaKeys.SPATIAL_SHAPE]
                ):
                    raise DataError(f"{item.path}: grid differs from {meta['filename_or_obj']}; cannot stack as channels")
            else:
                meta = header
            check_finite(item.path, array)
            arrays.append(array)
        if len(arrays) == 1:
            return arrays[0], meta
        if not np.isnan(meta[MetaKeys.ORIGINAL_CHANNEL_DIM]):
            return np.concatenate(arrays, axis=int(meta[MetaKeys.ORIGINAL_CHANNEL_DIM])), meta
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack(arrays, axis=0), meta


# --------------------------------------------------------------------------------------------
# one function to read any supported path (used by validation)
# --------------------------------------------------------------------------------------------


def read_volume(path: str | os.PathLike, series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI (nibabel) or anything SimpleITK reads, as the pipeline's loader would.

    Returns:
        ``(array, affine)``: array indexed ``(i, j, k[, c])`` (a 2D image is ``(i, j)``),
        affine 4x4 RAS.

    Raises:
        DataError naming ``path`` when it is missing, unreadable or corrupt.
    """
    path = str(path)
    if Path(path).is_dir():
        return _read_sitk(SimpleITKReader(series_uid=series_uid), path)
    if not Path(path).exists():
        raise DataError(f"{path}: file not found")
    if is_nifti(path):
        import nibabel as nib

        _check_nifti_size(path)
        try:
            image = nib.load(path)
            array = np.asanyarray(image.dataobj)
        except Exception as err:  # nibabel raises many types for corrupt/truncated/text files
            raise DataError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})") from err
        check_finite(path, array)
        return array, np.asarray(image.affine, dtype=float)
    return _read_sitk(SimpleITKReader(series_uid=series_uid), path)


def _read_sitk(reader: SimpleITKReader, path: str) -> tuple[np.ndarray, np.ndarray]:
    array, meta = reader.get_data(reader.read(path))
    return array, meta[MetaKeys.AFFINE]
