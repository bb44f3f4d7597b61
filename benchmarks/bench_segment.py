"""Batch segmentation: pipeline overhead, peak memory on a CT-sized volume, bf16 against fp32. Prints JSON.

Usage::

    python benchmarks/bench_segment.py                    # the real measurement, a few minutes on a 2-core CPU
    python benchmarks/bench_segment.py --quick            # tiny sizes, a smoke run (~1 minute)
    python benchmarks/bench_segment.py --output bench_segment.json

Everything goes through ``bundles/unetpp_3d_seg/configs/inference.json`` (ConfigParser), with the
widths of the bundle's CPU demo overlay (16-32-64-128, depth 3; the bundle's default instance norm), the
bundle's default 96^3 sliding window with ``sw_batch_size`` 1 and overlap 0.25. The weights are
``--checkpoint`` (a state_dict of that architecture), else a network trained here for a
minute or two on synthetic blobs, so that bf16/fp32 mask agreement is measured on a network that
segments something (a random network's logits hover around 0 and flip sign under any rounding);
``bf16.dice_fp32_vs_truth`` shows how well it segments.

Measurements (``--count`` volumes of ``--shape``, synthetic blobs written as NIfTI):

* ``pipeline``: the batch's wall time inside ``python -m pipeline segment`` (first read to last
  write: reading, preprocessing, network, inversion, writing; ``batch_wall_s``) and the whole
  command in-process (bundle loading, discovery, summary; ``command_wall_s``) against the pure
  network time: the bundle's inferer on the same preprocessed volumes, one after the other, in
  the same process (mean of a run before and a run after the batch, to share background load).
  Target: ``batch_over_network`` <= 1.15.
* ``memory_ct``: a batch of ``--ct-count`` int16 CT volumes (1 by default: ``--ct-shape``,
  512x512x200 by default; each further one 16 slices shorter) segmented by the
  command in a subprocess, fp32 on CPU; peak proportional set size (PSS, shared pages counted
  once) summed over the process and its reader worker, and the largest single-process peak RSS
  (``VmHWM``), both sampled every 0.25 s. Target (issue 13): both under 2.5 GB. The child's
  ``getrusage`` max RSS (``ru_maxrss_gb``) is reported too but is no measure of the command: Linux
  carries the forking process's high-water mark over fork and exec, i.e. this benchmark's own
  (about 2.6 GB after generating the CT volume in float64).
* ``bf16``: the same batch with ``--precision bf16``: pure-network and batch speed ratios
  (fp32 time / bf16 time; above 1 = bf16 faster) and the Dice agreement of each case's bf16 mask
  with its fp32 mask. Target: Dice >= 0.99.
* ``levels``: the same batch, fp32, through the command once per UNet++ option and round
  (``--rounds``, 3 by default; the options take turns within a round): fast mode
  ``--prune-level`` 1..depth beside ``--mode accurate``, in one run: seconds per volume of the
  network inside the batch and of the batch's wall time, and the median over the cases of each
  case's own time through the command (read + network + write; the median leaves out the first
  case's one-off kernel set-up, which a batch of hundreds pays once); each level's share of
  L_depth's, its FLOP share (one window, ``torch.utils.flop_counter``) and the ratio of the two
  (issue 13's target, on the per-case median over all rounds: at most 1.2 end to end; each
  round's own ratio is reported beside it), and each level's mask
  Dice against the truth.
  ``--skip-levels`` leaves it out.
  ``--levels-only`` runs just this section.
* ``memory_ct`` is measured in fp32 and, with ``--memory-bf16``, in bf16 too (``memory_ct_bf16``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from monai.data import create_test_image_3d  # noqa: E402

from pipeline import segment  # noqa: E402
from pipeline.inferers import AutocastInferer  # noqa: E402
from pipeline.losses import BCEDiceLoss, DeepSupervisionLoss  # noqa: E402
from pipeline.nets import UNetPlusPlus  # noqa: E402
from pipeline.cpu import apply_thread_count, available_cores, native_bf16  # noqa: E402

BUNDLE = ROOT / "bundles" / "unetpp_3d_seg"
TARGET_GB = 2.5  # issue 13: peak memory of segment on a 512x512x200 CT in fp32
FULL = {"features": [16, 32, 64, 128], "depth": 3, "roi": [96, 96, 96], "shape": [192, 192, 96], "ct_shape": [512, 512, 200], "train_steps": 40, "patch": 32}
QUICK = {"features": [4, 8, 16], "depth": 2, "roi": [32, 32, 32], "shape": [48, 48, 40], "ct_shape": [96, 96, 40], "train_steps": 5, "patch": 32}


def overrides(size: dict) -> list[str]:
    return [
        "--override", f"network_def#features={json.dumps(size['features'])}",
        "--override", f"network_def#depth={size['depth']}",
        "--override", f"sw_roi_size={json.dumps(size['roi'])}",
        "--override", "sw_batch_size=1",
        "--override", "overlap=0.25",
    ]


def override_dict(size: dict) -> dict:
    args = overrides(size)
    return dict(segment.parse_override(args[i + 1]) for i in range(0, len(args), 2))


def blobs(shape, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rad_max = max(6, min(shape) // 6)
    image, label = create_test_image_3d(
        *shape, num_objs=max(4, int(np.prod(shape) / 64**3 * 6)), rad_max=rad_max, rad_min=max(3, rad_max // 2),
        noise_max=0.2, random_state=np.random.RandomState(seed),
    )
    return image.astype(np.float32), (label > 0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------


def train_quickly(size: dict, steps: int, path: Path) -> dict:
    """A minute of training on synthetic blobs (paper loss with deep supervision), saved as a state_dict."""
    torch.manual_seed(0)
    network = UNetPlusPlus(3, 1, 1, features=size["features"], depth=size["depth"])
    optimiser = torch.optim.Adam(network.parameters(), lr=3e-3)
    loss_fn = DeepSupervisionLoss(BCEDiceLoss())
    start, losses = time.perf_counter(), []
    patch = [size["patch"]] * 3
    for step in range(steps):
        pairs = [blobs(patch, 10_000 + 2 * step + k) for k in range(2)]
        image = torch.from_numpy(np.stack([(p[0] - p[0].min()) / (np.ptp(p[0]) or 1) for p in pairs]))[:, None]
        label = torch.from_numpy(np.stack([p[1] for p in pairs]))[:, None]
        optimiser.zero_grad()
        loss = loss_fn(network(image), label)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    torch.save(network.state_dict(), path)
    return {"steps": steps, "seconds": round(time.perf_counter() - start, 1), "final_loss": round(statistics.mean(losses[-10:]), 4)}


def weights(size: dict, args, work: Path) -> tuple[Path, dict]:
    if args.checkpoint:
        return Path(args.checkpoint), {"source": args.checkpoint}
    path = work / "model.pt"
    if args.memory_only:  # memory does not depend on the weights
        torch.manual_seed(0)
        torch.save(UNetPlusPlus(3, 1, 1, features=size["features"], depth=size["depth"]).state_dict(), path)
        return path, {"source": "freshly initialised (memory does not depend on the weights)"}
    return path, {"source": "trained here on synthetic blobs", **train_quickly(size, size["train_steps"], path)}


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------


def network_only(bundle: segment.LoadedBundle, images: list, precision: str) -> float:
    """Seconds of the bundle's inferer on already preprocessed volumes, one after the other."""
    total = 0.0
    inferer = AutocastInferer(bundle.inferer, precision)
    for image in images:
        start = time.perf_counter()
        with torch.no_grad():
            inferer(image.as_tensor().unsqueeze(0).to(bundle.device), bundle.network)
        total += time.perf_counter() - start
    return total


