"""Hostile and careless inputs: every case tells the truth, nothing is lost, messages name the file.

Each test writes real files to a temp folder, runs the command as a user would, and checks the
exit code, the summary row, the message and that nothing was lost or overwritten.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from pipeline.data import validate_datalist
from pipeline.nets import UNetPlusPlus
from pipeline.readers import DataError, read_volume

from test_segment import BUNDLE, ROOT, DiesOn, checkpoint, run, summary, tree, write_nifti, write_series  # noqa: F401 (fixture)


def environment() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def datalist_of(root: Path, images: list[str]) -> Path:
    path = root / "datalist.json"
    path.write_text(json.dumps({"test": [{"image": name} for name in images]}))
    return path


# --------------------------------------------------------------------------------------------
# non-finite voxels, damaged pixels, zero-size axes
# --------------------------------------------------------------------------------------------


def test_one_nan_voxel_fails_the_case_with_the_file_and_count_in_segment_and_validate(tmp_path, checkpoint):
    data = tmp_path / "in"
    write_nifti(data / "clean.nii.gz", seed=1)
    image = np.asarray(nib.load(str(write_nifti(data / "one_nan.nii.gz", seed=2))).dataobj).copy()
    image[10, 11, 12] = np.nan
    nib.save(nib.Nifti1Image(image, np.diag([1.2, 0.9, 1.5, 1.0])), str(data / "one_nan.nii.gz"))

    assert run(checkpoint, data, tmp_path / "out") == 1

    rows = summary(tmp_path / "out")
    assert rows["clean"]["status"] == "done"
    assert rows["one_nan"]["status"] == "failed"
    assert "one_nan.nii.gz: 1 NaN/Inf voxel(s)" in rows["one_nan"]["reason"]
    assert not (tmp_path / "out" / "one_nan_seg.nii.gz").exists()  # never an empty mask marked done
    problems = validate_datalist(datalist_of(data, ["clean.nii.gz", "one_nan.nii.gz"]), data)
    assert len(problems) == 1 and "one_nan.nii.gz: 1 NaN/Inf voxel(s)" in problems[0]


def test_a_dicom_slice_cut_short_fails_its_series_instead_of_reading_zeros(tmp_path, checkpoint):
    data = tmp_path / "in"
    series = write_series(data / "ct")
    victim = sorted(series.glob("*.dcm"))[7]
    content = victim.read_bytes()
    victim.write_bytes(content[: len(content) - 600])  # the last rows of pixels are missing

    assert run(checkpoint, data, tmp_path / "out", "--show-phi") == 1  # named case and reason (DICOM: pseudonymised by default)

    row = summary(tmp_path / "out")["ct"]
    assert row["status"] == "failed" and victim.name in row["reason"] and "truncated" in row["reason"]
    problems = validate_datalist(datalist_of(data, ["ct/"]), data)
    assert len(problems) == 1 and victim.name in problems[0] and "truncated" in problems[0]


def test_zero_size_axis_is_a_clear_error_naming_the_file(tmp_path):
    path = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((0, 10, 10), np.float32), np.eye(4)), str(path))
    with pytest.raises(DataError, match="flat.nii.gz: the header claims an image with no voxels"):
        read_volume(path)


# --------------------------------------------------------------------------------------------
# memory bombs: refused from the header, before any allocation
# --------------------------------------------------------------------------------------------


def nifti_claiming(path: Path, shape: tuple, payload_bytes: int = 4096) -> Path:
    """A NIfTI whose header claims ``shape`` float32 but which holds only ``payload_bytes`` of data."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.float32)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + b"\0" * payload_bytes
    if path.name.endswith(".gz"):
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def peak_rss_mb_of(code: str) -> tuple[float, str]:
    """Run ``code`` in a fresh interpreter; return its peak RSS (MB) and what it printed."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (here pytest) across exec.
    script = textwrap.dedent(code) + textwrap.dedent(
        """
        peak = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
        print("PEAK_MB", int(peak) / 1024)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], env=environment(), capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    peak = float(result.stdout.split("PEAK_MB")[-1])
    return peak, result.stdout


