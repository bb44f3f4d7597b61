"""Batch segmentation (``python -m pipeline segment``) end to end on real files in a temp folder.

Every run goes through the real 3D bundle config (``bundles/unetpp_3d_seg/configs/inference.json``);
only the network is shrunk with ``--override`` so that a freshly initialised tiny UNet++ saved
as the checkpoint stands in for a trained one (the masks are meaningless, the geometry is not).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.data import create_test_image_3d

from pipeline import segment
from pipeline.nets import UNetPlusPlus
from pipeline.readers import read_volume, sitk_image_from_array, write_dicom_series

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "unetpp_3d_seg"
TINY = ["--override", "network_def#features=[4,8,16]", "--override", "network_def#depth=2",
        "--override", "sw_roi_size=[32,32,32]", "--override", "sw_batch_size=1"]
OBLIQUE = np.array([[-0.9, 0.15, 0.0, 40.0], [0.1, 1.1, 0.2, -20.0], [0.0, -0.25, 1.4, 7.5], [0, 0, 0, 1.0]])


# --------------------------------------------------------------------------------------------
# data helpers
# --------------------------------------------------------------------------------------------


def blobs(shape=(32, 32, 32), seed=0) -> np.ndarray:
    image, _ = create_test_image_3d(*shape, num_objs=4, rad_max=min(shape) // 3, random_state=np.random.RandomState(seed))
    return image.astype(np.float32)


def write_nifti(path: Path, shape=(32, 32, 32), affine=None, seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.2, 0.9, 1.5, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(blobs(shape, seed), affine), str(path))
    return path


def write_series(folder: Path, shape=(30, 28, 20), seed=5) -> Path:
    """A real CT series written by SimpleITK (with a FrameOfReferenceUID, which a DICOM SEG references)."""
    affine = np.diag([-0.8, -0.8, 2.0, 1.0])
    affine[:3, 3] = [100.0, 80.0, -30.0]
    write_dicom_series(np.round(blobs(shape, seed) * 1000), affine, folder, modality="CT")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """State dict of a freshly initialised tiny UNet++ with the TINY overrides' architecture."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(UNetPlusPlus(3, 1, 1, features=(4, 8, 16), depth=2).state_dict(), path)
    return path


def run(checkpoint: Path, input_path: Path, output: Path, *extra: str) -> int:
    args = ["--bundle", str(BUNDLE), "--checkpoint", str(checkpoint), *TINY, "--input", str(input_path), "--output", str(output), "--quiet", *extra]
    return segment.main(args)


def summary(output: Path) -> dict[str, dict]:
    return {row["case_id"]: row for row in json.loads((output / "summary.json").read_text())["cases"]}


