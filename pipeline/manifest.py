"""``python -m pipeline bundle pin|verify B``: pin what a bundle is, and check it has not changed.

A bundle's configs are code (``$`` expressions and ``_target_`` run Python when parsed), and its
weights decide every mask, so a lab should run exactly the bundle it validated. ``pin`` writes
``B/manifest.json``: the SHA-256 of every file under ``configs/`` and ``models/`` and one digest
over them all; ``verify`` recomputes it and names each changed, added or missing file.
``segment --bundle-digest DIGEST`` refuses a bundle whose digest differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Sequence

from pipeline.fileio import atomic_write_text, read_json, sha256

__all__ = ["MANIFEST", "bundle_manifest", "differences", "main"]

MANIFEST = "manifest.json"
PINNED_FOLDERS = ("configs", "models")


def bundle_manifest(bundle: str | Path) -> dict:
    """``{"files": {relative path: sha256}, "digest": sha256 of the sorted file list}`` of a bundle."""
    bundle = Path(bundle)
    files = {}
    for folder in PINNED_FOLDERS:
        for path in sorted((bundle / folder).rglob("*")):
            relative = path.relative_to(bundle)
            if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                files[relative.as_posix()] = sha256(path)
    canonical = json.dumps(files, sort_keys=True, separators=(",", ":")).encode()
    return {"files": files, "digest": hashlib.sha256(canonical).hexdigest()}


def differences(pinned: dict, current: dict) -> list[str]:
    """One line per file that is changed, added or missing in ``current`` compared with ``pinned``."""
    before, now = pinned.get("files", {}), current["files"]
    lines = [f"changed: {p}" for p in sorted(before) if p in now and now[p] != before[p]]
    lines += [f"added: {p}" for p in sorted(set(now) - set(before))]
    lines += [f"missing: {p}" for p in sorted(set(before) - set(now))]
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline bundle", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("pin", "verify"), help="pin: write B/manifest.json; verify: check B against it")
    parser.add_argument("bundle", help="the bundle folder")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    bundle = Path(args.bundle)
    if not (bundle / "configs").is_dir():
        print(f"error: {bundle}: not a bundle folder (no configs/)", file=sys.stderr)
        return 2
    current = bundle_manifest(bundle)
    if args.action == "pin":
        atomic_write_text(bundle / MANIFEST, json.dumps(current, indent=1) + "\n")
        print(f"pinned {len(current['files'])} files of {bundle}: digest {current['digest']}")
        return 0
    try:
        pinned = read_json(bundle / MANIFEST)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err} (run `python -m pipeline bundle pin {bundle}` once the bundle is validated)", file=sys.stderr)
        return 2
    problems = differences(pinned, current)
    for line in problems:
        print(f"{bundle}: {line}")
    if problems:
        print(f"{bundle}: does NOT match its manifest (digest {current['digest']}, pinned {pinned.get('digest')})")
        return 1
    print(f"{bundle}: matches its manifest (digest {current['digest']})")
    return 0
