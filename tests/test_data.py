"""Datalists: load, validate every bad input (each names its file), build from folders, folds, CLI."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipeline.data import (
    DataError,
    build_datalist,
    check_datalist,
    datalist_main,
    intensity_fingerprint,
    load_datalist,
    select_fold,
    validate_datalist,
)
from pipeline.readers import write_dicom_series

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])
ROTATED = AFFINE.copy()  # the same spacing, turned 10 degrees about z
ROTATED[:2, :2] = np.array([[np.cos(0.17), -np.sin(0.17)], [np.sin(0.17), np.cos(0.17)]]) * 1.5


def save(path: Path, array, affine=AFFINE) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), path)
    return str(path)


def case(root: Path, name: str, shape=(12, 10, 8), label_affine=AFFINE, label_values=(0, 1)) -> dict:
    """An image/label pair on disk; returns the datalist entry (relative paths)."""
    rs = np.random.RandomState(len(name))
    save(root / "imagesTr" / f"{name}.nii.gz", rs.rand(*shape).astype(np.float32))
    label = rs.choice(label_values, size=shape).astype(np.uint8)
    save(root / "labelsTr" / f"{name}.nii.gz", label, label_affine)
    return {"image": f"imagesTr/{name}.nii.gz", "label": f"labelsTr/{name}.nii.gz"}


def write_datalist(root: Path, training, **extra) -> Path:
    content = {"labels": {"0": "background", "1": "organ"}, "tensorImageSize": "3D", "training": training, **extra}
    path = root / "datalist.json"
    path.write_text(json.dumps(content))
    return path


def digest(root: Path) -> dict:
    """Content hash of every file under root (to prove nothing was overwritten)."""
    return {str(p): hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def clean(tmp_path):
    entries = [case(tmp_path, "a"), case(tmp_path, "b")]
    return tmp_path, write_datalist(tmp_path, entries, validation=[entries[1]], test=["imagesTr/a.nii.gz"])


# ------------------------------------------------------------------ load


def test_load_datalist_absolute_paths(clean):
    root, datalist = clean
    training = load_datalist(datalist, root)
    assert [Path(e["image"]).name for e in training] == ["a.nii.gz", "b.nii.gz"]
    assert all(os.path.isabs(e["image"]) and os.path.isfile(e["label"]) for e in training)
    assert load_datalist(datalist, root, "test") == [{"image": str(root / "imagesTr" / "a.nii.gz")}]
    with pytest.raises(DataError, match="no 'missing' section"):
        load_datalist(datalist, root, "missing")


@pytest.mark.parametrize("escape", ["../outside.nii.gz", "imagesTr/../../outside.nii.gz", "/etc/passwd"])
def test_path_escaping_dataset_dir_rejected_unless_allowed(tmp_path, escape):
    root = tmp_path / "data"
    entry = case(root, "a")
    save(tmp_path / "outside.nii.gz", np.zeros((12, 10, 8), np.float32))
    datalist = write_datalist(root, [entry, {"image": escape, "label": entry["label"]}])
    with pytest.raises(DataError, match=f"training\\[1\\].*{escape}.*outside dataset_dir"):
        load_datalist(datalist, root)
    allowed = load_datalist(datalist, root, allow_outside=True)
    assert allowed[1]["image"] == os.path.normpath(os.path.join(root, escape))
    assert any("outside dataset_dir" in p for p in validate_datalist(datalist, root))


def test_absolute_path_inside_dataset_dir_is_fine(tmp_path):
    entry = case(tmp_path, "a")
    datalist = write_datalist(tmp_path, [{"image": str(tmp_path / entry["image"]), "label": entry["label"]}])
    assert validate_datalist(datalist, tmp_path) == []


# ------------------------------------------------------------------ validate: each bad input


def test_clean_datalist_validates(clean):
    root, datalist = clean
    assert validate_datalist(datalist, root) == []
    assert check_datalist(datalist, root) == str(datalist)


def problems_for(tmp_path, entry_fn) -> list[str]:
    """Validate a datalist with one good case and one broken by ``entry_fn``; nothing may change on disk."""
    good = case(tmp_path, "good")
    bad = entry_fn(tmp_path)
    datalist = write_datalist(tmp_path, [good, bad])
    before = digest(tmp_path)
    problems = validate_datalist(datalist, tmp_path)
    assert digest(tmp_path) == before, "validation must not write anything"
    assert problems, "the broken case must be reported"
    assert not any("good.nii.gz" in p for p in problems), problems
    return problems


def test_missing_file(tmp_path):
    problems = problems_for(tmp_path, lambda root: {"image": "imagesTr/nope.nii.gz", "label": "labelsTr/nope.nii.gz"})
    assert any(p.startswith(str(tmp_path / "imagesTr" / "nope.nii.gz")) and "not found" in p for p in problems)
    assert any("labelsTr/nope.nii.gz" in p for p in problems)


def test_truncated_nii_gz(tmp_path):
    def broken(root):
        entry = case(root, "trunc")
        path = root / entry["image"]
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
        return entry

    problems = problems_for(tmp_path, broken)
    assert any("imagesTr/trunc.nii.gz: not a readable NIfTI" in p for p in problems), problems


def test_corrupt_gzip_bytes(tmp_path):
    def broken(root):
        entry = case(root, "corrupt")
        (root / entry["image"]).write_bytes(gzip.compress(b"\x00" * 400))  # valid gzip, garbage NIfTI
        return entry

    problems = problems_for(tmp_path, broken)
    assert any("corrupt.nii.gz: not a readable NIfTI" in p for p in problems), problems


def test_text_file_named_nii(tmp_path):
    def broken(root):
        entry = case(root, "text")
        (root / "imagesTr" / "text.nii").write_text("this is a note, not an image\n")
        return {"image": "imagesTr/text.nii", "label": entry["label"]}

    problems = problems_for(tmp_path, broken)
    assert any("imagesTr/text.nii: not a readable NIfTI" in p for p in problems), problems


def test_image_label_shape_mismatch(tmp_path):
    def broken(root):
        entry = case(root, "shape")
        save(root / entry["label"], np.zeros((12, 10, 7), np.uint8))
        return entry

    problems = problems_for(tmp_path, broken)
    assert any("labelsTr/shape.nii.gz: label grid differs" in p and "shape" in p for p in problems), problems


@pytest.mark.parametrize(
    "label_affine, what",
    [
        (np.diag([1.5, 1.5, 2.5, 1.0]), "spacing"),
        (ROTATED, "direction"),
        (np.diag([-1.5, 1.5, 2.0, 1.0]), "origin"),  # a flip about x=0: the voxels land elsewhere
        (np.array([[1.5, 0, 0, 3.0], [0, 1.5, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]]), "origin"),
    ],
)
def test_image_label_affine_mismatch(tmp_path, label_affine, what):
    problems = problems_for(tmp_path, lambda root: case(root, "aff", label_affine=label_affine))
    assert any("labelsTr/aff.nii.gz: label grid differs" in p and what in p for p in problems), problems


def test_same_grid_in_another_axis_order_is_accepted(tmp_path):
    """A label stored flipped (LAS vs RAS) but on the same physical grid is fine after Orientationd."""
    entry = case(tmp_path, "flip")
    label = np.asanyarray(nib.load(tmp_path / entry["label"]).dataobj)
    flipped = AFFINE.copy()
    flipped[0, 0], flipped[0, 3] = -1.5, 1.5 * 11
    save(tmp_path / entry["label"], label[::-1], flipped)
    assert validate_datalist(write_datalist(tmp_path, [entry]), tmp_path) == []


def test_label_value_outside_classes(tmp_path):
    problems = problems_for(tmp_path, lambda root: case(root, "values", label_values=(0, 1, 3)))
    assert any("labelsTr/values.nii.gz: label values [3] are not in the declared classes [0, 1]" in p for p in problems)


def test_non_integer_label(tmp_path):
    def broken(root):
        entry = case(root, "frac")
        save(root / entry["label"], np.full((12, 10, 8), 0.5, np.float32))
        return entry

    problems = problems_for(tmp_path, broken)
    assert any("frac.nii.gz: label has non-integer values" in p for p in problems), problems


def test_nan_voxels(tmp_path):
    def broken(root):
        entry = case(root, "nan")
        image = np.ones((12, 10, 8), np.float32)
        image[3, 4, 5] = np.nan
        image[0, 0, 0] = np.inf
        save(root / entry["image"], image)
        return entry

    problems = problems_for(tmp_path, broken)
    assert any("imagesTr/nan.nii.gz: 2 NaN/Inf voxel(s)" in p for p in problems), problems


def test_4d_volume_where_3d_expected(tmp_path):
    def broken(root):
        entry = case(root, "four")
        save(root / entry["image"], np.zeros((12, 10, 8, 2), np.float32))
        return entry

    problems = problems_for(tmp_path, broken)
    assert any("four.nii.gz: shape (12, 10, 8, 2) is not 3D" in p for p in problems), problems


def test_every_problem_reported_at_once_and_cli_exit_code(tmp_path, capsys):
    entries = [case(tmp_path, "ok")]
    entries.append({"image": "imagesTr/missing.nii.gz", "label": "labelsTr/missing.nii.gz"})
    entries.append(case(tmp_path, "values", label_values=(0, 7)))
    entries.append({"image": "../escape.nii.gz"})
    datalist = write_datalist(tmp_path, entries)
    problems = validate_datalist(datalist, tmp_path)
    for needle in ("missing.nii.gz", "values.nii.gz", "escape.nii.gz"):
        assert any(needle in p for p in problems), (needle, problems)
    with pytest.raises(DataError) as raised:
        check_datalist(datalist, tmp_path)
    assert all(p in str(raised.value) for p in problems)

    assert datalist_main(["validate", str(datalist), "--dataset_dir", str(tmp_path)]) == 1
    assert "missing.nii.gz" in capsys.readouterr().err
    assert datalist_main(["validate", str(datalist), "--dataset_dir", str(tmp_path), "--allow-outside"]) == 1
    good = write_datalist(tmp_path, entries[:1])
    assert datalist_main(["validate", str(good), "--dataset_dir", str(tmp_path)]) == 0
    assert datalist_main(["validate", str(tmp_path / "none.json"), "--dataset_dir", str(tmp_path)]) == 1


def test_cli_through_python_m(clean):
    root, datalist = clean
    run = subprocess.run(
        [sys.executable, "-m", "pipeline", "datalist", "validate", str(datalist), "--dataset_dir", str(root)],
        capture_output=True,
        text=True, encoding="utf-8", errors="replace",
    )
    assert run.returncode == 0, run.stderr
    assert "OK" in run.stdout


def test_dicom_series_image_with_nifti_label(tmp_path):
    """A series folder is a valid image; its grid is compared with the NIfTI label's."""
    volume = np.random.RandomState(0).randint(0, 100, (12, 10, 8)).astype(np.int16)
    write_dicom_series(volume, AFFINE, tmp_path / "ct" / "series1", modality="CT")
    save(tmp_path / "labels" / "series1.nii.gz", (volume > 50).astype(np.uint8))
    save(tmp_path / "labels" / "shifted.nii.gz", (volume > 50).astype(np.uint8), AFFINE @ np.diag([1, 1, -1, 1.0]))
    datalist = write_datalist(
        tmp_path,
        [{"image": "ct/series1/", "label": "labels/series1.nii.gz"}, {"image": "ct/series1", "label": "labels/shifted.nii.gz"}],
    )
    problems = validate_datalist(datalist, tmp_path)
    assert len(problems) == 1 and "shifted.nii.gz: label grid differs" in problems[0], problems