def tree(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


# --------------------------------------------------------------------------------------------
# cases and ids
# --------------------------------------------------------------------------------------------


def test_discovery_finds_files_and_series_and_resolves_name_collisions(tmp_path):
    write_nifti(tmp_path / "ct.nii.gz")
    write_nifti(tmp_path / "siteA" / "ct.nii.gz")
    write_nifti(tmp_path / "siteB" / "ct.nii.gz")
    sitk.WriteImage(sitk_image_from_array(blobs(), np.eye(4)), str(tmp_path / "siteB" / "ct.mha"))
    sitk.WriteImage(sitk_image_from_array(blobs(), np.eye(4)), str(tmp_path / "mr 01.nrrd"))
    write_series(tmp_path / "study" / "CT_0001")
    (tmp_path / "study" / "CT_0001" / "README.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    write_nifti(tmp_path / ".hidden" / "skip.nii.gz")
    write_nifti(tmp_path / "out" / "inside_output.nii.gz")

    cases = segment.discover_cases(tmp_path, exclude=[tmp_path / "out"])
    ids = {case.source: case.case_id for case in cases}
    assert ids == {
        "ct.nii.gz": "ct",  # colliding ids are qualified with their folders...
        "siteA/ct.nii.gz": "siteA__ct",
        "siteB/ct.mha": "siteB__ct",  # ...then numbered in path order
        "siteB/ct.nii.gz": "siteB__ct__2",
        "mr 01.nrrd": "mr_01",
        "study/CT_0001/": "CT_0001",
    }
    assert [c.is_dicom for c in cases if c.case_id == "CT_0001"] == [True]
    # Same ids whatever order the file system lists things in.
    assert segment.assign_case_ids([(c.image, c.source, c.is_dicom) for c in reversed(cases)]) == cases
    # Sharding is disjoint and complete.
    shards = [segment.shard(cases, r, 4) for r in range(4)]
    assert sorted(c.case_id for s in shards for c in s) == sorted(c.case_id for c in cases)


# --------------------------------------------------------------------------------------------
# geometry: masks on each input's own grid
# --------------------------------------------------------------------------------------------


def test_mixed_nifti_and_dicom_series_masks_match_input_geometry(tmp_path, checkpoint):
    data = tmp_path / "in"
    write_nifti(data / "ras.nii.gz", shape=(32, 30, 28), seed=1)
    write_nifti(data / "oblique.nii.gz", shape=(28, 32, 30), affine=OBLIQUE, seed=2)
    sitk.WriteImage(sitk_image_from_array(blobs((30, 30, 26), 3), np.diag([0.7, 0.7, 1.8, 1])), str(data / "scan.mha"))
    write_series(data / "patient1" / "series_ct")
    bundle_before, input_before = tree(BUNDLE), tree(tmp_path)
    output = tmp_path / "out"

    # --show-phi: cases named after their files (a batch with a DICOM case is pseudonymised by default)
    assert run(checkpoint, data, output, "--show-phi") == 0

    rows = summary(output)
    assert sorted(rows) == ["oblique", "ras", "scan", "series_ct"]
    for case_id, row in rows.items():
        assert row["status"] == "done", row
        source = data / row["source"]
        image, affine = read_volume(source)
        mask_file = nib.load(str(output / f"{case_id}_seg.nii.gz"))
        mask = np.asarray(mask_file.dataobj)
        assert mask.shape == image.shape, case_id
        np.testing.assert_allclose(mask_file.affine, affine, atol=1e-4, err_msg=case_id)
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
        assert row["volumes_ml"]["foreground"] == pytest.approx(mask.sum() * voxel_ml, rel=1e-3, abs=1e-3)
    # The NIfTI input's qform/sform are copied to its mask.
    source = nib.load(str(data / "oblique.nii.gz")).header
    written = nib.load(str(output / "oblique_seg.nii.gz"))
    np.testing.assert_allclose(written.header.get_sform(), source.get_sform(), atol=1e-6)
    assert written.header["sform_code"] == source["sform_code"] and written.header["qform_code"] == source["qform_code"]
    # The DICOM series' mask is on the series' own grid (what SimpleITK reads from the folder).
    reference = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(data / "patient1" / "series_ct")))
    mask_itk = sitk.ReadImage(str(output / "series_ct_seg.nii.gz"))
    assert mask_itk.GetSize() == reference.GetSize()
    np.testing.assert_allclose(mask_itk.GetOrigin(), reference.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(mask_itk.GetDirection(), reference.GetDirection(), atol=1e-5)
    np.testing.assert_allclose(mask_itk.GetSpacing(), reference.GetSpacing(), atol=1e-4)

    # Nothing written outside OUT (inputs, bundle: no eval/ folder), no temporaries left inside it.
    assert tree(BUNDLE) == bundle_before
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("out")} == input_before
    assert not [p for p in output.rglob(".tmp.*")]
    csv_header = (output / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"case_id", "status", "reason", "read_s", "infer_s", "write_s", "volume_ml_foreground"} <= set(csv_header)


def test_datalist_input_fast_mode_bf16(tmp_path, checkpoint):
    write_nifti(tmp_path / "imagesTs" / "a.nii.gz", seed=1)
    write_nifti(tmp_path / "imagesTs" / "b.nii.gz", seed=2)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"test": ["imagesTs/a.nii.gz", {"image": "imagesTs/b.nii.gz"}], "training": []}))
    output = tmp_path / "out"
    assert run(checkpoint, datalist, output, "--mode", "fast", "--prune-level", "1", "--precision", "bf16") == 0
    rows = summary(output)
    assert sorted(rows) == ["a", "b"] and {r["status"] for r in rows.values()} == {"done"}
    assert rows["a"]["settings"]["overrides"]["network_def#mode"] == "fast"
    assert rows["a"]["settings"]["precision"] == "bf16"


