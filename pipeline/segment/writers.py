"""Output writers, chosen by name from a registry (after nnU-Net's ``imageio`` reader/writer registry).

Every output a case can get is one :class:`OutputWriter` subclass registered here; the command
line (``--format``), the output paths, the records and the summary columns are all built from
:data:`WRITERS`. Adding a format (RTSTRUCT, say) is one new class with ``@register_writer``::

    @register_writer
    class RtStructWriter(OutputWriter):
        name, key, suffix = "rtstruct", "rtstruct", "_rtstruct.dcm"

        def applies_to(self, case):
            return case.is_dicom

        def write(self, prediction, path):
            ...  # write prediction.mask (on the input's grid) to path

The NIfTI mask is always written: records vouch for it and resume checks it.
"""

from __future__ import annotations

import abc
import dataclasses
import html
import warnings
from pathlib import Path
from typing import ClassVar, Sequence

import numpy as np

from pipeline import __version__
from pipeline.fileio import atomic_write_text
from pipeline.readers import DataError, c_order, is_nifti
from pipeline.segment.cases import Case

__all__ = [
    "Prediction",
    "OutputWriter",
    "WRITERS",
    "register_writer",
    "writers_for",
    "NiftiMaskWriter",
    "DicomSegWriter",
    "QaPngWriter",
    "RtStructWriter",
    "write_mask_nifti",
    "write_rtstruct",
    "mask_contours",
    "write_dicom_seg",
    "write_qa_png",
]


@dataclasses.dataclass
class Prediction:
    """A finished case: the mask on the input's own grid.

    ``mask``: ``(i, j, k)`` (or ``(i, j)`` for a 2D input) class values, uint8/uint16.
    ``affine``: the input's 4x4 RAS affine. ``class_names``: class value -> name (foreground only).
    """

    case: Case
    mask: np.ndarray
    affine: np.ndarray
    class_names: dict[int, str]


class OutputWriter(abc.ABC):
    """One kind of output file per case.

    Class attributes: ``name`` is the ``--format`` value, ``key`` the output's name in records
    and the summary's column, ``suffix`` what follows the case id in the file name, ``folder``
    the sub-folder of ``OUT`` (``""``: ``OUT`` itself), ``help`` one line for ``--help``.
    """

    name: ClassVar[str]
    help: ClassVar[str] = ""
    key: ClassVar[str]
    suffix: ClassVar[str]
    folder: ClassVar[str] = ""

    def output_path(self, out: Path, case_id: str) -> Path:
        return out / self.folder / f"{case_id}{self.suffix}" if self.folder else out / f"{case_id}{self.suffix}"

    def check_available(self) -> None:
        """Raise ``ImportError`` with an install hint when an optional package is missing."""

    def applies_to(self, case: Case) -> bool:
        """False when this output cannot exist for ``case`` (it is then noted, not failed)."""
        return True

    def not_applicable(self, case: Case) -> str:
        """The note recorded for a case this writer does not apply to."""
        return f"no {self.name} output for this input"

    @abc.abstractmethod
    def write(self, prediction: Prediction, path: Path) -> None:
        """Write ``prediction`` to ``path`` (a temporary name; the caller renames it when all are written)."""

    def finish(self, rows: Sequence[dict], out: Path) -> None:
        """Called once after the batch with every case's summary row (e.g. to write an index)."""


WRITERS: dict[str, type[OutputWriter]] = {}


def register_writer(cls: type[OutputWriter]) -> type[OutputWriter]:
    """Class decorator: make ``cls`` selectable with ``--format cls.name``."""
    if cls.name in WRITERS and WRITERS[cls.name] is not cls:
        raise ValueError(f"an output writer named {cls.name!r} is already registered ({WRITERS[cls.name].__name__})")
    WRITERS[cls.name] = cls
    return cls


