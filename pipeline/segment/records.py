"""Records: what each case's outputs are, whether a case is finished (resume), and the batch summary.

Each finished case has ``OUT/records/<case>.json`` listing its outputs with SHA-256 digests, the
input's fingerprint and the settings that made it; a failed case has ``<case>.failed.json``.
A case is skipped on a rerun only when its record vouches for every requested output; an
output file that no record vouches for is never replaced without ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import os
import socket
from pathlib import Path
from typing import Sequence

from pipeline.fileio import atomic_write_text, read_json, sha256
from pipeline.readers import input_files, is_series_reference
from pipeline.segment.cases import Case
from pipeline.segment.writers import WRITERS, OutputWriter

__all__ = [
    "RECORDS_DIR",
    "record_path",
    "failed_path",
    "input_fingerprint",
    "output_paths",
    "plan_case",
    "base_row",
    "write_record",
    "write_failure",
    "collect_rows",
    "summary_fields",
    "write_summary",
]

RECORDS_DIR = "records"


def record_path(out: Path, case_id: str) -> Path:
    return out / RECORDS_DIR / f"{case_id}.json"


def failed_path(out: Path, case_id: str) -> Path:
    return out / RECORDS_DIR / f"{case_id}.failed.json"


def input_fingerprint(image: str | list[str]) -> list:
    """Cheap identity of an input (sizes and mtimes; a series folder or ``folder?series=UID``: its files)."""
    fingerprint = []
    for path in image if isinstance(image, list) else [image]:
        if os.path.isdir(path) or is_series_reference(path):
            stats = [os.stat(p) for p in input_files(path)]
            fingerprint.append([len(stats), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)])
        else:
            stat = os.stat(path)
            fingerprint.append([stat.st_size, stat.st_mtime_ns])
    return fingerprint


def output_paths(out: Path, case: Case, writers: Sequence[OutputWriter]) -> dict[str, Path]:
    """Output key -> final path, for the writers that apply to ``case``."""
    return {w.key: w.output_path(out, case.case_id) for w in writers if w.applies_to(case)}


def vouched(record: dict | None, key: str, path: Path, out: Path, previous: bool = False) -> bool:
    """True when ``path`` exists and is the file the record lists (same relative path and digest).

    ``previous=True`` also accepts the outputs the record replaced: a run killed between writing
    a record and renaming its files leaves the earlier run's files, still ours to replace.
    """
    if not record or not path.is_file():
        return False
    relative, digest = path.relative_to(out).as_posix(), None
    for section in ("outputs", "previous_outputs") if previous else ("outputs",):
        listed = (record.get(section) or {}).get(key)
        if listed and listed.get("path") == relative:
            digest = digest or sha256(path)
            if listed.get("sha256") == digest:
                return True
    return False


def plan_case(case: Case, out: Path, writers: Sequence[OutputWriter], settings: dict, overwrite: bool) -> tuple[str, str]:
    """Decide what to do with a case: ``("existing", "")``, ``("todo", "")`` or ``("failed", reason)``."""
    if overwrite:
        return "todo", ""
    record = read_json(record_path(out, case.case_id), missing_ok=True)
    paths = output_paths(out, case, writers)
    if record and record.get("status") == "done" and all(vouched(record, k, p, out) for k, p in paths.items()):
        try:
            changed = record.get("input_fingerprint") != input_fingerprint(case.image)
        except OSError as err:
            return "failed", f"input unreadable: {err}"
        if changed:
            return "failed", "the input changed since its mask was written; pass --overwrite to redo it"
        previous = record.get("settings", {})
        if previous != settings:
            differing = sorted(k for k in set(settings) | set(previous) if settings.get(k) != previous.get(k))
            return "failed", (
                f"segmented earlier with other settings ({', '.join(differing)}); pass --overwrite to redo it "
                "or choose another --output"
            )
        return "existing", ""
    for key, path in paths.items():
        if path.exists() and not vouched(record, key, path, out, previous=True):
            return "failed", (
                f"{path.relative_to(out).as_posix()} exists and no record of this command vouches for it; "
                "pass --overwrite to replace it"
            )
    return "todo", ""


def redact(text: str, case: Case) -> str:
    """``text`` without the case's input paths when the case is pseudonymised (they may name the patient)."""
    if not case.phi:
        return text
    original = str(case.phi.get("input") or case.first_path)
    for path in sorted({original, os.path.dirname(original.rstrip("/")), case.first_path}, key=len, reverse=True):
        if path and path not in ("/", "."):
            text = text.replace(path, f"<{case.case_id}>")
    return text


