"""Fuzz the readers and ``datalist validate`` with mutated real files. Prints JSON.

    python benchmarks/fuzz_readers.py                       # 2,000 mutants, a few minutes
    python benchmarks/fuzz_readers.py --iterations 60       # the short run in the test suite

Seeds are real files shipped with installed packages (nibabel's ``anatomical.nii``, pydicom's
``CT_small.dcm`` and a 5-slice CT series) plus a NIfTI-gz, an NRRD and a MetaImage written from
them. Each mutant is one of: truncated at a random byte, random bits flipped (mostly in the
header, where a flip changes meaning), a header field overwritten with an extreme value (NIfTI
dims/datatype/vox_offset, DICOM Rows/Columns/BitsAllocated/NumberOfFrames), or a DICOM with
deeply nested sequences. Each is read by ``pipeline.readers.read_volume`` in a separate process.

Allowed outcomes: read, or refused with :class:`pipeline.readers.DataError` naming the file.
Anything else is a finding: another exception type (a traceback a user would see), a crash of
the reader process (a segfault), or a read that took more than ``--max-rss-gb`` of memory.
Every finding should become a regression test. Exit code 1 when there are findings.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def seed_files(folder: Path) -> list[Path]:
    """Real files to mutate, written into ``folder``."""
    import nibabel as nib
    import nibabel.tests
    import pydicom.data
    import SimpleITK as sitk

    from pipeline.readers import sitk_image_from_array

    folder.mkdir(parents=True, exist_ok=True)
    anatomical = Path(nibabel.tests.__file__).parent / "data" / "anatomical.nii"
    seeds = [Path(shutil.copy(anatomical, folder / "anatomical.nii"))]
    image = nib.load(str(anatomical))
    nib.save(image, str(folder / "anatomical.nii.gz"))
    array = np.asarray(image.dataobj)[:32, :32, :16].astype(np.int16)
    for suffix in (".nrrd", ".mha"):
        sitk.WriteImage(sitk_image_from_array(array, image.affine), str(folder / f"anatomical{suffix}"))
    seeds += [folder / "anatomical.nii.gz", folder / "anatomical.nrrd", folder / "anatomical.mha"]
    data = Path(pydicom.data.__file__).parent / "test_files"
    seeds.append(Path(shutil.copy(data / "CT_small.dcm", folder / "CT_small.dcm")))
    series = folder / "CT5N"
    shutil.copytree(data / "dicomdirtests" / "98892001" / "CT5N", series)
    seeds.append(series)
    return seeds


def _nested_sequences(path: Path, depth: int) -> None:
    """A valid DICOM file whose private sequence nests ``depth`` levels deep."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    dataset = pydicom.dcmread(path)
    inner = Dataset()
    for _ in range(depth):
        outer = Dataset()
        outer.add_new(0x00091010, "SQ", Sequence([inner]))
        inner = outer
    dataset.add_new(0x00091010, "SQ", Sequence([inner]))
    dataset.save_as(path)


def mutate(source: Path, target: Path, rng: np.random.Generator) -> str:
    """Write one mutant of ``source`` (a file or a series folder) to ``target``; returns what was done."""
    if source.is_dir():
        shutil.copytree(source, target)
        victims = sorted(p for p in target.iterdir() if p.is_file())
        victim = victims[int(rng.integers(len(victims)))]
        return f"{victim.name}: " + mutate_file(victim, rng)
    shutil.copy(source, target)
    return mutate_file(target, rng)


def mutate_file(path: Path, rng: np.random.Generator) -> str:
    content = bytearray(path.read_bytes())
    kind = rng.choice(["truncate", "flip", "field", "nested"] if path.suffix == ".dcm" else ["truncate", "flip", "field"])
    if kind == "truncate":
        cut = int(rng.integers(0, len(content)))
        path.write_bytes(bytes(content[:cut]))
        return f"truncated at byte {cut} of {len(content)}"
    if kind == "flip":
        header = min(len(content), 2048)
        flips = int(rng.integers(1, 9))
        for _ in range(flips):
            at = int(rng.integers(0, header if rng.random() < 0.8 else len(content)))
            content[at] ^= 1 << int(rng.integers(8))
        path.write_bytes(bytes(content))
        return f"{flips} bit(s) flipped"
    if kind == "nested":
        depth = int(rng.choice([50, 200]))  # deeper ones exceed pydicom's own recursion when writing
        _nested_sequences(path, depth)
        return f"sequences nested {depth} deep"
    return _extreme_field(path, content, rng)


