"""Image readers that keep full geometry: DICOM series, NRRD, MetaImage (and NIfTI).

Why our own reader: MONAI's ``ITKReader`` needs the 555 MB ``itk`` package and
``PydicomReader`` stacks slices by instance number (wrong when numbers run
against z) and mishandles multi-frame files. SimpleITK (already a dependency)
reads every format here with full geometry; this module wraps it as a MONAI
:class:`~monai.data.ImageReader` and does the DICOM series discovery itself so
the rules are explicit and tested:

* files are grouped by ``SeriesInstanceUID``; reports, presentation states, secondary captures,
  localizers and label objects next to one image series are passed over; a folder holding
  several image series is rejected unless ``series_uid=`` or a series reference
  ``folder?series=UID`` picks one (:func:`series_reference`);
* slices are sorted by their position along the slice normal
  (``ImagePositionPatient . (row x col)``), never by ``InstanceNumber``; enhanced multi-frame
  CT/MR objects are read frame by frame from their functional groups;
* positions that repeat (multi-phase, 4D, diffusion) are separated by the first tag that tells
  the volumes apart (:data:`SPLIT_KEYS`): one is chosen with ``&Keyword=value`` in the reference,
  otherwise the series is refused with that advice; a duplicate slice that no tag explains is
  an error naming the files;
* a gantry tilt (slices shifted in-plane from one to the next) and uneven spacing (a missing
  slice) are resampled to an even, orthogonal grid with a :class:`DicomGeometryWarning`, never
  read sheared; an empty folder is an error that names the folder;
* compressed transfer syntaxes (JPEG lossless, JPEG-LS, JPEG 2000, RLE) are decoded by the GDCM
  inside SimpleITK.

Conventions (the same as MONAI's ``NibabelReader``/``ITKReader``): arrays are
indexed ``(i, j, k[, c])`` i.e. x fastest in the file, and the affine maps
``(i, j, k, 1)`` to RAS millimetres; ``affine``/``original_affine`` are always
4x4 (a 2D image is embedded in 3D like a 2D NIfTI).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import struct
import warnings
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
    "c_order",
    "check_finite",
    "SimpleITKReader",
    "dicom_series_files",
    "read_dicom_series",
    "DicomGeometryWarning",
    "DicomSlice",
    "DicomVolume",
    "DicomSeriesGroup",
    "SPLIT_KEYS",
    "dicom_object_kind",
    "dicom_slices",
    "dicom_series_in_folder",
    "plan_dicom_volumes",
    "plan_series",
    "resolve_dicom_volume",
    "read_dicom_volume",
    "series_reference",
    "split_series_reference",
    "is_series_reference",
    "input_files",
    "dicom_volume_affine",
    "read_rtstruct",
    "RTSTRUCT_SOP_CLASS",
    "SEG_SOP_CLASS",
    "LABEL_OBJECT_KINDS",
    "LABEL_CLASSES_KEY",
    "dicom_label_kind",
    "label_object_names",
    "label_object_references",
    "read_label_object",
    "read_label",
    "DicomLabelReader",
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
    return _has_preamble(path)


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


def _check_nifti_size(path: str):
    """Header-only size check of a NIfTI file (nibabel reads the header, not the pixels); returns the image."""
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
    return image


def _gzipped_through_isal(image, path: str):
    """``image`` (nibabel, loaded from the gzipped ``path``) reading its voxels through ISA-L's igzip.

    Why: igzip decompresses about twice as fast as zlib (a 512x512x200 int16 CT: 0.37 s against
    0.88 s), the largest part of reading a volume. Same bytes, same CRC check; the stream is
    closed by :meth:`GuardedNibabelReader.get_data`.
    """
    from isal import igzip
    from nibabel.fileholders import FileHolder

    klass = type(image)
    stream = igzip.open(path, "rb")
    try:
        return klass.from_file_map({klass.files_types[0][0]: FileHolder(filename=path, fileobj=stream)}, mmap=False)
    except Exception:
        stream.close()
        raise


def c_order(array: np.ndarray, block: int = 64) -> np.ndarray:
    """``array`` as a C-contiguous array: a 3D Fortran-ordered one (NIfTI's order) reordered
    block by block, other arrays by ``np.ascontiguousarray``.

    Why: numpy's reordering of a 3D Fortran array walks one side with huge strides (30 ms for a
    192x192x96 float32 volume, 0.41 s for a 512x512x200 int16 CT). Copying ``block`` columns of
    one y plane at a time keeps both sides in cache: 4 ms and 0.16 s.
    """
    if array.ndim != 3 or array.flags.c_contiguous or not array.flags.f_contiguous:
        return np.ascontiguousarray(array)
    out = np.empty(array.shape, dtype=array.dtype)
    source = array.T  # (z, y, x), C-contiguous: the same memory
    for y in range(array.shape[1]):
        plane = source[:, y, :]
        for x in range(0, array.shape[0], block):
            out[x : x + block, y, :] = plane[:, x : x + block].T
    return out


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
    NaN/Inf voxels refused (see :func:`check_image_size`, :func:`check_finite`). Faster than
    MONAI's on the same files: ``.nii.gz`` decompressed by ISA-L, voxels put in C order block by
    block (:func:`c_order`; MONAI would reorder them anyway)."""

    def read(self, data, **kwargs):
        from monai.data.utils import correct_nifti_header_if_necessary

        names = ensure_tuple(data)
        images = []
        for name in names:
            image = _check_nifti_size(str(name))
            if kwargs or self.kwargs or not str(name).lower().endswith(".gz"):
                image = super().read(name, **kwargs)
            else:
                image = correct_nifti_header_if_necessary(_gzipped_through_isal(image, str(name)))
            images.append(image)
        self.filenames = names
        return images if len(names) > 1 else images[0]

    def get_data(self, img):
        try:
            array, meta = super().get_data(img)
        finally:
            for image in ensure_tuple(img):
                stream = image.file_map[type(image).files_types[0][0]].fileobj
                if stream is not None:
                    stream.close()
        check_finite(ensure_tuple(img)[0].get_filename() or "image", array)
        return array, meta

    def _get_array_data(self, img, filename):
        return c_order(super()._get_array_data(img, filename))


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
    if syntax is None:
        return None
    try:
        if syntax.is_compressed:
            return None
    except ValueError:
        return f"TransferSyntaxUID {syntax} is not a transfer syntax"
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


@contextlib.contextmanager
def _quiet_pydicom():
    """pydicom's value-validation warnings (an invalid UID, a DS with letters) off: a damaged header
    is reported by us, once, naming the file; the raw value may not even be printable."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
        yield


def _has_preamble(path: Path) -> bool:
    """The 128-byte preamble followed by ``DICM``, as the standard's file format has it."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _check_dicom_file(path: Path) -> None:
    """A single DICOM file given as an image: its native PixelData must hold what its header
    claims (a header claiming 65535 frames over 32 KB of pixels is refused before reading)."""
    headers = _dicom_headers(path.parent, only=path)
    if headers and dicom_object_kind(headers[0][1])[0] in LABEL_OBJECT_KINDS:
        # SimpleITK would read a SEG's frames as a stack of slices, on no grid of any image
        raise DataError(
            f"{path}: {dicom_object_kind(headers[0][1])[1]}; a label object is read onto its image's grid "
            "(a datalist label next to its image, or pipeline.readers.read_label(path, image))"
        )
    if not headers or "Rows" not in headers[0][1] or "Columns" not in headers[0][1]:
        # Not handed to SimpleITK to guess: on a damaged header GDCM can allocate gigabytes first.
        raise DataError(f"{path}: not a readable DICOM image (its header does not parse, or has no Rows/Columns)")


