"""Write the 2D bundle's configs from the 3D bundle's plus a short overlay.

    python -m pipeline.bundle_sync            # after editing bundles/unetpp_3d_seg
    python -m pipeline.bundle_sync --check    # exit status 1 when the 2D files are out of date

A bundle must run on its own when copied (model-zoo layout), so ``bundles/unetpp_2d_seg``
keeps complete configs. They are generated, not edited: ``train.json`` and ``inference.json``
are the 3D ones with the values of ``configs/overlay_2d.json`` set (MONAI ``#`` ids per
config file: spatial dims, patch and batch sizes, datalist, ``SliceInferer``); ``evaluate.json``,
``multi_gpu_train.json``, ``multi_gpu_evaluate.json``, ``logging.conf``, ``scripts/``,
``large_files.yml`` and ``LICENSE`` are copied. ``metadata.json``,
``demo.json`` and ``docs/`` are written by hand. ``tests/test_bundle_sync.py`` fails when the
committed 2D files differ from what this writes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipeline.fileio import atomic_write_bytes

BUNDLES = Path(__file__).resolve().parent.parent / "bundles"
SOURCE, TARGET = "unetpp_3d_seg", "unetpp_2d_seg"
OVERLAY = "configs/overlay_2d.json"
COPIED = (
    "configs/evaluate.json",
    "configs/multi_gpu_train.json",
    "configs/multi_gpu_evaluate.json",
    "configs/logging.conf",
    "scripts/__init__.py",
    "scripts/find_pipeline.py",
    "large_files.yml",
    "LICENSE",
)


def dumps(value: Any, indent: int = 0) -> str:
    """JSON as the bundle configs are written by hand: 4-space indent, one entry per line,
    except lists of plain values (``[96, 96, 96]``, ``["pred", "label"]``) on one line.
    ``$`` expressions always get a line each, however short.
    """
    inner, outer = " " * (indent + 4), " " * indent
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(key)}: {dumps(item, indent + 4)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{outer}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) or str(v).startswith("$") for v in value):
        items = [inner + dumps(item, indent + 4) for item in value]
        return "[\n" + ",\n".join(items) + f"\n{outer}]"
    return json.dumps(value)


def set_id(config: dict, config_id: str, value: Any) -> None:
    """``config[a][b][c] = value`` for the MONAI id ``"a#b#c"`` (list positions as numbers)."""
    *parents, last = config_id.split("#")
    node = config
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]  # KeyError: a typo in the overlay
    node[int(last) if isinstance(node, list) else last] = value


def render(bundles: Path = BUNDLES) -> dict[str, bytes]:
    """``{path inside the 2D bundle: content}`` of every generated file."""
    source = bundles / SOURCE
    overlay = json.loads((bundles / TARGET / OVERLAY).read_text(encoding="utf-8"))
    files = {name: (source / name).read_bytes() for name in COPIED}
    for name, values in overlay.items():
        config = json.loads((source / "configs" / name).read_text(encoding="utf-8"))
        for config_id, value in values.items():
            set_id(config, config_id, value)
        files[f"configs/{name}"] = (dumps(config) + "\n").encode("utf-8")
    return files


def stale_files(bundles: Path = BUNDLES) -> dict[str, bytes]:
    """The generated files whose committed copy in the 2D bundle is missing or different."""
    target = bundles / TARGET
    return {
        name: content
        for name, content in render(bundles).items()
        if not (target / name).is_file() or (target / name).read_bytes() != content
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.bundle_sync", description=__doc__.splitlines()[0])
    parser.add_argument("--bundles", type=Path, default=BUNDLES, help="the bundles folder (default: this checkout's)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a 2D file is out of date")
    args = parser.parse_args(argv)
    stale = stale_files(args.bundles)
    for name, content in stale.items():
        path = args.bundles / TARGET / name
        if args.check:
            print(f"{path}: out of date; run python -m pipeline.bundle_sync")
        else:
            atomic_write_bytes(path, content)
            print(f"wrote {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    raise SystemExit(main())