# ------------------------------------------------------------------ build


def test_build_nnunet_layout_with_channels_and_folds(tmp_path):
    root = tmp_path / "Dataset001"
    for i in range(6):
        for channel in range(2):
            save(root / "imagesTr" / f"case{i}_{channel:04d}.nii.gz", np.zeros((4, 4, 4), np.float32))
        save(root / "labelsTr" / f"case{i}.nii.gz", np.full((4, 4, 4), i % 3, np.uint8))
    save(root / "imagesTs" / "new_0000.nii.gz", np.zeros((4, 4, 4), np.float32))
    save(root / "imagesTs" / "new_0001.nii.gz", np.zeros((4, 4, 4), np.float32))

    content = build_datalist(root, folds=3)
    assert content["labels"] == {"0": "background", "1": "class_1", "2": "class_2"}
    entries = content["training"] + content["validation"]
    assert len(entries) == 6 and len(content["validation"]) == 2
    assert {e["fold"] for e in content["validation"]} == {0}
    assert sorted(e["fold"] for e in entries) == [0, 0, 1, 1, 2, 2]
    first = next(e for e in entries if e["label"] == "labelsTr/case0.nii.gz")
    assert first["image"] == ["imagesTr/case0_0000.nii.gz", "imagesTr/case0_0001.nii.gz"]
    assert content["test"] == [{"image": ["imagesTs/new_0000.nii.gz", "imagesTs/new_0001.nii.gz"]}]
    assert select_fold(content, 2)["validation"] == [e for e in entries if e["fold"] == 2]

    # CLI: written relative to DIR, validated clean, never overwritten without --overwrite
    output = tmp_path / "built.json"
    assert datalist_main(["build", str(root), "--output", str(output), "--folds", "3"]) == 0
    assert datalist_main(["validate", str(output), "--dataset_dir", str(root)]) == 0
    before = output.read_bytes()
    assert datalist_main(["build", str(root), "--output", str(output)]) == 1
    assert output.read_bytes() == before
    assert datalist_main(["build", str(root), "--output", str(output), "--overwrite"]) == 0
    assert "validation" not in json.loads(output.read_text())
    assert datalist_main(["build", str(root), "--folds", "9"]) == 1


