"""Low-memory postprocessing of ``segment``: the same masks as the bundle's own chain."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.segment import run
from pipeline.transforms import inference_transforms, postprocessing


def ct_like(path: Path, shape=(40, 36, 24), affine=None) -> Path:
    """Air with an off-centre body, so that the body crop is a real crop."""
    volume = np.zeros(shape, np.float32)
    volume[5:31, 8:30, 3:20] = np.random.RandomState(0).rand(26, 22, 17) + 1
    affine = np.diag([0.8, 0.9, 2.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    return path


def reference(post, data: dict, logits: torch.Tensor) -> np.ndarray:
    """The bundle's chain: probabilities inverted in float32, then discretised."""
    mask = torch.as_tensor(post({**data, "pred": logits})["pred"]).numpy()
    return np.rint(mask[0]).astype(np.uint8)


# LPS-like (flipped x and y) and permuted axes: Orientationd's inverse moves voxels around
FLIPPED = np.array([[0, -0.9, 0, 10], [-0.8, 0, 0, 5], [0, 0, 2.0, -3], [0, 0, 0, 1]], dtype=float)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("affine", [None, FLIPPED], ids=["ras", "flipped"])
def test_discretised_then_inverted_mask_equals_the_bundle_chain(tmp_path, monkeypatch, channels, affine):
    monkeypatch.setattr(run, "SLAB_VOXELS", 3000)  # several slabs, a partial last one
    pre = inference_transforms(3, preset="scale")
    data = pre({"image": str(ct_like(tmp_path / "ct.nii.gz", affine=affine))})
    assert run._discretise_first(postprocessing(pre, channels), data["image"]) is not None
    generator = torch.Generator().manual_seed(channels)
    logits = torch.randn((channels, *data["image"].shape[1:]), generator=generator)
    logits[:, ::4] = 0.0  # exact ties: sigmoid 0.5 on the threshold, equal softmax channels
    for components in (None, {1: {"largest_component": True}}):
        post = postprocessing(pre, channels, components=components)
        mask, out_affine = run.mask_on_input_grid(SimpleNamespace(postprocessing=post), data, logits)
        expected = reference(post, data, logits)
        assert mask.dtype == np.uint8 and mask.shape == expected.shape == (40, 36, 24)
        np.testing.assert_array_equal(mask, expected)
        assert mask.max() == max(channels - 1, 1)  # every class present: a real test
        np.testing.assert_allclose(out_affine, nib.load(str(tmp_path / "ct.nii.gz")).affine, atol=1e-6)


def test_a_resampling_preprocessing_does_not_discretise_first(tmp_path):
    pre = inference_transforms(3, preset="scale", pixdim=(1.0, 1.0, 1.5))
    data = pre({"image": str(ct_like(tmp_path / "ct.nii.gz"))})
    post = postprocessing(pre, 1)
    assert run._discretise_first(post, data["image"]) is None  # Spacingd interpolates: probabilities first
    logits = torch.randn((1, *data["image"].shape[1:]), generator=torch.Generator().manual_seed(0))
    mask, _ = run.mask_on_input_grid(SimpleNamespace(postprocessing=post), data, logits)
    np.testing.assert_array_equal(mask, reference(post, data, logits))


# 0.7 x 0.7 x 2.5 mm, flipped x/y, permuted and slightly oblique: Orientationd moves voxels, Spacingd interpolates
OBLIQUE = np.array([[0, -0.7, 0.1, 10], [-0.7, 0, 0, 5], [0, 0.05, 2.5, -3], [0, 0, 0, 1]], dtype=float)


def anisotropic(path: Path, affine) -> Path:
    volume = np.zeros((40, 36, 12), np.float32)
    volume[5:31, 8:30, 2:10] = np.random.RandomState(1).rand(26, 22, 8) + 1
    nib.save(nib.Nifti1Image(volume, affine), str(path))
    return path


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("affine", [np.diag([0.7, 0.7, 2.5, 1.0]), OBLIQUE], ids=["ras", "oblique"])
@pytest.mark.parametrize("pixdim", [(1.0, 1.0, 1.0), (0.7, 0.7, 2.5)], ids=["resampled", "same-spacing"])
def test_a_resampling_inversion_by_slabs_equals_the_bundle_chain(tmp_path, monkeypatch, channels, affine, pixdim):
    monkeypatch.setattr(run, "RESAMPLE_SLAB_VOXELS", 7200)  # slabs of 5 of the 12 output slices: 5, 5, 2
    used = []
    inverted = run._inverted_resample
    monkeypatch.setattr(run, "_inverted_resample", lambda *args: used.append(1) or inverted(*args))
    pre = inference_transforms(3, preset="scale", pixdim=pixdim)
    data = pre({"image": str(anisotropic(tmp_path / "ct.nii.gz", affine))})
    assert [op["class"] for op in data["image"].applied_operations] == ["Orientation", "SpatialResample", "CropForeground"]
    generator = torch.Generator().manual_seed(channels)
    logits = torch.randn((channels, *data["image"].shape[1:]), generator=generator)
    data["image"] = run._trace_only(data["image"])  # as the batch hands it over
    logits[:, ::4] = 0.0  # exact ties on the working grid
    for components in (None, {1: {"largest_component": True}}):
        post = postprocessing(pre, channels, components=components)
        assert run._discretise_first(post, data["image"]) is None
        assert run._resample_first(post, data["image"]) is not None
        mask, out_affine = run.mask_on_input_grid(SimpleNamespace(postprocessing=post), data, logits)
        expected = reference(post, data, logits)
        assert mask.dtype == np.uint8 and mask.shape == expected.shape == (40, 36, 12)
        np.testing.assert_array_equal(mask, expected)
        assert mask.max() == max(channels - 1, 1) and (mask == 0).any()
        np.testing.assert_allclose(out_affine, affine, atol=1e-6)
    assert len(used) == 2
