"""PACS exports as labs get them: built from real CT pixel data in a temp folder, then scanned,
selected, read, segmented or refused exactly as docs/dicom.md says.

The exports are written with pydicom from pydicom's own ``CT_small.dcm`` (a real CT slice and a
real scanner header): a stack of that slice, shrunk towards both ends like a torso, makes a
body-shaped volume with real CT texture. Geometry tests (tilt, a missing slice) use a linear
ramp in patient coordinates instead, so that the corrected read can be checked voxel by voxel
(linear interpolation reproduces a linear function exactly).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline import dicom
from test_segment import checkpoint  # noqa: F401 (the tiny-network weights fixture)
from pipeline.readers import (
    DataError,
    DicomGeometryWarning,
    dicom_series_files,
    read_volume,
    series_reference,
    split_series_reference,
)

CT_SMALL = get_testdata_file("CT_small.dcm")
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DOSE_SR = "1.2.840.10008.5.1.4.1.1.88.67"
AIR = -1000.0


# --------------------------------------------------------------------------------------------
# building exports
# --------------------------------------------------------------------------------------------


def body_volume(n: int, size: int = 48) -> np.ndarray:
    """``(i, j, k)`` HU volume from the real CT slice: shrunk towards both ends, a torso-like body."""
    from scipy import ndimage

    ds = pydicom.dcmread(CT_SMALL)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    hu = ndimage.zoom(hu, size / hu.shape[0], order=1).T  # (columns i, rows j)
    centre = (np.asarray(hu.shape) - 1) / 2
    slices = []
    for k in range(n):
        scale = 1.0 - 0.35 * ((k - (n - 1) / 2) / max(n / 2, 1)) ** 2
        matrix = np.eye(2) / scale
        offset = centre - matrix @ centre
        slices.append(ndimage.affine_transform(hu, matrix, offset, order=1, cval=AIR))
    return np.round(np.stack(slices, axis=-1))


class Study:
    """One patient's study: shared patient/study attributes from a real CT header, and file names
    ``IM0001``, ``IM0002``, ... handed out across every series written into it (a flat export)."""

    def __init__(self, folder: Path, names: str = "IM{:04d}", patient: str = "Doe^Jane", patient_id: str = "MRN0042"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.names = names
        self.count = 0
        self.study_uid = generate_uid()
        self.frame_uid = generate_uid()
        self.patient, self.patient_id = patient, patient_id

    def next_path(self, folder: Path | None = None) -> Path:
        self.count += 1
        folder = self.folder if folder is None else Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / self.names.format(self.count)

    def template(self) -> Dataset:
        ds = pydicom.dcmread(CT_SMALL)
        ds.PatientName, ds.PatientID = self.patient, self.patient_id
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = self.study_uid, self.frame_uid
        ds.StudyDescription = "CT ABDOMEN"
        ds.AccessionNumber = "ACC123"
        return ds

    def series(
        self,
        volume_hu: np.ndarray,
        spacing=(0.8, 0.8, 2.5),
        origin=(-20.0, -20.0, 0.0),
        orientation=(1, 0, 0, 0, 1, 0),
        number: int = 2,
        description: str = "Abdomen 2.5 B30f",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        positions=None,
        per_slice=None,
        folder: Path | None = None,
        series_uid: str | None = None,
    ) -> list[Path]:
        """Write ``volume_hu`` ``(i, j, k)`` as one CT series, slice k at ``positions[k]`` (default:
        ``origin + k * spacing[2] * normal``); ``per_slice(k)`` gives extra tags per slice."""
        row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
        normal = np.cross(row, col)
        series_uid = series_uid or generate_uid()
        paths = []
        for k in range(volume_hu.shape[2]):
            ds = self.template()
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, number, description
            ds.ImageType = list(image_type)
            ds.InstanceNumber = k + 1
            position = np.asarray(origin, float) + k * spacing[2] * normal if positions is None else np.asarray(positions[k], float)
            ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
            ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
            ds.PixelSpacing = [spacing[1], spacing[0]]
            ds.SliceThickness = spacing[2]
            ds.AcquisitionNumber = 1
            stored = np.round(volume_hu[:, :, k].T + 1024).astype(np.int16)  # (rows j, columns i)
            ds.Rows, ds.Columns = stored.shape
            ds.PixelData = stored.tobytes()
            for key, value in (per_slice(k) if per_slice else {}).items():
                setattr(ds, key, value)
            path = self.next_path(folder)
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths

    def _non_image(self, sop_class: str, modality: str, number: int, description: str) -> Dataset:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.Modality, ds.SeriesNumber, ds.SeriesDescription = modality, number, description
        ds.PatientName, ds.PatientID, ds.StudyInstanceUID = self.patient, self.patient_id, self.study_uid
        template = self.template()
        for key in ("StudyDate", "StudyTime", "StudyID", "AccessionNumber", "StudyDescription", "FrameOfReferenceUID"):
            setattr(ds, key, template.get(key, ""))
        ds.SeriesInstanceUID = generate_uid()
        ds.InstanceNumber = 1
        ds.ContentDate, ds.ContentTime = template.StudyDate, "120000"
        return ds

    def dose_report(self, number: int = 997, folder: Path | None = None) -> Path:
        ds = self._non_image(DOSE_SR, "SR", number, "Dose Report")
        ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
        title = Dataset()
        title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning = "113701", "DCM", "X-Ray Radiation Dose Report"
        ds.ConceptNameCodeSequence = [title]
        item = Dataset()
        item.ValueType, item.TextValue = "TEXT", "CTDIvol 8.2 mGy"
        ds.ContentSequence = [item]
        path = self.next_path(folder)
        ds.save_as(path, enforce_file_format=True)
        return path

    def screenshot(self, number: int = 998, folder: Path | None = None) -> Path:
        """A secondary capture: an RGB picture of the real slice, no patient geometry."""
        ds = self._non_image(SECONDARY_CAPTURE, "OT", number, "Patient Protocol")
        grey = pydicom.dcmread(CT_SMALL).pixel_array[::2, ::2]
        grey = (255 * (grey - grey.min()) / np.ptp(grey)).astype(np.uint8)
        ds.Rows, ds.Columns = grey.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.PixelData = np.repeat(grey[..., None], 3, axis=-1).tobytes()
        path = self.next_path(folder)
        ds.save_as(path, enforce_file_format=True)
        return path


def write_dicomdir(root: Path, files: list[Path]) -> Path:
    """A DICOMDIR (pydicom's FileSet) whose records reference ``files`` by their own names."""
    from pydicom.fileset import FileSet

    staging = root.parent / (root.name + ".fileset")
    fileset = FileSet()
    for path in files:
        fileset.add(str(path))
    fileset.write(str(staging))
    written = pydicom.dcmread(staging / "DICOMDIR")
    by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in files}
    for record in written.DirectoryRecordSequence:
        if "ReferencedSOPInstanceUIDInFile" in record:
            record.ReferencedFileID = list(by_uid[record.ReferencedSOPInstanceUIDInFile].relative_to(root).parts)
    written.save_as(root / "DICOMDIR", enforce_file_format=True)
    import shutil

    shutil.rmtree(staging)
    return root / "DICOMDIR"