def base_row(case: Case, status: str, reason: str, run_id: str, rank: int, timings: dict | None) -> dict:
    """The fields every record has: the case, what happened, where and when (paths redacted under --pseudonymise)."""
    return {
        "case_id": case.case_id,
        "input": case.case_id if case.phi else case.image,
        "source": case.source,
        "status": status,
        "reason": redact(reason, case),
        "run_id": run_id,
        "rank": rank,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "timings": {k: round(float(v), 4) for k, v in (timings or {}).items()},
    }


def write_record(out: Path, row: dict, finals: dict[str, Path], temps: dict[str, Path], overwrite: bool) -> dict:
    """Commit a finished case: check nothing foreign appeared, write its record, rename its files.

    ``temps`` are the written temporaries of ``finals`` (same keys). The record is written before
    the renames, so a mask that exists always has a record that vouches for it. Returns the row.
    """
    record = read_json(record_path(out, row["case_id"]), missing_ok=True)
    for key, path in finals.items():
        if path.exists() and not overwrite and not vouched(record, key, path, out, previous=True):
            raise FileExistsError(f"{path.relative_to(out).as_posix()} appeared meanwhile; not replacing it")
    row["outputs"] = {key: {"path": path.relative_to(out).as_posix(), "sha256": sha256(temps[key])} for key, path in finals.items()}
    if record and record.get("outputs"):
        row["previous_outputs"] = record["outputs"]
    atomic_write_text(record_path(out, row["case_id"]), json.dumps(row, indent=1) + "\n")
    for key, path in finals.items():
        os.replace(temps[key], path)
    with contextlib.suppress(FileNotFoundError):
        failed_path(out, row["case_id"]).unlink()
    return row


def write_failure(out: Path, row: dict) -> dict:
    """Record a failed case; when even that cannot be written (a full disk), the row says so."""
    try:
        atomic_write_text(failed_path(out, row["case_id"]), json.dumps(row, indent=1) + "\n")
    except OSError as err:
        row["unrecorded"] = f"the failure record could not be written: {err}"
    return row


def collect_rows(cases: Sequence[Case], out: Path, run_id: str, unrecorded: dict[str, dict] | None = None) -> list[dict]:
    """One row per case from its records: done (this run), existing (earlier run), failed, or missing.

    ``unrecorded``: this run's failure rows whose record could not be written (case id -> row).
    """
    rows = []
    for case in cases:
        if unrecorded and case.case_id in unrecorded:
            rows.append(unrecorded[case.case_id])
            continue
        failed = read_json(failed_path(out, case.case_id), missing_ok=True)
        record = read_json(record_path(out, case.case_id), missing_ok=True)
        if failed and failed.get("run_id") == run_id:
            row = dict(failed)
        elif record and record.get("status") == "done":
            row = dict(record)
            if row.get("run_id") != run_id:
                row["status"] = "existing"
        else:
            row = {"case_id": case.case_id, "source": case.source, "status": "missing", "reason": "no record: the run did not reach this case"}
        row.pop("traceback", None)
        rows.append(row)
    return rows


def summary_fields(class_names: dict[int, str]) -> list[str]:
    """``summary.csv`` columns: the case, one column per registered output, timings, geometry, volumes."""
    outputs = [cls.key for cls in WRITERS.values()]
    timings = ["rank", "read_s", "infer_s", "write_s", "total_s", "shape", "spacing_mm"]
    return ["case_id", "status", "reason", "warnings", "source", *outputs, *timings] + [f"volume_ml_{name}" for _, name in sorted(class_names.items())]


def write_summary(rows: list[dict], out: Path, class_names: dict[int, str], batch: dict) -> None:
    """``summary.json`` (every case, batch statistics) and ``summary.csv`` (one line per case)."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    content = {"counts": counts, "batch": batch, "cases": rows}
    atomic_write_text(out / "summary.json", json.dumps(content, indent=1, default=str) + "\n")
    buffer = io.StringIO()
    table = csv.DictWriter(buffer, fieldnames=summary_fields(class_names), extrasaction="ignore")
    table.writeheader()
    for row in rows:
        timings = row.get("timings", {})
        outputs = row.get("outputs", {})
        flat = {
            **{k: row.get(k, "") for k in ("case_id", "status", "reason", "source", "rank")},
            "warnings": "; ".join(row.get("warnings", [])),
            **{cls.key: outputs.get(cls.key, {}).get("path", "") for cls in WRITERS.values()},
            **{k: timings.get(k, "") for k in ("read_s", "infer_s", "write_s")},
            "total_s": round(sum(timings.values()), 4) if timings else "",
            "shape": "x".join(str(s) for s in row.get("shape", [])),
            "spacing_mm": "x".join(f"{s:g}" for s in row.get("spacing_mm", [])),
        }
        for name in class_names.values():
            flat[f"volume_ml_{name}"] = row.get("volumes_ml", {}).get(name, "")
        table.writerow(flat)
    atomic_write_text(out / "summary.csv", buffer.getvalue())