@pytest.mark.parametrize("name,shape", [("claims_13gb.nii", (1500, 1500, 1500)), ("gzip_bomb.nii.gz", (2048, 2048, 1024))])
def test_memory_bombs_are_refused_before_reading_with_peak_memory_under_1gb(tmp_path, name, shape):
    bomb = nifti_claiming(tmp_path / name, shape)
    assert bomb.stat().st_size < 10_000
    peak, printed = peak_rss_mb_of(
        f"""
        from monai.transforms import LoadImage
        from pipeline.readers import DataError, read_volume
        from pipeline.transforms import inference_transforms
        for load in (lambda p: read_volume(p), lambda p: inference_transforms(preset="ct")({{"image": p}})):
            try:
                load({str(bomb)!r})
                print("READ")
            except Exception as err:
                print("REFUSED", str(err).splitlines()[0])
        """
    )
    assert printed.count("REFUSED") == 2 and "READ" not in printed, printed
    assert f"{name}: the header claims {int(np.prod(shape)):,} voxels" in printed
    assert peak < 1024, f"peak RSS {peak:.0f} MB"


def test_a_file_shorter_than_its_header_is_refused_as_truncated(tmp_path):
    bomb = nifti_claiming(tmp_path / "short.nii", (64, 64, 64))
    with pytest.raises(DataError, match=r"short.nii: truncated: the header claims 1,048,928 bytes of image data, the file holds 4,448"):
        read_volume(bomb)


# --------------------------------------------------------------------------------------------
# crashing decoders
# --------------------------------------------------------------------------------------------


def test_workers_0_still_isolates_a_crashing_reader(tmp_path, checkpoint):
    from pipeline import segment
    from test_segment import TINY

    data = tmp_path / "in"
    for index, name in enumerate(("a", "b_crash", "c")):
        write_nifti(data / f"{name}.nii.gz", seed=index)
    overrides = dict(segment.parse_override(text) for text in TINY[1::2])
    bundle = segment.load_bundle(BUNDLE, overrides=overrides, checkpoint=str(checkpoint), device="cpu")
    bundle.preprocessing = DiesOn(bundle.preprocessing, "b_crash.nii.gz")
    cases = segment.discover_cases(data)
    options = segment.SegmentOptions(output=tmp_path / "out", quiet=True, workers=0)

    segment.run_segmentation(cases, bundle, options, settings={}, run_id="run1")

    rows = {row["case_id"]: row for row in segment.collect_rows(cases, tmp_path / "out", "run1")}
    assert {k: r["status"] for k, r in rows.items()} == {"a": "done", "b_crash": "failed", "c": "done"}
    assert "reader process died" in rows["b_crash"]["reason"]


def test_validate_reports_a_crashing_decoder_and_every_other_problem(tmp_path, monkeypatch):
    import pipeline.data

    data = tmp_path / "in"
    write_nifti(data / "a.nii.gz", seed=1)
    write_nifti(data / "crash.nii.gz", seed=2)
    (data / "text.nii").write_text("not an image")
    real = pipeline.data.read_volume

    def crashing(path, *args, **kwargs):
        if Path(path).name == "crash.nii.gz":
            os._exit(139)  # in the reader process, as a segfault in a decoder would
        return real(path, *args, **kwargs)

    monkeypatch.setattr(pipeline.data, "read_volume", crashing)
    problems = validate_datalist(datalist_of(data, ["a.nii.gz", "crash.nii.gz", "text.nii"]), data)
    assert len(problems) == 2
    assert "crash.nii.gz: the reader crashed on this file" in problems[0]
    assert "text.nii" in problems[1]


# --------------------------------------------------------------------------------------------
# one run per output folder; outputs are never inputs
# --------------------------------------------------------------------------------------------