def test_usage_errors_exit_2_and_write_nothing(tmp_path, checkpoint, capsys):
    write_nifti(tmp_path / "in" / "a.nii.gz")
    output = tmp_path / "out"
    assert run(checkpoint, tmp_path / "in", output, "--precision", "fp16", "--device", "cpu") == 2
    assert "fp16 needs a CUDA device" in capsys.readouterr().err
    assert run(checkpoint, tmp_path / "in", output, "--prune-level", "1") == 2
    assert run(tmp_path / "missing.pt", tmp_path / "in", output) == 2
    assert "no trained weights" in capsys.readouterr().err
    wrong = tmp_path / "wrong.pt"
    torch.save(UNetPlusPlus(3, 1, 1, features=(8, 16, 32), depth=2).state_dict(), wrong)
    assert run(wrong, tmp_path / "in", output) == 2
    assert "does not fit the network" in capsys.readouterr().err
    assert run(checkpoint, tmp_path / "in", output, "--override", "sw_roi_sise=[16,16,16]") == 2
    assert "no id 'sw_roi_sise'" in capsys.readouterr().err
    assert not output.exists()


# --------------------------------------------------------------------------------------------
# bad cases, resume, overwrite protection
# --------------------------------------------------------------------------------------------


def test_corrupt_case_mid_batch_is_reported_and_the_others_finish(tmp_path, checkpoint):
    data = tmp_path / "in"
    write_nifti(data / "a_first.nii.gz", seed=1)
    good = write_nifti(tmp_path / "tmp.nii.gz", seed=2).read_bytes()
    (data / "b_truncated.nii.gz").write_bytes(good[: len(good) // 2])
    (data / "c_text.nii").write_text("this is not an image\n")
    nib.save(nib.Nifti1Image(np.random.rand(20, 20, 20, 3).astype(np.float32), np.eye(4)), str(data / "d_4d.nii.gz"))
    nib.save(nib.Nifti1Image(np.random.rand(32, 32).astype(np.float32), np.eye(4)), str(data / "e_2d.nii.gz"))
    two_series = write_series(data / "f_two_series")
    for path in write_series(tmp_path / "other_series", seed=6).glob("*.dcm"):  # another SeriesInstanceUID
        path.rename(two_series / f"other_{path.name}")
    write_nifti(data / "z_last.nii.gz", seed=3)
    output = tmp_path / "out"

    assert run(checkpoint, data, output, "--show-phi") == 1  # some case failed (named: --show-phi, f_ is DICOM)

    rows = summary(output)
    assert {k: r["status"] for k, r in rows.items()} == {
        "a_first": "done",
        "b_truncated": "failed",
        "c_text": "failed",
        "d_4d": "failed",
        "e_2d": "failed",
        "f_two_series": "failed",
        "z_last": "done",
    }
    assert "b_truncated.nii.gz" in rows["b_truncated"]["reason"]
    assert "c_text.nii" in rows["c_text"]["reason"]
    assert "3 channels" in rows["d_4d"]["reason"] and "expects 1" in rows["d_4d"]["reason"]
    assert "2D image" in rows["e_2d"]["reason"]
    assert "2 DICOM series" in rows["f_two_series"]["reason"]
    assert sorted(p.name for p in output.glob("*_seg.nii.gz")) == ["a_first_seg.nii.gz", "z_last_seg.nii.gz"]
    csv_lines = (output / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(rows)


def test_a_cpu_network_takes_turns_with_reading_and_writing_and_a_gpu_network_overlaps_them(tmp_path, checkpoint, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.segment import run as segment_run

    data = tmp_path / "in"
    for seed in (1, 2, 3):
        write_nifti(data / f"case{seed}.nii.gz", seed=seed)
    reads = tmp_path / "reads.txt"  # written by the reader process: "<case index> <time the read ended>"
    networks, writes = [], []  # main process: (start, end) of each network run; (thread, end) of each write
    read, predict, write = segment_run._PreprocessedCases.__getitem__, segment_run._predict, segment_run._CaseWriter.__call__

    def recorded_read(self, index):
        item = read(self, index)
        with open(reads, "a") as log:
            log.write(f"{index} {time.time()}\n")
        return item

    def slow_network(*args):
        start = time.time()
        time.sleep(0.5)  # a read beside it would end well before it does
        logits = predict(*args)
        networks.append((start, time.time()))
        return logits

    def recorded_write(self, *args):
        row = write(self, *args)
        writes.append((threading.current_thread().name, time.time()))
        return row

    def read_ends():
        lines = [line.split() for line in reads.read_text().splitlines()]
        reads.unlink()
        return [float(end) for _, end in sorted(lines, key=lambda line: int(line[0]))]

    monkeypatch.setattr(segment_run._PreprocessedCases, "__getitem__", recorded_read)
    monkeypatch.setattr(segment_run, "_predict", slow_network)
    monkeypatch.setattr(segment_run._CaseWriter, "__call__", recorded_write)
    assert run(checkpoint, data, tmp_path / "cpu") == 0
    read_end = read_ends()
    assert [name for name, _ in writes] == ["MainThread"] * 3  # the network has every core: no writer beside it
    for case in (1, 2):  # and no reader beside it: a case is read once the one before is written
        assert read_end[case] > writes[case - 1][1] > networks[case - 1][1]

    networks.clear()  # the arrangement beside a GPU network, on this CPU
    writes.clear()
    monkeypatch.setattr(segment_run, "_takes_turns", lambda device: False)
    assert run(checkpoint, data, tmp_path / "overlapped") == 0
    read_end = read_ends()
    assert len(writes) == 3 and all(name.startswith("segment-writer") for name, _ in writes)
    assert read_end[1] < networks[0][1]  # read ahead, while the network ran
    for seed in (1, 2, 3):
        name = f"case{seed}_seg.nii.gz"
        assert np.array_equal(nib.load(str(tmp_path / "cpu" / name)).dataobj, nib.load(str(tmp_path / "overlapped" / name)).dataobj)
    with segment_run._writer_pool(torch.device("cuda")) as pool:
        assert type(pool) is ThreadPoolExecutor


def test_a_cpu_batch_reuses_the_memory_of_the_case_before(tmp_path, checkpoint, monkeypatch):
    import resource

    from pipeline.segment import run as segment_run

    data = tmp_path / "in"
    for seed in (1, 2, 3):
        write_nifti(data / f"case{seed}.nii.gz", shape=(48, 48, 48), seed=seed)
    faults = []  # page faults of each case's network
    predict = segment_run._predict

    def counted(*args):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        logits = predict(*args)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return logits

    monkeypatch.setattr(segment_run, "_predict", counted)
    assert run(checkpoint, data, tmp_path / "kept") == 0
    # Memory handed back after each case is faulted in again by the next (measured: 2881, 2299, 1866
    # faults); kept, the first case faults it in once (3697, 278, 7).
    assert len(faults) == 3 and faults[2] < faults[0] / 10, faults

    faults.clear()  # cases larger than the limit hand it back once written
    monkeypatch.setattr(segment_run, "KEEP_MEMORY_MAX_VOXELS", 0)
    assert run(checkpoint, data, tmp_path / "handed_back") == 0
    assert len(faults) == 3 and faults[2] > faults[0] / 4, faults


def test_a_reader_waiting_for_its_turn_gives_up_once_the_segment_process_is_gone(tmp_path):
    gave_up = tmp_path / "gave_up.txt"
    script = f"""
import multiprocessing, os, time
from pipeline.segment.run import ReadTurn

turn = ReadTurn()

def reader():
    try:
        turn.wait(3)
    except RuntimeError as err:
        open({str(gave_up)!r}, "w").write(str(err))

multiprocessing.Process(target=reader).start()  # not a daemon: it has to end by itself
turn.allow(2)
time.sleep(0.5)
os._exit(0)  # gone (as if killed) without ever allowing case 3
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    deadline = time.monotonic() + 20
    while not (gave_up.exists() and gave_up.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gave_up.read_text() == "the segment process is gone"


def test_rerun_skips_verified_cases_and_never_overwrites_foreign_files(tmp_path, checkpoint):
    data = tmp_path / "in"
    for i in range(3):
        write_nifti(data / f"case{i}.nii.gz", seed=i)
    output = tmp_path / "out"
    output.mkdir()
    (output / "case2_seg.nii.gz").write_bytes(b"a lab's own mask, not ours")

    assert run(checkpoint, data, output) == 1
    rows = summary(output)
    assert rows["case2"]["status"] == "failed" and "--overwrite" in rows["case2"]["reason"]
    assert (output / "case2_seg.nii.gz").read_bytes() == b"a lab's own mask, not ours"
    written = {name: (output / f"{name}_seg.nii.gz").stat().st_mtime_ns for name in ("case0", "case1")}

    # Second run: finished cases are checked (digest, input unchanged, same settings) and kept.
    assert run(checkpoint, data, output) == 1
    rows = summary(output)
    assert rows["case0"]["status"] == rows["case1"]["status"] == "existing"
    assert {n: (output / f"{n}_seg.nii.gz").stat().st_mtime_ns for n in written} == written

    # A damaged output is not trusted; a changed input is not silently kept; other settings are refused.
    (output / "case0_seg.nii.gz").write_bytes(b"garbage")
    os.utime(data / "case1.nii.gz", ns=(time.time_ns(), time.time_ns()))
    assert run(checkpoint, data, output) == 1
    rows = summary(output)
    assert "no record of this command vouches" in rows["case0"]["reason"]
    assert "input changed" in rows["case1"]["reason"]

    # --overwrite redoes everything.
    assert run(checkpoint, data, output, "--overwrite") == 0
    assert {r["status"] for r in summary(output).values()} == {"done"}
    assert nib.load(str(output / "case2_seg.nii.gz")).shape == (32, 32, 32)
    # Killed between writing a record and renaming its files: the files on disk are the earlier
    # run's (listed as the record's previous outputs), so they are ours to replace.
    record_path = output / "records" / "case1.json"
    record = json.loads(record_path.read_text())
    record["previous_outputs"] = json.loads(json.dumps(record["outputs"]))
    record["outputs"]["mask"]["sha256"] = "0" * 64
    record_path.write_text(json.dumps(record))
    assert run(checkpoint, data, output) == 0
    assert {k: r["status"] for k, r in summary(output).items()} == {"case0": "existing", "case1": "done", "case2": "existing"}
    assert run(checkpoint, data, output, "--precision", "bf16") == 1
    assert "other settings (precision)" in summary(output)["case0"]["reason"]


class DiesOn:
    """Preprocessing that kills its reader process on one file, as a decoder segfault would."""

    def __init__(self, inner, name: str):
        self.inner, self.name = inner, name

    def __call__(self, data):
        if Path(data["image"]).name == self.name:
            os._exit(139)
        return self.inner(data)


def test_a_reader_process_dying_on_one_case_fails_only_that_case(tmp_path, checkpoint):
    data = tmp_path / "in"
    for index, name in enumerate(("a", "b_crash", "c", "d")):
        write_nifti(data / f"{name}.nii.gz", seed=index)
    overrides = dict(segment.parse_override(text) for text in TINY[1::2])
    bundle = segment.load_bundle(BUNDLE, overrides=overrides, checkpoint=str(checkpoint), device="cpu")
    bundle.preprocessing = DiesOn(bundle.preprocessing, "b_crash.nii.gz")
    cases = segment.discover_cases(data)
    options = segment.SegmentOptions(output=tmp_path / "out", quiet=True, workers=1)

    segment.run_segmentation(cases, bundle, options, settings={}, run_id="run1")

    rows = {row["case_id"]: row for row in segment.collect_rows(cases, tmp_path / "out", "run1")}
    assert {k: r["status"] for k, r in rows.items()} == {"a": "done", "b_crash": "failed", "c": "done", "d": "done"}
    assert "reader process died" in rows["b_crash"]["reason"]


# --------------------------------------------------------------------------------------------
# DICOM SEG and QA pictures
# --------------------------------------------------------------------------------------------


def test_qa_png_and_dicom_seg(tmp_path, checkpoint):
    hd = pytest.importorskip("highdicom")
    data = tmp_path / "in"
    write_nifti(data / "brain.nii.gz", affine=OBLIQUE)
    series = write_series(data / "ct_series")
    output = tmp_path / "out"

    assert run(checkpoint, data, output, "--qa-png", "--format", "dicom-seg", "--show-phi") == 0  # named cases

    for case_id in ("brain", "ct_series"):
        png = output / "qa" / f"{case_id}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    index = (output / "qa" / "index.html").read_text()
    assert 'src="brain.png"' in index and 'src="ct_series.png"' in index
    assert not (output / "brain_seg.dcm").exists()  # no source series to reference
    assert "not a DICOM series" in summary(output)["brain"]["notes"]

    seg = hd.seg.segread(str(output / "ct_series_seg.dcm"))
    files = sorted(series.glob("*.dcm"), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in files]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, combine_segments=True)
    mask = np.asarray(nib.load(str(output / "ct_series_seg.nii.gz")).dataobj)
    np.testing.assert_array_equal(frames.transpose(2, 1, 0), mask)
    assert seg.SeriesInstanceUID != pydicom.dcmread(files[0]).SeriesInstanceUID


def test_dicom_seg_without_highdicom_is_a_clear_usage_error(tmp_path, checkpoint, monkeypatch, capsys):
    write_nifti(tmp_path / "in" / "a.nii.gz")
    monkeypatch.setitem(sys.modules, "highdicom", None)  # import fails as if not installed
    assert run(checkpoint, tmp_path / "in", tmp_path / "out", "--format", "dicom-seg") == 2
    assert "pip install 'unetpp-pipeline[dicom-seg]'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# killed mid-batch, torchrun
# --------------------------------------------------------------------------------------------


def command(checkpoint: Path, data: Path, output: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline", "segment", "--bundle", str(BUNDLE), "--checkpoint", str(checkpoint), *TINY,
            "--input", str(data), "--output", str(output), "--quiet"]


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_sigkill_mid_batch_then_rerun_completes_each_case_exactly_once(tmp_path, checkpoint):
    data = tmp_path / "in"
    names = [f"case{i:02d}" for i in range(12)]
    for i, name in enumerate(names):
        write_nifti(data / f"{name}.nii.gz", shape=(40, 40, 40), seed=i)
    output = tmp_path / "out"
    process = subprocess.Popen(command(checkpoint, data, output), env=environment(), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((output / "records").glob("case*[0-9].json"))) < 3:
        assert process.poll() is None, process.stderr.read().decode("utf-8", "replace")
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the command and its reader worker
    process.wait()
    process.stderr.close()
    assert not (output / "summary.json").exists(), "the batch finished before the kill"
    finished_before = {
        p.stem: (p.stat().st_mtime_ns, (output / f"{p.stem}_seg.nii.gz").stat().st_mtime_ns)
        for p in (output / "records").glob("*.json")
        if (output / f"{p.stem}_seg.nii.gz").exists()
    }
    assert 0 < len(finished_before) < len(names)

    rerun = subprocess.run(command(checkpoint, data, output), env=environment(), cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert rerun.returncode == 0, rerun.stderr

    rows = summary(output)
    assert sorted(rows) == names
    for name, row in rows.items():
        expected = "existing" if name in finished_before else "done"
        assert row["status"] == expected, (name, row)
        mask = nib.load(str(output / f"{name}_seg.nii.gz"))
        assert np.asarray(mask.dataobj).shape == (40, 40, 40)  # reads completely: not truncated
    for name, stamps in finished_before.items():  # finished cases were not redone
        assert ((output / "records" / f"{name}.json").stat().st_mtime_ns, (output / f"{name}_seg.nii.gz").stat().st_mtime_ns) == stamps
    assert sorted(p.name for p in output.glob("*_seg.nii.gz")) == [f"{n}_seg.nii.gz" for n in names]
    assert not list(output.rglob(".tmp.*"))


def test_two_rank_torchrun_covers_every_case_exactly_once(tmp_path, checkpoint):
    data = tmp_path / "in"
    for i in range(4):
        write_nifti(data / f"vol{i}.nii.gz", seed=i)
    write_series(data / "dicom" / "series_a")
    output = tmp_path / "out"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    process = subprocess.Popen(launcher + command(checkpoint, data, output)[1:] + ["--show-phi"], env=environment(), cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", start_new_session=True)
    try:
        log, _ = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        pytest.fail(f"torchrun did not finish in 180 s:\n{log[-4000:]}")
    assert process.returncode == 0, log[-4000:]

    rows = summary(output)
    assert sorted(rows) == ["series_a", "vol0", "vol1", "vol2", "vol3"]
    assert {r["status"] for r in rows.values()} == {"done"}
    by_rank = {rank: sorted(k for k, r in rows.items() if r["rank"] == rank) for rank in (0, 1)}
    assert by_rank == {0: ["series_a", "vol1", "vol3"], 1: ["vol0", "vol2"]}
    assert json.loads((output / "summary.json").read_text())["batch"]["world_size"] == 2
    assert len(list(output.glob("*_seg.nii.gz"))) == 5
    assert not list((output / "records").glob(".rank*"))  # completion files are cleaned up


def test_benchmark_quick_run_prints_its_measurements_as_json(tmp_path):
    output = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_segment.py"), "--quick", "--output", str(output)],
                            env=environment(), cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert report["pipeline"]["volumes"] >= 4 and report["pipeline"]["batch_over_network"] > 0
    assert 0 < report["pipeline"]["network_share_of_batch"] <= 1
    assert len(report["bf16"]["dice_bf16_vs_fp32"]) == 4 and report["bf16"]["network_speedup_fp32_over_bf16"] > 0
    assert report["memory_ct"]["peak_pss_gb_process_tree"] > 0 and report["memory_ct"]["peak_rss_gb_largest_process"] > 0
    levels = report["levels"]["rows"]  # seconds per volume per level beside accurate mode, in one run
    assert list(levels) == ["L1", "L2", "accurate"]
    assert all(row["network_s_per_volume"] > 0 and 0 < row["flop_share"] for row in levels.values())
    assert levels["L1"]["flop_share"] < levels["L2"]["flop_share"] == 1.0
    assert report["levels"]["rounds"] == 1 and len(levels["L1"]["case_share_over_flop_share_by_round"]) == 1


# --------------------------------------------------------------------------------------------
# the rooms' contracts: class information from the config, writers as plug-ins, one scanning rule
# --------------------------------------------------------------------------------------------


def multi_class_bundle(folder: Path, network_def: dict) -> Path:
    """A lab's 3-class bundle: the 3D bundle's configs with another network and named classes."""
    configs = folder / "configs"
    configs.mkdir(parents=True)
    inference = json.loads((BUNDLE / "configs" / "inference.json").read_text())
    inference.update(out_channels=3, network_def=network_def, sw_roi_size=[32, 32, 32], sw_batch_size=1)
    (configs / "inference.json").write_text(json.dumps(inference, indent=1))
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    pred.update(num_channels=3, channel_def={"0": "background", "1": "liver", "2": "tumour (softmax)"})
    (configs / "metadata.json").write_text(json.dumps(meta, indent=1))
    return folder


@pytest.mark.parametrize(
    "network_def",
    [
        {"_target_": "pipeline.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": "@out_channels", "features": [4, 8, 16], "depth": 2},
        # MONAI's own network keeps no out_channels attribute: the count must come from the config
        {"_target_": "monai.networks.nets.BasicUNet", "spatial_dims": 3, "in_channels": 1, "out_channels": "@out_channels", "features": [4, 4, 8, 8, 16, 4]},
    ],
    ids=["UNet", "BasicUNet"],
)
def test_multi_class_unet_bundle_names_classes_and_measures_each(tmp_path, network_def):
    from monai.bundle import ConfigParser

    bundle = multi_class_bundle(tmp_path / "bundle", network_def)
    torch.manual_seed(0)
    network = ConfigParser({"out_channels": 3, "network_def": network_def}).get_parsed_content("network_def")
    torch.save(network.state_dict(), tmp_path / "model.pt")
    write_nifti(tmp_path / "in" / "a.nii.gz", affine=np.diag([1.2, 0.9, 1.5, 1.0]))

    code = segment.main(["--bundle", str(bundle), "--checkpoint", str(tmp_path / "model.pt"), "--input", str(tmp_path / "in"),
                         "--output", str(tmp_path / "out"), "--quiet"])

    assert code == 0
    row = summary(tmp_path / "out")["a"]
    mask = np.asarray(nib.load(str(tmp_path / "out" / "a_seg.nii.gz")).dataobj)
    assert set(np.unique(mask)) <= {0, 1, 2} and mask.max() >= 1
    voxel_ml = 1.2 * 0.9 * 1.5 / 1000
    assert row["volumes_ml"] == pytest.approx({"liver": (mask == 1).sum() * voxel_ml, "tumour": (mask == 2).sum() * voxel_ml}, abs=1e-3)
    header = (tmp_path / "out" / "summary.csv").read_text().splitlines()[0].split(",")
    assert header[-2:] == ["volume_ml_liver", "volume_ml_tumour"]


def test_a_registered_writer_is_a_format_with_its_own_outputs_and_summary_column(tmp_path, checkpoint):
    from pipeline.segment import writers

    calls = []

    class VolumeText(writers.OutputWriter):
        """Writes each case's voxel count per class as text."""

        name, key, suffix, folder = "counts", "counts", "_counts.txt", "counts"

        def write(self, prediction, path):
            calls.append(prediction.case.case_id)
            path.write_text(json.dumps({int(k): int((prediction.mask == k).sum()) for k in np.unique(prediction.mask)}))

    writers.register_writer(VolumeText)
    try:
        write_nifti(tmp_path / "in" / "a.nii.gz", seed=1)
        write_nifti(tmp_path / "in" / "b.nii.gz", seed=2)
        output = tmp_path / "out"
        assert run(checkpoint, tmp_path / "in", output, "--format", "counts") == 0
        assert calls == ["a", "b"]
        rows = summary(output)
        for case_id in ("a", "b"):
            mask = np.asarray(nib.load(str(output / f"{case_id}_seg.nii.gz")).dataobj)
            counts = json.loads((output / "counts" / f"{case_id}_counts.txt").read_text())
            assert counts.get("1", 0) == int(mask.sum())
            assert rows[case_id]["outputs"]["counts"]["path"] == f"counts/{case_id}_counts.txt"
        assert "counts" in (output / "summary.csv").read_text().splitlines()[0].split(",")
        # A rerun checks the new output like any other: deleting it redoes nothing silently.
        (output / "counts" / "a_counts.txt").unlink()
        assert run(checkpoint, tmp_path / "in", output, "--format", "counts") == 0
        assert calls == ["a", "b", "a"] and summary(output)["b"]["status"] == "existing"
    finally:
        del writers.WRITERS["counts"]


def test_datalist_build_and_segment_find_the_same_cases_in_a_folder(tmp_path):
    from pipeline.data import build_datalist

    images = tmp_path / "images"
    write_nifti(images / "a.nii.gz")
    sitk.WriteImage(sitk_image_from_array(blobs(), np.eye(4)), str(images / "b.nrrd"))
    write_series(images / "c_series")
    no_suffix = write_series(images / "d_exported")
    for path in sorted(no_suffix.glob("*.dcm")):  # PACS exports: IM000001 without a suffix
        path.rename(no_suffix / f"IM{path.stem[-4:]}")
    (images / "e_notes").mkdir()
    (images / "e_notes" / "README.txt").write_text("a folder of other files is not a series")
    (images / "f.txt").write_text("not an image")

    from_build = build_datalist(tmp_path)["test"]
    from_segment = segment.discover_cases(images)

    built = sorted(entry["image"].removeprefix("images/") for entry in from_build)
    assert built == sorted(case.source for case in from_segment) == ["a.nii.gz", "b.nrrd", "c_series/", "d_exported/"]


def test_tta_is_a_setting_of_the_masks(tmp_path, checkpoint):
    write_nifti(tmp_path / "in" / "a.nii.gz", seed=4)
    output = tmp_path / "out"
    assert run(checkpoint, tmp_path / "in", output, "--tta") == 0
    row = summary(output)["a"]
    assert row["status"] == "done" and row["settings"]["tta"] is True
    assert run(checkpoint, tmp_path / "in", output) == 1  # masks made with TTA are not silently kept
    assert "other settings (tta)" in summary(output)["a"]["reason"]


def test_pseudonymised_failure_records_do_not_name_the_input(tmp_path):
    from pipeline.segment.records import base_row

    source = tmp_path / "Doe_John_1961" / "ct.nii.gz"
    case = segment.Case("case-0123abcd", str(source), "Doe_John_1961/ct.nii.gz", phi={"input": str(source)})
    row = base_row(case, "failed", f"read: {source}: truncated", "run1", 0, None)
    assert "Doe_John" not in json.dumps({k: v for k, v in row.items() if k != "source"})
    assert row["reason"] == "read: <case-0123abcd>: truncated" and row["input"] == "case-0123abcd"
    plain = base_row(segment.Case("ct", str(source), "ct.nii.gz"), "failed", f"read: {source}", "run1", 0, None)
    assert plain["reason"] == f"read: {source}"  # without --pseudonymise the file is named


def test_phi_map_keeps_earlier_batches_and_a_damaged_key_is_named(tmp_path, monkeypatch):
    import csv

    from pipeline.segment.cases import pseudonym_key, record_discovery

    monkeypatch.delenv("PIPELINE_PSEUDONYM_KEY", raising=False)
    key = pseudonym_key(tmp_path)
    first = segment.Case("case-1", "a.nii.gz", "a.nii.gz", phi={"case_id": "case-1", "source": "Doe/a.nii.gz", "input": "/in/Doe/a.nii.gz"})
    second = segment.Case("case-2", "b.nii.gz", "b.nii.gz", phi={"case_id": "case-2", "source": "Roe/b.nii.gz", "input": "/in/Roe/b.nii.gz"})
    record_discovery(tmp_path, [], [first], key)
    record_discovery(tmp_path, [], [second], pseudonym_key(tmp_path))
    with open(tmp_path / "phi_map.csv", newline="") as handle:
        assert [row["case_id"] for row in csv.DictReader(handle)] == ["case-1", "case-2"]
    assert oct((tmp_path / "phi_map.csv").stat().st_mode & 0o777) == "0o600"
    (tmp_path / ".pseudonym.key").write_text("not hex\n")
    with pytest.raises(ValueError, match=r"\.pseudonym\.key: not a hex key"):
        pseudonym_key(tmp_path)
