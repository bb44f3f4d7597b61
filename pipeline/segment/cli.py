"""``python -m pipeline segment``: options, checks that fail fast (exit 2), the batch, the summary."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Sequence

import torch

from pipeline.fileio import FolderLock, LockHeld, atomic_write_text
from pipeline.inferers import PRECISIONS, check_precision
from pipeline.readers import MAX_GB_ENV, MAX_VOXELS_ENV, DataError, input_files
from pipeline.segment import dist
from pipeline.segment.bundle import LoadedBundle, load_bundle, parse_override
from pipeline.dicom import SeriesSelection
from pipeline.segment.cases import (
    OUTPUT_MARKER,
    assign_case_ids,
    cases_from_datalist,
    discover_cases,
    pseudonym_key,
    pseudonymise_cases,
    record_discovery,
    shard,
)
from pipeline.segment.records import RECORDS_DIR, collect_rows, write_summary
from pipeline.segment.run import SegmentOptions, root_cause, run_segmentation
from pipeline.segment.writers import WRITERS, writers_for

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "build_parser", "main"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline segment",
        description="Batch-segment a folder (NIfTI/NRRD/MHA files, DICOM series folders) or a datalist with a MONAI bundle.",
        epilog="Exit code: 0 all cases done, 1 some case failed (see OUT/summary.csv), 2 usage or setup error.",
    )
    parser.add_argument("--bundle", required=True, help="bundle folder, e.g. bundles/unetpp_3d_seg")
    parser.add_argument("--input", required=True, help="input folder (searched recursively), a datalist .json, or one image file")
    parser.add_argument("--output", required=True, help="output folder (nothing is written outside it)")
    parser.add_argument("--config", nargs="+", default=["configs/inference.json"], help="bundle config file(s), later ones override")
    parser.add_argument("--override", action="append", default=[], metavar="ID=VALUE",
                        help="config override as for `monai.bundle run`, e.g. network_def#features=[8,16,32] (repeatable)")
    parser.add_argument("--checkpoint", default=None, help="weights (state_dict); default: the bundle's ckpt_path / models/model.pt")
    parser.add_argument("--force", action="store_true",
                        help="use the weights even when the settings differ from the ones they were trained with (models/settings.json)")
    parser.add_argument("--series", action="append", default=None, metavar="RULE",
                        help="DICOM inputs: which series to segment, per study (repeatable; see python -m pipeline dicom scan): "
                             "modality=CT, description~venous, orientation=axial, number=3, uid=..., axial-thinnest, all; "
                             "default: each folder's one image series")
    names = parser.add_mutually_exclusive_group()
    names.add_argument("--pseudonymise", action="store_true",
                       help="case ids case-<hash> keyed from the Study/Series UIDs (a file's: its path), never from folder "
                            "or file names; OUT/phi_map.csv (mode 600) links them back (the default when a case is DICOM)")
    names.add_argument("--show-phi", action="store_true",
                       help="keep folder and file names as case ids, also for DICOM inputs (which are pseudonymised by default)")
    parser.add_argument("--section", default="test", help="datalist section to segment (default: test)")
    parser.add_argument("--dataset-dir", "--dataset_dir", dest="dataset_dir", default=None, help="datalist paths root (default: its folder)")
    parser.add_argument("--mode", choices=("accurate", "fast"), default=None,
                        help="UNet++ eval mode (default: the one `prune` recorded in models/settings.json, else the bundle's)")
    parser.add_argument("--prune-level", type=int, default=None, help="fast mode: compute nodes X(i,j) with i+j <= K only")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: the bundle's; under torchrun cuda means cuda:LOCAL_RANK)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="autocast dtype for the network (fp16: CUDA only); default: the one `prune` recorded in "
                             "models/settings.json where the device computes it natively, else fp32")
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average the probabilities of every mirrored input (3D: 8x the network time)")
    formats = "; ".join(f"{name}: {cls.help}" for name, cls in WRITERS.items())
    parser.add_argument("--format", dest="formats", action="append", default=[], choices=list(WRITERS), metavar="FORMAT",
                        help=f"an output to write besides the NIfTI mask (repeatable): {formats}")
    parser.add_argument("--qa-png", dest="formats", action="append_const", const="qa-png", help="short for --format qa-png")
    parser.add_argument("--overwrite", action="store_true", help="redo every case and replace existing outputs")
    parser.add_argument("--workers", type=int, default=1,
                        help="reader processes reading ahead of a GPU network (0: one reader holding one case at a time); "
                             "with the network on the CPU, one reader reads each case in turn")
    parser.add_argument("--quiet", action="store_true", help="no progress bar; one log line per case")
    parser.add_argument("--bundle-digest", default=None, metavar="DIGEST",
                        help="refuse the bundle unless its configs and weights have this digest (python -m pipeline bundle pin B)")
    parser.add_argument("--wait", action="store_true", help="when another run holds OUT, wait for it instead of refusing")
    parser.add_argument("--max-voxels", type=float, default=None,
                        help="refuse an image whose header claims more voxels (default 2**31), before reading it")
    parser.add_argument("--max-gb", type=float, default=None,
                        help="refuse an image needing more float32 GB (default: 80%% of the memory available)")
    parser.add_argument("--dist-timeout", type=float, default=24 * 3600,
                        help="torchrun: seconds rank 0 waits for the other ranks to finish their shares")
    return parser


def _settings(args, bundle: LoadedBundle, overrides: dict) -> dict:
    """What makes two runs' masks comparable (stored in each record, checked on resume).

    The weights' digest, the content of every config file read, the resolved model settings
    (preprocessing, patch size, network shape: what the configs, ``configs/plan.json``,
    ``models/settings.json`` and the overrides made of them), the overrides and the precision.
    Editing a config, retraining or overriding a setting makes earlier masks "other settings".
    """
    return {
        "bundle": os.path.basename(os.path.normpath(args.bundle)),
        "config": dict(bundle.config_sha256),
        "checkpoint_sha256": bundle.checkpoint_sha256,
        "model_settings": bundle.settings,
        "overrides": {k: overrides[k] for k in sorted(overrides)},
        "precision": args.precision,
        "tta": args.tta,
    }


def _usage_error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _overrides(args) -> dict:
    """``--override`` items plus ``--mode``/``--prune-level`` as config overrides; ValueError on misuse."""
    overrides = dict(parse_override(text) for text in args.override)
    if args.prune_level is not None and args.mode != "fast":
        raise ValueError("--prune-level needs --mode fast")
    if args.mode is not None:
        overrides["network_def#mode"] = args.mode
    if args.prune_level is not None:
        overrides["network_def#prune_level"] = args.prune_level
    return overrides


def _served_defaults(args, overrides: dict) -> dict:
    """The serving decision ``prune`` recorded beside the weights (mode, level, head weights) as overrides,
    unless the command line chose the mode itself."""
    from pipeline.settings import serving_overrides, trained_settings

    if args.mode is not None or any(key.startswith("network_def#") and key.split("#")[1] in ("mode", "prune_level", "head_weights")
                                    for key in overrides):
        return overrides
    weights = args.checkpoint or os.path.join(args.bundle, "models", "model.pt")
    return {**serving_overrides(trained_settings(weights)), **overrides}


def _default_precision(args, bundle: LoadedBundle) -> str:
    """``--precision``, else the one recorded in the weights' settings where the device computes it natively, else fp32."""
    from pipeline.cpu import native_bf16
    from pipeline.settings import trained_settings

    if args.precision is not None:
        return args.precision
    recorded = (trained_settings(bundle.checkpoint) or {}).get("precision", "fp32")
    if recorded == "bf16" and not native_bf16(bundle.device):
        print(f"segment: models/settings.json says bf16, but {bundle.device} has no native bfloat16: using fp32", file=sys.stderr)
        return "fp32"
    return recorded if recorded in PRECISIONS else "fp32"


