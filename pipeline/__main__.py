"""Command line: ``python -m pipeline <command> ...`` (also the ``unetpp-pipeline`` script).

Each command lives in the module that owns the work and takes its own argv, so
``python -m pipeline <command> --help`` shows that command's options.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, function taking argv and returning an exit code)
COMMANDS = {
    "demo": ("pipeline.demo", "main", "the main job: demo data, train, evaluate, infer"),
    "demo-data": ("pipeline.demo_data", "main", "write the embedded demo data sets and datalists"),
    "datalist": ("pipeline.data", "datalist_main", "build or validate an MSD-style datalist"),
    "segment": ("pipeline.segment", "main", "batch-segment a folder or datalist of volumes"),
    "plan": ("pipeline.plan", "main", "fingerprint a dataset and write a bundle planned for it (nnU-Net-style)"),
    "dicom": ("pipeline.dicom", "main", "list the series of a DICOM export and what would be done with each"),
    "prune": ("pipeline.prune", "main", "measure UNet++ L1..L_depth on validation cases, pick and record the cheapest that keeps accuracy"),
    "postprocess": ("pipeline.postprocess", "main", "choose per-class component rules on validation cases, keep them with the weights"),
    "bundle": ("pipeline.manifest", "main", "pin a bundle's configs and weights (sha256), or verify them"),
}


def usage() -> str:
    lines = ["usage: python -m pipeline <command> [options]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def printable_streams() -> None:
    """Escape what the terminal's encoding cannot show: a file name in Latin script, or a library's
    arrow, on a server whose locale is ASCII (``LC_ALL=C``) must print, not raise."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    printable_streams()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name, _ = COMMANDS[name]
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
