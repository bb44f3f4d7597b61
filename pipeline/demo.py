"""The main job: ``python -m pipeline demo [--output DIR] [--data mni|synthetic]``.

Every step is a standard command, printed so it can be rerun or changed by hand.

``--data mni`` (the default, the README's Quickstart): real anatomy through ``plan``, the way a
lab runs its own data:

1. the MNI152 2009c T1 (nilearn's package data, 2 mm) with its 4-class tissue label
   (background, CSF/other, grey matter, white matter), cut into boxes
   (:func:`pipeline.demo_data.write_mni_slabs`): training on the left hemisphere, validation on
   its top, test on the right hemisphere, once as acquired (site A) and once as a simulated
   second scanner (site B: bias field, contrast, scale, noisy air, LPS);
2. ``python -m pipeline plan DATALIST --cpu --from unetpp_2d_seg``: fingerprint and plan, a new
   bundle ``DIR/bundle`` (2D: on a CPU a 2D network costs about a third of a 3D one per voxel);
   the demo then writes its CPU schedule (:data:`SCHEDULE`: epochs, learning rate, samples,
   workers, bf16) into that bundle's ``configs/train.json``, so training needs no override;
3. ``cd DIR/bundle && python -m monai.bundle run --config_file configs/train.json``;
4. ``python -m monai.bundle run --config_file "['configs/train.json','configs/evaluate.json']"``
   on the test cases (per case and per class CSVs in ``DIR/bundle/eval``);
5. ``python -m pipeline segment --bundle DIR/bundle --input DATALIST --output DIR/masks --format qa-png``:
   masks on each input's own grid and QA pictures (``DIR/masks/qa/<case>.png``, ``index.html``);
6. a metrics table, per case and class, Dice and HD95: printed and written to
   ``DIR/metrics.md`` and ``DIR/metrics.csv``.

A rerun in the same ``DIR`` reuses the planned bundle and resumes its training from
``models/latest.pt``; delete ``DIR/bundle`` to plan afresh.

``--data synthetic``: synthetic 3D blobs through the 3D template bundle and its CPU-sized
overlay, ``python -m monai.bundle run`` with ``train.json`` + ``demo.json``, then
``evaluate.json`` on the test cases, then ``inference.json``; ``data/``, ``models/``, ``logs/``,
``eval/`` and ``masks/`` under ``DIR``. A rerun resumes training.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.demo_data import MNI_LABELS, write_demo_data, write_mni_slabs
from pipeline.cpu import native_bf16

__all__ = ["BUNDLE", "SCHEDULE", "bundle_command", "bundle_dir", "main", "metrics_table"]

BUNDLE = "unetpp_3d_seg"

EPOCH_LINE = "INFO - Epoch "  # the per-epoch summary written by pipeline.handlers.TrainingCurves
# what the demo sets in the planned bundle's configs/train.json: a schedule for 2 CPU cores
SCHEDULE = {
    "max_epochs": 100,  # 200 steps of 4 slices: about 3 minutes on 2 cores
    "val_interval": 10,
    "learning_rate": 0.003,  # AdamW, as in the MNI runs of docs/paper_results.md (0.01 swung the loss here)
    "num_samples": 8,
    "num_workers": 0,
    "progress_bar": False,
    # bf16 only where the CPU computes it natively: emulated, a training step is >10x slower
    "cpu_bf16": native_bf16("cpu"),
    # the site-shift augmentation (bias field, contrast, noise...): site B's mean Dice 0.62 -> 0.69,
    # and CSF 0.43 -> 0.62 at site A (measured with and without, the same 100 epochs)
    "train#preprocessing#augment": True,
}


def bundle_command(bundle: Path, configs: list[str], **overrides) -> list[str]:
    """``python -m monai.bundle run --config_file "['.../a.json', ...]" --key value ...``."""
    files = "[" + ",".join(f"'{bundle / 'configs' / c}'" for c in configs) + "]"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", files]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    return command


def bundle_dir(name: str = BUNDLE) -> Path:
    """A template bundle folder: this checkout's ``bundles/<name>``, or the copy inside the installed package."""
    from pipeline.plan import template_dir

    return template_dir(name)


def _shell(command: list[str]) -> str:
    return " ".join(f'"{part}"' if any(c in part for c in " [],'") else part for part in command)