def writers_for(formats: Sequence[str]) -> list[OutputWriter]:
    """Writer instances for ``formats``: always the NIfTI mask first, then the others in registry order."""
    unknown = sorted(set(formats) - set(WRITERS))
    if unknown:
        raise ValueError(f"unknown output format(s) {unknown}; known: {sorted(WRITERS)}")
    chosen = {NiftiMaskWriter.name, *formats}
    return [cls() for name, cls in WRITERS.items() if name in chosen]


# --------------------------------------------------------------------------------------------
# NIfTI mask
# --------------------------------------------------------------------------------------------


def write_mask_nifti(mask: np.ndarray, affine: np.ndarray, path: Path, header=None) -> np.ndarray:
    """Write a mask as NIfTI; returns the affine a reader will see.

    With the input's NIfTI ``header`` its qform and sform (and their codes) are copied, so
    every viewer places the mask exactly as it places the image; otherwise ``affine`` is
    stored as both (code 1, scanner).
    """
    import nibabel as nib

    if mask.ndim == 3 and mask.flags.c_contiguous:
        mask = c_order(mask.T).T  # NIfTI's (Fortran) order, reordered block by block: written without another copy
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
    if str(path).lower().endswith(".gz"):
        from isal import igzip

        # nibabel's own gzip writer is zlib's, about 5 times slower than ISA-L at the same ratio
        Path(path).write_bytes(igzip.compress(image.to_bytes(), compresslevel=1, mtime=0))
    else:
        nib.save(image, str(path))
    return np.asarray(image.header.get_best_affine(), dtype=float)


@register_writer
class NiftiMaskWriter(OutputWriter):
    """``<case>_seg.nii.gz`` on the input's grid; a NIfTI input's qform/sform are copied."""

    name, key, suffix = "nifti", "mask", "_seg.nii.gz"
    help = "<case>_seg.nii.gz, always written"

    def write(self, prediction: Prediction, path: Path) -> None:
        case = prediction.case
        header = None
        if not case.is_dicom and is_nifti(case.first_path):
            import nibabel as nib

            header = nib.load(case.first_path).header
        written = write_mask_nifti(prediction.mask, prediction.affine, path, header=header)
        if not np.allclose(written, prediction.affine, atol=1e-4):
            raise RuntimeError(f"the mask's header affine {written.tolist()} would differ from the input's {prediction.affine.tolist()}")


# --------------------------------------------------------------------------------------------
# DICOM SEG
# --------------------------------------------------------------------------------------------