def test_build_paired_names_and_dicom_folders(tmp_path):
    save(tmp_path / "p1.nii.gz", np.zeros((4, 4, 3), np.float32))
    save(tmp_path / "p1_seg.nii.gz", np.zeros((4, 4, 3), np.uint8))
    save(tmp_path / "p2.nrrd.nii.gz", np.zeros((4, 4, 3), np.float32))  # unlabelled -> test
    volume = np.zeros((4, 4, 3), np.int16)
    write_dicom_series(volume, AFFINE, tmp_path / "p3", modality="CT")
    save(tmp_path / "p3_mask.nii.gz", np.ones((4, 4, 3), np.uint8), AFFINE)
    (tmp_path / "readme.txt").write_text("ignored")

    content = build_datalist(tmp_path)
    assert content["training"] == [
        {"image": "p1.nii.gz", "label": "p1_seg.nii.gz"},
        {"image": "p3/", "label": "p3_mask.nii.gz"},
    ]
    assert content["test"] == [{"image": "p2.nrrd.nii.gz"}]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps(content))
    assert validate_datalist(datalist, tmp_path) == []


def test_build_images_labels_folders_and_empty(tmp_path):
    save(tmp_path / "images" / "x.nii.gz", np.zeros((3, 3, 3), np.float32))
    save(tmp_path / "labels" / "x.nii.gz", np.zeros((3, 3, 3), np.uint8))
    assert build_datalist(tmp_path)["training"] == [{"image": "images/x.nii.gz", "label": "labels/x.nii.gz"}]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no images found"):
        build_datalist(tmp_path / "empty")


def test_intensity_fingerprint(tmp_path):
    image = np.linspace(-1000, 1000, 12 * 10 * 8, dtype=np.float32).reshape(12, 10, 8)
    label = (image > 0).astype(np.uint8)
    save(tmp_path / "imagesTr" / "a.nii.gz", image)
    save(tmp_path / "labelsTr" / "a.nii.gz", label)
    datalist = write_datalist(tmp_path, [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}])
    stats = intensity_fingerprint(datalist, tmp_path, percentiles=(0, 100))
    assert 0 < stats["a_min"] < 5 and stats["a_max"] == pytest.approx(1000)
    assert stats["mean"] == pytest.approx(image[label > 0].mean(), rel=1e-4)
