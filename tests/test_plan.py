"""``python -m pipeline plan``: fingerprint, plan (spacing, 2D/3D, patch, depth, widths, batch, intensity), new bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline import plan as planning
from pipeline.plan import fingerprint, plan, target_spacing, training_memory_gb, write_bundle

REPO = Path(__file__).resolve().parents[1]


def ct_like(folder: Path, cases: int = 4, shape=(64, 64, 12), spacing=(0.8, 0.8, 5.0), seed: int = 0) -> Path:
    """Thick-slice abdominal-CT-like volumes in HU: air, a soft-tissue body, a brighter 'liver' (label 1)."""
    rng = np.random.RandomState(seed)
    entries = []
    for index in range(cases):
        x, y, _ = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
        body = (x - shape[0] / 2) ** 2 + (y - shape[1] / 2) ** 2 < (shape[0] * 0.45) ** 2
        liver = body & ((x - shape[0] * 0.4) ** 2 + (y - shape[1] * 0.45) ** 2 < (shape[0] * (0.15 + 0.02 * index)) ** 2)
        image = np.where(body, 40.0, -1000.0) + rng.normal(0, 10, shape)
        image[liver] = 100.0 + rng.normal(0, 10, liver.sum())
        affine = np.diag([*spacing, 1.0])
        for kind, array in (("images", image.astype(np.int16)), ("labels", liver.astype(np.uint8))):
            (folder / kind).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine), folder / kind / f"case{index}.nii.gz")
        entries.append({"image": f"images/case{index}.nii.gz", "label": f"labels/case{index}.nii.gz"})
    datalist = {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "liver"},
                "training": entries[:-1], "validation": entries[-1:], "test": [entries[-1]["image"]]}  # fmt: skip
    (folder / "datalist.json").write_text(json.dumps(datalist))
    return folder / "datalist.json"


@pytest.fixture(scope="module")
def mni(tmp_path_factory):
    """The demo's real MRI: MNI152 T1 at 2 mm with 4 tissue classes (validation as a DICOM series)."""
    pytest.importorskip("nilearn")
    from pipeline.demo_data import write_demo_data

    root = tmp_path_factory.mktemp("mni")
    write_demo_data(root, sets=("mni",))
    return root / "mni.json"


# --------------------------------------------------------------------------------------------
# the rules
# --------------------------------------------------------------------------------------------


def test_target_spacing_is_the_median_unless_an_axis_is_anisotropic_and_short():
    spacing, reason = target_spacing([[1, 1, 1], [1.2, 1.2, 1.5], [0.8, 0.8, 1.2]], [[100, 100, 100]] * 3)
    assert spacing == [1.0, 1.0, 1.2] and reason == "median spacing of the training cases"
    # thick slices and few of them: the 10th percentile of that axis, not the median (nnU-Net)
    thick = [[0.8, 0.8, z] for z in (2.5, 5.0, 5.0, 5.0, 6.0)]
    spacing, reason = target_spacing(thick, [[512, 512, 40]] * 5)
    assert spacing[:2] == [0.8, 0.8] and spacing[2] == pytest.approx(np.percentile([2.5, 5, 5, 5, 6], 10))
    assert "10th percentile" in reason
    # thick slices but many of them (as many voxels as in-plane): the median stays
    assert target_spacing(thick, [[100, 100, 400]] * 5)[0] == [0.8, 0.8, 5.0]


def test_memory_estimate_grows_with_patch_batch_and_widths():
    small = training_memory_gb([8, 16, 32], 2, [32, 32, 32], 1)
    assert 0 < small < training_memory_gb([8, 16, 32], 2, [64, 32, 32], 1) < training_memory_gb([8, 16, 32], 2, [64, 32, 32], 2)
    assert training_memory_gb([16, 32, 64], 2, [32, 32, 32], 1) > small
    # no memory is used to estimate it, however large the patch
    assert training_memory_gb([32, 64, 128, 256, 320], 4, [256, 256, 256], 2) > 50


