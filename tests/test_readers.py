"""Readers on real files: DICOM series round trips, real pydicom/nibabel test data, NRRD/MHA, bad series."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

from pipeline.data import DataError
from pipeline.readers import (
    DicomGeometryWarning,
    GuardedNibabelReader,
    SimpleITKReader,
    c_order,
    dicom_series_files,
    read_volume,
    sitk_image_from_array,
    write_dicom_series,
)
from pipeline.transforms import LoadVolumed, inference_transforms

PYDICOM_DATA = Path(pydicom.__file__).parent / "data" / "test_files"
CT5N = PYDICOM_DATA / "dicomdirtests" / "98892001" / "CT5N"
ANATOMICAL = Path(nib.__file__).parent / "tests" / "data" / "anatomical.nii"


def oriented(path) -> "np.ndarray, np.ndarray":
    """Load a path the way the pipeline does, then reorient to RAS: (C, X, Y, Z) array, affine."""
    chain = Compose([LoadVolumed("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS", labels=None)])
    image = chain({"image": str(path)})["image"]
    return image.numpy(), image.affine.numpy()


def rotation(degrees: float, axis: int) -> np.ndarray:
    angle = np.deg2rad(degrees)
    c, s = np.cos(angle), np.sin(angle)
    i, j = [a for a in range(3) if a != axis]
    rot = np.eye(3)
    rot[i, i], rot[i, j], rot[j, i], rot[j, j] = c, -s, s, c
    return rot


AFFINES = {
    "RAS": np.diag([0.8, 0.9, 2.5, 1.0]),
    "LAS": np.diag([-0.8, 0.9, 2.5, 1.0]),
    "oblique": np.eye(4),
}
AFFINES["oblique"][:3, :3] = rotation(20, 0) @ rotation(-12, 2) @ np.diag([-0.8, 0.9, 2.5])
for affine in AFFINES.values():
    affine[:3, 3] = [-40.0, 12.5, 70.0]


@pytest.mark.parametrize("orientation", sorted(AFFINES))
def test_nifti_to_dicom_series_round_trip(tmp_path, orientation):
    """A NIfTI written as a DICOM series loads back with the same voxels and affine after orientation."""
    affine = AFFINES[orientation]
    volume = np.random.RandomState(1).randint(-1000, 2000, size=(20, 17, 9)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "volume.nii.gz")
    files = write_dicom_series(volume, affine, tmp_path / "series", modality="CT")
    assert len(files) == 9
    assert pydicom.dcmread(files[0]).Modality == "CT"

    from_nifti, affine_nifti = oriented(tmp_path / "volume.nii.gz")
    from_dicom, affine_dicom = oriented(tmp_path / "series")
    assert from_dicom.shape == from_nifti.shape
    np.testing.assert_array_equal(from_dicom, from_nifti)
    np.testing.assert_allclose(affine_dicom, affine_nifti, atol=1e-4)

    # and the whole inference chain (intensity, body crop) agrees too
    nifti_item = inference_transforms(preset="ct")({"image": str(tmp_path / "volume.nii.gz")})["image"]
    dicom_item = inference_transforms(preset="ct")({"image": str(tmp_path / "series")})["image"]
    np.testing.assert_allclose(dicom_item.numpy(), nifti_item.numpy(), atol=1e-6)
    np.testing.assert_allclose(dicom_item.affine.numpy(), nifti_item.affine.numpy(), atol=1e-4)


def test_ct5n_series_sorted_by_position_not_instance_number():
    """pydicom's CT5N: instance numbers 6..10 run from high z to low z; slices must come out by z."""
    headers = [pydicom.dcmread(f) for f in sorted(CT5N.iterdir())]
    by_instance = sorted(headers, key=lambda h: int(h.InstanceNumber))
    z_by_instance = [float(h.ImagePositionPatient[2]) for h in by_instance]
    assert z_by_instance == sorted(z_by_instance, reverse=True)  # the trap is real

    files, _ = dicom_series_files(CT5N)
    z_sorted = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files]
    assert z_sorted == sorted(z_sorted)

    array, affine = read_volume(CT5N)
    assert array.shape == (16, 16, 5)
    assert affine[2, 2] == pytest.approx(2.5)  # +z, slice spacing 2.5 mm
    assert affine[2, 3] == pytest.approx(min(z_sorted))
    for k, f in enumerate(files):  # slice k is the k-th lowest file, pixels transposed to (i, j)
        ds = pydicom.dcmread(f)
        expected = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        np.testing.assert_array_equal(array[:, :, k], expected.T)