def test_a_second_run_on_the_same_output_folder_is_refused_or_waits(tmp_path, checkpoint, capsys):
    data, output = tmp_path / "in", tmp_path / "out"
    write_nifti(data / "a.nii.gz")
    output.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from pipeline.fileio import FolderLock
            with FolderLock({str(output)!r}, ".segment.lock"):
                print("held", flush=True)
                time.sleep(float(sys.argv[1]))
        """), "4"],
        env=environment(), stdout=subprocess.PIPE, text=True, encoding="utf-8", errors="replace",
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert run(checkpoint, data, output) == 2
        message = capsys.readouterr().err
        assert f"pid {holder.pid} on" in message and "--wait" in message
        assert not (output / "summary.json").exists() and not (output / "a_seg.nii.gz").exists()
        start = time.monotonic()
        assert run(checkpoint, data, output, "--wait") == 0  # waits until the holder lets go
        assert time.monotonic() - start > 1.0
    finally:
        holder.kill()
        holder.wait()
    # The lock file left behind (the holder is gone, killed or not) does not block the next run.
    assert (output / ".segment.lock").exists()
    assert run(checkpoint, data, output) == 0
    assert summary(output)["a"]["status"] == "existing"


def test_output_equal_to_input_is_refused_and_earlier_outputs_are_never_inputs(tmp_path, checkpoint, capsys):
    data = tmp_path / "in"
    write_nifti(data / "a.nii.gz", seed=1)
    write_nifti(data / "b.nii.gz", seed=2)
    before = tree(data)
    assert run(checkpoint, data, data) == 2
    assert "is the input folder" in capsys.readouterr().err
    assert tree(data) == before

    assert run(checkpoint, data, data / "masks_v1") == 0  # an output folder inside the input
    assert run(checkpoint, data, tmp_path / "masks_v2") == 0  # a second run elsewhere
    assert sorted(summary(tmp_path / "masks_v2")) == ["a", "b"]  # not masks_v1/a_seg etc.
    assert run(checkpoint, data, data / "masks_v1") == 0  # rerun: existing, no a_seg_seg
    assert sorted(summary(data / "masks_v1")) == ["a", "b"]
    assert not list(data.rglob("*_seg_seg*"))


# --------------------------------------------------------------------------------------------
# storage errors
# --------------------------------------------------------------------------------------------


def test_an_output_folder_that_cannot_be_created_is_one_line_and_exit_2(tmp_path, checkpoint, capsys):
    write_nifti(tmp_path / "in" / "a.nii.gz")
    (tmp_path / "a_file").write_text("not a folder")
    assert run(checkpoint, tmp_path / "in", tmp_path / "a_file" / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --output") and "cannot write there" in err and "Traceback" not in err


def test_a_full_disk_fails_cases_with_one_line_and_leaves_no_temporaries(tmp_path, checkpoint):
    data = tmp_path / "in"
    write_nifti(data / "a.nii.gz", seed=1)
    write_nifti(data / "b.nii.gz", seed=2)
    output = tmp_path / "out"
    # A file-size limit makes every write beyond 1 KB fail as a full disk does (EFBIG/ENOSPC). It is
    # set once the reader process has started: that process hands tensors over through /dev/shm.
    script = textwrap.dedent(f"""
        import resource, signal, sys
        import pipeline.segment.run as run

        def full_disk_after_start(*args, start=run._loader):
            iterator = start(*args)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
            return iterator

        run._loader = full_disk_after_start
        from pipeline.segment import main
        sys.exit(main({["--bundle", str(BUNDLE), "--checkpoint", str(checkpoint), "--input", str(data), "--output", str(output), "--quiet",
                        "--override", "network_def#features=[4,8,16]", "--override", "network_def#depth=2",
                        "--override", "sw_roi_size=[32,32,32]", "--override", "sw_batch_size=1"]!r}))
    """)
    result = subprocess.run([sys.executable, "-c", script], env=environment(), capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "a: FAILED: write: OSError" in result.stderr and "File too large" in result.stderr
    assert "the summary could not be written" in result.stderr
    assert not list(output.rglob(".tmp.*")) and not list(output.glob("*_seg.nii.gz"))
    assert sorted(p.name for p in data.iterdir()) == ["a.nii.gz", "b.nii.gz"]


# --------------------------------------------------------------------------------------------
# a done case with an empty mask is never silent
# --------------------------------------------------------------------------------------------


def test_an_empty_mask_from_a_non_empty_image_is_a_warning_in_the_summary(tmp_path, capsys):
    network = UNetPlusPlus(3, 1, 1, features=(4, 8, 16), depth=2)
    state = network.state_dict()
    for key in state:
        if key.startswith("heads") and key.endswith("bias"):
            state[key] = torch.full_like(state[key], -1e4)  # every voxel far below the threshold
    torch.save(state, tmp_path / "silent.pt")
    write_nifti(tmp_path / "in" / "a.nii.gz")

    assert run(tmp_path / "silent.pt", tmp_path / "in", tmp_path / "out") == 0

    row = summary(tmp_path / "out")["a"]
    assert row["status"] == "done" and row["volumes_ml"]["foreground"] == 0
    assert row["warnings"] == ["empty mask: no foreground voxel predicted in a non-empty image"]
    header, line = (tmp_path / "out" / "summary.csv").read_text().splitlines()[:2]
    assert "empty mask" in line.split(",")[header.split(",").index("warnings")]
    assert "1 with warnings" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# checkpoints: every bad file is named with its problem
# --------------------------------------------------------------------------------------------


class Pwned:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("empty", "empty file (0 bytes)"),
        ("truncated", "not a readable PyTorch checkpoint"),
        ("text", "not a readable PyTorch checkpoint"),
        ("pickle", "refused: it holds Python objects other than tensors"),
    ],
)
def test_bad_checkpoints_are_one_line_naming_the_file(tmp_path, checkpoint, capsys, kind, expected):
    import pickle

    path = tmp_path / f"{kind}.pt"
    good = checkpoint.read_bytes()
    content = {"empty": b"", "truncated": good[: len(good) // 2], "text": b"weights are in the other folder\n",
               "pickle": pickle.dumps({"model": Pwned()})}[kind]
    path.write_bytes(content)
    write_nifti(tmp_path / "in" / "a.nii.gz")

    assert run(path, tmp_path / "in", tmp_path / "out") == 2

    err = capsys.readouterr().err
    assert f"{path}: {expected}" in err and "Traceback" not in err and "pwned" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# trust in bundles
# --------------------------------------------------------------------------------------------


def test_a_pinned_bundle_that_changed_is_named_by_verify_and_refused_by_segment(tmp_path, checkpoint, capsys):
    import shutil

    from pipeline.manifest import main as bundle_main

    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    (bundle / "models").mkdir()
    shutil.copy(checkpoint, bundle / "models" / "model.pt")
    assert bundle_main(["pin", str(bundle)]) == 0
    digest = capsys.readouterr().out.split("digest ")[-1].strip()
    assert bundle_main(["verify", str(bundle)]) == 0
    write_nifti(tmp_path / "in" / "a.nii.gz")
    tiny = ["--override", "network_def#features=[4,8,16]", "--override", "network_def#depth=2", "--override", "sw_roi_size=[32,32,32]"]
    from pipeline.segment import main as segment_main

    command = ["--bundle", str(bundle), *tiny, "--input", str(tmp_path / "in"), "--quiet", "--bundle-digest", digest]
    assert segment_main([*command, "--output", str(tmp_path / "out1")]) == 0

    inference = bundle / "configs" / "inference.json"
    inference.write_text(inference.read_text().replace('"overlap": 0.5', '"overlap": 0.25'))
    capsys.readouterr()
    assert bundle_main(["verify", str(bundle)]) == 1
    assert "changed: configs/inference.json" in capsys.readouterr().out
    assert segment_main([*command, "--output", str(tmp_path / "out2")]) == 2
    assert "its configs or weights changed" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


# --------------------------------------------------------------------------------------------
# fuzzing: mutated real files are read or refused with the file named, nothing else
# --------------------------------------------------------------------------------------------


def test_short_fuzz_run_of_the_readers_finds_nothing():
    """260 mutants of seed 1 include #256, a CT slice with flipped header bits on which SimpleITK's
    own header probe allocated 1.1 GB; DICOM files are now checked with pydicom first."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fuzz_readers.py"), "--iterations", "260", "--seed", "1"],
                            env=environment(), cwd=ROOT, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=600)
    report = json.loads(result.stdout)
    assert report["findings"] == [] and result.returncode == 0, report["findings"]
    assert report["read"] > 50 and report["refused"] > 50  # the mutants exercise both outcomes