def _extreme_field(path: Path, content: bytearray, rng: np.random.Generator) -> str:
    """Overwrite one header field with an extreme value, keeping the rest of the file valid."""
    extremes = [0, 1, -1, 2**15 - 1, -(2**15), 2**16 - 1, 2**31 - 1]
    value = int(rng.choice(extremes))
    name = path.name.lower()
    if name.endswith(".nii"):
        field = rng.choice(["dim", "datatype", "vox_offset", "bitpix"])
        offsets = {"dim": 40 + 2 * int(rng.integers(0, 8)), "datatype": 70, "bitpix": 72, "vox_offset": 108}
        at = offsets[field]
        if field == "vox_offset":
            content[at : at + 4] = np.float32(value).tobytes()
        else:
            content[at : at + 2] = np.int16(np.clip(value, -(2**15), 2**15 - 1)).tobytes()
        path.write_bytes(bytes(content))
        return f"NIfTI {field} at byte {at} set to {value}"
    if name.endswith(".dcm"):
        import pydicom

        dataset = pydicom.dcmread(path)
        field = str(rng.choice(["Rows", "Columns", "BitsAllocated", "NumberOfFrames", "SamplesPerPixel"]))
        setattr(dataset, field, max(value, 0) % 65536 if field != "NumberOfFrames" else str(value))
        dataset.save_as(path)
        return f"DICOM {field} set to {value}"
    text = content.decode("latin-1")  # NRRD / MetaImage: text headers
    for key in ("sizes: ", "DimSize = "):
        if key in text:
            start = text.index(key) + len(key)
            end = text.index("\n", start)
            text = text[:start] + " ".join(str(value) for _ in text[start:end].split()) + text[end:]
            path.write_bytes(text.encode("latin-1"))
            return f"{key.strip(': =')} set to {value}"
    return mutate_file(path, rng)


def _read(path: str, connection) -> None:
    """In a fresh reader process: read ``path``; send (outcome, message, peak RSS GB of this read)."""
    from pipeline.readers import DataError, read_volume

    try:
        read_volume(path)
        outcome, message = "read", ""
    except DataError as err:
        outcome, message = "refused", str(err).splitlines()[0]
    except Exception as err:  # noqa: BLE001 - the finding this harness looks for
        outcome, message = "unexpected", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    connection.send((outcome, message, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6))


def read_isolated(path: Path, timeout_s: float = 120) -> tuple[str, str, float]:
    """Read ``path`` in a forked process (a crash or a memory peak there is this file's alone)."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_read, args=(str(path), send))
    process.start()
    send.close()
    result = receive.recv() if receive.poll(timeout_s) else None
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
        return "crash", f"no answer within {timeout_s:.0f} s", 0.0
    if result is None:
        return "crash", f"the reader process died (exit code {process.exitcode})", 0.0
    return result


def fuzz(iterations: int, seed: int, max_rss_gb: float, folder: Path) -> dict:
    rng = np.random.default_rng(seed)
    seeds = seed_files(folder / "seeds")
    findings, counts = [], {"read": 0, "refused": 0}
    start = time.perf_counter()
    baseline_gb = read_isolated(seeds[0])[2]  # what importing the pipeline costs, to subtract
    for index in range(iterations):
        source = seeds[index % len(seeds)]
        target = folder / "mutants" / f"{index:05d}_{source.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        what = mutate(source, target, rng)
        outcome, message, rss_gb = read_isolated(target)
        rss_gb = max(rss_gb - baseline_gb, 0.0)
        finding = None
        if outcome in ("unexpected", "crash"):
            finding = message
        elif outcome == "refused" and target.name not in message and source.name not in message:
            finding = f"refused without naming the file: {message}"
        elif rss_gb > max_rss_gb:
            finding = f"peak memory {rss_gb:.1f} GB"
        if finding:  # the mutant is kept (with --keep) to become a regression test
            findings.append({"mutant": target.name, "mutation": what, "finding": finding})
            continue
        counts[outcome] += 1
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    return {"iterations": iterations, "seed": seed, "seconds": round(time.perf_counter() - start, 1), **counts, "findings": findings}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-rss-gb", type=float, default=1.0, help="peak memory a read may add (GB)")
    parser.add_argument("--keep", default=None, help="folder to keep the mutants that gave findings in")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.keep) if args.keep else Path(scratch)
        report = fuzz(args.iterations, args.seed, args.max_rss_gb, folder)
    print(json.dumps(report, indent=1))
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
