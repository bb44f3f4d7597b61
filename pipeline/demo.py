"""The main job: ``python -m pipeline demo [--output DIR]``.

Writes the synthetic 3D demo data, then runs the 3D bundle with the standard MONAI commands
(each is printed, so it can be rerun or changed by hand):

1. ``python -m monai.bundle run`` with ``configs/train.json`` + ``configs/demo.json`` (CPU-sized);
2. the same with ``configs/evaluate.json`` on the test cases (per-case and per-class CSVs);
3. ``configs/inference.json`` + ``configs/demo.json``: masks on each input's own grid.

Everything goes under ``DIR`` (default ``./demo_output``): ``data/``, ``models/``, ``logs/``
(TensorBoard, ``training_log.csv``, ``training_curves.png``, the bundle logs), ``eval/`` and
``masks/``. An interrupted run started again resumes training from ``models/latest.pt``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.demo_data import write_demo_data

__all__ = ["BUNDLE", "bundle_dir", "bundle_command", "main"]

BUNDLE = "unetpp_3d_seg"
EPOCH_LINE = "INFO - Epoch "  # the per-epoch summary written by pipeline.handlers.TrainingCurves


def bundle_dir(name: str = BUNDLE) -> Path:
    """The template bundle folder: this checkout's ``bundles/<name>``, or the copy inside the installed package."""
    from pipeline.plan import template_dir

    return template_dir(name)


def bundle_command(bundle: Path, configs: list[str], **overrides) -> list[str]:
    """``python -m monai.bundle run --config_file "['.../a.json', ...]" --key value ...``."""
    files = "[" + ",".join(f"'{bundle / 'configs' / c}'" for c in configs) + "]"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    return command


def _shell(command: list[str]) -> str:
    return " ".join(f'"{part}"' if any(c in part for c in " [],'") else part for part in command)


def _environment() -> dict:
    """The bundle runs' environment: unbuffered output (epoch lines are relayed as they come), and
    OpenMP threads that sleep rather than spin while they wait. On a CPU shared with other jobs a
    spinning thread pool slows a training step down by 2-10x (measured here on 2 cores: 0.3 s per
    step alone, 1-13 s beside another process); passive waiting keeps it at about 1x.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _run(step: str, command: list[str], log: Path, relay: str | None = None) -> float:
    """Run ``command`` with its output in ``log``; relay lines containing ``relay``; seconds taken."""
    print(f"\n{step}\n  $ {_shell(command)}\n  log: {log}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w") as handle:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env=_environment(),
        )
        assert process.stdout is not None
        for line in process.stdout:
            handle.write(line)
            if relay is not None and relay in line:
                print(f"  epoch {line.split(relay, 1)[1].rstrip()}", flush=True)
        code = process.wait()
    if code != 0:
        tail = log.read_text().splitlines()[-30:]
        raise RuntimeError(f"{step} failed (exit code {code}); last lines of {log}:\n" + "\n".join(tail))
    seconds = time.time() - start
    print(f"  done in {seconds:.0f} s", flush=True)
    return seconds


def _metrics(path: Path) -> dict[str, float]:
    """``metrics.csv`` of MONAI's ``MetricsSaver``: one ``name,value`` row per metric."""
    with open(path, newline="") as handle:
        return {row[0]: float(row[1]) for row in csv.reader(handle) if len(row) == 2}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline demo",
        description="Main job on embedded demo data: write synthetic 3D volumes, train the 3D UNet++ bundle "
        "(CPU-sized demo overlay), evaluate on the test cases, write masks.",
    )
    parser.add_argument("--output", default="demo_output", help="folder for everything the job writes (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: configs/demo.json's max_epochs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    args = parser.parse_args(argv)

    if importlib.util.find_spec("fire") is None:
        print("error: `python -m monai.bundle` needs the 'fire' package: pip install fire", file=sys.stderr)
        return 1

    out = Path(args.output).resolve()
    bundle = bundle_dir()
    start = time.time()
    print(f"UNet++ demo: bundle {bundle}, output {out}", flush=True)

    print("\n[1/4] demo data", flush=True)
    info = write_demo_data(out / "data", sets=("synthetic_3d",), seed=args.seed)["synthetic_3d"]
    print(f"  {info['files']} files under {out / 'data'}, datalist {info['datalist']}", flush=True)

    # bundle_root is "." in the configs (the model zoo's convention): point it at the output folder
    common = {"bundle_root": out, "dataset_dir": out / "data", "datalist": info["datalist"], "ckpt_dir": out / "models"}
    train = dict(common, output_dir=out / "logs", progress_bar=False)
    if args.epochs is not None:
        train["max_epochs"] = args.epochs
    timings = {}
    try:
        timings["train"] = _run(
            "[2/4] train (train.json + demo.json)",
            bundle_command(bundle, ["train.json", "demo.json"], **train),
            out / "logs" / "train.log",
            relay=EPOCH_LINE,
        )
        timings["evaluate"] = _run(
            "[3/4] evaluate on the test cases (+ evaluate.json)",
            bundle_command(bundle, ["train.json", "demo.json", "evaluate.json"], **common, output_dir=out / "eval"),
            out / "logs" / "evaluate.log",
        )
        timings["inference"] = _run(
            "[4/4] inference (inference.json + demo.json)",
            bundle_command(bundle, ["inference.json", "demo.json"], **common, output_dir=out / "masks"),
            out / "logs" / "inference.log",
        )
    except RuntimeError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 1

    metrics = _metrics(out / "eval" / "metrics.csv")
    masks = sorted((out / "masks").glob("*_seg.nii.gz"))
    minutes, seconds = divmod(int(time.time() - start), 60)
    print(
        f"\nDone in {minutes} min {seconds:02d} s "
        f"(train {timings['train']:.0f} s, evaluate {timings['evaluate']:.0f} s, inference {timings['inference']:.0f} s).\n"
        f"  test cases:   mean Dice {metrics.get('val_mean_dice', float('nan')):.4f}, "
        f"IoU {metrics.get('val_mean_iou', float('nan')):.4f}, HD95 {metrics.get('val_hd95', float('nan')):.2f} mm\n"
        f"  masks:        {out / 'masks'} ({len(masks)} x <case>_seg.nii.gz, on each input's own grid)\n"
        f"  metrics:      {out / 'eval' / 'metrics.csv'} (summary); per case and class: "
        f"{out / 'eval'}/val_<metric>_raw.csv, per class: val_<metric>_summary.csv\n"
        f"  TensorBoard:  tensorboard --logdir {out / 'logs'}\n"
        f"  curves:       {out / 'logs' / 'training_curves.png'} (values in {out / 'logs' / 'training_log.csv'})\n"
        f"  model:        {out / 'models' / 'model.pt'} (best validation Dice; training state in latest.pt)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