def _device(name: str | None, world_size: int, local_rank: int) -> str | None:
    """``--device`` checked; under torchrun a bare ``cuda`` becomes this rank's GPU. ValueError if unusable."""
    if name is None:
        return None
    try:
        resolved = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"--device {name!r}: {err}") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine")
        if world_size > 1 and resolved.index is None:
            return f"cuda:{local_rank}"
    return name


def _find_cases(input_path: Path, out: Path, args, skipped: list | None = None) -> list:
    if args.series and input_path.is_file():
        raise ValueError("--series chooses among the DICOM series of an input folder; a datalist or a file names its images")
    if input_path.is_file() and input_path.suffix.lower() == ".json":
        return cases_from_datalist(input_path, args.dataset_dir, args.section)
    if input_path.is_file():
        return assign_case_ids([(str(input_path), input_path.name, False)])
    return discover_cases(input_path, exclude=[out], series=args.series, skipped=skipped)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline segment ...``; returns the exit code (0 ok, 1 some case failed, 2 usage/setup)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    rank, world_size, local_rank = dist.dist_env()
    try:
        overrides = _served_defaults(args, _overrides(args))
        SeriesSelection.parse(args.series)  # a bad --series rule is a usage error before anything loads
        if args.workers < 0:
            raise ValueError("--workers must be >= 0")
        device = _device(args.device, world_size, local_rank)
        for writer in writers_for(args.formats):
            writer.check_available()
    except (ValueError, ImportError) as err:
        return _usage_error(str(err))
    input_path, out = Path(args.input), Path(args.output).absolute()
    if not input_path.exists():
        return _usage_error(f"--input {input_path}: not found")
    if out.exists() and not out.is_dir():
        return _usage_error(f"--output {out}: exists and is not a folder")
    if os.path.realpath(out) == os.path.realpath(input_path):
        return _usage_error(f"--output {out} is the input folder: masks would mix with the images; choose another folder")
    for name, value in ((MAX_VOXELS_ENV, args.max_voxels), (MAX_GB_ENV, args.max_gb)):
        if value is not None:  # the environment reaches every reader process
            os.environ[name] = str(value)
    if args.bundle_digest is not None:
        from pipeline.manifest import bundle_manifest

        digest = bundle_manifest(args.bundle)["digest"]
        if digest != args.bundle_digest.strip().lower():
            return _usage_error(
                f"--bundle {args.bundle} has digest {digest}, not the pinned {args.bundle_digest}: its configs or "
                f"weights changed (python -m pipeline bundle verify {args.bundle} names the files)"
            )
    try:
        bundle = load_bundle(args.bundle, args.config, overrides, checkpoint=args.checkpoint, device=device, force=args.force)
    except Exception as err:  # noqa: BLE001 - any setup problem is one clear line
        return _usage_error(f"cannot load bundle {args.bundle}: {root_cause(err)}")
    args.precision = _default_precision(args, bundle)
    try:
        check_precision(args.precision, bundle.device)
        distributed = dist.init_dist(world_size)
    except (ValueError, RuntimeError) as err:
        return _usage_error(str(err))
    try:
        with contextlib.ExitStack() as held:
            return _run(args, bundle, overrides, input_path, out, rank, world_size, distributed, held)
    finally:
        if distributed:
            dist.destroy()


