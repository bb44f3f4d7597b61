"""Demo data: written deterministically in seconds, matching the committed datalists, clean to validate."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.data import load_datalist, validate_datalist
from pipeline import demo_data
from pipeline.demo_data import SETS, demo_datalist, write_demo_data
from pipeline.readers import read_volume
from pipeline.transforms import eval_transforms, train_transforms

DATA_LISTS = Path(__file__).resolve().parents[1] / "data_lists"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    written = write_demo_data(out)
    assert set(written) == set(SETS)
    return out


@pytest.mark.parametrize("name", SETS)
def test_committed_datalists_match_generated(demo_dir, name):
    committed = json.loads((DATA_LISTS / f"{name}.json").read_text())
    assert committed == demo_datalist(name)
    assert json.loads((demo_dir / f"{name}.json").read_text()) == committed


@pytest.mark.parametrize("name", SETS)
def test_demo_sets_validate_clean(demo_dir, name):
    assert validate_datalist(DATA_LISTS / f"{name}.json", demo_dir) == []


def test_synthetic_3d_content(demo_dir):
    training = load_datalist(DATA_LISTS / "synthetic_3d.json", demo_dir)
    assert len(training) == 16
    assert len(load_datalist(DATA_LISTS / "synthetic_3d.json", demo_dir, "validation")) == 4
    assert len(load_datalist(DATA_LISTS / "synthetic_3d.json", demo_dir, "test")) == 4
    orientations = {nib.aff2axcodes(nib.load(e["image"]).affine) for e in training}
    assert orientations == {("R", "A", "S"), ("L", "P", "S")}
    label = nib.load(training[0]["label"])
    assert label.shape == (64, 64, 64) and set(np.unique(label.get_fdata())) == {0.0, 1.0}
    assert np.allclose(nib.affines.voxel_sizes(label.affine), 1.0)


def test_synthetic_2d_images_are_2d(demo_dir):
    entry = load_datalist(DATA_LISTS / "synthetic_2d.json", demo_dir)[0]
    assert nib.load(entry["image"]).shape == (128, 128)
    samples = train_transforms(spatial_dims=2, preset="scale", roi_size=(64, 64), num_samples=2)(entry)
    assert [tuple(s["image"].shape) for s in samples] == [(1, 64, 64)] * 2


def test_deterministic(demo_dir, tmp_path):
    write_demo_data(tmp_path, sets=("synthetic_3d",))
    for name in ("imagesTr/syn3d_005.nii.gz", "labelsTs/syn3d_023.nii.gz"):
        a = nib.load(demo_dir / "synthetic_3d" / name).get_fdata()
        b = nib.load(tmp_path / "synthetic_3d" / name).get_fdata()
        np.testing.assert_array_equal(a, b)


def test_mni_tissue_label_and_dicom_copy(demo_dir):
    train = load_datalist(DATA_LISTS / "mni.json", demo_dir)[0]
    val = load_datalist(DATA_LISTS / "mni.json", demo_dir, "validation")[0]
    t1 = nib.load(train["image"])
    assert t1.shape == (98, 116, 94) and nib.aff2axcodes(t1.affine) == ("R", "A", "S")
    label = np.asanyarray(nib.load(train["label"]).dataobj)
    counts = np.bincount(label.ravel(), minlength=4)
    assert len(counts) == 4 and (counts > 1000).all()  # every tissue class is present
    assert counts[3] > counts[1]  # more white matter than CSF in a brain
    # the DICOM series holds the same voxels on the same grid
    series, affine = read_volume(val["image"])
    np.testing.assert_array_equal(series, np.asanyarray(t1.dataobj))
    np.testing.assert_allclose(affine, t1.affine, atol=1e-4)
    assert len(list(Path(val["image"]).glob("*.dcm"))) == 94
    # and the pipeline's MRI chain reads the series (crop to the head)
    item = eval_transforms(preset="mri")(val)
    assert item["image"].shape == item["label"].shape and item["image"].shape[1] < 98


def test_cli(tmp_path):
    assert demo_data.main([str(tmp_path), "--sets", "synthetic_2d"]) == 0
    assert (tmp_path / "synthetic_2d" / "imagesTr" / "syn2d_000.nii.gz").is_file()
    assert not (tmp_path / "synthetic_3d").exists()
    run = subprocess.run([sys.executable, "-m", "pipeline", "demo-data", str(tmp_path), "--sets", "nope"], capture_output=True)
    assert run.returncode == 2 and b"invalid choice" in run.stderr


@pytest.mark.parametrize("command", ["demo", "demo-data"])
def test_demo_commands_run_their_module_main(command, capsys):
    """``python -m pipeline demo`` is pipeline/demo.py's main(argv), ``demo-data`` pipeline/demo_data.py's."""
    from pipeline.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    assert f"usage: python -m pipeline {command} " in capsys.readouterr().out