def test_single_dicom_file_and_metadata():
    """A lone .dcm file is a one-slice volume; MONAI metadata is complete."""
    reader = SimpleITKReader()
    array, meta = reader.get_data(reader.read(str(PYDICOM_DATA / "CT_small.dcm")))
    assert array.shape == (128, 128, 1)
    assert meta["spatial_shape"].tolist() == [128, 128, 1]
    assert meta["affine"].shape == (4, 4) and np.allclose(meta["affine"], meta["original_affine"])
    assert meta["filename_or_obj"].endswith("CT_small.dcm")
    assert meta["space"] == "RAS"


def test_monai_loadimaged_with_simpleitk_reader():
    """The reader plugs into MONAI's own LoadImaged (affine RAS, like NibabelReader)."""
    loaded = LoadImaged("image", reader=SimpleITKReader(), ensure_channel_first=True)({"image": str(CT5N)})
    image = loaded["image"]
    assert tuple(image.shape) == (1, 16, 16, 5)
    assert image.meta["filename_or_obj"] == str(CT5N)
    assert image.affine[0, 0] < 0 and image.affine[1, 1] < 0  # LPS identity directions in RAS


def test_anatomical_nii_las_big_endian():
    """nibabel's anatomical.nii (LAS, big-endian) loads and reorients like nibabel's canonical."""
    image, affine = oriented(ANATOMICAL)
    canonical = nib.as_closest_canonical(nib.load(ANATOMICAL))
    assert image.shape == (1, 33, 41, 25)
    np.testing.assert_array_equal(image[0], canonical.get_fdata())
    np.testing.assert_allclose(affine, canonical.affine)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
def test_nrrd_mha_match_nifti(tmp_path, suffix):
    """NRRD and MetaImage through SimpleITK equal the NIfTI through nibabel (after orientation)."""
    affine = AFFINES["oblique"]
    volume = np.random.RandomState(2).rand(11, 12, 7).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "v.nii.gz")
    sitk.WriteImage(sitk_image_from_array(volume, affine), str(tmp_path / f"sitk{suffix}"))
    reader = SimpleITKReader()
    array, meta = reader.get_data(reader.read(str(tmp_path / f"sitk{suffix}")))
    np.testing.assert_array_equal(array, volume)
    np.testing.assert_allclose(meta["affine"], affine, atol=1e-5)
    if suffix != ".nii.gz":
        a, b = oriented(tmp_path / f"sitk{suffix}"), oriented(tmp_path / "v.nii.gz")
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_allclose(a[1], b[1], atol=1e-5)


# ------------------------------------------------------------------ bad series