def _require_highdicom():
    try:
        import highdicom
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
    algorithm = hd.AlgorithmIdentificationSequence(name="UNet++", version=__version__, family=codes.cid7162.ArtificialIntelligence)
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
        seg = hd.seg.Segmentation(
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
    seg.save_as(str(path))


@register_writer
class DicomSegWriter(OutputWriter):
    """``<case>_seg.dcm``: a DICOM SEG referencing the source series (DICOM series inputs only)."""

    name, key, suffix = "dicom-seg", "dicom_seg", "_seg.dcm"
    help = "<case>_seg.dcm for DICOM series inputs (needs highdicom)"

    def check_available(self) -> None:
        _require_highdicom()

    def applies_to(self, case: Case) -> bool:
        return case.is_dicom

    def not_applicable(self, case: Case) -> str:
        return "no DICOM SEG: the input is not a DICOM series"

    def write(self, prediction: Prediction, path: Path) -> None:
        write_dicom_seg(prediction.mask, prediction.case.first_path, prediction.class_names, path)


# --------------------------------------------------------------------------------------------
# RT structure set
# --------------------------------------------------------------------------------------------

# Patient and study attributes an RT structure set must carry (PS3.3 C.7.1.1, C.7.2.1): copied
# from the source, nothing else of it (no other identifying attribute leaves with the contours).
RTSTRUCT_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
ROI_COLOURS = ((255, 0, 0), (0, 255, 255), (255, 255, 0), (0, 255, 0), (255, 0, 255), (255, 128, 0))


def _decimal_strings(values: np.ndarray):
    """A DS element's encoded value, written as is: pydicom's per-value DS objects and checks
    cost seconds for the ~10^5 contour coordinates of one structure set."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    text = "\\".join(f"{v:.4f}" for v in values).encode("ascii")
    text += b" " * (len(text) % 2)
    return RawDataElement(Tag(0x30060050), "DS", len(text), text, 0, False, True)


def mask_contours(plane: np.ndarray) -> list[np.ndarray]:
    """Closed outlines of a 2D boolean ``(i, j)`` mask, as ``(N, 2)`` arrays of ``(i, j)`` voxel
    coordinates (marching squares at 0.5, so they pass between pixel centres: a pixel is inside
    its outline, its outside neighbours are not). Holes are separate outlines."""
    import contourpy

    padded = np.pad(plane.astype(np.float32), 1).T  # (j, i) rows, zero border: every outline closes
    lines = contourpy.contour_generator(z=padded, name="serial", line_type="Separate").lines(0.5)
    outlines = []
    for line in lines:
        line = np.asarray(line, dtype=float) - 1.0  # undo the padding
        if len(line) > 1 and np.allclose(line[0], line[-1]):
            line = line[:-1]  # DICOM closed planar contours do not repeat the first point
        if len(line) >= 3:
            outlines.append(line)
    return outlines


def write_rtstruct(mask: np.ndarray, affine: np.ndarray, reference: str, class_names: dict[int, str], path: Path) -> None:
    """Write an RTSTRUCT of an ``(i, j, k)`` class-value mask on its source series' grid.

    One ROI per class (named from ``class_names``, generation algorithm AUTOMATIC, interpreted
    type ORGAN), one CLOSED_PLANAR contour per outline and slice, in patient coordinates, each
    referencing the source image it lies on (slices the reader interpolated to fill a gap
    reference none). The series is read as the pipeline reads it: a tilted series' contours lie in
    the source planes, so a treatment-planning system overlays them on the original images.
    Only the patient and study attributes the standard requires are copied from the source.
    """
    import datetime

    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from pipeline.readers import RTSTRUCT_SOP_CLASS, dicom_volume_affine, resolve_dicom_volume

    volume, _ = resolve_dicom_volume(reference)
    shape, grid_affine = dicom_volume_affine(volume)
    if tuple(mask.shape) != shape or not np.allclose(affine, grid_affine, atol=1e-3):
        raise DataError(f"{reference}: the mask's grid {mask.shape} differs from the series' {shape}; no RTSTRUCT")
    headers = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in volume.files}
    first = headers[volume.files[0]]
    frame_uid = first.get("FrameOfReferenceUID")
    if not frame_uid:
        raise DataError(f"{reference}: the series has no FrameOfReferenceUID, which an RTSTRUCT must reference")
    # grid slice k -> the source plane at its position (none for a slice filled by interpolation)
    along = np.asarray(volume.along, dtype=float)
    source_of = {}
    for k in range(shape[2]):
        nearest = int(np.argmin(np.abs(along - k * volume.spacing[2])))
        if abs(along[nearest] - k * volume.spacing[2]) < 1e-3 * volume.spacing[2] + 1e-4:
            source_of[k] = volume.slices[nearest]

    def image_reference(plane) -> Dataset:
        item = Dataset()
        header = headers[plane.path]
        item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = header.SOPClassUID, header.SOPInstanceUID
        if plane.frame is not None:
            item.ReferencedFrameNumber = plane.frame + 1
        return item

    now = datetime.datetime.now()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword in RTSTRUCT_COPIED:
        setattr(ds, keyword, first.get(keyword, ""))
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "RTSTRUCT", generate_uid(), 901
    ds.SeriesDescription, ds.InstanceNumber = "UNet++ contours", 1
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "unetpp-pipeline", "UNet++", __version__
    ds.StructureSetLabel, ds.StructureSetName = "UNet++", "UNet++ segmentation"
    ds.StructureSetDate, ds.StructureSetTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.ContentDate, ds.ContentTime = ds.StructureSetDate, ds.StructureSetTime

    series_item = Dataset()
    series_item.SeriesInstanceUID = first.SeriesInstanceUID
    series_item.ContourImageSequence = [image_reference(plane) for plane in volume.slices]
    study_item = Dataset()
    study_item.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (the usual value)
    study_item.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study_item.RTReferencedSeriesSequence = [series_item]
    frame_item = Dataset()
    frame_item.FrameOfReferenceUID = frame_uid
    frame_item.RTReferencedStudySequence = [study_item]
    ds.ReferencedFrameOfReferenceSequence = [frame_item]

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    ds.StructureSetROISequence, ds.ROIContourSequence, ds.RTROIObservationsSequence = [], [], []
    for index, (number, name) in enumerate(sorted(class_names.items())):
        roi = Dataset()
        roi.ROINumber, roi.ReferencedFrameOfReferenceUID, roi.ROIName = number, frame_uid, name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        ds.StructureSetROISequence.append(roi)
        contours = []
        for k in range(shape[2]):
            plane = mask[:, :, k] == number
            if not plane.any():
                continue
            for outline in mask_contours(plane):
                points = np.c_[outline, np.full(len(outline), k), np.ones(len(outline))] @ lps.T
                contour = Dataset()
                contour.ContourGeometricType = "CLOSED_PLANAR"
                contour.NumberOfContourPoints = len(points)
                contour[0x30060050] = _decimal_strings(points[:, :3].ravel())  # ContourData
                if k in source_of:
                    contour.ContourImageSequence = [image_reference(source_of[k])]
                contours.append(contour)
        item = Dataset()
        item.ReferencedROINumber = number
        item.ROIDisplayColor = list(ROI_COLOURS[index % len(ROI_COLOURS)])
        if contours:
            item.ContourSequence = contours
        ds.ROIContourSequence.append(item)
        observation = Dataset()
        observation.ObservationNumber, observation.ReferencedROINumber = number, number
        observation.RTROIInterpretedType, observation.ROIInterpreter = "ORGAN", ""
        ds.RTROIObservationsSequence.append(observation)
    ds.save_as(str(path), enforce_file_format=True)


@register_writer
class RtStructWriter(OutputWriter):
    """``<case>_rtstruct.dcm``: an RT structure set, one ROI per class, referencing the source series."""

    name, key, suffix = "rtstruct", "rtstruct", "_rtstruct.dcm"
    help = "<case>_rtstruct.dcm for DICOM series inputs: one ROI of contours per class, for treatment planning"

    def applies_to(self, case: Case) -> bool:
        return case.is_dicom

    def not_applicable(self, case: Case) -> str:
        return "no RTSTRUCT: the input is not a DICOM series"

    def write(self, prediction: Prediction, path: Path) -> None:
        write_rtstruct(prediction.mask, prediction.affine, prediction.case.first_path, prediction.class_names, path)


# --------------------------------------------------------------------------------------------
# QA pictures
# --------------------------------------------------------------------------------------------


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
    low, high = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
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


@register_writer
class QaPngWriter(OutputWriter):
    """``qa/<case>.png`` (three mid-slices with the mask's contour) and ``qa/index.html`` for the batch."""

    name, key, suffix, folder = "qa-png", "qa_png", ".png", "qa"
    help = "qa/<case>.png and qa/index.html"

    def write(self, prediction: Prediction, path: Path) -> None:
        from pipeline.readers import read_volume

        image, affine = read_volume(prediction.case.first_path)
        while image.ndim > 3:  # first channel
            image = image[..., 0]
        write_qa_png(image, prediction.mask, affine, path, prediction.case.case_id, prediction.class_names)

    def finish(self, rows: Sequence[dict], out: Path) -> None:
        items = []
        for row in rows:
            png = row.get("outputs", {}).get(self.key, {}).get("path")
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
        atomic_write_text(out / self.folder / "index.html", page)
