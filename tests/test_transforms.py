"""Transform presets on real files: shapes, intensity presets, body crop, 2D slice sampling, inversion."""

from __future__ import annotations

import hashlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.readers import read_volume, write_dicom_series
from pipeline.transforms import (
    PRESETS,
    Preset,
    eval_transforms,
    inference_transforms,
    intensity_transforms,
    postprocessing,
    train_transforms,
)

LPS = np.diag([-1.2, -1.0, 2.0, 1.0])
LPS[:3, 3] = [30.0, 20.0, -15.0]
BODY = (slice(3, 17), slice(4, 19), slice(2, 15))  # voxels inside the "patient"


def phantom(root: Path, affine=LPS, shape=(20, 22, 17), name: str = "ct") -> dict:
    """CT-like volume: air (-1000) around a body box (40 HU) holding an organ ball (200 HU, label 1)."""
    image = np.full(shape, -1000, np.int16)
    image[BODY] = 40
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    ball = ((grid - np.array([10, 11, 8])[:, None, None, None]) ** 2).sum(0) <= 16
    image[ball] = 200
    root.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), root / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(ball.astype(np.uint8), affine), root / f"{name}_label.nii.gz")
    return {"image": str(root / f"{name}.nii.gz"), "label": str(root / f"{name}_label.nii.gz")}


def digest(root: Path) -> dict:
    return {str(p): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_train_3d_shapes_and_positive_crops(tmp_path):
    item = phantom(tmp_path)
    samples = train_transforms(preset="ct", pixdim=(1.5, 1.5, 1.5), roi_size=(16, 16, 16), num_samples=3, neg=0)(item)
    assert len(samples) == 3
    for sample in samples:
        assert tuple(sample["image"].shape) == (1, 16, 16, 16) and tuple(sample["label"].shape) == (1, 16, 16, 16)
        assert sample["image"].dtype == torch.float32
        assert set(torch.unique(sample["label"]).tolist()) <= {0.0, 1.0}
    # pos=1, neg=0: every crop is centred on the organ (before flips/affine it always holds some)
    plain = train_transforms(preset="ct", roi_size=(8, 8, 8), num_samples=4, neg=0, augment=False)(item)
    assert all(s["label"].sum() > 0 for s in plain)


def test_roi_larger_than_volume_is_padded(tmp_path):
    item = phantom(tmp_path)
    samples = train_transforms(preset="ct", roi_size=(32, 32, 32), num_samples=1, augment=False, cache_safe=False)(item)
    assert tuple(samples[0]["image"].shape) == (1, 32, 32, 32)


def test_train_2d_slices_sampled_from_volumes_without_writing(tmp_path):
    item = phantom(tmp_path)
    before = digest(tmp_path)
    samples = train_transforms(spatial_dims=2, preset="ct", pixdim=(1.0, 1.0), roi_size=(24, 20), num_samples=4)(item)
    assert digest(tmp_path) == before  # no slice files written
    assert len(samples) == 4
    assert all(tuple(s["image"].shape) == (1, 24, 20) and tuple(s["label"].shape) == (1, 24, 20) for s in samples)

    # each 2D sample is an 8x8 window of one axial (RAS x-y) slice of the preprocessed volume
    plain = train_transforms(spatial_dims=2, preset="ct", roi_size=(8, 8), num_samples=2, augment=False, neg=0)(item)
    volume = eval_transforms(preset="ct")(item)["image"][0]
    X, Y, Z = volume.shape
    windows = [volume[x : x + 8, y : y + 8, z] for z in range(Z) for x in range(X - 7) for y in range(Y - 7)]
    for sample in plain:
        assert sample["label"].sum() > 0
        assert any(torch.equal(sample["image"][0], window) for window in windows)


def test_train_2d_from_2d_images(tmp_path):
    image = np.random.RandomState(0).rand(40, 36).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.diag([-1.0, -1.0, 1.0, 1.0])), tmp_path / "i.nii.gz")
    nib.save(nib.Nifti1Image((image > 0.5).astype(np.uint8), np.diag([-1.0, -1.0, 1.0, 1.0])), tmp_path / "l.nii.gz")
    item = {"image": str(tmp_path / "i.nii.gz"), "label": str(tmp_path / "l.nii.gz")}
    samples = train_transforms(spatial_dims=2, preset="scale", roi_size=(32, 32), num_samples=2)(item)
    assert [tuple(s["image"].shape) for s in samples] == [(1, 32, 32)] * 2
    whole = eval_transforms(spatial_dims=2, preset="scale")(item)
    assert tuple(whole["image"].shape) == (1, 40, 36, 1)  # a one-slice volume for SliceInferer


