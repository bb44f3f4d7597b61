"""Demo data: written deterministically in seconds, matching the committed datalists, clean to validate."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from pipeline.data import load_datalist, validate_datalist
from pipeline import demo, demo_data
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


def test_main_job_defaults_to_real_anatomy(monkeypatch):
    """The README's first command, ``python -m pipeline demo``, is the MNI job through ``plan``."""
    chosen = []
    monkeypatch.setattr(demo, "_mni_job", lambda args: chosen.append(("mni", args.output)) or 0)
    monkeypatch.setattr(demo, "_synthetic_job", lambda args: chosen.append(("synthetic", args.output)) or 0)
    assert demo.main([]) == 0 and demo.main(["--data", "synthetic"]) == 0
    assert chosen == [("mni", "demo_output"), ("synthetic", "demo_output")]


@pytest.mark.parametrize("command", ["demo", "demo-data"])
def test_demo_commands_run_their_module_main(command, capsys):
    """``python -m pipeline demo`` is pipeline/demo.py's main(argv), ``demo-data`` pipeline/demo_data.py's."""
    from pipeline.__main__ import main

    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    assert f"usage: python -m pipeline {command} " in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# the main job's data (MNI152 slabs, a simulated second site) and the main job itself
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slabs_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("slabs")
    info = demo_data.write_mni_slabs(out)
    assert info["files"] == 8 and Path(info["datalist"]) == out / "mni_slabs.json"
    return out


def _world_box(path):
    """The world (mm, RAS) extent of a volume's voxel centres: ``[(low, high)] * 3``."""
    image = nib.load(path)
    corners = nib.affines.apply_affine(image.affine, [[0, 0, 0], np.asarray(image.shape) - 1])
    return [tuple(sorted(corners[:, axis])) for axis in range(3)]


def test_mni_slabs_hold_out_the_test_slab_and_validate_clean(slabs_dir):
    datalist = slabs_dir / "mni_slabs.json"
    assert json.loads(datalist.read_text()) == demo_data.mni_slabs_datalist()
    assert json.loads((DATA_LISTS / "mni_slabs.json").read_text()) == demo_data.mni_slabs_datalist()  # the committed copy
    assert validate_datalist(datalist, slabs_dir) == []
    training = [_world_box(e["image"]) for e in load_datalist(datalist, slabs_dir)]
    held_out = [_world_box(e["image"]) for s in ("validation", "test") for e in load_datalist(datalist, slabs_dir, s)]
    for box in held_out:  # no test or validation voxel lies inside a training box: apart along some axis
        for seen in training:
            assert any(high < low_seen or low > high_seen for (low, high), (low_seen, high_seen) in zip(box, seen))
    for entry in load_datalist(datalist, slabs_dir, "test"):
        counts = np.bincount(np.asanyarray(nib.load(entry["label"]).dataobj).ravel(), minlength=4)
        assert len(counts) == 4 and (counts[1:] > 1000).all()  # every tissue class in the test slab


def test_second_site_is_the_same_anatomy_from_another_scanner(slabs_dir):
    site_a, site_b = load_datalist(slabs_dir / "mni_slabs.json", slabs_dir, "test")
    a, b = nib.load(site_a["image"]), nib.load(site_b["image"])
    assert nib.aff2axcodes(a.affine) == ("R", "A", "S") and nib.aff2axcodes(b.affine) == ("L", "P", "S")
    to_ras = nib.orientations.io_orientation(b.affine)
    label_b = nib.orientations.apply_orientation(np.asanyarray(nib.load(site_b["label"]).dataobj), to_ras)
    np.testing.assert_array_equal(label_b, np.asanyarray(nib.load(site_a["label"]).dataobj))
    corner = [a.shape[0] - 1, a.shape[1] - 1, 0]
    np.testing.assert_allclose(nib.affines.apply_affine(b.affine, corner), a.affine[:3, 3])
    image_a = np.asanyarray(a.dataobj).astype(float)
    image_b = nib.orientations.apply_orientation(np.asanyarray(b.dataobj), to_ras)
    air = image_a == 0
    assert image_b[air].std() > 5 and image_b[~air].mean() > 3 * image_a[~air].mean()  # noisy air, another scale
    assert 0.8 < np.corrcoef(image_a[~air], image_b[~air])[0, 1] < 0.999  # same anatomy, not the same values


def test_steps_survive_non_ascii_output_on_an_ascii_locale(tmp_path):
    """A server with ``LC_ALL=C`` (and no UTF-8 mode) decodes pipes as ASCII; a step whose tools print
    UTF-8 (MONAI's and ignite's messages do) must still be logged and relayed, not crash the demo."""
    script = (
        "import sys; from pathlib import Path; from pipeline import demo, __main__\n"
        "__main__.printable_streams()  # as python -m pipeline does\n"
        "child = [sys.executable, '-c', 'print(\"epoch: 1 \\\\u2192 0.5 \\\\u00b5m\")']\n"
        "demo._run('step', child, Path(sys.argv[1]), relay='epoch:')\n"
    )
    log = tmp_path / "step.log"
    run = subprocess.run([sys.executable, "-c", script, str(log)], capture_output=True,
                         env={**demo._environment(), "LC_ALL": "C", "PYTHONUTF8": "0"})  # fmt: skip
    assert run.returncode == 0, run.stderr.decode("utf-8", "replace")
    assert log.read_text(encoding="utf-8") == "epoch: 1 \u2192 0.5 \u00b5m\n"
    assert b"epoch  1 " in run.stdout  # relayed to the terminal (escaped there, as the locale cannot show it)