def test_ct_like_thick_slices_plan_2d_with_nnunet_ct_normalisation(tmp_path):
    fp = fingerprint(ct_like(tmp_path))
    assert fp["modality"] == "CT" and fp["cases"] == 4 and fp["dims"] == 3
    assert fp["spacings"] == [[0.8, 0.8, 5.0]] * 4 and fp["shapes"] == [[64, 64, 12]] * 4
    assert 60 < fp["intensity"]["mean"] < 140 and fp["intensity"]["percentile_00_5"] < fp["intensity"]["percentile_99_5"]
    assert set(fp["class_volumes_ml"]) == {"liver"} and fp["class_volumes_ml"]["liver"]["cases"] == 4

    result = plan(fp)
    settings, choices = result["settings"], result["choices"]
    assert choices["dims"] == 2 and choices["template"] == "unetpp_2d_seg" and "anisotropic" in result["reasons"]["dims"]
    assert settings["pixdim"] == [0.8, 0.8]
    assert settings["preset"] == "ct" and settings["intensity"]["output"] == "zscore"
    intensity = settings["intensity"]
    assert intensity["a_min"] == pytest.approx(fp["intensity"]["percentile_00_5"], abs=0.01)
    assert intensity["mean"] == pytest.approx(fp["intensity"]["mean"], abs=1e-3)
    assert settings["out_channels"] == 1 and settings["roi_size"] == [64, 64]
    assert all(size % 2 ** settings["depth"] == 0 for size in settings["roi_size"])
    assert len(settings["features"]) == settings["depth"] + 1 and settings["features"][0] == 32


def test_isotropic_ct_plans_3d_and_a_smaller_budget_gives_a_smaller_step(tmp_path):
    fp = fingerprint(ct_like(tmp_path, shape=(48, 48, 48), spacing=(1.0, 1.0, 1.0)))
    roomy, tight = plan(fp, memory_gb=8.0), plan(fp, memory_gb=0.5, base_features=16, max_features=128)
    assert roomy["choices"]["dims"] == tight["choices"]["dims"] == 3
    assert roomy["settings"]["roi_size"] == [48, 48, 48] and roomy["settings"]["pixdim"] == [1.0, 1.0, 1.0]
    assert np.prod(tight["settings"]["roi_size"]) < np.prod(roomy["settings"]["roi_size"])
    assert tight["choices"]["estimated_memory_gb"] <= 0.5 < roomy["choices"]["estimated_memory_gb"]


def test_mri_plans_3d_multiclass_with_the_mri_preset(mni):
    fp = fingerprint(mni)  # the validation image is a DICOM series: read as well
    assert fp["modality"] == "MRI" and fp["cases"] == 2 and fp["spacings"] == [[2.0, 2.0, 2.0]] * 2
    assert set(fp["class_volumes_ml"]) == {"csf_other", "grey_matter", "white_matter"}
    assert fp["class_volumes_ml"]["grey_matter"]["median"] > fp["class_volumes_ml"]["csf_other"]["median"]
    result = plan(fp)
    settings = result["settings"]
    assert result["choices"]["dims"] == 3 and settings["preset"] == "mri" and settings["intensity"] is None
    assert settings["out_channels"] == 4 and settings["pixdim"] == [2.0, 2.0, 2.0]
    assert result["choices"]["estimated_memory_gb"] <= 8.0


def test_plan_writes_a_bundle_whose_configs_read_the_plan(tmp_path, mni):
    fp = fingerprint(mni)
    result = plan(fp, memory_gb=1.0, base_features=16, max_features=128)
    bundle = write_bundle(result, fp, tmp_path / "brains", mni.parent, epochs=3)
    saved = json.loads((bundle / "configs" / "plan.json").read_text())
    assert {k: saved[k] for k in result["settings"]} == result["settings"] and saved["fingerprint"]["cases"] == 2

    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    parser["bundle_root"] = str(bundle)
    for key, value in result["settings"].items():
        assert parser.get_parsed_content(key) == value, key
    assert parser.get_parsed_content("datalist") == str(mni) and parser.get_parsed_content("max_epochs") == 3
    assert parser["loss"]["loss"]["_target_"] == "pipeline.losses.CEDiceLoss"  # 4 classes: softmax
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == 4 and pred["spatial_shape"] == ["16*n"] * 3  # depth 3
    assert pred["channel_def"] == {"0": "background", "1": "csf_other", "2": "grey_matter", "3": "white_matter"}
    readme = (bundle / "docs" / "README.md").read_text(encoding="utf-8")
    assert "## What was chosen and why" in readme and "z-score inside the body" in readme
    with pytest.raises(FileExistsError):
        write_bundle(result, fp, bundle, mni.parent)
    assert write_bundle(result, fp, bundle, mni.parent, overwrite=True) == bundle  # a planned bundle is replaced
    # --overwrite never deletes a folder plan did not write, nor one holding the data
    (tmp_path / "lab" / "scans").mkdir(parents=True)
    (tmp_path / "lab" / "scans" / "precious.nii.gz").write_bytes(b"irreplaceable")
    with pytest.raises(FileExistsError, match="not a bundle written by plan"):
        write_bundle(result, fp, tmp_path / "lab", mni.parent, overwrite=True)
    assert (tmp_path / "lab" / "scans" / "precious.nii.gz").read_bytes() == b"irreplaceable"