def test_ct_window_and_percentile_presets(tmp_path):
    item = phantom(tmp_path)
    windowed = eval_transforms(preset="ct", intensity={"a_min": -100, "a_max": 300})(item)["image"]
    assert windowed.min() >= 0 and windowed.max() <= 1
    assert np.isclose(windowed.max().item(), 0.75)  # 200 HU in [-100, 300]
    scaled = eval_transforms(preset="ct", intensity={"percentiles": (1, 99)})(item)["image"]
    # 1st..99th percentiles are -1000 (air) and 200 (organ); after the body crop the minimum is the body's 40 HU
    assert np.isclose(scaled.max().item(), 1) and np.isclose(scaled.min().item(), 1040 / 1200)
    zscored = eval_transforms(preset="ct", intensity={"a_min": -100, "a_max": 300, "output": "zscore", "mean": 40, "std": 10})(item)["image"]
    assert np.isclose(zscored.max().item(), (200 - 40) / 10)
    with pytest.raises(ValueError, match="unknown CT intensity options"):
        intensity_transforms("ct", {"window": 1})
    with pytest.raises(ValueError, match="preset must be one of"):
        eval_transforms(preset="pet")


def test_mri_preset_zscore_on_nonzero_and_crop(tmp_path):
    image = np.zeros((16, 16, 12), np.float32)
    image[4:12, 3:13, 2:10] = np.random.RandomState(0).rand(8, 10, 8) * 500 + 100
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "t1.nii.gz")
    out = inference_transforms(preset="mri")({"image": str(tmp_path / "t1.nii.gz")})["image"]
    assert tuple(out.shape) == (1, 8, 10, 8)  # cropped to the non-zero head
    assert abs(out.mean().item()) < 1e-4 and abs(out.std(unbiased=False).item() - 1) < 1e-3


def test_a_new_preset_is_one_table_entry(tmp_path, monkeypatch):
    """Registering a Preset is all it takes: the chains use its intensity, options and foreground."""
    from monai.transforms import ScaleIntensityd

    monkeypatch.setitem(PRESETS, "organ", Preset(  # monkeypatch removes it again after the test
        intensity=lambda options, key: [ScaleIntensityd(key, minv=-1.0, maxv=float(options.get("maxv", 1.0)))],
        foreground=lambda x: x > 0.9,  # only the organ: the body (40 HU) scales to about 0.73
        options=frozenset({"maxv"}),
        description="test: scale to [-1, maxv], crop to the organ",
    ))
    item = phantom(tmp_path, affine=np.eye(4))
    out = eval_transforms(preset="organ")(item)
    assert tuple(out["image"].shape) == (1, 9, 9, 9)  # the organ ball's bounding box, not the body's
    assert torch.allclose(out["image"].max(), torch.tensor(1.0)) and out["image"].min() > 0.7
    assert out["label"].sum() == nib.load(item["label"]).get_fdata().sum()
    assert torch.allclose(eval_transforms(preset="organ", intensity={"maxv": 2.0})(item)["image"].max(), torch.tensor(2.0))
    with pytest.raises(ValueError, match="unknown ORGAN intensity options"):
        eval_transforms(preset="organ", intensity={"a_min": 0})