def flat_export(folder: Path) -> dict[str, list[Path]]:
    """A flat PACS export: localizer, axial 5 mm, axial 2.5 mm (venous), coronal 3 mm reformat,
    a dose report (SR) and a secondary capture, files IM0001... without suffix, and a DICOMDIR."""
    study = Study(folder)
    volume = body_volume(16)
    files = {}
    topogram = volume.mean(axis=1, keepdims=True)  # (i, 1, k): an AP projection
    files["localizer"] = study.series(
        np.round(topogram[:, :, ::-1].transpose(0, 2, 1)), spacing=(0.8, 2.5, 1.0), origin=(-20, 0, 37.5),
        orientation=(1, 0, 0, 0, 0, -1), number=1, description="Topogram 0.6 T20f", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    thick = (volume[:, :, 0::2] + volume[:, :, 1::2]) / 2
    files["axial_5mm"] = study.series(np.round(thick), spacing=(0.8, 0.8, 5.0), origin=(-20, -20, 1.25), number=2, description="Abdomen 5.0 B30f")
    files["axial_2.5mm"] = study.series(volume, number=3, description="Abdomen venous 2.5 B30f")
    coronal = volume[:, ::4, ::-1].transpose(0, 2, 1)  # (i, z top->bottom, y): one coronal plane per 3.2 mm
    files["coronal"] = study.series(
        coronal, spacing=(0.8, 2.5, 3.2), origin=(-20, -20, 37.5), orientation=(1, 0, 0, 0, 0, -1), number=4,
        description="Cor 3.0 MPR", image_type=("DERIVED", "SECONDARY", "REFORMATTED"),
    )
    files["sr"] = [study.dose_report()]
    files["sc"] = [study.screenshot()]
    write_dicomdir(folder, [p for paths in files.values() for p in paths])
    return files


# --------------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------------


def test_series_reference_round_trip():
    reference = series_reference("/data/p1/CT/", "1.2.840.10008.9", {"TemporalPositionIdentifier": "2"})
    assert reference == "/data/p1/CT?series=1.2.840.10008.9&TemporalPositionIdentifier=2"
    assert split_series_reference(reference) == ("/data/p1/CT", "1.2.840.10008.9", {"TemporalPositionIdentifier": "2"})
    assert split_series_reference("/data/p1/CT") == ("/data/p1/CT", None, {})
    assert split_series_reference("/data/what?series=x") == ("/data/what?series=x", None, {})  # not a UID


# --------------------------------------------------------------------------------------------
# the flat export: scan and selection
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("pacs") / "export"
    return folder, flat_export(folder)


def by_number(entries) -> dict:
    return {e.series_number: e for e in entries}


def test_scan_lists_every_series_with_what_would_be_done(export):
    folder, files = export
    assert sorted(p.name for p in folder.iterdir())[:3] == ["DICOMDIR", "IM0001", "IM0002"]
    entries = by_number(dicom.scan(folder))
    assert sorted(entries) == [1, 2, 3, 4, 997, 998]
    localizer, thick, thin, coronal, sr, sc = (entries[n] for n in (1, 2, 3, 4, 997, 998))
    assert (localizer.kind, localizer.action) == ("localizer", "skip") and "LOCALIZER" in localizer.why
    assert (sr.kind, sr.action) == ("non-image", "skip") and "structured report" in sr.why
    assert (sc.kind, sc.action) == ("secondary-capture", "skip") and "screenshot" in sc.why
    assert (thin.orientation, thin.slices, thin.thickness, thin.frames_per_position) == ("axial", 16, 2.5, 1)
    assert thin.spacing == pytest.approx((0.8, 0.8, 2.5))
    assert (thick.orientation, thick.slices, thick.thickness) == ("axial", 8, 5.0)
    assert (coronal.orientation, coronal.slices) == ("coronal", 12)
    # without rules: three image series in one folder are a choice for the user
    for entry in (thick, thin, coronal):
        assert entry.action == "skip" and "3 image series in this folder: choose with --series" in entry.why


def test_axial_thinnest_picks_the_thin_venous_series(export):
    folder, files = export
    entries = by_number(dicom.select(dicom.scan(folder), dicom.SeriesSelection.parse(["axial-thinnest"])))
    assert [n for n, e in entries.items() if e.action == "use"] == [3]
    assert "axial-thinnest picked series 3" in entries[2].why and "2.5 mm" in entries[2].why
    assert "not axial" in entries[4].why or "not chosen" in entries[4].why
    assert entries[1].action == entries[997].action == entries[998].action == "skip"  # never candidates
    chosen = entries[3]
    assert split_series_reference(chosen.path)[1] == chosen.series_uid
    array, affine = read_volume(chosen.path)
    assert array.shape == (48, 48, 16)
    assert affine[2, 2] == pytest.approx(2.5)
    np.testing.assert_allclose(array, body_volume(16), atol=0.5)  # real HU, stacked by position


@pytest.mark.parametrize(
    "rules, used",
    [
        (["modality=CT"], [2, 3, 4]),
        (["description~venous"], [3]),
        (["description~abdomen", "axial-thinnest"], [3]),
        (["orientation=coronal"], [4]),
        (["number=2"], [2]),
        (["all"], [2, 3, 4]),
        (["modality=MR"], []),
    ],
)
def test_series_rules(export, rules, used):
    folder, _ = export
    entries = dicom.select(dicom.scan(folder), dicom.SeriesSelection.parse(rules))
    assert sorted(e.series_number for e in entries if e.action == "use") == used
    assert all(e.action == "skip" for e in entries if e.series_number in (1, 997, 998))


@pytest.mark.parametrize("rule", ["modality", "colour=red", "thinnest-axial", "description~("])
def test_bad_rules_are_usage_errors(rule):
    with pytest.raises(ValueError, match="--series"):
        dicom.SeriesSelection.parse([rule])


def test_reading_the_export_folder_without_a_choice_names_the_series(export):
    folder, _ = export
    with pytest.raises(DataError, match=r"holds 6 DICOM series \(3 image series\), choose one .*--series"):
        read_volume(folder)


def test_scan_command_table_and_json(export, capsys):
    folder, _ = export
    assert dicom.main(["scan", str(folder), "--series", "axial-thinnest"]) == 0
    table = capsys.readouterr().out
    assert "Doe" not in table and "MRN0042" not in table and "P1-S1" in table
    assert "6 series in 1 folder(s); 1 to use with --series axial-thinnest" in table
    assert dicom.main(["scan", str(folder), "--json", "--show-phi"]) == 1  # no rule: nothing chosen
    rows = json.loads(capsys.readouterr().out)["series"]
    assert {r["patient_id"] for r in rows} == {"MRN0042"}
    assert dicom.main(["scan", str(folder), "--series", "colour=red"]) == 2


# --------------------------------------------------------------------------------------------
# segment and case discovery with --series
# --------------------------------------------------------------------------------------------


def nested_export(folder: Path) -> Path:
    """The same study as a DICOMDIR file-set: PT000000/ST000000/SE00000n/IM00000n (pydicom's
    FileSet), one folder per series, names that mean nothing."""
    from pydicom.fileset import FileSet

    staging = folder.parent / (folder.name + ".flat")
    files = flat_export(staging)
    fileset = FileSet()
    for path in (p for paths in files.values() for p in paths):
        fileset.add(str(path))
    fileset.write(str(folder))
    return folder


def test_discovery_with_series_rules_names_cases_and_lists_what_it_skipped(export, tmp_path):
    from pipeline.segment import discover_cases

    folder, _ = export
    skipped: list = []
    cases = discover_cases(folder, series=["axial-thinnest"], skipped=skipped)
    assert [(c.case_id, c.is_dicom) for c in cases] == [("export", True)]
    assert split_series_reference(cases[0].image)[1] == cases[0].series_uid
    assert sorted(row["series"].split(" (")[0] for row in skipped) == ["series 1", "series 2", "series 4", "series 997", "series 998"]
    assert all(row["why"] for row in skipped)
    # every image series its own case: ids from the folder and the series number
    cases = discover_cases(folder, series=["all"])
    assert sorted(c.case_id for c in cases) == ["export__s2", "export__s3", "export__s4"]
    # without rules: the folder is one case, which fails when read (three image series)
    assert [c.image for c in discover_cases(folder)] == [str(folder) + "/"]


def test_nested_dicomdir_export_axial_thinnest_across_folders(tmp_path):
    from pipeline.segment import discover_cases

    root = nested_export(tmp_path / "cd")
    assert (root / "DICOMDIR").is_file()
    entries = dicom.select(dicom.scan(root), dicom.SeriesSelection.parse(["axial-thinnest"]))
    assert len({e.folder for e in entries}) == 6  # one folder per series
    used = [e for e in entries if e.action == "use"]
    assert [(e.series_number, e.path) for e in used] == [(3, used[0].folder)]  # the folder itself: no reference needed
    cases = discover_cases(root, series=["axial-thinnest"])
    assert len(cases) == 1 and cases[0].image == used[0].folder + "/"
    assert cases[0].case_id == Path(used[0].folder).name  # SE00000n: meaningless, but no patient data


def run_segment(checkpoint: Path, input_path: Path, output: Path, *extra: str) -> int:
    from pipeline import segment

    root = Path(__file__).resolve().parents[1]
    tiny = ["--override", "network_def#features=[4,8,16]", "--override", "network_def#depth=2",
            "--override", "sw_roi_size=[32,32,32]", "--override", "sw_batch_size=1"]
    return segment.main(["--bundle", str(root / "bundles" / "unetpp_3d_seg"), "--checkpoint", str(checkpoint), *tiny,
                         "--input", str(input_path), "--output", str(output), "--quiet", "--workers", "0", *extra])


def summary_rows(output: Path) -> dict[str, dict]:
    return {row["case_id"]: row for row in json.loads((output / "summary.json").read_text())["cases"]}


def test_segment_nested_export_with_axial_thinnest(tmp_path, checkpoint, capsys):
    import nibabel as nib

    root = nested_export(tmp_path / "cd")
    output = tmp_path / "out"
    assert run_segment(checkpoint, root, output, "--series", "axial-thinnest") == 0
    rows = summary_rows(output)
    assert len(rows) == 1
    (case_id, row), = rows.items()
    assert row["status"] == "done" and row["shape"] == [48, 48, 16]
    mask = nib.load(output / f"{case_id}_seg.nii.gz")
    chosen = next(e for e in dicom.scan(root) if e.series_number == 3)
    np.testing.assert_allclose(mask.affine, read_volume(chosen.folder)[1], atol=1e-4)
    skipped = json.loads((output / "skipped_series.json").read_text())
    assert len(skipped) == 5 and "skipped" in capsys.readouterr().err
    # a bad rule is a usage error before anything is read
    assert run_segment(checkpoint, root, tmp_path / "out2", "--series", "colour=red") == 2
    assert not (tmp_path / "out2").exists()


def test_segment_flat_export_with_axial_thinnest(export, tmp_path, checkpoint):
    folder, _ = export
    output = tmp_path / "out"
    # --show-phi: the case is named after its folder (DICOM inputs are pseudonymised by default)
    assert run_segment(checkpoint, folder, output, "--series", "axial-thinnest", "--show-phi") == 0
    rows = summary_rows(output)
    assert [(k, r["status"], r["shape"]) for k, r in rows.items()] == [("export", "done", [48, 48, 16])]


# --------------------------------------------------------------------------------------------
# geometry realities: phases, tilt, a missing slice, multi-frame, compression
# --------------------------------------------------------------------------------------------


def ramp(positions_lps: np.ndarray) -> np.ndarray:
    """A linear function of patient position (LPS mm): what a corrected grid must reproduce."""
    return 100.0 + 3.0 * positions_lps[..., 1] + 5.0 * positions_lps[..., 2]


def voxel_positions(affine: np.ndarray, shape) -> np.ndarray:
    """LPS mm of every voxel (i, j, k) of a RAS affine."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).astype(float)
    ras = grid @ affine[:3, :3].T + affine[:3, 3]
    return ras * np.array([-1.0, -1.0, 1.0])


def ramp_series(study: Study, n: int, orientation, positions, spacing=(1.0, 1.0, 2.0), size=(24, 20), **kwargs) -> list[Path]:
    row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    i, j = np.meshgrid(np.arange(size[0]), np.arange(size[1]), indexing="ij")
    planes = []
    for k in range(n):
        where = positions[k] + i[..., None] * spacing[0] * row + j[..., None] * spacing[1] * col
        planes.append(ramp(where))
    return study.series(np.round(np.stack(planes, axis=-1)), spacing=spacing, orientation=orientation, positions=positions, **kwargs)


def test_two_phase_series_is_split_into_volumes_or_refused_with_advice(tmp_path):
    study = Study(tmp_path / "phases")
    volume = body_volume(10)
    uid = generate_uid()
    contrast = np.where(volume > -200, volume + 150, volume)
    for phase, data in ((1, volume), (2, contrast)):
        study.series(data, series_uid=uid, number=5, description="Liver 2 phase",
                     per_slice=lambda k, p=phase: {"TemporalPositionIdentifier": p, "AcquisitionNumber": p})
    entries = dicom.scan(study.folder)
    assert [(e.split, e.frames_per_position, e.slices) for e in entries] == [
        ({"TemporalPositionIdentifier": "1"}, 2, 10), ({"TemporalPositionIdentifier": "2"}, 2, 10)]
    with pytest.raises(DataError, match=r"holds 2 volumes at the same positions .*TemporalPositionIdentifier 1, 2.*"
                                        r"phases\?series=.*&TemporalPositionIdentifier=1"):
        read_volume(study.folder)
    first, _ = read_volume(series_reference(study.folder, uid, {"TemporalPositionIdentifier": "1"}))
    second, _ = read_volume(series_reference(study.folder, uid, {"TemporalPositionIdentifier": "2"}))
    np.testing.assert_allclose(first, volume, atol=0.5)
    np.testing.assert_allclose(second, contrast, atol=0.5)
    with pytest.raises(DataError, match="no volume of series"):
        read_volume(series_reference(study.folder, uid, {"TemporalPositionIdentifier": "3"}))
    from pipeline.segment import discover_cases

    cases = discover_cases(tmp_path, series=["all"])
    assert sorted(c.case_id for c in cases) == ["phases__s5_t1", "phases__s5_t2"]


def test_duplicate_slice_without_a_separating_tag_is_refused_naming_the_files(tmp_path):
    study = Study(tmp_path / "dup")
    paths = study.series(body_volume(6), number=7)
    twin = pydicom.dcmread(paths[3])
    twin.ImagePositionPatient = pydicom.dcmread(paths[2]).ImagePositionPatient
    twin.save_as(paths[3])
    with pytest.raises(DataError, match=r"duplicate slice position .* IM000[34] and IM000[34]"):
        read_volume(study.folder)
    (entry,) = dicom.scan(study.folder)
    assert entry.action == "refuse" and "duplicate slice position" in entry.why


def test_gantry_tilt_is_resampled_to_an_orthogonal_grid_never_sheared(tmp_path):
    """CT with a 15 degree gantry tilt: image planes tilted, positions moving along the table (z).
    Stacked as they are, every slice would be shifted by up to 4.7 px (a shear); read, the voxels
    sit where the ramp says they are."""
    tilt = np.radians(15)
    orientation = (1, 0, 0, 0, np.cos(tilt), np.sin(tilt))
    positions = [np.array([-10.0, -8.0, 2.0 * k]) for k in range(10)]
    study = Study(tmp_path / "tilt")
    ramp_series(study, 10, orientation, positions, number=9, description="Head tilted")
    (entry,) = dicom.scan(study.folder)
    assert entry.action == "use" and "gantry tilt 15.0 deg" in entry.geometry[0]
    with pytest.warns(DicomGeometryWarning, match="gantry tilt 15.0 deg"):
        array, affine = read_volume(study.folder)
    assert array.shape == (24, 20, 10)
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    np.testing.assert_allclose(directions.T @ directions, np.eye(3), atol=1e-6)  # an orthogonal grid
    assert np.linalg.norm(affine[:3, 2]) == pytest.approx(2.0 * np.cos(tilt), rel=1e-4)
    expected = ramp(voxel_positions(affine, array.shape))
    inside = np.s_[:, 6:, :]  # rows whose source pixel lies inside every shifted slice
    np.testing.assert_allclose(array[inside], expected[inside], atol=0.6)
    # a DICOM SEG must match the source slices one to one: refused, with the reason
    with pytest.raises(DataError, match="gantry tilt.*no longer matches the source slices"):
        dicom_series_files(study.folder)


def test_missing_slice_is_interpolated_with_a_warning(tmp_path):
    study = Study(tmp_path / "gap")
    positions = [np.array([0.0, 0.0, 3.0 * k]) for k in range(9)]
    paths = ramp_series(study, 9, (1, 0, 0, 0, 1, 0), positions, spacing=(0.9, 0.9, 3.0), number=4)
    paths[4].unlink()
    (entry,) = dicom.scan(study.folder)
    assert entry.slices == 9 and "1 missing slice" in entry.geometry[0]
    with pytest.warns(DicomGeometryWarning, match=r"1 missing slice.*resampled to 9 slices at 3 mm"):
        array, affine = read_volume(study.folder)
    assert array.shape == (24, 20, 9)
    np.testing.assert_allclose(array, ramp(voxel_positions(affine, array.shape)), atol=0.6)


def test_uneven_spacing_is_resampled_to_its_median_gap(tmp_path):
    study = Study(tmp_path / "uneven")
    z = np.array([0.0, 2.0, 4.0, 6.3, 8.0, 10.0, 12.0])
    ramp_series(study, len(z), (1, 0, 0, 0, 1, 0), [np.array([0.0, 0.0, v]) for v in z], number=4)
    with pytest.warns(DicomGeometryWarning, match="uneven slice spacing"):
        array, affine = read_volume(study.folder)
    assert array.shape[2] == 7 and affine[2, 2] == pytest.approx(2.0)
    np.testing.assert_allclose(array, ramp(voxel_positions(affine, array.shape)), atol=0.6)


def legacy_multiframe(source: list[Path], path: Path, reverse: bool = False) -> Path:
    """An enhanced multi-frame CT object made from a classic series (highdicom's legacy conversion)."""
    hd = pytest.importorskip("highdicom")
    datasets = [pydicom.dcmread(p) for p in source]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        multiframe = hd.legacy.LegacyConvertedEnhancedCTImage(
            legacy_datasets=datasets[::-1] if reverse else datasets, series_instance_uid=generate_uid(), series_number=30,
            sop_instance_uid=generate_uid(), instance_number=1,
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    multiframe.save_as(path)
    return path


@pytest.mark.parametrize("reverse", [False, True], ids=["frames_in_order", "frames_reversed"])
def test_enhanced_multiframe_ct_is_read_like_its_classic_series(tmp_path, reverse):
    study = Study(tmp_path / "classic")
    volume = body_volume(8)
    source = study.series(volume, number=3)
    path = legacy_multiframe(source, tmp_path / "mf" / "MF0001", reverse)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert int(ds.NumberOfFrames) == 8 and "ImagePositionPatient" not in ds  # geometry only per frame
    expected, expected_affine = read_volume(study.folder)
    array, affine = read_volume(path.parent)
    np.testing.assert_allclose(array, expected)
    np.testing.assert_allclose(affine, expected_affine, atol=1e-4)
    (entry,) = dicom.scan(path.parent)
    assert (entry.kind, entry.files, entry.slices, entry.orientation) == ("image", 1, 8, "axial")
    z = [float(g.PlanePositionSequence[0].ImagePositionPatient[2]) for g in ds.PerFrameFunctionalGroupsSequence]
    if z == sorted(z):
        assert dicom_series_files(path.parent)[0] == [str(path)]
    else:  # a SEG's frames follow the source's frames: a multi-frame stored against slice order is refused
        with pytest.raises(DataError, match="not stored in slice order"):
            dicom_series_files(path.parent)


@pytest.mark.parametrize("codec", ["JPEG2000", "JPEG", "RLE"])
def test_compressed_series_are_decoded_by_gdcm(tmp_path, codec):
    """JPEG 2000 and JPEG lossless written by SimpleITK's GDCM, RLE by pydicom; read back exactly."""
    study = Study(tmp_path / "plain")
    volume = body_volume(6)
    source = study.series(volume, number=3)
    compressed = tmp_path / "compressed"
    compressed.mkdir()
    for index, path in enumerate(source):
        target = compressed / f"IM{index + 1:04d}"
        if codec == "RLE":
            ds = pydicom.dcmread(path)
            ds.compress(pydicom.uid.RLELossless)
            ds.save_as(target)
        else:
            writer = sitk.ImageFileWriter()
            writer.SetImageIO("GDCMImageIO")
            writer.KeepOriginalImageUIDOn()
            writer.UseCompressionOn()
            writer.SetCompressor(codec)
            writer.SetFileName(str(target))
            image = sitk.ReadImage(str(path))  # HU as int32: JPEG codecs want 16 bits
            stored = sitk.Cast(image, sitk.sitkInt16)
            for key in image.GetMetaDataKeys():
                stored.SetMetaData(key, image.GetMetaData(key))
            stored.SetMetaData("0028|1052", "0")  # the values are HU now
            stored.SetMetaData("0028|1053", "1")
            writer.Execute(stored)
    syntax = pydicom.dcmread(compressed / "IM0001", stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert syntax.is_compressed
    (entry,) = dicom.scan(compressed)
    assert entry.transfer_syntax == syntax.name
    array, affine = read_volume(compressed)
    expected, expected_affine = read_volume(study.folder)
    np.testing.assert_allclose(array, expected)
    np.testing.assert_allclose(affine, expected_affine, atol=1e-4)


# --------------------------------------------------------------------------------------------
# datalist build: patient folders, --series, labels never dropped
# --------------------------------------------------------------------------------------------


def save_label(path: Path, image_path, threshold: float = 0.0) -> Path:
    """A label on the image's own grid (what a lab exports from Slicer next to the series)."""
    import nibabel as nib

    array, affine = read_volume(image_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image((array > threshold).astype(np.uint8), affine), str(path))
    return path


def test_datalist_build_patient_folders(tmp_path):
    from pipeline.data import build_datalist, validate_datalist

    root = tmp_path / "study"
    Study(root / "p1" / "CT", patient="A^A").series(body_volume(6), number=2)
    save_label(root / "p1" / "label.nii.gz", root / "p1" / "CT")
    Study(root / "p2" / "CT", patient="B^B").series(body_volume(5), number=2)  # no label yet: a test case
    flat_export(root / "p3" / "export")  # a whole PACS export inside the patient folder
    content_error = None
    with pytest.raises(DataError, match=r"p3/: several image series .*choose with --series") as content_error:
        build_datalist(root)
    assert "p1" not in str(content_error.value)  # only the folder that needs a choice is named

    reference = next(e for e in dicom.select(dicom.scan(root / "p3"), dicom.SeriesSelection.parse(["axial-thinnest"]))
                     if e.action == "use").path
    save_label(root / "p3" / "seg.nii.gz", reference)
    content = build_datalist(root, series=["axial-thinnest"])
    assert content["training"] == [
        {"image": "p1/CT/", "label": "p1/label.nii.gz"},
        {"image": "p3/export" + reference[len(str(root / "p3" / "export")):], "label": "p3/seg.nii.gz"},
    ]
    assert content["test"] == [{"image": "p2/CT/"}]
    assert content["labels"] == {"0": "background", "1": "class_1"}
    assert {row["series"].split(" (")[0] for row in content["skipped_series"]} >= {"series 1", "series 2", "series 4"}
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(content))
    assert validate_datalist(datalist, root) == []  # the reference reads, the label sits on its grid


@pytest.mark.parametrize(
    "layout, message",
    [
        ("label_without_image", r"p4/: a label \(p4/label.nii.gz\) but no image"),
        ("two_labels", r"p1/: 2 label files"),
        ("labels_tr_orphan", r"labelsTr: 1 label\(s\) without an image of the same name: .*orphan.nii.gz"),
        # pydicom's real RTSTRUCT was drawn on another series than p1's CT: listed, it would mislabel p1
        ("rtstruct_of_another_series", r"p1/: the label p1/RT/RS0001 references series .* but the image p1/CT/ is series"),
    ],
)
def test_datalist_build_never_drops_a_label_silently(tmp_path, layout, message):
    import shutil

    from pipeline.data import build_datalist, datalist_main

    root = tmp_path / "data"
    if layout == "labels_tr_orphan":
        Study(root / "imagesTr" / "a").series(body_volume(4))
        save_label(root / "labelsTr" / "a.nii.gz", root / "imagesTr" / "a")
        shutil.copy(root / "labelsTr" / "a.nii.gz", root / "labelsTr" / "orphan.nii.gz")
    else:
        Study(root / "p1" / "CT").series(body_volume(4))
        if layout == "label_without_image":
            save_label(root / "p4" / "label.nii.gz", root / "p1" / "CT")
        elif layout == "two_labels":
            save_label(root / "p1" / "label.nii.gz", root / "p1" / "CT")
            save_label(root / "p1" / "liver_mask.nii.gz", root / "p1" / "CT")
        else:
            (root / "p1" / "RT").mkdir()
            rtstruct = pydicom.dcmread(get_testdata_file("rtstruct.dcm"), force=True)  # a real RTSTRUCT, as a Part 10 file
            rtstruct.file_meta = FileMetaDataset()
            rtstruct.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
            rtstruct.file_meta.MediaStorageSOPClassUID = rtstruct.SOPClassUID
            rtstruct.file_meta.MediaStorageSOPInstanceUID = rtstruct.SOPInstanceUID
            rtstruct.save_as(root / "p1" / "RT" / "RS0001", enforce_file_format=True)
    with pytest.raises(DataError, match=message):
        build_datalist(root)
    assert datalist_main(["build", str(root), "--output", str(tmp_path / "out.json")]) == 1
    assert not (tmp_path / "out.json").exists()


def test_datalist_build_command_with_series(tmp_path, capsys):
    from pipeline.data import datalist_main

    root = tmp_path / "data"
    flat_export(root / "p1" / "export")
    assert datalist_main(["build", str(root), "--series", "description~venous", "--output", str(tmp_path / "d.json")]) == 0
    content = json.loads((tmp_path / "d.json").read_text())
    assert content["test"][0]["image"].startswith("p1/export?series=")
    assert content["series_rules"] == ["description~venous"]
    assert datalist_main(["build", str(root), "--series", "nonsense"]) == 1
    assert "--series 'nonsense'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# RTSTRUCT out
# --------------------------------------------------------------------------------------------


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def test_rtstruct_round_trip_on_a_real_sized_ct(tmp_path):
    """Mask -> RTSTRUCT -> rasterised mask on a 256 x 256 x 40 CT: Dice >= 0.98 per class, the
    ROIs referencing the source slices, only the required patient/study attributes copied."""
    from pipeline.readers import read_rtstruct
    from pipeline.segment.writers import write_rtstruct

    study = Study(tmp_path / "ct")
    source = study.series(body_volume(40, size=256), spacing=(0.7, 0.7, 2.5), number=3)
    for path in source:  # identifying attributes an RTSTRUCT has no business carrying
        ds = pydicom.dcmread(path)
        ds.PatientAddress, ds.OtherPatientIDs, ds.InstitutionName = "1 Main St", "OTHER-7", "General Hospital"
        ds.save_as(path)
    image, affine = read_volume(study.folder)
    mask = np.zeros(image.shape, np.uint8)
    mask[image > -400] = 1  # the body, with holes where the lungs and bowel gas are
    mask[image > 150] = 2  # bone and contrast
    out = tmp_path / "rt.dcm"
    write_rtstruct(mask, affine, str(study.folder), {1: "body", 2: "bone"}, out)

    rt = pydicom.dcmread(out)
    assert rt.Modality == "RTSTRUCT" and [r.ROIName for r in rt.StructureSetROISequence] == ["body", "bone"]
    assert (rt.PatientName, rt.PatientID, rt.StudyInstanceUID) == ("Doe^Jane", "MRN0042", study.study_uid)
    assert not any(k in rt for k in ("PatientAddress", "OtherPatientIDs", "InstitutionName", "StudyDescription"))
    series_ref = rt.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    sources = {pydicom.dcmread(p).SOPInstanceUID: p for p in source}
    assert series_ref.SeriesInstanceUID == pydicom.dcmread(source[0]).SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in series_ref.ContourImageSequence} == set(sources)
    for contour in rt.ROIContourSequence[0].ContourSequence:  # each contour lies on the slice it references
        z = float(contour.ContourData[2])
        referenced = pydicom.dcmread(sources[contour.ContourImageSequence[0].ReferencedSOPInstanceUID])
        assert z == pytest.approx(float(referenced.ImagePositionPatient[2]), abs=1e-3)

    back, back_affine, classes = read_rtstruct(out, study.folder)
    assert classes == {1: "body", 2: "bone"}
    np.testing.assert_allclose(back_affine, affine, atol=1e-4)
    for value in (1, 2):
        assert dice(back == value, mask == value) >= 0.98
    only_bone, _, _ = read_rtstruct(out, study.folder, roi_names={"BONE": 5})
    assert set(np.unique(only_bone).tolist()) == {0, 5}
    with pytest.raises(DataError, match="no ROI named liver"):
        read_rtstruct(out, study.folder, roi_names=["liver"])


def test_rtstruct_of_a_tilted_series_lies_in_the_source_planes(tmp_path):
    from pipeline.readers import read_rtstruct
    from pipeline.segment.writers import write_rtstruct

    tilt = np.radians(15)
    orientation = (1, 0, 0, 0, np.cos(tilt), np.sin(tilt))
    study = Study(tmp_path / "tilt")
    paths = ramp_series(study, 10, orientation, [np.array([-10.0, -8.0, 2.0 * k]) for k in range(10)], number=9)
    with pytest.warns(DicomGeometryWarning):
        image, affine = read_volume(study.folder)
    mask = np.zeros(image.shape, np.uint8)
    mask[5:15, 8:16, 2:8] = 1
    write_rtstruct(mask, affine, str(study.folder), {1: "box"}, tmp_path / "rt.dcm")
    rt = pydicom.dcmread(tmp_path / "rt.dcm")
    planes = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in paths}
    normal = np.cross(orientation[:3], orientation[3:])
    for contour in rt.ROIContourSequence[0].ContourSequence:
        source = planes[contour.ContourImageSequence[0].ReferencedSOPInstanceUID]
        points = np.asarray(contour.ContourData, float).reshape(-1, 3)
        distance = (points - np.asarray(source.ImagePositionPatient, float)) @ normal
        np.testing.assert_allclose(distance, 0, atol=1e-3)
    back, _, _ = read_rtstruct(tmp_path / "rt.dcm", study.folder)  # reads headers only: no warning
    assert dice(back == 1, mask == 1) == 1.0


def test_segment_export_to_rtstruct_and_dicom_seg_read_back(tmp_path, checkpoint):
    """A study export in; NIfTI, RTSTRUCT and DICOM SEG out; each read back with its library and
    compared with the NIfTI mask on the source series' grid."""
    hd = pytest.importorskip("highdicom")
    import nibabel as nib

    from pipeline.readers import read_rtstruct

    root = nested_export(tmp_path / "cd")
    output = tmp_path / "out"
    assert run_segment(checkpoint, root, output, "--series", "axial-thinnest", "--format", "rtstruct", "--format", "dicom-seg") == 0
    (case_id, row), = summary_rows(output).items()
    assert set(row["outputs"]) == {"mask", "rtstruct", "dicom_seg"}
    chosen = next(e for e in dicom.scan(root) if e.series_number == 3)
    mask_image = nib.load(output / f"{case_id}_seg.nii.gz")
    mask = np.asarray(mask_image.dataobj)
    image, affine = read_volume(chosen.folder)
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask_image.affine, affine, atol=1e-4)

    rasterised, rt_affine, classes = read_rtstruct(output / f"{case_id}_rtstruct.dcm", chosen.folder)
    np.testing.assert_allclose(rt_affine, affine, atol=1e-4)
    assert dice(rasterised > 0, mask > 0) >= 0.98

    seg = hd.seg.segread(str(output / f"{case_id}_seg.dcm"))
    files, _ = dicom_series_files(chosen.folder)
    uids = [pydicom.dcmread(f).SOPInstanceUID for f in files]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])[..., 0]
    assert dice(frames.transpose(2, 1, 0) > 0, mask == 1) == 1.0