def _environment() -> dict:
    """The runs' environment: unbuffered UTF-8 output (epoch lines are relayed as they come, and
    read as UTF-8 whatever the server's locale), and OpenMP threads that sleep rather than spin
    while they wait. On a CPU shared with other jobs a spinning thread pool slows a training step
    down by 2-10x (measured here on 2 cores: 0.3 s per step alone, 1-13 s beside another
    process); passive waiting keeps it at about 1x.
    """
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _run(step: str, command: list[str], log: Path, cwd: Path | None = None, relay: str | None = None) -> float:
    """Run ``command`` (in ``cwd``) with its output in ``log``; relay lines containing ``relay``; seconds taken."""
    shown = _shell(command) if cwd is None else f"cd {cwd} && {_shell(command)}"
    print(f"\n{step}\n  $ {shown}\n  log: {log}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w", encoding="utf-8") as handle:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",  # a child's odd byte must not end the demo
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
        tail = log.read_text(encoding="utf-8").splitlines()[-30:]
        raise RuntimeError(f"{step} failed (exit code {code}); last lines of {log}:\n" + "\n".join(tail))
    seconds = time.time() - start
    print(f"  done in {seconds:.0f} s", flush=True)
    return seconds


def _set_schedule(bundle: Path, schedule: dict) -> None:
    """Write the demo's CPU schedule into the planned bundle's ``configs/train.json``."""
    from pipeline.bundle_sync import dumps, set_id

    from pipeline.fileio import atomic_write_text

    path = bundle / "configs" / "train.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    for key, value in schedule.items():
        set_id(config, key, value)
    atomic_write_text(path, dumps(config) + "\n")


def _raw(path: Path) -> dict[str, list[float]]:
    """A ``MetricsSaver`` ``<metric>_raw.csv``: case -> one value per foreground class.

    Its columns are ``filename,class0,...,mean``; without the background ``class0`` is label 1.
    """
    rows = {}
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        next(reader)
        for row in reader:
            if row:
                rows[Path(row[0]).name.split(".")[0]] = [float(v) for v in row[1:-1]]  # the last column is the mean
    return rows


def metrics_table(eval_dir: Path, labels: dict[str, str] = MNI_LABELS) -> tuple[list[list[str]], str]:
    """Per case and class Dice and HD95 from an ``eval/`` folder: (CSV rows, Markdown table)."""
    dice, hd95 = _raw(eval_dir / "val_mean_dice_raw.csv"), _raw(eval_dir / "val_hd95_raw.csv")
    names = [labels[str(c)] for c in sorted(int(k) for k in labels) if c > 0]
    header = ["case"] + [f"{n} {m}" for n in names for m in ("Dice", "HD95 mm")] + ["mean Dice"]
    rows = []
    for case in dice:
        cells = [case]
        for c in range(len(names)):
            cells += [f"{dice[case][c]:.3f}", f"{hd95[case][c]:.1f}"]
        cells.append(f"{sum(dice[case]) / len(names):.3f}")
        rows.append(cells)
    if rows:
        mean = ["mean"] + [
            f"{sum(float(r[i]) for r in rows) / len(rows):.{3 if header[i].endswith('Dice') else 1}f}" for i in range(1, len(header))
        ]
        rows.append(mean)
    markdown = "\n".join(
        ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    )
    return [header] + rows, markdown


def _synthetic_job(args: argparse.Namespace) -> int:
    """Synthetic 3D blobs through the template bundle and its demo overlay (``--data synthetic``)."""
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
        train["val_interval"] = min(2, args.epochs)  # demo.json validates every 2 epochs; model.pt needs one
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