def test_eval_crops_to_body_bounding_box(tmp_path):
    item = phantom(tmp_path, affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    out = eval_transforms(preset="ct")(item)
    assert tuple(out["image"].shape) == (1, 14, 15, 13)  # the BODY box
    assert tuple(out["label"].shape) == (1, 14, 15, 13)
    assert out["label"].sum() == nib.load(item["label"]).get_fdata().sum()


def invert_and_save(preprocessing, item, out_dir, make_logits, **kwargs):
    data = preprocessing(item)
    data["pred"] = make_logits(data["image"])
    return postprocessing(preprocessing, output_dir=str(out_dir), **kwargs)(data)


def test_postprocessing_inverts_to_input_shape_and_affine(tmp_path):
    item = phantom(tmp_path)
    pre = eval_transforms(preset="ct", pixdim=(1.5, 1.5, 1.5), intensity={"a_min": -100, "a_max": 300})
    # logits > 0 exactly on the organ (0.75 after the window); the resampled grid differs from the input
    out = invert_and_save(pre, item, tmp_path / "out", lambda x: (x - 0.6) * 10)
    saved = nib.load(tmp_path / "out" / "ct_seg.nii.gz")
    reference = nib.load(item["label"])
    assert saved.shape == reference.shape == (20, 22, 17)
    np.testing.assert_allclose(saved.affine, reference.affine, atol=1e-5)
    assert saved.get_data_dtype() == np.uint8
    mask, truth = saved.get_fdata(), reference.get_fdata()
    dice = 2 * (mask * truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.85, dice  # nearest resampling to 1.5 mm and back loses only the rim
    assert tuple(out["pred"].shape) == (1, 20, 22, 17)


def test_postprocessing_multiclass_largest_component(tmp_path):
    item = phantom(tmp_path, affine=np.eye(4))
    pre = inference_transforms(preset="ct", intensity={"a_min": -100, "a_max": 300})

    def logits(x):
        scores = torch.cat([torch.full_like(x, 0.5), x, torch.zeros_like(x)])  # class 1 where x > 0.5
        scores[2, 0, 0, 0] = 5.0  # a stray one-voxel class-2 island next to...
        scores[2, 5:8, 5:8, 5:8] = 5.0  # ...a larger class-2 block
        return scores

    invert_and_save(pre, item, tmp_path / "out", logits, out_channels=3, largest_component=True)
    mask = nib.load(tmp_path / "out" / "ct_seg.nii.gz").get_fdata()
    assert mask.shape == (20, 22, 17)
    assert (mask == 2).sum() == 27 and mask[3, 4, 2] != 2  # island at the crop origin removed
    assert (mask == 1).sum() > 0


def test_postprocessing_2d_input_keeps_2d_shape(tmp_path):
    image = np.random.RandomState(0).rand(30, 26).astype(np.float32)
    affine = np.diag([-0.7, -0.7, 1.0, 1.0])
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "slice.nii.gz")
    pre = inference_transforms(spatial_dims=2, preset="scale", pixdim=(1.0, 1.0))
    invert_and_save(pre, {"image": str(tmp_path / "slice.nii.gz")}, tmp_path / "out", lambda x: x - 0.5)
    saved = nib.load(tmp_path / "out" / "slice_seg.nii.gz")
    assert saved.shape == (30, 26)
    np.testing.assert_allclose(saved.affine, nib.load(tmp_path / "slice.nii.gz").affine, atol=1e-6)


def test_postprocessing_on_dicom_series_input(tmp_path):
    """A mask predicted for a DICOM series lands on the series' own grid (shape and affine)."""
    item = phantom(tmp_path)
    volume, affine = read_volume(item["image"])
    write_dicom_series(volume, affine, tmp_path / "series_ct", modality="CT")
    # no resampling here, so the mask must match voxel for voxel after orientation + crop + inversion
    pre = inference_transforms(preset="ct", intensity={"a_min": -100, "a_max": 300})
    invert_and_save(pre, {"image": str(tmp_path / "series_ct")}, tmp_path / "out", lambda x: (x - 0.6) * 10)
    saved = nib.load(tmp_path / "out" / "series_ct_seg.nii.gz")
    series_volume, series_affine = read_volume(tmp_path / "series_ct")
    assert saved.shape == series_volume.shape
    np.testing.assert_allclose(saved.affine, series_affine, atol=1e-4)
    np.testing.assert_array_equal(saved.get_fdata() > 0, series_volume == 200)


def test_bad_arguments():
    with pytest.raises(ValueError, match="roi_size needs 2 values"):
        train_transforms(spatial_dims=2, roi_size=(96, 96, 96))
    with pytest.raises(ValueError, match="pixdim needs 3 values"):
        eval_transforms(pixdim=(1.0, 1.0))


def test_channel_files_are_stacked(tmp_path):
    """nnU-Net style ``case_0000``/``case_0001`` files load as one two-channel image."""
    item = phantom(tmp_path)
    out = eval_transforms(preset="mri", keys=("image",))({"image": [item["image"], item["image"]]})
    assert out["image"].shape[0] == 2 and torch.equal(out["image"][0], out["image"][1])


def test_loader_errors_name_the_file(tmp_path):
    """MONAI's Compose wraps errors in "applying transform ..."; the cause names the file."""
    from pipeline.data import DataError

    (tmp_path / "note.nii").write_text("not an image")
    for name, message in (("note.nii", "note.nii: cannot load"), ("nothing.nrrd", "nothing.nrrd: file not found")):
        with pytest.raises(RuntimeError) as raised:
            inference_transforms(preset="ct")({"image": str(tmp_path / name)})
        assert isinstance(raised.value.__cause__, DataError) and message in str(raised.value.__cause__)


def test_eval_volumes_feed_slice_inferer_along_the_training_axis(tmp_path):
    """2D training slices are planes of the last (S) axis, so the 2D bundle uses SliceInferer(spatial_dim=2)."""
    from monai.inferers import SliceInferer

    item = phantom(tmp_path)
    image = eval_transforms(preset="ct")(item)["image"][None]  # (1, 1, X, Y, Z)
    net = torch.nn.Conv2d(1, 2, kernel_size=1)
    out = SliceInferer(roi_size=(8, 8), sw_batch_size=4, spatial_dim=2)(image, net)
    assert out.shape == (1, 2) + tuple(image.shape[2:])
    assert torch.allclose(out[:, :, :, :, 3], net(image[:, :, :, :, 3]), atol=1e-5)


def test_batched_inference_round_trip(tmp_path):
    """The evaluator's path: DataLoader -> sliding window -> decollate -> postprocessing -> saved masks."""
    from monai.data import DataLoader, Dataset, decollate_batch
    from monai.inferers import sliding_window_inference

    items = [phantom(tmp_path, name="a"), phantom(tmp_path, np.diag([0.9, 1.1, 1.4, 1.0]), (18, 20, 15), name="b")]
    pre = eval_transforms(preset="ct", pixdim=(1.5, 1.5, 1.5), intensity={"a_min": -100, "a_max": 300})
    post = postprocessing(pre, out_channels=2, output_dir=str(tmp_path / "out"))
    net = torch.nn.Conv3d(1, 2, kernel_size=1)
    for batch in DataLoader(Dataset(items, pre), batch_size=1, num_workers=0):
        batch["pred"] = sliding_window_inference(batch["image"], (8, 8, 8), 2, net)
        for item in decollate_batch(batch):
            post(item)
    for name, item in zip("ab", items):
        saved, reference = nib.load(tmp_path / "out" / f"{name}_seg.nii.gz"), nib.load(item["image"])
        assert saved.shape == reference.shape
        np.testing.assert_allclose(saved.affine, reference.affine, atol=1e-5)