def test_cli_usage_errors(tmp_path, capsys):
    (tmp_path / "empty.json").write_text(json.dumps({"training": []}))
    assert planning.main([str(tmp_path / "empty.json"), "--output", str(tmp_path / "b")]) == 2
    assert "no labelled cases" in capsys.readouterr().err
    run = subprocess.run([sys.executable, "-m", "pipeline", "plan", "--help"], capture_output=True, text=True, encoding="utf-8", errors="replace")
    assert run.returncode == 0 and "usage: python -m pipeline plan" in run.stdout


# --------------------------------------------------------------------------------------------
# plan -> train -> segment, no override after plan
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_plan_train_segment_without_overrides_matches_the_explicit_path(tmp_path):
    from pipeline import segment

    datalist = ct_like(tmp_path / "ct", shape=(48, 48, 40), spacing=(1.0, 1.0, 1.2))
    bundle = tmp_path / "liver"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    made = subprocess.run(
        [sys.executable, "-m", "pipeline", "plan", str(datalist), "--output", str(bundle), "--cpu",
         "--features", "4", "8", "16", "--epochs", "1"],
        capture_output=True, text=True, encoding="utf-8", env=env, timeout=300,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    settings = json.loads((bundle / "configs" / "plan.json").read_text())
    assert settings["preset"] == "ct" and settings["depth"] == 2 and settings["pixdim"] == [1.0, 1.0, 1.2]

    def bundle_run(*args):
        result = subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=bundle, env=env, timeout=600,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8")  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:]

    bundle_run("run", "--config_file", "configs/train.json", "--progress_bar", "False", "--num_workers", "0")
    trained = json.loads((bundle / "models" / "settings.json").read_text())
    assert {k: trained[k] for k in ("preset", "intensity", "pixdim", "roi_size", "features")} == {
        k: settings[k] for k in ("preset", "intensity", "pixdim", "roi_size", "features")
    }
    assert trained["labels"] == {"0": "background", "1": "liver"}
    from test_bundle import model_zoo_ci  # the model zoo's CI steps, with their defaults

    checked = model_zoo_ci(bundle)
    assert checked.returncode == 0, checked.stdout[-5000:]
    bundle_run("ckpt_export", "network_def", "--filepath", "models/model.ts", "--ckpt_file", "models/model.pt",
               "--meta_file", "configs/metadata.json", "--config_file", "configs/inference.json")  # fmt: skip

    images = tmp_path / "ct" / "images"
    assert segment.main(["--bundle", str(bundle), "--input", str(images), "--output", str(tmp_path / "planned"), "--quiet"]) == 0
    # the explicit path: the template bundle, the same weights, every planned value as an override
    explicit = [f"--override={key}={json.dumps(settings[key])}" for key in
                ("features", "depth", "norm", "preset", "intensity", "pixdim", "roi_size", "out_channels")]  # fmt: skip
    assert segment.main(["--bundle", str(REPO / "bundles" / "unetpp_3d_seg"), "--checkpoint", str(bundle / "models" / "model.pt"),
                         "--input", str(images), "--output", str(tmp_path / "explicit"), "--quiet", *explicit]) == 0  # fmt: skip
    for mask in sorted((tmp_path / "planned").glob("*_seg.nii.gz")):
        np.testing.assert_array_equal(np.asarray(nib.load(mask).dataobj), np.asarray(nib.load(tmp_path / "explicit" / mask.name).dataobj))
    assert json.loads((tmp_path / "planned" / "summary.json").read_text())["cases"][0]["volumes_ml"].keys() == {"liver"}
    assert torch.jit.load(str(bundle / "models" / "model.ts")).depth == 2


def test_the_template_bundles_ship_inside_the_package():
    """pyproject lists every package under pipeline/ and every folder of a template bundle (as pipeline.bundles.*)."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    packages = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "pipeline").rglob("__init__.py")}
    folders = {"pipeline.bundles"} | {
        "pipeline.bundles." + ".".join(p.relative_to(REPO / "bundles").parts)
        for p in (REPO / "bundles").rglob("*")
        if p.is_dir() and p.name not in ("models", "logs", "eval", "data", "__pycache__")
    }
    assert packages | folders == listed
    assert config["package-dir"] == {"pipeline.bundles": "bundles"}
    assert planning.template_dir("unetpp_3d_seg") == REPO / "bundles" / "unetpp_3d_seg"  # in a checkout