def _listing(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _series(tmp_path, name="series", n=6, **kwargs) -> Path:
    volume = np.arange(4 * 5 * n, dtype=np.int16).reshape(4, 5, n)
    write_dicom_series(volume, np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / name, **kwargs)
    return tmp_path / name


def test_empty_dicom_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not dicom")
    with pytest.raises(DataError, match=r"empty.*no DICOM files"):
        read_volume(tmp_path / "empty")
    assert _listing(tmp_path / "empty") == {"notes.txt": b"not dicom"}


def test_folder_mixing_two_series(tmp_path):
    first = _series(tmp_path, "a", n=4, series_description="first")
    second = _series(tmp_path, "b", n=3, series_description="second")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in first.iterdir():
        shutil.copy(f, mixed / f"a_{f.name}")
    for f in second.iterdir():
        shutil.copy(f, mixed / f"b_{f.name}")
    before = _listing(mixed)
    with pytest.raises(DataError, match=r"mixed: holds 2 DICOM series.*series_uid"):
        read_volume(mixed)
    uid = pydicom.dcmread(next(second.iterdir())).SeriesInstanceUID
    array, _ = read_volume(mixed, series_uid=uid)  # choosing one works
    assert array.shape == (4, 5, 3)
    with pytest.raises(DataError, match="no series with SeriesInstanceUID 1.2.3"):
        read_volume(mixed, series_uid="1.2.3")
    assert _listing(mixed) == before


def test_duplicate_slice_positions(tmp_path):
    folder = _series(tmp_path, n=5)
    files = sorted(folder.iterdir())
    ds = pydicom.dcmread(files[3])
    ds.ImagePositionPatient = pydicom.dcmread(files[2]).ImagePositionPatient
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(files[3])
    with pytest.raises(DataError, match=r"series: duplicate slice position .* slice_000[23].dcm and slice_000[23].dcm"):
        read_volume(folder)


def test_missing_slice_is_resampled_with_a_warning_and_refused_where_slices_must_match(tmp_path):
    """A gap in the stack is filled by linear interpolation (the values here are linear in k, so
    the filled slice equals the lost one), with a warning; a DICOM SEG's file list refuses it."""
    folder = _series(tmp_path, n=6)
    original = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    (folder / "slice_0003.dcm").unlink()
    with pytest.warns(DicomGeometryWarning, match=r"1 missing slice.*resampled to 6 slices at 2 mm"):
        array, affine = read_volume(folder)
    np.testing.assert_allclose(array, original, atol=1e-4)
    assert affine[2, 2] == pytest.approx(2.0)
    with pytest.warns(DicomGeometryWarning):  # through the pipeline's loader as well
        loaded = LoadVolumed("image")({"image": str(folder)})["image"]
    assert tuple(loaded.shape) == (4, 5, 6)
    with pytest.raises(DataError, match=r"missing slice.*no longer matches the source slices"):
        dicom_series_files(folder)


def test_write_dicom_series_refuses_non_integer_values(tmp_path):
    with pytest.raises(ValueError, match="round"):
        write_dicom_series(np.full((2, 2, 2), 0.5), np.eye(4), tmp_path / "s")
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("dtype,slope", [(np.float32, None), (np.int16, 2.5), (">i2", None), (np.uint8, None)])
def test_gzipped_nifti_reads_the_voxels_nibabel_reads_in_c_order_and_closes_its_file(tmp_path, dtype, slope):
    rng = np.random.default_rng(3)
    array = (rng.normal(size=(37, 29, 11)) * 40).astype(dtype)
    image = nib.Nifti1Image(array, AFFINES["oblique"])
    if slope is not None:
        image.header.set_slope_inter(slope, -7.0)
    path = tmp_path / "volume.nii.gz"
    nib.save(image, str(path))
    expected = np.asanyarray(nib.load(str(path)).dataobj)  # nibabel's own (zlib) reading, scaled
    reader = GuardedNibabelReader()
    loaded = reader.read(str(path))
    stream = loaded.file_map["image"].fileobj
    array_read, meta = reader.get_data(loaded)
    assert type(stream).__module__.startswith("isal") and stream.closed  # ISA-L decompressed it
    assert array_read.flags.c_contiguous and array_read.dtype == expected.dtype
    np.testing.assert_array_equal(array_read, expected)
    np.testing.assert_allclose(meta["affine"], AFFINES["oblique"], atol=1e-5)
    loaded = LoadVolumed("image")({"image": str(path)})["image"]
    np.testing.assert_array_equal(loaded.numpy(), expected.astype(np.float32))
    assert loaded.meta["filename_or_obj"] == str(path)


@pytest.mark.parametrize("damage", ["cut", "flipped"])
def test_a_damaged_gzip_nifti_is_refused_naming_the_file(tmp_path, damage):
    path = tmp_path / "damaged.nii.gz"
    nib.save(nib.Nifti1Image(np.arange(40 * 40 * 40, dtype=np.float32).reshape(40, 40, 40), np.eye(4)), str(path))
    raw = bytearray(path.read_bytes())
    if damage == "cut":
        raw = raw[: len(raw) // 2]
    else:  # one byte of the deflate stream in the voxels, far from the header: a CRC or stream error
        raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"damaged\.nii\.gz: "):
        LoadVolumed("image")({"image": str(path)})


@pytest.mark.parametrize("shape", [(130, 7, 9), (1, 1, 1), (64, 64, 3), (5, 200, 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.int16, np.uint8, np.float64])
def test_c_order_equals_numpy_for_fortran_volumes(shape, dtype):
    array = np.asfortranarray(np.random.default_rng(0).integers(0, 100, shape).astype(dtype))
    out = c_order(array, block=16)
    assert out.flags.c_contiguous and out.dtype == array.dtype
    np.testing.assert_array_equal(out, array)


def test_c_order_leaves_other_layouts_to_numpy():
    array = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    assert c_order(array) is array  # already C: no copy
    for other in (np.asfortranarray(array.reshape(4, 6)), np.asfortranarray(array.reshape(1, 2, 3, 4)), array.transpose(1, 0, 2)):
        out = c_order(other)
        assert out.flags.c_contiguous
        np.testing.assert_array_equal(out, other)