def _pseudonymise(args, cases: list) -> bool:
    """``--pseudonymise``, or by default when a case is DICOM (whose folder names are often a patient's
    name or id); ``--show-phi`` keeps the names. The default says so in one log line."""
    if args.pseudonymise or args.show_phi:
        return args.pseudonymise
    from pipeline.readers import is_dicom_file

    dicom = sum(case.is_dicom or is_dicom_file(case.first_path) for case in cases)  # a series, or one .dcm file
    if dicom:
        print(f"segment: {dicom} of {len(cases)} case(s) are DICOM: case ids are pseudonymised (case-<hash>; "
              "OUT/phi_map.csv links them back); --show-phi keeps folder names", file=sys.stderr)
    return bool(dicom)


def _lock_output(out: Path, wait: bool, held: contextlib.ExitStack) -> None:
    """Hold ``OUT``'s lock until ``held`` closes; ValueError (a usage error) when that cannot be."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        held.enter_context(FolderLock(out, OUTPUT_MARKER, wait=wait))
    except LockHeld as err:
        raise ValueError(f"{err}; wait for it to finish, pass --wait, or choose another --output") from None
    except OSError as err:
        raise ValueError(f"--output {out}: cannot write there ({err.strerror or err})") from None


def _run(args, bundle: LoadedBundle, overrides: dict, input_path: Path, out: Path, rank: int, world_size: int,
         distributed: bool, held: contextlib.ExitStack) -> int:
    cases, skipped, key = None, [], None
    if rank == 0:  # rank 0 holds the folder's lock for the whole run and tells the others what to do
        try:
            cases = _find_cases(input_path, out, args, skipped)
            if cases:
                _lock_output(out, args.wait, held)  # before the key: two runs must not both make one
                if _pseudonymise(args, cases):
                    key = pseudonym_key(out)
                    cases = pseudonymise_cases(cases, key[0])
                record_discovery(out, skipped, cases, key)
        except (DataError, ValueError) as err:
            cases = str(err)
        except OSError as err:  # e.g. a full disk while writing the key or phi_map.csv
            cases = f"--output {out}: cannot write there ({err.strerror or err})"
    cases = dist.broadcast(cases, distributed)
    if isinstance(cases, str):
        return _usage_error(cases)
    if not cases:
        return _usage_error(f"no images found under {input_path} (NIfTI/NRRD/MHA files or DICOM series folders)")
    run_id = dist.broadcast(f"{datetime.datetime.now():%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}", distributed)
    problem = None
    if rank == 0:
        problem = _storage_problem(out, cases)
    problem = dist.broadcast(problem, distributed)
    if problem:
        return _usage_error(problem)
    options = SegmentOptions(
        output=out,
        overwrite=args.overwrite,
        formats=tuple(args.formats),
        precision=args.precision,
        tta=args.tta,
        workers=args.workers,
        quiet=args.quiet,
        rank=rank,
        world_size=world_size,
    )
    settings = _settings(args, bundle, overrides)
    mine = shard(cases, rank, world_size)
    all_stats: list = [run_segmentation(mine, bundle, options, settings, run_id)]
    if distributed:
        atomic_write_text(dist.rank_done_path(out, run_id, rank), json.dumps(all_stats[0]) + "\n")
        dist.destroy()
        if rank != 0:  # rank 0 writes the summary; each rank's exit code covers its own share
            own = collect_rows(mine, out, run_id)
            return EXIT_FAILED if any(row["status"] in ("failed", "missing") for row in own) else EXIT_OK
        all_stats = dist.wait_for_ranks(out, run_id, world_size, args.dist_timeout)
    return _report(cases, out, run_id, all_stats, {"world_size": world_size, "device": str(bundle.device),
                   "precision": args.precision, "settings": settings}, bundle.class_names, options.formats)


def _report(cases: list, out: Path, run_id: str, all_stats: list, batch: dict, class_names: dict, formats) -> int:
    """Rank 0: the summary of every case from the records, the writers' batch outputs, the last line."""
    finished = [s for s in all_stats if s]
    unrecorded = {k: v for s in finished for k, v in (s.get("unrecorded") or {}).items()}
    rows = collect_rows(cases, out, run_id, unrecorded)
    batch = {
        "run_id": run_id,
        **batch,
        "wall_s": round(max(s["wall_s"] for s in finished), 3),
        "network_s": round(sum(s["network_s"] for s in finished), 3),
        "input_wait_s": round(sum(s["input_wait_s"] for s in finished), 3),
        "per_rank": [{k: v for k, v in s.items() if k != "unrecorded"} if s else s for s in all_stats],
    }
    statuses = [row["status"] for row in rows]
    counts = ", ".join(f"{statuses.count(k)} {k}" for k in sorted(set(statuses)))
    failed = any(row["status"] in ("failed", "missing") for row in rows)
    try:
        write_summary(rows, out, class_names, batch)
        for writer in writers_for(formats):
            writer.finish(rows, out)
    except OSError as err:
        for row in rows:
            if row["status"] != "existing":
                print(f"{row['case_id']}: {row['status']} {row.get('reason', '')}".rstrip(), file=sys.stderr)
        print(f"segment: {len(rows)} cases ({counts}); the summary could not be written: {err}", file=sys.stderr)
        return EXIT_FAILED
    warned = sum(1 for row in rows if row.get("warnings"))
    warning_note = f"; {warned} with warnings (see the summary's warnings column)" if warned else ""
    print(f"segment: {len(rows)} cases ({counts}){warning_note}; summary in {out / 'summary.csv'}", file=sys.stderr)
    return EXIT_FAILED if failed else EXIT_OK


def _input_bytes(image: str | list[str]) -> int:
    return sum(p.stat().st_size for path in (image if isinstance(image, list) else [image]) for p in input_files(path))


def _storage_problem(out: Path, cases: list) -> str | None:
    """None when ``OUT`` is writable and has room for the batch, else the one-line reason.

    The room needed is estimated as a quarter of the inputs' size plus 1 MB a case: masks are
    uint8 and compress well (typically 1-10 % of an int16 image), QA pictures are ~100 KB.
    """
    import shutil

    try:
        (out / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
        probe = out / RECORDS_DIR / f".write-test.{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as err:
        return f"--output {out}: cannot write there ({err.strerror or err})"
    try:
        needed = sum(_input_bytes(case.image) for case in cases) // 4 + len(cases) * 1_000_000
    except OSError:
        return None  # an unreadable input fails as its own case
    free = shutil.disk_usage(out).free
    if free < needed:
        return f"--output {out}: {free / 1e9:.2f} GB free, and this batch needs up to about {needed / 1e9:.2f} GB"
    return None