# --------------------------------------------------------------------------------------------
# --pseudonymise
# --------------------------------------------------------------------------------------------


def test_pseudonymised_case_ids_keep_names_out_of_outputs(tmp_path, checkpoint, capsys, monkeypatch):
    """A patient's name as the folder name (it happens) reaches no output name, no summary.csv
    row, no QA page and no log line; phi_map.csv (mode 600) links the id back; reruns keep it."""
    import csv
    import stat

    monkeypatch.delenv("PIPELINE_PSEUDONYM_KEY", raising=False)
    root = nested_export(tmp_path / "Doe_Jane_MRN0042")
    output = tmp_path / "out"
    args = ("--series", "axial-thinnest", "--pseudonymise", "--qa-png")
    assert run_segment(checkpoint, root, output, *args) == 0
    (case_id, row), = summary_rows(output).items()
    assert case_id.startswith("case-") and len(case_id) == 17 and row["source"] == case_id
    written = [p.relative_to(output).as_posix() for p in output.rglob("*")]
    logs = capsys.readouterr().err
    for text in [*written, (output / "summary.csv").read_text(), (output / "qa" / "index.html").read_text(),
                 (output / "skipped_series.json").read_text(), logs]:
        assert "Doe" not in text and "MRN0042" not in text
    phi_map = output / "phi_map.csv"
    assert stat.S_IMODE(phi_map.stat().st_mode) == 0o600
    assert stat.S_IMODE((output / ".pseudonym.key").stat().st_mode) == 0o600
    (linked,) = list(csv.DictReader(phi_map.open()))
    chosen = next(e for e in dicom.scan(root) if e.series_number == 3)
    assert (linked["case_id"], linked["patient_id"], linked["patient_name"], linked["series_uid"]) == (
        case_id, "MRN0042", "Doe^Jane", chosen.series_uid)
    assert "Doe_Jane_MRN0042" in linked["input"] and linked["source"].startswith("PT000000/")
    # the same key (kept in OUT) gives the same id: the rerun finds the case done
    assert run_segment(checkpoint, root, output, *args) == 0
    assert {k: r["status"] for k, r in summary_rows(output).items()} == {case_id: "existing"}
    # another key, another id: the pseudonyms cannot be recomputed from the UIDs alone
    monkeypatch.setenv("PIPELINE_PSEUDONYM_KEY", "another secret")
    from pipeline.segment import discover_cases
    from pipeline.segment.cases import pseudonymise_cases

    (other,) = pseudonymise_cases(discover_cases(root, series=["axial-thinnest"]), b"another secret")
    assert other.case_id != case_id and other.case_id.startswith("case-")


