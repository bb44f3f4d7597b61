"""Hospital label formats as training labels: DICOM SEG and RTSTRUCT next to their CT series.

Built in a temp folder from real CT pixel data (pydicom's ``CT_small.dcm``, see
``test_dicom.body_volume``): patient folders holding a CT series and a label object, which
``datalist build`` lists, ``datalist validate`` checks against the image's series, and the
bundle's loader places on the image's own grid, classes named through the datalist's ``labels``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from pipeline.readers import LABEL_CLASSES_KEY, DataError, read_volume
from test_dicom import Study, body_volume, dice, run_segment, summary_rows
from test_segment import checkpoint  # noqa: F401 (the tiny-network weights fixture)

hd = pytest.importorskip("highdicom")

REPO = Path(__file__).resolve().parents[1]


def source_mask(image: np.ndarray) -> np.ndarray:
    """``(i, j, k)`` classes on the CT: 1 soft tissue of the body, 2 bone; the end slices empty
    (so that a sparse SEG leaves frames out)."""
    mask = np.zeros(image.shape, np.uint8)
    mask[image > -400] = 1
    mask[image > 150] = 2
    mask[:, :, [0, -1]] = 0
    return mask


def write_seg(path: Path, series: list[Path], mask: np.ndarray, names: dict[int, str], seed: int = 0) -> Path:
    """A DICOM SEG as a hospital tool writes one (highdicom, MANUAL, empty frames left out), its frames
    then shuffled so that only their positions / references say where they go."""
    from pydicom.pixels import pack_bits
    from pydicom.sr.codedict import codes

    sources = sorted((pydicom.dcmread(p) for p in series), key=lambda ds: float(ds.ImagePositionPatient[2]))
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=name, segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for number, name in sorted(names.items())
    ]
    frames = np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8)  # (k, rows, columns)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=hd.UID(), series_number=300, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="Hospital", manufacturer_model_name="Slicer", software_versions="5",
        device_serial_number="1", omit_empty_frames=True,
    )
    pixels = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    order = np.random.RandomState(seed).permutation(len(pixels))
    assert not np.array_equal(order, np.arange(len(order)))
    seg.PerFrameFunctionalGroupsSequence = [seg.PerFrameFunctionalGroupsSequence[i] for i in order]
    seg.PixelData = pack_bits(pixels[order].ravel())
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


@pytest.fixture(scope="module")
def patients(tmp_path_factory):
    """``p1/CT/`` + ``p1/SEG/SEG0001`` (no suffix), ``p2/CT/`` + ``p2/RS.dcm`` (RTSTRUCT next to the
    series folder): ``(root, {patient: (series folder, source mask)})``."""
    from pipeline.segment.writers import write_rtstruct

    root = tmp_path_factory.mktemp("hospital")
    cases = {}
    for name, slices, seed in (("p1", 12, 0), ("p2", 10, 1)):
        study = Study(root / name / "CT", patient=f"{name.upper()}^Patient", patient_id=f"MRN-{name}")
        series = study.series(body_volume(slices), number=2)
        image, affine = read_volume(study.folder)
        mask = source_mask(image)
        if name == "p1":  # segment labels in another case than the datalist's names: matched case-insensitively
            write_seg(root / name / "SEG" / "SEG0001", series, mask, {1: "SOFT TISSUE", 2: "Bone"}, seed)
        else:
            write_rtstruct(mask, affine, str(study.folder), {1: "soft tissue", 2: "bone"}, root / name / "RS.dcm")
        cases[name] = (study.folder, mask)
    return root, cases


def write_datalist(path: Path, content: dict) -> Path:
    path.write_text(json.dumps(content))
    return path


def test_datalist_build_lists_seg_and_rtstruct_labels_with_their_names(patients):
    from pipeline.data import build_datalist

    root, _ = patients
    content = build_datalist(root)
    assert content["training"] == [
        {"image": "p1/CT/", "label": "p1/SEG/SEG0001"},
        {"image": "p2/CT/", "label": "p2/RS.dcm"},
    ]
    assert content["test"] == []
    # no dataset.json: the classes come from the segment labels / ROI names, first seen first
    assert content["labels"] == {"0": "background", "1": "SOFT TISSUE", "2": "Bone"}


def test_validate_passes_and_names_a_label_of_another_series(patients, tmp_path):
    from pipeline.data import build_datalist, validate_datalist

    root, cases = patients
    content = build_datalist(root)
    assert validate_datalist(write_datalist(tmp_path / "good.json", content), root) == []

    swapped = dict(content, training=[{"image": "p2/CT/", "label": "p1/SEG/SEG0001"}, {"image": "p1/CT/", "label": "p2/RS.dcm"}])
    problems = validate_datalist(write_datalist(tmp_path / "swapped.json", swapped), root)
    uid = {name: pydicom.dcmread(next(folder.iterdir())).SeriesInstanceUID for name, (folder, _) in cases.items()}
    assert len(problems) == 2, problems
    for problem, (label, image, label_of) in zip(problems, [("p1/SEG/SEG0001", "p2/CT", "p1"), ("p2/RS.dcm", "p1/CT", "p2")]):
        assert str(root / label) in problem and str(root / image) in problem
        assert f"references series {uid[label_of]}" in problem and f"is series {uid['p2' if label_of == 'p1' else 'p1']}" in problem


def test_datalist_build_refuses_a_label_object_of_another_series(patients, tmp_path):
    import shutil

    from pipeline.data import build_datalist

    root, _ = patients
    other = tmp_path / "data"
    shutil.copytree(root / "p1", other / "p1")
    shutil.copy(root / "p2" / "RS.dcm", other / "p1" / "RS.dcm")  # p2's contours beside p1's series
    shutil.rmtree(other / "p1" / "SEG")
    with pytest.raises(DataError, match=r"p1/: the label p1/RS.dcm references series .* but the image p1/CT/ is series"):
        build_datalist(other)


def load_labels(datalist: Path, root: Path) -> list:
    """The training entries as the bundles load them (LoadVolumed on the datalist's entries)."""
    from pipeline.data import load_datalist
    from pipeline.transforms import LoadVolumed

    entries = load_datalist(datalist, root)
    return [LoadVolumed(["image", "label"])(entry) for entry in entries]


def test_loaded_labels_equal_the_source_masks_on_the_image_grid(patients, tmp_path):
    from pipeline.data import build_datalist

    root, cases = patients
    content = build_datalist(root)
    content["labels"] = {"0": "background", "1": "bone", "2": "soft tissue"}  # the datalist's values, not the file's
    loaded = load_labels(write_datalist(tmp_path / "d.json", content), root)
    for item, (name, (_, mask)) in zip(loaded, sorted(cases.items())):
        assert LABEL_CLASSES_KEY not in item  # used by the loader, not carried further
        label, image = item["label"], item["image"]
        assert label.shape == image.shape == mask.shape
        np.testing.assert_allclose(label.affine.numpy(), image.affine.numpy(), atol=1e-5)
        label = label.numpy()
        expected = np.choose(mask, [0, 2, 1])  # 1 soft tissue -> 2, 2 bone -> 1
        if name == "p1":  # a SEG is placed frame by frame: exact
            np.testing.assert_array_equal(label, expected)
        else:  # contours rasterised: pixel centres inside the outline
            for value in (1, 2):
                assert dice(label == value, expected == value) >= 0.98


def test_unknown_segment_names_are_an_error_naming_file_and_names(patients, tmp_path):
    root, _ = patients
    content = {"labels": {"0": "background", "1": "soft tissue"}, "training": [{"image": "p1/CT/", "label": "p1/SEG/SEG0001"}]}
    with pytest.raises(DataError, match=r"SEG0001: segment label\(s\) 'Bone' not among the datalist's labels"):
        load_labels(write_datalist(tmp_path / "d.json", content), root)


def test_a_label_object_is_never_read_as_an_image(patients):
    root, _ = patients
    with pytest.raises(DataError, match=r"SEG0001: a DICOM SEG .* read onto its image's grid"):
        read_volume(root / "p1" / "SEG" / "SEG0001")


@pytest.mark.slow
def test_tiny_training_run_on_a_seg_label(patients, tmp_path):
    """``monai.bundle run`` train (1 epoch, tiny UNet++, 16^3 patches) on a datalist whose label is a SEG
    (about 30 s on two cores, most of it starting MONAI in a subprocess: ``slow`` like test_bundle_runs)."""
    root, _ = patients
    datalist = write_datalist(tmp_path / "train.json", {
        "labels": {"background": 0, "soft tissue": 1, "bone": 1},  # nnU-Net form: both segments are foreground
        "training": [{"image": "p1/CT/", "label": "p1/SEG/SEG0001"}],
        "validation": [{"image": "p1/CT/", "label": "p1/SEG/SEG0001"}],
    })
    configs = "[" + ",".join(f"'{REPO / 'bundles' / 'unetpp_3d_seg' / 'configs' / n}'" for n in ("train.json", "demo.json")) + "]"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", configs, "--dataset_dir", str(root),
        "--datalist", str(datalist), "--bundle_root", str(tmp_path / "bundle"), "--progress_bar", "False",
        "--features", "[4,8,16]", "--depth", "2", "--roi_size", "[16,16,16]", "--sw_roi_size", "[32,32,16]",
        "--num_samples", "1", "--batch_size", "1", "--max_epochs", "1", "--val_interval", "1",
    ]
    result = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", timeout=300,
                            env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    assert result.returncode == 0, result.stdout[-3000:]
    header, row = (tmp_path / "bundle" / "logs" / "training_log.csv").read_text().splitlines()
    # the network's output overlaps the SEG's foreground: the label reached the loss, placed and not empty
    assert float(row.split(",")[header.split(",").index("train_mean_dice")]) > 0.0
    assert (tmp_path / "bundle" / "models" / "model.pt").is_file()