def run_command(argv: list[str]) -> tuple[float, dict]:
    start = time.perf_counter()
    code = segment.main(argv)
    wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"segment exited with {code}: {argv}")
    return wall, json.loads((Path(argv[argv.index("--output") + 1]) / "summary.json").read_text())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def _process_tree(root_pid: int) -> set[int]:
    """``root_pid`` and its descendants (from /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                parents[int(entry)] = int(fields[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root_pid}, [root_pid]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in tree:
                tree.add(child)
                frontier.append(child)
    return tree


def _proc_bytes(pid: int, file: str, field: str) -> int:
    """A kB field (``Pss:``, ``VmHWM:``) of ``/proc/<pid>/<file>`` in bytes; 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/{file}") as handle:
            for line in handle:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _pss(pids: set[int]) -> int:
    """Sum of the proportional set sizes (bytes) of ``pids``: shared pages counted once."""
    return sum(_proc_bytes(pid, "smaps_rollup", "Pss:") for pid in pids)


def _hwm(pids: set[int]) -> int:
    """The largest peak resident set size (``VmHWM``, bytes) among ``pids``."""
    return max((_proc_bytes(pid, "status", "VmHWM:") for pid in pids), default=0)


def ct_volume(shape, path: Path) -> None:
    """An int16 CT-like volume: air, an elliptic body of soft tissue with bright and dark blobs."""
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1
    volume = np.full(shape, -1000, dtype=np.int16)
    rng = np.random.RandomState(0)
    volume[body] = 40
    blob, _ = create_test_image_3d(*shape, num_objs=30, rad_max=min(shape) // 8, rad_min=min(shape) // 16, random_state=rng)
    volume += np.where(body[..., None] & (blob > 0), (blob * 200).astype(np.int16), 0).astype(np.int16)
    volume += rng.normal(0, 15, size=shape).astype(np.int16) * body[..., None]
    nib.save(nib.Nifti1Image(volume, np.diag([0.7, 0.7, 2.5, 1.0])), str(path))


def ct_shapes(size: dict, count: int) -> list[list[int]]:
    """The CT batch: ``ct_shape``, then volumes 16 slices shorter each (a batch's volumes differ)."""
    x, y, z = size["ct_shape"]
    return [[x, y, max(16, z - 16 * k)] for k in range(count)]


def memory_ct(size: dict, checkpoint: Path, work: Path, precision: str = "fp32", count: int = 1) -> dict:
    folder = work / f"ct_{count}"
    shapes = ct_shapes(size, count)
    if not folder.is_dir():
        folder.mkdir()
        for k, shape in enumerate(shapes):
            ct_volume(tuple(shape), folder / f"ct{k}.nii.gz")
    out = work / f"ct_out_{precision}"
    command = [sys.executable, "-m", "pipeline", "segment", "--bundle", str(BUNDLE), "--checkpoint", str(checkpoint),
               *overrides(size), "--input", str(folder), "--output", str(out), "--quiet", "--precision", precision, "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = work / f"ct_stderr_{precision}.txt"
    start = time.perf_counter()
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    peak, hwm, finished = [0], [0], threading.Event()

    def sample():
        # Light sampling (smaps_rollup walks page tables): the sampler must not slow the run down.
        pids, refreshed = {process.pid}, 0.0
        while not finished.is_set():
            if time.monotonic() - refreshed > 2.0:
                pids, refreshed = _process_tree(process.pid), time.monotonic()
            peak[0] = max(peak[0], _pss(pids))
            hwm[0] = max(hwm[0], _hwm(pids))
            finished.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    # wait4: this child's own rusage (its reaped reader worker included); its max RSS starts from
    # this process's own high-water mark, carried over fork and exec, hence the sampled VmHWM.
    _, status, usage = os.wait4(process.pid, 0)
    finished.set()
    sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    max_rss = usage.ru_maxrss * 1024  # kB on Linux
    if process.returncode != 0:
        raise SystemExit(f"CT memory run failed ({process.returncode}):\n{log.read_text()[-2000:]}")
    rows = json.loads((out / "summary.json").read_text())["cases"]
    return {
        "shapes": shapes,
        "dtype": "int16 on disk, float32 in the pipeline",
        "precision": precision,
        "peak_pss_gb_process_tree": round(peak[0] / 1e9, 3),
        "peak_rss_gb_largest_process": round(hwm[0] / 1e9, 3),
        "ru_maxrss_gb": round(max_rss / 1e9, 3),
        "command_wall_s": round(wall, 1),
        "timings": [row["timings"] for row in rows],
        "target_gb": TARGET_GB,
        "meets_target": peak[0] / 1e9 < TARGET_GB and hwm[0] / 1e9 < TARGET_GB,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--count", type=int, default=4, help="volumes in the batch (>= 4)")
    parser.add_argument("--shape", type=int, nargs=3, default=None, help="batch volume shape")
    parser.add_argument("--ct-shape", type=int, nargs=3, default=None, help="shape of the memory volume (512 512 200)")
    parser.add_argument("--checkpoint", default=None, help="weights fitting the demo architecture (default: bundle's or trained here)")
    parser.add_argument("--workers", type=int, default=1, help="segment --workers")
    parser.add_argument("--skip-memory", action="store_true", help="skip the CT-volume memory run")
    parser.add_argument("--memory-only", action="store_true", help="only the CT-volume memory run")
    parser.add_argument("--skip-levels", action="store_true", help="skip the per-level (L1..L_depth, accurate) batches")
    parser.add_argument("--levels-only", action="store_true", help="only the per-level batches (fp32), no bf16 or memory runs")
    parser.add_argument("--rounds", type=int, default=None, help="per-level batches: rounds in which the options take turns (3; --quick: 1)")
    parser.add_argument("--memory-bf16", action="store_true", help="also measure the CT-volume memory run in bf16")
    parser.add_argument("--ct-count", type=int, default=1, help="CT volumes in the memory batch (the first --ct-shape, each next 16 slices shorter)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    rounds = args.rounds or (1 if args.quick else 3)
    if args.shape:
        size["shape"] = args.shape
    if args.ct_shape:
        size["ct_shape"] = args.ct_shape
    report: dict = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "available_cores": available_cores(),
                    "torch_threads": apply_thread_count(), "native_bf16": native_bf16("cpu"),
                    "torch": torch.__version__, "load_average_start": [round(v, 2) for v in os.getloadavg()]},
        "network": {"bundle": "unetpp_3d_seg", "features": size["features"], "depth": size["depth"], "roi_size": size["roi"],
                    "sw_batch_size": 1, "overlap": 0.25},
    }
    with tempfile.TemporaryDirectory(prefix="bench_segment_") as tmp:
        work = Path(tmp)
        checkpoint, report["weights"] = weights(size, args, work)
        data = work / "in"
        data.mkdir()
        truth = {}
        for index in range(args.count):
            image, truth[f"vol{index}"] = blobs(size["shape"], index)
            nib.save(nib.Nifti1Image(image, np.diag([1.0, 1.0, 1.5, 1.0])), str(data / f"vol{index}.nii.gz"))
        common = ["--bundle", str(BUNDLE), "--checkpoint", str(checkpoint), *overrides(size), "--input", str(data), "--quiet",
                  "--device", "cpu", "--workers", str(args.workers)]

        if args.memory_only:
            report["memory_ct"] = memory_ct(size, checkpoint, work, count=args.ct_count)
            if args.memory_bf16:
                report["memory_ct_bf16"] = memory_ct(size, checkpoint, work, "bf16", count=args.ct_count)
            return finish(report, args)
        bundle = segment.load_bundle(BUNDLE, overrides=override_dict(size), checkpoint=str(checkpoint), device="cpu")
        cases = segment.discover_cases(data)
        if args.levels_only:
            report["levels"] = levels(size, common, cases, truth, bundle, work, rounds)
            return finish(report, args)
        images = [bundle.preprocessing({"image": case.image})["image"] for case in cases]
        network_only(bundle, images[:1], "fp32")  # warm-up (oneDNN kernels, allocator)

        results = {}
        for precision in ("fp32", "bf16"):
            before = network_only(bundle, images, precision)
            command_wall, summary = run_command(common + ["--output", str(work / f"out_{precision}"), "--precision", precision])
            after = network_only(bundle, images, precision)
            batch = summary["batch"]
            results[precision] = {
                "network_only_s": round((before + after) / 2, 3),
                "network_only_runs_s": [round(before, 3), round(after, 3)],
                "batch_wall_s": round(batch["wall_s"], 3),
                "command_wall_s": round(command_wall, 3),
                "network_in_batch_s": round(batch["network_s"], 3),
                "input_wait_s": round(batch["input_wait_s"], 3),
            }
            results[precision]["batch_over_network"] = round(results[precision]["batch_wall_s"] / results[precision]["network_only_s"], 3)
            # Same run, so insensitive to background load: how much of the batch's wall time the
            # network was busy (1.0 = reading and writing entirely hidden behind it).
            results[precision]["network_share_of_batch"] = round(batch["network_s"] / batch["wall_s"], 4)
            results[precision]["command_over_network"] = round(command_wall / results[precision]["network_only_s"], 3)
        report["pipeline"] = {"volumes": args.count, "shape": size["shape"], **results["fp32"], "target_ratio": 1.15,
                              "meets_target": results["fp32"]["batch_over_network"] <= 1.15}
        dices, quality = [], []
        for case in cases:
            masks = [np.asarray(nib.load(str(work / f"out_{p}" / f"{case.case_id}_seg.nii.gz")).dataobj) > 0 for p in ("fp32", "bf16")]
            dices.append(dice(*masks))
            quality.append(dice(masks[0], truth[case.case_id] > 0))
        report["bf16"] = {
            **results["bf16"],
            "network_speedup_fp32_over_bf16": round(results["fp32"]["network_only_s"] / results["bf16"]["network_only_s"], 3),
            "batch_speedup_fp32_over_bf16": round(results["fp32"]["batch_wall_s"] / results["bf16"]["batch_wall_s"], 3),
            "dice_bf16_vs_fp32": [round(d, 5) for d in dices],
            "dice_min": round(min(dices), 5),
            "dice_fp32_vs_truth": [round(d, 4) for d in quality],
            "target_dice": 0.99,
            "meets_target": min(dices) >= 0.99,
        }
        if not args.skip_levels:
            report["levels"] = levels(size, common, cases, truth, bundle, work, rounds)
        del images, bundle
        if not args.skip_memory:
            report["memory_ct"] = memory_ct(size, checkpoint, work, count=args.ct_count)
            if args.memory_bf16:
                report["memory_ct_bf16"] = memory_ct(size, checkpoint, work, "bf16", count=args.ct_count)
    return finish(report, args)


def window_flops(network, roi: list[int]) -> dict[str, int]:
    """FLOPs of one window for every option: fast mode L1..L_depth and accurate mode."""
    from bench_network import flops_of

    depth, flops = network.depth, {}
    mode, level = network.mode, network.prune_level
    x = torch.zeros(1, network.in_channels, *roi)
    try:
        for option in [f"L{k}" for k in range(1, depth + 1)] + ["accurate"]:
            network.mode, network.prune_level = ("accurate", depth) if option == "accurate" else ("fast", int(option[1:]))
            flops[option] = int(flops_of(network, x))
    finally:
        network.mode, network.prune_level = mode, level
    return flops


def levels(size: dict, common: list[str], cases: list, truth: dict, bundle, work: Path, rounds: int) -> dict:
    """The batch through the command once per option per round (fp32): seconds per volume beside FLOP shares.

    The options take turns within each round (L1, L2, ..., accurate, then again), so a slow spell of
    a shared machine (one run's L3 took 11.3 s per volume, another's 13.8 s) falls on every option
    alike instead of on whichever ran then.
    """
    depth = size["depth"]
    flops = window_flops(bundle.network, size["roi"])
    options = [f"L{k}" for k in range(1, depth + 1)] + ["accurate"]
    runs: dict = {option: [] for option in options}
    for index in range(rounds):
        for option in options:
            mode = ["--mode", "accurate"] if option == "accurate" else ["--mode", "fast", "--prune-level", option[1:]]
            out = work / f"out_level_{option}_{index}"
            command_wall, summary = run_command(common + ["--output", str(out), "--precision", "fp32", *mode])
            quality = [dice(np.asarray(nib.load(str(out / f"{case.case_id}_seg.nii.gz")).dataobj) > 0, truth[case.case_id] > 0)
                       for case in cases]
            runs[option].append({"summary": summary, "command_wall_s": command_wall, "dice": float(np.mean(quality))})
    rows = {}
    for option in options:
        cases_run = [row for run in runs[option] for row in run["summary"]["cases"]]
        # Each case through the command (read, network, write); the median leaves out the first case's
        # one-off start-up (oneDNN builds its kernels for each new shape: 2-3 s), which a batch of
        # hundreds pays once.
        per_case = [sum(row["timings"].values()) for row in cases_run]
        stages = {stage: round(statistics.median(row["timings"].get(stage, 0.0) for row in cases_run), 4)
                  for stage in ("read_s", "infer_s", "write_s")}
        batches = [run["summary"]["batch"] for run in runs[option]]
        rows[option] = {
            "case_s_median": round(statistics.median(per_case), 4),
            "case_s_median_by_round": [round(statistics.median(sum(row["timings"].values()) for row in run["summary"]["cases"]), 4)
                                       for run in runs[option]],
            "stage_s_median": stages,
            "network_s_per_volume": round(sum(batch["network_s"] for batch in batches) / len(per_case), 4),
            "batch_wall_s_per_volume": round(sum(batch["wall_s"] for batch in batches) / len(per_case), 4),
            "command_wall_s": [round(run["command_wall_s"], 3) for run in runs[option]],
            "window_gflops": round(flops[option] / 1e9, 3),
            "dice_vs_truth": round(statistics.mean(run["dice"] for run in runs[option]), 4),
        }
    deepest = rows[f"L{depth}"]
    for option, row in rows.items():
        row["flop_share"] = round(flops[option] / flops[f"L{depth}"], 4)
        row["network_share"] = round(row["network_s_per_volume"] / deepest["network_s_per_volume"], 4)
        row["batch_share"] = round(row["batch_wall_s_per_volume"] / deepest["batch_wall_s_per_volume"], 4)
        row["batch_share_over_flop_share"] = round(row["batch_share"] / row["flop_share"], 3)
        row["case_share"] = round(row["case_s_median"] / deepest["case_s_median"], 4)
        row["case_share_over_flop_share"] = round(row["case_share"] / row["flop_share"], 3)
        row["case_share_over_flop_share_by_round"] = [
            round(mine / theirs / row["flop_share"], 3)
            for mine, theirs in zip(row["case_s_median_by_round"], deepest["case_s_median_by_round"])
        ]
    fast = [row for option, row in rows.items() if option != "accurate"]
    return {"precision": "fp32", "volumes": len(cases), "rounds": rounds, "rows": rows, "target_share_over_flop_share": 1.2,
            "meets_target": all(row["case_share_over_flop_share"] <= 1.2 for row in fast)}


def finish(report: dict, args) -> int:
    report["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