def test_a_slice_whose_header_is_damaged_stops_its_series_naming_it(tmp_path):
    """A file with the DICOM preamble whose header does not parse is damaged, not foreign: skipping
    it would silently drop a slice (then interpolated as a 'missing slice')."""
    study = Study(tmp_path / "ct")
    paths = study.series(body_volume(6), number=2)
    content = bytearray(paths[2].read_bytes())
    content[132:140] = b"\x02\x00\x00\x00ZZ\xff\xff"  # the first element's VR and length destroyed
    paths[2].write_bytes(bytes(content))
    with pytest.raises(DataError, match=r"IM0003: unreadable DICOM header"):
        read_volume(study.folder)
    (entry,) = dicom.scan(study.folder)
    assert entry.action == "refuse" and "IM0003" in entry.why


def test_a_geometry_correction_is_a_warning_in_the_segment_summary(tmp_path, checkpoint):
    study = Study(tmp_path / "gap")
    positions = [np.array([0.0, 0.0, 3.0 * k]) for k in range(12)]
    paths = ramp_series(study, 12, (1, 0, 0, 0, 1, 0), positions, spacing=(0.9, 0.9, 3.0), number=4)
    paths[5].unlink()
    assert run_segment(checkpoint, tmp_path / "gap", tmp_path / "out", "--series", "all") == 0  # the reader warns in its process
    (row,) = summary_rows(tmp_path / "out").values()
    assert row["status"] == "done" and any("1 missing slice" in w for w in row["warnings"]), row
    assert "missing slice" in (tmp_path / "out" / "summary.csv").read_text().splitlines()[1]