def test_segment_pseudonymises_dicom_inputs_by_default(patients, tmp_path, checkpoint, capsys):
    root, _ = patients
    output = tmp_path / "out"
    assert run_segment(checkpoint, root / "p1" / "CT", output) == 0
    (case_id,) = summary_rows(output)
    assert case_id.startswith("case-") and (output / "phi_map.csv").is_file()
    err = capsys.readouterr().err
    assert "1 of 1 case(s) are DICOM: case ids are pseudonymised" in err and "--show-phi" in err
    assert "MRN-p1" not in err and "CT" not in case_id
    # --show-phi keeps the folder name; the two cannot be combined
    assert run_segment(checkpoint, root / "p1" / "CT", tmp_path / "named", "--show-phi") == 0
    assert list(summary_rows(tmp_path / "named")) == ["CT"]
    assert not (tmp_path / "named" / "phi_map.csv").exists()
    with pytest.raises(SystemExit):
        run_segment(checkpoint, root / "p1" / "CT", tmp_path / "both", "--show-phi", "--pseudonymise")


def test_plan_fingerprints_seg_and_rtstruct_labels_on_their_images(patients, tmp_path):
    """``plan`` reads hospital label objects as training does: class volumes from the rasterised masks."""
    from pipeline.data import build_datalist
    from pipeline.plan import fingerprint

    root, _ = patients
    datalist = write_datalist(tmp_path / "hospital.json", build_datalist(root))
    found = fingerprint(datalist, root)
    assert found["classes"] == [1, 2] and found["cases"] == 2
    assert {name: volume["cases"] for name, volume in found["class_volumes_ml"].items()} == {"SOFT TISSUE": 2, "Bone": 2}