def _dicom_headers(folder: Path, damaged: dict[str, str] | None = None, only: Path | None = None) -> list[tuple[str, Any]]:
    """(file, pydicom header without pixels) for every DICOM file directly in ``folder``.

    Raises DataError naming the file when an image file's pixel data is damaged (see
    :func:`_pixel_data_problem`): a series with a short slice must not be read as zeros.
    With ``damaged`` (a dict) such files are collected there (path -> problem) instead, so that
    an inventory can go on and name them.
    """
    with _quiet_pydicom():
        return _read_headers(folder, damaged, only)


def _read_headers(folder: Path, damaged: dict[str, str] | None, only: Path | None) -> list[tuple[str, Any]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    headers = []
    for path in [only] if only is not None else sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.name.upper() == "DICOMDIR":
            continue
        try:
            with open(path, "rb") as handle:
                # defer_size: a corrupt element length (say 0xFFFFFFF0) is skipped, not allocated
                header = pydicom.dcmread(handle, stop_before_pixels=True, defer_size="1 MB")
                pixel_tag_at = handle.tell()
            has_series = "SeriesInstanceUID" in header and bool(str(header.SeriesInstanceUID))
        except InvalidDicomError:
            continue  # not DICOM (a README, a thumbnail...): series folders often hold such files
        except Exception as err:  # noqa: BLE001 - pydicom raises many types on a damaged header
            if not is_dicom_file(path) or path.name.lower().endswith(DICOM_SUFFIXES) and not _has_preamble(path):
                continue  # not a DICOM file to begin with
            # It says it is DICOM (the preamble): a damaged header, not a foreign file. Skipping it
            # would silently drop a slice, so it stops its folder, named.
            problem = f"unreadable DICOM header ({type(err).__name__}: {_first_line(err)})"
            if damaged is None:
                raise DataError(f"{path}: {problem}") from err
            damaged[str(path)] = problem
            continue
        if only is not None or has_series:
            try:
                problem = _pixel_data_problem(path, header, pixel_tag_at)
            except _HEADER_ERRORS as err:
                problem = f"unreadable image attributes ({type(err).__name__}: {err})"
            if problem:
                if damaged is None:
                    raise DataError(f"{path}: {problem}")
                damaged[str(path)] = problem
                continue
            headers.append((str(path), header))
    return headers


# What an object is, from its SOP class (exact UIDs or prefixes ending in "."), in the order checked.
_SOP_KINDS: tuple[tuple[str, str, str], ...] = (
    ("1.2.840.10008.5.1.4.1.1.66.4", "segmentation", "a DICOM SEG (a label, not an image)"),
    ("1.2.840.10008.5.1.4.1.1.481.3", "rtstruct", "an RT structure set (contours, a label, not an image)"),
    ("1.2.840.10008.5.1.4.1.1.481.", "non-image", "a radiotherapy object (dose, plan or record), not an image to segment"),
    ("1.2.840.10008.5.1.4.1.1.88.", "non-image", "a structured report (SR: a dose report, measurements), not an image"),
    ("1.2.840.10008.5.1.4.1.1.11.", "non-image", "a presentation state (display settings), not an image"),
    ("1.2.840.10008.5.1.4.1.1.104.", "non-image", "an encapsulated document (PDF, CDA), not an image"),
    ("1.2.840.10008.5.1.4.1.1.9.", "non-image", "a waveform, not an image"),
    ("1.2.840.10008.5.1.4.1.1.66", "non-image", "raw data, a registration or fiducials, not an image"),
    ("1.2.840.10008.5.1.4.1.1.66.", "non-image", "raw data, a registration or fiducials, not an image"),
    ("1.2.840.10008.5.1.4.1.1.7", "secondary-capture", "a secondary capture (a screenshot without patient geometry)"),
    ("1.2.840.10008.5.1.4.1.1.7.", "secondary-capture", "a secondary capture (a screenshot without patient geometry)"),
)
_NON_IMAGE_MODALITIES = {"SR", "PR", "KO", "DOC", "REG", "FID", "PLAN", "RTPLAN", "RTDOSE", "RTRECORD", "RWV", "AU", "ECG"}
_LOCALIZER_WORDS = re.compile(r"\b(scout|localizer|localiser|locator|topogram|surview|scanogram|survey|3.?plane.?loc)\b", re.I)


def dicom_object_kind(header: Any) -> tuple[str, str]:
    """What one DICOM object is, and why it is not an image volume when it is not one.

    Returns ``(kind, reason)``; kinds: ``"image"`` (a slice or a multi-frame volume, reason
    ``""``), ``"localizer"``, ``"secondary-capture"``, ``"no-geometry"`` (images that are no
    volume to segment, but readable when asked for by name), ``"segmentation"``, ``"rtstruct"``
    (label objects) and ``"non-image"`` (reports, presentation states, documents...).
    """
    sop = str(header.get("SOPClassUID", ""))
    for uid, kind, reason in _SOP_KINDS:
        if sop == uid or (uid.endswith(".") and sop.startswith(uid)):
            return kind, reason
    modality = str(header.get("Modality", "")).upper()
    if modality in _NON_IMAGE_MODALITIES or "Rows" not in header or "Columns" not in header:
        return "non-image", f"not an image (modality {modality or '?'}, no pixel data)"
    image_type = [str(v).upper() for v in (header.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return "localizer", "a localizer (ImageType LOCALIZER): a scout view, not a volume"
    description = str(header.get("SeriesDescription", ""))
    if _LOCALIZER_WORDS.search(description):
        return "localizer", f"a localizer (series description '{description}'): a scout view, not a volume"
    enhanced = "PerFrameFunctionalGroupsSequence" in header or "SharedFunctionalGroupsSequence" in header
    if not enhanced and ("ImagePositionPatient" not in header or "ImageOrientationPatient" not in header):
        return "no-geometry", "no ImagePositionPatient/ImageOrientationPatient: an image without patient geometry"
    return "image", ""


# --------------------------------------------------------------------------------------------
# series references: one series (or one volume of it) inside a folder, as a path
# --------------------------------------------------------------------------------------------

# "<folder>?series=<SeriesInstanceUID>[&<Keyword>=<value>]": a series of a folder holding several,
# optionally one volume of a series with repeated positions (a phase, a b-value). A path, so that
# it fits everywhere an image path goes: datalists, segment cases, LoadVolumed, read_volume.
_REFERENCE = re.compile(r"^(?P<folder>.+?)\?series=(?P<uid>[0-9][0-9.]*)(?P<split>(?:&[A-Za-z][A-Za-z0-9]*=[^&?]*)*)$")


def series_reference(folder: str | os.PathLike, series_uid: str, split: dict[str, str] | None = None) -> str:
    """The path form of one series in ``folder``: ``folder?series=UID[&Keyword=value]``.

    ``split`` picks one volume of a series whose slices repeat positions (multi-phase, 4D), e.g.
    ``{"TemporalPositionIdentifier": "2"}``. :func:`split_series_reference` is the inverse.
    """
    text = os.fspath(folder)
    text = text.rstrip("/" + os.sep) or text
    text = f"{text}?series={series_uid}"
    for key, value in (split or {}).items():
        text += f"&{key}={value}"
    return text


def split_series_reference(path: str | os.PathLike) -> tuple[str, str | None, dict[str, str]]:
    """``(folder, series_uid, split)`` of a series reference; ``(path, None, {})`` for any other path."""
    text = os.fspath(path)
    match = _REFERENCE.match(text)
    if not match:
        return text, None, {}
    split = dict(item.split("=", 1) for item in match.group("split").split("&") if item)
    return match.group("folder"), match.group("uid"), split


def is_series_reference(path: str | os.PathLike) -> bool:
    return split_series_reference(path)[1] is not None


def input_files(path: str | os.PathLike) -> list[Path]:
    """The files an input path stands for (for fingerprints and sizes): a file itself, a folder's
    (or a series reference's folder's) non-hidden files."""
    folder = Path(split_series_reference(path)[0])
    if folder.is_dir():
        return [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    return [folder]


# --------------------------------------------------------------------------------------------
# slices, volumes, geometry
# --------------------------------------------------------------------------------------------

# Tags that may tell apart volumes stacked at the same positions (phases, time points,
# b-values, echoes), tried in this order. Enhanced objects carry them per frame.
SPLIT_KEYS = (
    "TemporalPositionIdentifier",
    "TemporalPositionIndex",
    "AcquisitionNumber",
    "StackID",
    "DiffusionBValue",
    "EchoNumbers",
    "EffectiveEchoTime",
    "EchoTime",
    "TriggerTime",
)
TILT_TOLERANCE_VOXELS = 0.05  # in-plane drift of a slice (in pixels) below which it is not a tilt


class DicomGeometryWarning(UserWarning):
    """A DICOM series was read with corrected geometry (gantry tilt, a missing slice, uneven spacing)."""


@dataclasses.dataclass
class DicomSlice:
    """One 2D plane of a series: a single-frame file, or one frame of a multi-frame file."""

    path: str
    frame: int | None  # index in a multi-frame file; None for a single-frame file
    position: np.ndarray | None  # ImagePositionPatient (LPS mm)
    orientation: np.ndarray | None  # ImageOrientationPatient (row then column direction)
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns) in mm
    thickness: float | None
    tags: dict[str, str]  # SPLIT_KEYS values


def _tag_text(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(_tag_text(v) or "" for v in value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value).strip()
    return f"{number:g}"


def _first_item(dataset: Any, keyword: str) -> Any:
    sequence = dataset.get(keyword) if dataset is not None else None
    return sequence[0] if sequence else None


def dicom_slices(path: str, header: Any) -> list[DicomSlice]:
    """The planes of one object: one for a classic file, one per frame for an enhanced
    multi-frame object (geometry from its per-frame and shared functional groups)."""
    frames = int(header.get("NumberOfFrames", 1) or 1)
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != frames:
        position, orientation = header.get("ImagePositionPatient"), header.get("ImageOrientationPatient")
        spacing = header.get("PixelSpacing")
        tags = {key: text for key in SPLIT_KEYS if (text := _tag_text(header.get(key))) is not None}
        return [
            DicomSlice(
                path,
                None,
                None if position is None else np.asarray(position, dtype=float),
                None if orientation is None else np.asarray(orientation, dtype=float),
                None if spacing is None else (float(spacing[0]), float(spacing[1])),
                _float_or_none(header.get("SliceThickness")),
                tags,
            )
        ]
    shared = _first_item(header, "SharedFunctionalGroupsSequence")
    slices = []
    for index, group in enumerate(per_frame):
        def find(sequence: str, keyword: str, group=group) -> Any:
            for source in (group, shared):
                item = _first_item(source, sequence)
                if item is not None and keyword in item:
                    return item.get(keyword)
            return None

        position = find("PlanePositionSequence", "ImagePositionPatient")
        orientation = find("PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = find("PixelMeasuresSequence", "PixelSpacing")
        tags = {}
        for sequence, keyword in (
            ("FrameContentSequence", "TemporalPositionIndex"),
            ("FrameContentSequence", "StackID"),
            ("FrameContentSequence", "FrameAcquisitionNumber"),
            ("MRDiffusionSequence", "DiffusionBValue"),
            ("MREchoSequence", "EffectiveEchoTime"),
            ("CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime"),
        ):
            text = _tag_text(find(sequence, keyword))
            if text is not None:
                tags["AcquisitionNumber" if keyword == "FrameAcquisitionNumber" else
                     "TriggerTime" if keyword == "NominalCardiacTriggerDelayTime" else keyword] = text
        slices.append(
            DicomSlice(
                path,
                index,
                None if position is None else np.asarray(position, dtype=float),
                None if orientation is None else np.asarray(orientation, dtype=float),
                None if spacing is None else (float(spacing[0]), float(spacing[1])),
                _float_or_none(find("PixelMeasuresSequence", "SliceThickness")),
                tags,
            )
        )
    return slices


def _float_or_none(value: Any) -> float | None:
    try:
        return None if value is None or value == "" else float(value)
    except (TypeError, ValueError):
        return None


@dataclasses.dataclass
class DicomVolume:
    """One 3D volume of a series: its planes sorted along the slice normal, and its geometry.

    ``split`` is the tag value picking this volume when the series stacks several at the same
    positions (``{}`` otherwise). ``direction`` (3x3, columns row/column/normal, LPS),
    ``origin`` (the first plane's position), ``spacing`` ``(x, y, z)`` mm with ``z`` the even
    spacing the volume is read at; ``along`` the planes' positions along the normal (mm,
    relative to the first), ``shifts`` each plane's in-plane offset in pixels ``(i, j)`` (not
    zero: gantry tilt). ``tilt_deg``, ``irregular`` (why the spacing is not even, or ``""``).
    A single plane without geometry (a 2D image) has ``direction is None``.
    """

    series_uid: str
    slices: list[DicomSlice]
    split: dict[str, str] = dataclasses.field(default_factory=dict)
    direction: np.ndarray | None = None
    origin: np.ndarray | None = None
    spacing: tuple[float, float, float] | None = None
    along: np.ndarray | None = None
    shifts: np.ndarray | None = None
    tilt_deg: float = 0.0
    irregular: str = ""

    @property
    def files(self) -> list[str]:
        return list(dict.fromkeys(s.path for s in self.slices))

    @property
    def tilted(self) -> bool:
        return self.shifts is not None and bool(np.abs(self.shifts).max(initial=0.0) > TILT_TOLERANCE_VOXELS)

    @property
    def resampled(self) -> bool:
        """True when the volume is read on a corrected grid (gantry tilt, missing slice, uneven spacing)."""
        return self.tilted or bool(self.irregular)

    @property
    def num_slices(self) -> int:
        """Slices of the grid the volume is read at (more than its planes when a gap is filled)."""
        if self.along is None or len(self.along) < 2 or not self.irregular:
            return len(self.slices)
        return int(round(float(self.along[-1] - self.along[0]) / self.spacing[2])) + 1

    def geometry_notes(self) -> list[str]:
        """One sentence per correction made when reading (what the summary's warnings say)."""
        notes = []
        if self.tilted:
            notes.append(
                f"gantry tilt {self.tilt_deg:.1f} deg: slices shifted in-plane by up to "
                f"{np.abs(self.shifts).max():.1f} px; resampled to an orthogonal grid"
            )
        if self.irregular:
            notes.append(f"{self.irregular}; resampled to {self.num_slices} slices at {self.spacing[2]:.4g} mm")
        return notes


def _orientation_problem(slices: Sequence[DicomSlice]) -> str | None:
    if any(s.position is None or s.orientation is None for s in slices):
        return "has no ImagePositionPatient/ImageOrientationPatient on every slice"
    orientations = np.stack([s.orientation for s in slices])
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        count = len({tuple(np.round(o, 3)) for o in orientations})
        return f"has slices in {count} different orientations (ImageOrientationPatient; a multi-plane localizer?)"
    return None


def _position_clusters(along: np.ndarray, tolerance: float) -> np.ndarray:
    """An id per plane, equal for planes at the same position along the normal (within
    ``tolerance`` of the typical gap, at least 0.01 mm)."""
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    real = gaps[gaps > 0.01]
    threshold = max(0.01, tolerance * (float(np.median(real)) if real.size else 1.0))
    ids = np.empty(len(along), dtype=np.int64)
    ids[order] = np.concatenate([[0], np.cumsum(gaps > threshold)]) if len(along) else []
    return ids


def _split_volumes(slices: list[DicomSlice], normal: np.ndarray, tolerance: float) -> tuple[str | None, list[list[DicomSlice]]]:
    """Group planes that repeat positions into volumes by the first tag of SPLIT_KEYS that
    separates them: every group has each position once, at least two planes, and there are as
    many groups as the most planes found at one position. ``(None, [slices])`` when no position
    repeats; ValueError when positions repeat and no tag separates them."""
    along = np.array([float(s.position @ normal) for s in slices])
    ids = _position_clusters(along, tolerance)
    per_position = int(np.bincount(ids).max(initial=1)) if len(ids) else 1
    if per_position == 1:
        return None, [slices]
    for key in SPLIT_KEYS:
        if not all(key in s.tags for s in slices):
            continue
        groups: dict[str, list[int]] = {}
        for index, s in enumerate(slices):
            groups.setdefault(s.tags[key], []).append(index)
        if len(groups) != per_position or any(len(g) < 2 for g in groups.values()):
            continue
        if all(len(set(ids[g].tolist())) == len(g) for g in groups.values()):
            ordered = sorted(groups.items(), key=lambda item: _sort_key(item[0]))
            return key, [[slices[i] for i in g] for _, g in ordered]
    raise ValueError(
        f"{per_position} planes at one position and no tag ({', '.join(SPLIT_KEYS[:5])}, ...) that tells volumes apart"
    )


def _sort_key(text: str) -> tuple:
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def plan_dicom_volumes(series_uid: str, slices: list[DicomSlice], where: str, tolerance: float = 1e-2) -> tuple[str | None, list[DicomVolume]]:
    """The volumes a series' planes make, each with its geometry: ``(split_by, volumes)``.

    ``split_by`` is the tag that separates volumes stacked at the same positions (``None``: one
    volume). Planes are sorted by their position along the slice normal
    (``ImagePositionPatient . (row x column)``), never by ``InstanceNumber``. A gantry tilt
    (planes shifted in-plane from one to the next) and uneven spacing (a missing slice) are
    measured here and corrected when reading (:func:`read_dicom_volume`).

    Raises:
        DataError naming ``where``: missing or mixed orientations, positions that repeat with no
        tag to tell the volumes apart (a duplicate slice).
    """
    if len(slices) == 1:
        return None, [DicomVolume(series_uid, slices)]  # one file without per-frame geometry: read as it is
    problem = _orientation_problem(slices)
    if problem:
        raise DataError(f"{where}: series {series_uid} {problem}")
    row, col = slices[0].orientation[:3], slices[0].orientation[3:]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    try:
        split_by, groups = _split_volumes(slices, normal, tolerance)
    except ValueError as err:
        along = np.array([float(s.position @ normal) for s in slices])
        order = np.argsort(along, kind="stable")
        gaps = np.diff(along[order])
        k = int(np.argmin(gaps))  # the closest pair
        first, second = slices[order[k]], slices[order[k + 1]]
        raise DataError(
            f"{where}: duplicate slice position {along[order[k]]:.4f} mm along the normal in "
            f"{_plane_name(first)} and {_plane_name(second)} ({err})"
        ) from None
    volumes = []
    for group in groups:
        volume = _volume_geometry(series_uid, group, row, col, normal, tolerance)
        if split_by:
            volume.split = {split_by: group[0].tags[split_by]}
        volumes.append(volume)
    return split_by, volumes


def _plane_name(plane: DicomSlice) -> str:
    return Path(plane.path).name + ("" if plane.frame is None else f" frame {plane.frame + 1}")


def _volume_geometry(series_uid: str, slices: list[DicomSlice], row, col, normal, tolerance: float) -> DicomVolume:
    along = np.array([float(s.position @ normal) for s in slices])
    order = np.argsort(along, kind="stable")
    slices = [slices[i] for i in order]
    along = along[order] - along[order[0]]
    spacing = slices[0].pixel_spacing or (1.0, 1.0)
    dx, dy = float(spacing[1]), float(spacing[0])  # PixelSpacing is (between rows, between columns)
    origin = slices[0].position
    volume = DicomVolume(series_uid, slices, direction=np.stack([row, col, normal], axis=1), origin=origin, along=along)
    if len(slices) == 1:
        volume.spacing = (dx, dy, float(slices[0].thickness or 1.0))
        volume.shifts = np.zeros((1, 2))
        return volume
    offsets = np.stack([s.position - origin for s in slices])
    in_plane = offsets - np.outer(along, normal)
    volume.shifts = np.stack([in_plane @ row / dx, in_plane @ col / dy], axis=1)
    if volume.tilted:
        drift = float(np.linalg.norm(in_plane[-1]))
        volume.tilt_deg = float(np.degrees(np.arctan2(drift, along[-1]))) if along[-1] > 0 else 0.0
    gaps = np.diff(along)
    median_gap = float(np.median(gaps))
    if np.abs(gaps - median_gap).max() > tolerance * median_gap:
        worst = int(np.argmax(np.abs(gaps - median_gap)))
        missing = int(np.sum(np.maximum(np.round(gaps / median_gap) - 1, 0)))
        what = f"{missing} missing slice(s)" if missing else "uneven slice spacing"
        volume.irregular = (
            f"{what}: gaps from {gaps.min():.4g} to {gaps.max():.4g} mm (median {median_gap:.4g}; "
            f"{gaps[worst]:.4g} mm after {_plane_name(slices[worst])})"
        )
        count = int(round(float(along[-1]) / median_gap)) + 1
        volume.spacing = (dx, dy, float(along[-1]) / (count - 1))
    else:
        volume.spacing = (dx, dy, float(along[-1]) / (len(slices) - 1))
    return volume


@dataclasses.dataclass
class DicomSeriesGroup:
    """One series found in one folder: its headers and what it is (see :func:`dicom_object_kind`)."""

    folder: str
    series_uid: str
    headers: list[tuple[str, Any]]
    kind: str
    reason: str

    @property
    def first(self) -> Any:
        return self.headers[0][1]

    def slices(self) -> list[DicomSlice]:
        return [plane for path, header in self.headers for plane in dicom_slices(path, header)]


def dicom_series_in_folder(folder: str | os.PathLike, damaged: dict[str, str] | None = None) -> list[DicomSeriesGroup]:
    """Every series directly in ``folder`` (grouped by ``SeriesInstanceUID``, files sorted by name),
    with what it is. A series counts as an image when any of its objects is one (a CT series
    whose first file is a localizer is still rare; its kind comes from its image objects)."""
    with _quiet_pydicom():
        return _series_groups(folder, damaged)


def _series_groups(folder: str | os.PathLike, damaged: dict[str, str] | None) -> list[DicomSeriesGroup]:
    series: dict[str, list[tuple[str, Any]]] = {}
    for path, header in _dicom_headers(Path(folder), damaged):
        series.setdefault(str(header.SeriesInstanceUID), []).append((path, header))
    groups = []
    for uid, items in series.items():
        kinds = []
        for path, header in items:
            try:
                kinds.append(dicom_object_kind(header))
            except _HEADER_ERRORS as err:
                raise DataError(f"{path}: unreadable DICOM header ({type(err).__name__}: {err})") from err
        kind, reason = next((k for k in kinds if k[0] == "image"), kinds[0])
        if kind == "image":
            items = [item for item, k in zip(items, kinds) if k[0] == "image"]  # a stray SR in an image series
        groups.append(DicomSeriesGroup(str(folder), uid, items, kind, reason))
    return groups


# What a damaged header raises when its values are converted (pydicom converts lazily).
_HEADER_ERRORS = (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError, NotImplementedError)


def plan_series(group: DicomSeriesGroup, tolerance: float = 1e-2) -> tuple[str | None, list[DicomVolume]]:
    """:func:`plan_dicom_volumes` for one series group; a damaged header is a DataError naming the folder."""
    try:
        with _quiet_pydicom():
            return plan_dicom_volumes(group.series_uid, group.slices(), group.folder, tolerance)
    except DataError:
        raise
    except _HEADER_ERRORS as err:
        raise DataError(
            f"{group.folder}: series {group.series_uid} has damaged geometry tags ({type(err).__name__}: {err})"
        ) from err


def _describe(group: DicomSeriesGroup) -> str:
    first = group.first
    number = first.get("SeriesNumber", "")
    return (
        f"{group.series_uid} (series {number}, {len(group.headers)} files, {first.get('Modality', '?')} "
        f"'{first.get('SeriesDescription', '')}'{'' if group.kind == 'image' else ', ' + group.kind})"
    )


def resolve_dicom_volume(path: str | os.PathLike, series_uid: str | None = None, tolerance: float = 1e-2) -> tuple[DicomVolume, dict]:
    """The one volume a folder or series reference stands for, with descriptive info.

    ``path``: a folder (holding one image series, possibly next to reports, localizers and
    other non-volume objects, which are passed over), or a reference ``folder?series=UID``
    (``&Keyword=value`` picks one volume of a series with repeated positions); ``series_uid``
    does what the reference does.

    Raises:
        DataError naming the folder: no DICOM files, several image series and none chosen,
        unknown series, a non-image series asked for, several volumes at the same positions and
        none chosen (the message lists how to choose), and what :func:`plan_dicom_volumes` refuses.
    """
    folder_text, reference_uid, split = split_series_reference(path)
    folder = Path(folder_text)
    series_uid = series_uid or reference_uid
    if not folder.is_dir():
        raise DataError(f"{folder}: not a folder")
    groups = dicom_series_in_folder(folder)
    if not groups:
        raise DataError(f"{folder}: no DICOM files in this folder (empty, or not a DICOM series folder)")
    by_uid = {g.series_uid: g for g in groups}
    if series_uid is None:
        if len(groups) == 1:
            group = groups[0]
        else:
            images = [g for g in groups if g.kind == "image"]
            if len(images) != 1:
                described = "; ".join(_describe(g) for g in groups)
                raise DataError(
                    f"{folder}: holds {len(groups)} DICOM series ({len(images)} image series), choose one with "
                    f"series_uid=..., a path {Path(folder).name}?series=<uid>, or --series for segment and "
                    f"datalist build (see python -m pipeline dicom scan): {described}"
                )
            group = images[0]
    elif series_uid not in by_uid:
        raise DataError(f"{folder}: no series with SeriesInstanceUID {series_uid} (found: {', '.join(by_uid)})")
    else:
        group = by_uid[series_uid]
    if group.kind in ("non-image", "segmentation", "rtstruct"):
        raise DataError(f"{folder}: series {group.series_uid} is {group.reason}")
    first = group.first
    if "Rows" in first and "Columns" in first:
        frames = sum(int(h.get("NumberOfFrames", 1) or 1) for _, h in group.headers)
        check_claimed_size(folder, int(first.Rows) * int(first.Columns) * int(first.get("SamplesPerPixel", 1) or 1) * frames)
    split_by, volumes = plan_series(group, tolerance)
    if split:
        unknown = sorted(set(split) - set(SPLIT_KEYS))
        if unknown:
            raise DataError(f"{path}: unknown volume selector(s) {unknown}; known: {', '.join(SPLIT_KEYS)}")
        chosen = [v for v in volumes if all(v.split.get(k) == _tag_text(value) for k, value in split.items())]
        if len(chosen) != 1:
            found = ", ".join(f"{k}={v}" for volume in volumes for k, v in volume.split.items()) or "a single volume"
            raise DataError(f"{path}: no volume of series {group.series_uid} with {split} (found: {found})")
        volume = chosen[0]
    elif len(volumes) > 1:
        values = ", ".join(v.split[split_by] for v in volumes)
        raise DataError(
            f"{folder}: series {group.series_uid} holds {len(volumes)} volumes at the same positions "
            f"(multi-phase or 4D: {split_by} {values}); choose one with "
            f"{Path(folder).name}?series={group.series_uid}&{split_by}={volumes[0].split[split_by]}, "
            "or --series to segment each as its own case"
        )
    else:
        volume = volumes[0]
    info = {
        "series_instance_uid": group.series_uid,
        "modality": str(first.get("Modality", "")),
        "series_description": str(first.get("SeriesDescription", "")),
    }
    return volume, info


def dicom_series_files(
    folder: str | os.PathLike, series_uid: str | None = None, tolerance: float = 1e-2
) -> tuple[list[str], dict]:
    """Files of one DICOM volume, sorted along the slice normal, for objects that must match the
    source slices one to one (a DICOM SEG references each source slice).

    Args:
        folder: a folder holding the files of one series (other non-DICOM files, reports and
            localizers are passed over), or a series reference ``folder?series=UID[&Keyword=value]``.
        series_uid: the ``SeriesInstanceUID`` to read when the folder holds several image series.
        tolerance: relative tolerance on the slice spacing (duplicates: gap below
            ``tolerance * median gap``; uneven: any gap differing from the median
            by more than ``tolerance * median gap``).

    Returns:
        ``(files, geometry)``; ``geometry`` has ``direction`` (3x3, columns row/col/normal,
        LPS), ``origin`` (LPS mm), ``slice_spacing`` (mm) and a few descriptive tags; it
        is empty for a single-file series (multi-frame or one slice), read as is.

    Raises:
        DataError: everything :func:`resolve_dicom_volume` refuses, and volumes that
        :func:`read_dicom_series` reads on a corrected grid (gantry tilt, missing slice, uneven
        spacing) or whose frames are not stored in slice order: such a grid no longer matches the
        source slices one to one.
    """
    volume, info = resolve_dicom_volume(folder, series_uid, tolerance)
    files = volume.files
    if volume.resampled:
        raise DataError(
            f"{folder}: {'; '.join(volume.geometry_notes())} when read, so its grid no longer matches the "
            "source slices one to one"
        )
    if len(files) == 1:
        frames = [s.frame for s in volume.slices]
        if frames != sorted(frames, key=lambda f: -1 if f is None else f):
            raise DataError(f"{folder}: the frames of {Path(files[0]).name} are not stored in slice order")
        return files, info
    if len(files) != len(volume.slices):
        raise DataError(f"{folder}: the volume's planes come from multi-frame files; no one-to-one file order")
    info.update(direction=volume.direction, origin=volume.origin, slice_spacing=volume.spacing[2])
    return files, info


def _read_planes(volume: DicomVolume, where: str) -> np.ndarray:
    """Pixel planes of ``volume`` in its slice order, ``(k, rows, columns[, samples])``,
    decoded by SimpleITK/GDCM (JPEG lossless, JPEG-LS, JPEG 2000 and RLE included)."""
    if all(s.frame is None for s in volume.slices) and len(volume.files) == len(volume.slices):
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(volume.files)
        previous = sitk.ProcessObject.GetGlobalWarningDisplay()
        sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's own "non uniform sampling" notice: we say it better
        try:
            image = reader.Execute()
        finally:
            sitk.ProcessObject.SetGlobalWarningDisplay(previous)
        return sitk.GetArrayFromImage(image)
    decoded: dict[str, np.ndarray] = {}
    planes = []
    for plane in volume.slices:
        if plane.path not in decoded:
            array = sitk.GetArrayFromImage(sitk.ReadImage(plane.path))  # (frames, rows, columns[, samples])
            decoded[plane.path] = array if array.ndim >= 3 else array[None]
        planes.append(decoded[plane.path][plane.frame or 0])
    return np.stack(planes)


def _correct_geometry(planes: np.ndarray, volume: DicomVolume) -> np.ndarray:
    """Resample a tilted or unevenly spaced stack ``(k, rows, columns[, c])`` onto the even,
    orthogonal grid of ``volume`` (linear interpolation; outside the scanned field: its minimum)."""
    from scipy import ndimage

    array = planes.astype(np.float32)
    if volume.tilted:
        fill = float(array.min())
        extra = (0,) * (array.ndim - 3)
        for k, (shift_i, shift_j) in enumerate(volume.shifts):
            if abs(shift_i) > 1e-6 or abs(shift_j) > 1e-6:
                array[k] = ndimage.shift(array[k], (shift_j, shift_i) + extra, order=1, mode="constant", cval=fill)
    if volume.irregular:
        along = volume.along
        target = np.arange(volume.num_slices) * volume.spacing[2]
        upper = np.clip(np.searchsorted(along, target, side="right"), 1, len(along) - 1)
        lower = upper - 1
        weight = ((target - along[lower]) / (along[upper] - along[lower])).astype(np.float32)
        weight = weight.reshape((-1,) + (1,) * (array.ndim - 1))
        array = (1 - weight) * array[lower] + weight * array[upper]
    return array


def read_dicom_volume(volume: DicomVolume, where: str) -> sitk.Image:
    """Read a planned volume into a SimpleITK image with the geometry its headers define.

    A gantry tilt or uneven spacing is resampled to an even, orthogonal grid with a
    :class:`DicomGeometryWarning` (never sheared silently: reading the shifted planes onto an
    orthogonal grid as they are would shear the anatomy).
    """
    try:
        if volume.direction is None:  # a 2D image without geometry: as SimpleITK reads it
            return sitk.ReadImage(volume.slices[0].path)
        planes = _read_planes(volume, where)
    except RuntimeError as err:
        raise DataError(f"{where}: SimpleITK cannot read the series: {_first_line(err)}") from err
    if volume.resampled:
        notes = volume.geometry_notes()
        warnings.warn(f"{where}: {'; '.join(notes)}", DicomGeometryWarning, stacklevel=2)
        planes = _correct_geometry(planes, volume)
    vector = planes.ndim == 4
    image = sitk.GetImageFromArray(planes, isVector=vector)
    image.SetDirection(tuple(float(v) for v in volume.direction.ravel()))
    image.SetOrigin(tuple(float(v) for v in volume.origin))
    image.SetSpacing(tuple(float(v) for v in volume.spacing))
    return image


def read_dicom_series(
    folder: str | os.PathLike, series_uid: str | None = None, tolerance: float = 1e-2
) -> tuple[sitk.Image, dict]:
    """Read one DICOM series (a folder or a series reference) into a SimpleITK image.

    Returns ``(image, info)``: ``info`` has the series' UID, modality and description, the
    number of files, and ``dicom_geometry`` when the grid was corrected (gantry tilt, missing
    slice, uneven spacing; a :class:`DicomGeometryWarning` says so too).
    """
    volume, info = resolve_dicom_volume(folder, series_uid, tolerance)
    image = read_dicom_volume(volume, str(folder))
    info["dicom_num_files"] = len(volume.files)
    if volume.resampled:
        info["dicom_geometry"] = "; ".join(volume.geometry_notes())
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
        series_uid: SeriesInstanceUID to read when a folder holds several image series (or
            give the path as a series reference ``folder?series=UID``).
        tolerance: relative slice-spacing tolerance for DICOM series (see :func:`dicom_series_files`).
    """

    def __init__(self, channel_dim: int | str | None = None, series_uid: str | None = None, tolerance: float = 1e-2):
        super().__init__()
        self.channel_dim = float("nan") if channel_dim == "no_channel" else channel_dim
        self.series_uid = series_uid
        self.tolerance = tolerance

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        """True for folders (DICOM series), series references and the suffixes in ``SITK_SUFFIXES``."""
        return all(
            Path(f).is_dir() or is_series_reference(f) or str(f).lower().endswith(SITK_SUFFIXES) for f in ensure_tuple(filename)
        )

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs) -> LoadedImage | list[LoadedImage]:
        """Read one path (or several, stacked as channels by :meth:`get_data`)."""
        names = ensure_tuple(data)
        loaded = [self._read_one(str(name)) for name in names]
        return loaded if len(names) > 1 else loaded[0]

    def _read_one(self, path: str) -> LoadedImage:
        if Path(path).is_dir() or is_series_reference(path):
            image, info = read_dicom_series(path, series_uid=self.series_uid, tolerance=self.tolerance)
            return LoadedImage(image, path, info)
        if not Path(path).exists():
            raise DataError(f"{path}: file not found")
        if is_dicom_file(path):
            _check_dicom_file(Path(path))
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
    if Path(path).is_dir() or is_series_reference(path):
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


# --------------------------------------------------------------------------------------------
# DICOM label objects (RT structure sets, DICOM SEG) onto their series' grid
# --------------------------------------------------------------------------------------------

RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_OBJECT_KINDS = ("segmentation", "rtstruct")  # dicom_object_kind's kinds for label objects
# A datalist entry key (set by pipeline.data for DICOM labels, popped by LoadVolumed): the datalist's
# class names -> values, through which a SEG's segment labels / an RTSTRUCT's ROI names become classes.
LABEL_CLASSES_KEY = "label_classes"


def dicom_volume_affine(volume: DicomVolume) -> tuple[tuple[int, int, int], np.ndarray]:
    """``(shape, affine)`` of the grid a planned volume is read on: ``(columns, rows, slices)`` and
    the 4x4 RAS affine :class:`SimpleITKReader` gives it (without reading any pixel)."""
    if volume.direction is None:
        raise DataError(f"{volume.slices[0].path}: a single image without per-slice geometry has no 3D grid")
    import pydicom

    header = pydicom.dcmread(volume.slices[0].path, stop_before_pixels=True)
    lps = np.eye(4)
    lps[:3, :3] = volume.direction * np.asarray(volume.spacing)
    lps[:3, 3] = volume.origin
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return (int(header.Columns), int(header.Rows), volume.num_slices), affine


def _contour_points(contour: Any) -> np.ndarray:
    """ContourData as an ``(N, 3)`` array, parsed straight from the encoded text when still raw
    (pydicom's per-value conversion costs seconds over a whole structure set)."""
    raw = contour.get_item(0x30060050)
    value = getattr(raw, "value", None)
    if isinstance(value, (bytes, bytearray)):
        try:
            return np.array(bytes(value).decode("ascii").strip(" \x00").split("\\"), dtype=float).reshape(-1, 3)
        except (UnicodeDecodeError, ValueError):
            pass
    return np.asarray(contour.ContourData, dtype=float).reshape(-1, 3)


def read_rtstruct(
    path: str | os.PathLike, reference: str | os.PathLike, roi_names: Sequence[str] | dict[str, int] | None = None
) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """Rasterise an RTSTRUCT's contours onto the grid of the series it was drawn on.

    Args:
        path: the RT structure set file.
        reference: the image series (a folder or a series reference), read as :func:`read_volume` would.
        roi_names: which ROIs become which class: a list (class k = the k-th name, from 1) or a
            ``{name: class}`` dict, compared case-insensitively; default: every ROI, in the file's
            order, as classes 1, 2, ...

    Returns:
        ``(mask, affine, classes)``: a uint8/uint16 ``(i, j, k)`` class map on the reference's
        grid, its 4x4 RAS affine, and class -> ROI name. A pixel belongs to an ROI when its centre
        lies inside an odd number of the ROI's contours on its slice (inner contours are holes).

    Raises:
        DataError naming the file: not an RTSTRUCT, a named ROI that is missing, a contour that lies
        off the reference's slice planes (drawn on another series), a frame of reference that differs.
    """
    import pydicom
    from matplotlib.path import Path as PolygonPath

    try:
        structure = pydicom.dcmread(path)
    except Exception as err:  # pydicom raises many types for damaged files
        raise DataError(f"{path}: not a readable DICOM file ({type(err).__name__}: {err})") from err
    if str(structure.get("SOPClassUID", "")) != RTSTRUCT_SOP_CLASS:
        raise DataError(f"{path}: not an RT structure set (SOP class {structure.get('SOPClassUID', '?')})")
    volume, _ = resolve_dicom_volume(reference)
    shape, affine = dicom_volume_affine(volume)
    frame_uids = {str(item.get("FrameOfReferenceUID", "")) for item in structure.get("ReferencedFrameOfReferenceSequence", [])}
    source_frame = str(pydicom.dcmread(volume.slices[0].path, stop_before_pixels=True).get("FrameOfReferenceUID", ""))
    if source_frame and frame_uids and source_frame not in frame_uids:
        raise DataError(f"{path}: drawn in frame of reference {', '.join(sorted(frame_uids))}, the series {reference} is in {source_frame}")
    rois = {int(item.ROINumber): str(item.ROIName) for item in structure.get("StructureSetROISequence", [])}
    if roi_names is None:
        classes = {number: index + 1 for index, number in enumerate(rois)}
    else:
        wanted = {name.lower(): k for name, k in (roi_names.items() if isinstance(roi_names, dict) else
                                                   ((n, i + 1) for i, n in enumerate(roi_names)))}
        by_name = {name.lower(): number for number, name in rois.items()}
        missing = sorted(set(wanted) - set(by_name))
        if missing:
            raise DataError(f"{path}: no ROI named {', '.join(missing)} (ROIs: {', '.join(rois.values()) or 'none'})")
        classes = {by_name[name]: k for name, k in wanted.items()}
    to_voxel = np.linalg.inv(np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine)  # LPS mm -> (i, j, k)
    mask = np.zeros(shape, dtype=np.uint8 if max(classes.values(), default=0) < 256 else np.uint16)
    for item in structure.get("ROIContourSequence", []):
        number = int(item.ReferencedROINumber)
        if number not in classes:
            continue
        inside = np.zeros(shape, dtype=bool)
        for contour in item.get("ContourSequence", []):
            points = _contour_points(contour)
            if len(points) < 3:
                continue
            voxels = np.c_[points, np.ones(len(points))] @ to_voxel.T
            k = float(np.mean(voxels[:, 2]))
            if np.abs(voxels[:, 2] - k).max() > 0.1 or abs(k - round(k)) > 0.1 or not 0 <= round(k) < shape[2]:
                raise DataError(
                    f"{path}: a contour of ROI {rois.get(number, number)!r} lies off the slice planes of {reference} "
                    f"(at slice index {k:.2f}); was it drawn on another series?"
                )
            # only the pixel centres inside the contour's bounding box can be inside it
            low = np.clip(np.ceil(voxels[:, :2].min(axis=0)).astype(int), 0, np.asarray(shape[:2]) - 1)
            high = np.clip(np.floor(voxels[:, :2].max(axis=0)).astype(int), 0, np.asarray(shape[:2]) - 1)
            if np.any(high < low):
                continue
            i, j = np.meshgrid(np.arange(low[0], high[0] + 1), np.arange(low[1], high[1] + 1), indexing="ij")
            hit = PolygonPath(voxels[:, :2], closed=True).contains_points(np.c_[i.ravel(), j.ravel()]).reshape(i.shape)
            inside[low[0]:high[0] + 1, low[1]:high[1] + 1, int(round(k))] ^= hit
        mask[inside] = classes[number]
    return mask, affine, {k: rois[number] for number, k in classes.items()}


def _label_header(path: str | os.PathLike) -> Any:
    """The header (no pixels) of a DICOM SEG or RTSTRUCT file; DataError naming it otherwise."""
    import pydicom

    try:
        with _quiet_pydicom():
            header = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as err:  # pydicom raises many types for damaged files
        raise DataError(f"{path}: not a readable DICOM file ({type(err).__name__}: {err})") from err
    if str(header.get("SOPClassUID", "")) not in (SEG_SOP_CLASS, RTSTRUCT_SOP_CLASS):
        raise DataError(f"{path}: not a DICOM SEG or RT structure set (SOP class {header.get('SOPClassUID', '?')})")
    return header


def dicom_label_kind(path: str | os.PathLike) -> str | None:
    """``"segmentation"`` (DICOM SEG) or ``"rtstruct"`` when ``path`` is such a file, else None.

    Cheap for other paths: folders, series references and volume files (``.nii.gz``...) are
    answered from the name; a DICOM file by its SOPClassUID alone.
    """
    text = os.fspath(path)
    if is_series_reference(text) or not Path(text).is_file() or not is_dicom_file(text):
        return None
    import pydicom

    try:
        with _quiet_pydicom():
            header = pydicom.dcmread(text, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # noqa: BLE001 - not a readable label object; the image reader names the problem
        return None
    return {SEG_SOP_CLASS: "segmentation", RTSTRUCT_SOP_CLASS: "rtstruct"}.get(str(header.get("SOPClassUID", "")))


def label_object_names(path_or_header: Any) -> list[str]:
    """A SEG's segment labels (by segment number) or an RTSTRUCT's ROI names (in file order)."""
    header = _label_header(path_or_header) if isinstance(path_or_header, (str, os.PathLike)) else path_or_header
    if str(header.get("SOPClassUID", "")) == SEG_SOP_CLASS:
        segments = sorted(header.get("SegmentSequence", []), key=lambda item: int(item.SegmentNumber))
        return [str(item.get("SegmentLabel", f"segment_{item.SegmentNumber}")) for item in segments]
    return [str(item.ROIName) for item in header.get("StructureSetROISequence", [])]


def label_object_references(path_or_header: Any) -> set[str]:
    """The SeriesInstanceUIDs a SEG (ReferencedSeriesSequence) or an RTSTRUCT (its frame of
    reference's RTReferencedSeriesSequence) says it was drawn on; empty when it does not say."""
    header = _label_header(path_or_header) if isinstance(path_or_header, (str, os.PathLike)) else path_or_header
    if str(header.get("SOPClassUID", "")) == SEG_SOP_CLASS:
        return {str(item.SeriesInstanceUID) for item in header.get("ReferencedSeriesSequence", []) if "SeriesInstanceUID" in item}
    return {
        str(series.SeriesInstanceUID)
        for frame in header.get("ReferencedFrameOfReferenceSequence", [])
        for study in frame.get("RTReferencedStudySequence", [])
        for series in study.get("RTReferencedSeriesSequence", [])
        if "SeriesInstanceUID" in series
    }


def _class_values(path: str, kind: str, names: list[str], classes: dict[str, int] | None) -> dict[str, int]:
    """Segment label / ROI name -> class value: through ``classes`` (the datalist's class names,
    compared case-insensitively), else the k-th name -> k. An unknown name is a DataError."""
    if classes is None:
        values: dict[str, int] = {}
        for name in names:
            values.setdefault(name, len(values) + 1)
        return values
    lower = {str(name).lower(): int(value) for name, value in classes.items()}
    unknown = [name for name in names if name.lower() not in lower]
    if unknown:
        what = "segment label(s)" if kind == "segmentation" else "ROI name(s)"
        raise DataError(
            f"{path}: {what} {', '.join(repr(n) for n in unknown)} not among the datalist's labels "
            f"({', '.join(repr(n) for n in classes)}); rename them, or add them to 'labels' (compared case-insensitively)"
        )
    return {name: lower[name.lower()] for name in names}


def read_label_object(
    path: str | os.PathLike, image: str | os.PathLike | None, classes: dict[str, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A DICOM SEG or RTSTRUCT as a class map on its image's grid.

    Args:
        path: the SEG / RT structure set file.
        image: the series it labels (a folder or a series reference), read as :func:`read_volume` would.
        classes: class name -> value (the datalist's ``labels``); each segment label / ROI name must
            be one of them (case-insensitive). Default: the k-th segment / ROI is class k.

    Returns:
        ``(mask, affine)``: uint8/uint16 ``(i, j, k)`` on the image's grid, its 4x4 RAS affine.

    Raises:
        DataError naming the file: not a label object, an image that is no DICOM series, a label
        that references another series (both UIDs named), an unknown name, frames off the grid.
    """
    path = os.fspath(path)
    header = _label_header(path)
    kind = "segmentation" if str(header.SOPClassUID) == SEG_SOP_CLASS else "rtstruct"
    what = "DICOM SEG" if kind == "segmentation" else "RTSTRUCT"
    if image is None or not (Path(image).is_dir() or is_series_reference(image)):
        raise DataError(f"{path}: a {what} label is read onto its image's DICOM series; its image {image} is not a DICOM series")
    volume, _ = resolve_dicom_volume(image)
    referenced = label_object_references(header)
    if referenced and volume.series_uid not in referenced:
        raise DataError(
            f"{path}: the {what} references series {', '.join(sorted(referenced))}, but its image {image} is series "
            f"{volume.series_uid}; is it the label of another series?"
        )
    values = _class_values(path, kind, label_object_names(header), classes)
    if kind == "rtstruct":
        mask, affine, _ = read_rtstruct(path, image, values)
        return mask, affine
    return _read_seg(path, volume, str(image), values)


def _read_seg(path: str, volume: DicomVolume, image: str, values: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Place a SEG's frames on ``volume``'s grid by their own positions (any frame order, empty
    frames left out, a missing slice's grid too); a frame that lies off the grid is an error."""
    try:
        import highdicom as hd
    except ImportError:
        raise DataError(f"{path}: reading a DICOM SEG needs highdicom (pip install 'unetpp-pipeline[dicom-seg]')") from None
    try:
        with _quiet_pydicom():
            seg = hd.seg.segread(path)
            frames = np.asarray(seg.pixel_array)
    except Exception as err:  # highdicom/pydicom raise many types for a damaged SEG
        raise DataError(f"{path}: not a readable DICOM SEG ({type(err).__name__}: {_first_line(err)})") from err
    frames = frames[None] if frames.ndim == 2 else frames  # (frames, rows, columns)
    if str(seg.SegmentationType) == "FRACTIONAL":
        frames = frames >= 0.5 * float(seg.MaximumFractionalValue)
    shape, affine = dicom_volume_affine(volume)
    to_voxel = np.linalg.inv(np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine)  # LPS mm -> (i, j, k)
    number_to_name = {int(item.SegmentNumber): label for item, label in
                      zip(sorted(seg.SegmentSequence, key=lambda item: int(item.SegmentNumber)), label_object_names(seg))}
    expected = np.concatenate([volume.direction[:, 0], volume.direction[:, 1]])
    mask = np.zeros(shape, dtype=np.uint8 if max(values.values(), default=0) < 256 else np.uint16)
    for index, (plane, group) in enumerate(zip(dicom_slices(path, seg), seg.PerFrameFunctionalGroupsSequence)):
        if plane.position is None or plane.orientation is None:
            raise DataError(f"{path}: frame {index + 1} has no plane position/orientation to place it by")
        spacing = plane.pixel_spacing or (volume.spacing[1], volume.spacing[0])
        if np.abs(plane.orientation - expected).max() > 1e-3 or not np.allclose(spacing, (volume.spacing[1], volume.spacing[0]), rtol=1e-3):
            raise DataError(f"{path}: frame {index + 1} is not in the plane orientation and pixel spacing of {image}")
        corner = (to_voxel @ np.r_[plane.position, 1.0])[:3]
        start = np.round(corner).astype(int)
        rows, columns = frames[index].shape
        if np.abs(corner - start).max() > 0.1 or start.min() < 0 or start[0] + columns > shape[0] or start[1] + rows > shape[1] or start[2] >= shape[2]:
            raise DataError(
                f"{path}: frame {index + 1} lies off the grid of {image} (at voxel {np.round(corner, 2).tolist()}); "
                "was it drawn on another series, or on a series read with corrected geometry (gantry tilt)?"
            )
        number = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        window = mask[start[0]:start[0] + columns, start[1]:start[1] + rows, start[2]]
        window[frames[index].T > 0] = values[number_to_name[number]]  # later segments win where they overlap
    return mask, affine


def read_label(
    path: str | os.PathLike, image: str | os.PathLike | None = None, classes: dict[str, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A datalist label as ``(array, affine)``: a DICOM SEG / RTSTRUCT onto ``image``'s grid
    (:func:`read_label_object`), any other file or folder as :func:`read_volume` reads it."""
    if dicom_label_kind(path):
        return read_label_object(path, image, classes)
    return read_volume(path)


class DicomLabelReader(ImageReader):
    """MONAI reader for one DICOM SEG / RTSTRUCT label, on the grid of ``image`` (a series folder or
    reference), class values from ``classes`` (see :func:`read_label_object`). Metadata as
    :class:`SimpleITKReader`'s, so that a label object and a NIfTI label go through the same chain."""

    def __init__(self, image: str | os.PathLike | None, classes: dict[str, int] | None = None):
        super().__init__()
        self.image, self.classes = image, classes

    def verify_suffix(self, filename) -> bool:
        return all(dicom_label_kind(f) for f in ensure_tuple(filename))

    def read(self, data, **kwargs) -> str:
        names = ensure_tuple(data)
        if len(names) != 1:
            raise DataError(f"{names}: a DICOM label object is one file, not a list of channels")
        return os.fspath(names[0])

    def get_data(self, img: str) -> tuple[np.ndarray, dict]:
        mask, affine = read_label_object(img, self.image, self.classes)
        meta = {
            "spacing": np.linalg.norm(affine[:3, :3], axis=0),
            MetaKeys.ORIGINAL_AFFINE: affine,
            MetaKeys.AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(mask.shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            "filename_or_obj": img,
        }
        return mask, meta