def test_metrics_table_reads_monai_metrics_saver_csvs(tmp_path):
    header = "filename,class0,class1,class2,mean\n"
    (tmp_path / "val_mean_dice_raw.csv").write_text(header + "/d/a.nii.gz,0.5,0.8,0.9,0.7333\n/d/b.nii.gz,0.3,0.6,0.7,0.5333\n")
    (tmp_path / "val_hd95_raw.csv").write_text(header + "/d/a.nii.gz,4,2,2,2.67\n/d/b.nii.gz,6,4,2,4\n")
    rows, markdown = demo.metrics_table(tmp_path)
    assert rows[0] == ["case", "csf_other Dice", "csf_other HD95 mm", "grey_matter Dice", "grey_matter HD95 mm",
                       "white_matter Dice", "white_matter HD95 mm", "mean Dice"]  # fmt: skip
    assert rows[1] == ["a", "0.500", "4.0", "0.800", "2.0", "0.900", "2.0", "0.733"]
    assert rows[-1] == ["mean", "0.400", "5.0", "0.700", "3.0", "0.800", "2.0", "0.633"]
    assert markdown.splitlines()[0].startswith("| case | csf_other Dice |") and len(markdown.splitlines()) == 5


def test_main_job_plans_trains_evaluates_and_segments_the_mni_slabs(tmp_path):
    """``python -m pipeline demo --data mni`` as a user runs it (one epoch, so it fits CI's budget).

    It plans a bundle with ``python -m pipeline plan --cpu``, trains and evaluates it with the
    standard ``monai.bundle`` commands and segments the test slabs with ``pipeline segment``,
    none of them repeating a setting after the plan; it ends with QA pictures and a table.
    """
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--data", "mni", "--output", str(out), "--epochs", "1"],
                         capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    printed = run.stdout
    bundle = out / "bundle"
    assert f"-m pipeline plan {out / 'data' / 'mni_slabs.json'}" in printed and "--cpu" in printed
    plan = json.loads((bundle / "configs" / "plan.json").read_text())
    assert plan["preset"] == "mri" and plan["out_channels"] == 4 and plan["plan"]["choices"]["dims"] == 2  # 2D: --from unetpp_2d_seg, ~3x cheaper per voxel on a CPU
    # the commands after plan carry no override: the bundle holds the settings
    assert f"cd {bundle} && {sys.executable} -m monai.bundle run --config_file configs/train.json\n" in printed
    assert """--config_file "['configs/train.json','configs/evaluate.json']"\n""" in printed
    assert f"-m pipeline segment --bundle {bundle} --input {out / 'data' / 'mni_slabs.json'} --output {out / 'masks'} --format qa-png --quiet\n" in printed
    settings = json.loads((bundle / "models" / "settings.json").read_text())
    assert json.dumps(settings).count("grey_matter") >= 1
    # QA pictures and masks of both test cases (site A as acquired, site B a simulated second scanner)
    for case in ("mni_test_site_a", "mni_test_site_b"):
        assert (out / "masks" / "qa" / f"{case}.png").stat().st_size > 1000
        mask = nib.load(out / "masks" / f"{case}_seg.nii.gz")
        image = nib.load(out / "data" / "mni_slabs" / "images" / f"{case}.nii.gz")
        assert mask.shape == image.shape and np.allclose(mask.affine, image.affine, atol=1e-4)
        assert set(np.unique(np.asanyarray(mask.dataobj))) <= {0, 1, 2, 3}
    # No specks in the air: site A's air is exact zeros (the atlas is skull-stripped). The 2D network
    # draws classes in it (after one epoch, 3,322 voxels more than 4 voxels from the brain, measured
    # with segment --override inferer#air=null); the inferers' AirIsBackground rule leaves none
    # beyond its 3-voxel box around the body.
    site_a = np.asanyarray(nib.load(out / "data" / "mni_slabs" / "images" / "mni_test_site_a.nii.gz").dataobj)
    far = ndimage.distance_transform_cdt(site_a == 0, metric="chessboard") > 4
    assert int((np.asanyarray(nib.load(out / "masks" / "mni_test_site_a_seg.nii.gz").dataobj)[far] > 0).sum()) == 0
    # the metrics table: per case and class Dice and HD95, printed and written
    with open(out / "metrics.csv") as handle:
        rows = list(csv.reader(handle))
    assert rows[0][1:3] == ["csf_other Dice", "csf_other HD95 mm"] and [r[0] for r in rows[1:]] == ["mni_test_site_a", "mni_test_site_b", "mean"]
    assert all(0.0 <= float(v) <= 1.0 for v in rows[-1][1::2])  # Dice columns (and the mean Dice)
    assert "| mni_test_site_b |" in printed and (out / "metrics.md").read_text().count("| mni_test_site") == 2