def _mni_job(args: argparse.Namespace) -> int:
    """The MNI152 slabs through ``plan``, the planned bundle and ``segment`` (``--data mni``)."""
    out = Path(args.output).resolve()
    bundle = out / "bundle"
    start = time.time()
    print(f"UNet++ demo: output {out}", flush=True)

    print("\n[1/6] demo data: MNI152 T1 with 4 tissue classes, left/right hemispheres, a simulated second site", flush=True)
    try:
        info = write_mni_slabs(out / "data", seed=args.seed)
    except Exception as err:  # noqa: BLE001 - nilearn missing is the usual cause; say so and stop
        print(f"error: {err}", file=sys.stderr)
        return 1
    datalist = Path(info["datalist"])
    print(f"  {info['files']} files under {out / 'data'}, datalist {datalist}", flush=True)

    schedule = dict(SCHEDULE)
    if args.epochs is not None:
        schedule["max_epochs"] = args.epochs
        schedule["val_interval"] = max(1, min(schedule["val_interval"], args.epochs))
    timings = {}
    try:
        if (bundle / "configs" / "plan.json").is_file():
            print(f"\n[2/6] plan: reusing {bundle} (delete it to plan afresh)", flush=True)
        else:
            plan = [sys.executable, "-m", "pipeline", "plan", str(datalist), "--dataset-dir", str(out / "data"),
                    "--output", str(bundle), "--cpu", "--from", "unetpp_2d_seg", "--overwrite"]  # fmt: skip
            timings["plan"] = _run("[2/6] plan a bundle for the data (CPU budget)", plan, out / "logs" / "plan.log")
            print((out / "logs" / "plan.log").read_text(encoding="utf-8").splitlines()[0], flush=True)
        _set_schedule(bundle, schedule)
        print(f"  demo CPU schedule in {bundle / 'configs' / 'train.json'}: "
              + ", ".join(f"{k} {v}" for k, v in schedule.items()), flush=True)  # fmt: skip
        monai_run = [sys.executable, "-m", "monai.bundle", "run", "--config_file"]
        timings["train"] = _run(
            "[3/6] train", monai_run + ["configs/train.json"], out / "logs" / "train.log", cwd=bundle, relay=EPOCH_LINE
        )
        timings["evaluate"] = _run(
            "[4/6] evaluate on the test cases",
            monai_run + ["['configs/train.json','configs/evaluate.json']"],
            out / "logs" / "evaluate.log",
            cwd=bundle,
        )
        segment = [sys.executable, "-m", "pipeline", "segment", "--bundle", str(bundle), "--input", str(datalist),
                   "--output", str(out / "masks"), "--format", "qa-png", "--quiet"]  # fmt: skip
        timings["segment"] = _run("[5/6] segment the test cases", segment, out / "logs" / "segment.log")
    except RuntimeError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 1

    rows, markdown = metrics_table(bundle / "eval")
    with open(out / "metrics.csv", "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows(rows)
    (out / "metrics.md").write_text(
        "Test slabs (held out from training; site B is the same slab as a simulated second scanner). "
        "Dice and HD95 (mm) per class, on each input's own grid.\n\n" + markdown + "\n",
        encoding="utf-8",
    )
    print(f"\n[6/6] metrics (per case and class; {out / 'metrics.md'}, {out / 'metrics.csv'})\n{markdown}", flush=True)

    pictures = sorted((out / "masks" / "qa").glob("*.png"))
    minutes, seconds = divmod(int(time.time() - start), 60)
    print(
        f"\nDone in {minutes} min {seconds:02d} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items())
        + ").\n"
        f"  bundle:       {bundle} (planned: configs/plan.json, docs/README.md; weights and settings in models/)\n"
        f"  QA pictures:  {out / 'masks' / 'qa'} ({len(pictures)} PNG, index.html)\n"
        f"  masks:        {out / 'masks'} (<case>_seg.nii.gz, on each input's own grid)\n"
        f"  metrics:      {out / 'metrics.md'}; per case and class CSVs in {bundle / 'eval'}\n"
        f"  TensorBoard:  tensorboard --logdir {bundle / 'logs'}\n"
        f"  curves:       {bundle / 'logs' / 'training_curves.png'}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline demo",
        description="Main job on embedded demo data. --data mni (default): real anatomy, the MNI152 brain MRI "
        "(train on the left hemisphere, test on the right, once as a simulated second scanner), a bundle planned for "
        "it (python -m pipeline plan --cpu), trained, evaluated, the test cases segmented with QA pictures, and a "
        "per-class metrics table. --data synthetic: synthetic 3D volumes through the 3D template bundle and its "
        "CPU-sized demo overlay.",
    )
    parser.add_argument("--output", default="demo_output", help="folder for everything the job writes (default: %(default)s)")
    parser.add_argument("--data", choices=("mni", "synthetic"), default="mni", help="which job (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"training epochs (default: {SCHEDULE['max_epochs']}; --data synthetic: configs/demo.json's max_epochs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the second site's noise (--data synthetic: of the data)")
    args = parser.parse_args(argv)

    if importlib.util.find_spec("fire") is None:
        print("error: `python -m monai.bundle` needs the 'fire' package: pip install fire", file=sys.stderr)
        return 1
    return _mni_job(args) if args.data == "mni" else _synthetic_job(args)


if __name__ == "__main__":
    sys.exit(main())
