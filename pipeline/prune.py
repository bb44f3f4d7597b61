"""``python -m pipeline prune``: choose the cheapest UNet++ level that keeps accuracy, on the bundle's own validation cases.

UNet++ trained with deep supervision holds the networks L1..L_depth (the paper's "fast mode":
L_k computes only the nodes X(i,j) with i+j <= k) and the accurate mode (a weighted mean of
every head). This command measures each of them on the bundle's validation cases with the
bundle's own evaluation chain (``validate#preprocessing``, ``validate#inferer`` -- the sliding
window --, ``validate#postprocessing``: inversion to each case's grid) and writes, into
``B/docs/``:

* ``prune_table.csv`` / ``prune_table.json``: per level Dice / IoU / HD95 per class (and their
  means), seconds per volume (the whole sliding window, on the chosen device and precision),
  peak memory above the process's baseline, parameters of the standalone pruned network;
* ``prune_tradeoff.png``: mean Dice against seconds per volume, one point per level, accurate
  mode marked, the choice circled.

It also fits accurate mode's head weights (a grid over the simplex of the heads' logit weights,
scored by Dice on the preprocessed grid, then re-measured through the whole chain) and keeps them
only when they beat both the deepest head alone and the equal mean.

Then it picks an option (see :func:`choose`) and records it in ``models/settings.json``
(``mode``, ``prune_level``, ``head_weights``, ``precision``), which ``segment`` reads by default.
With ``--export OUT`` it writes a standalone bundle holding only L_k's weights (``net.prune(k)``).

Exit codes: 0 an option was chosen (and recorded), 2 usage or setup error, 3 no option meets the
budget (the table and plot are written, the settings are left as they were).
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.fileio import atomic_torch_save, atomic_write_bytes, atomic_write_text, read_json

__all__ = ["EXIT_OK", "EXIT_USAGE", "EXIT_NO_LEVEL", "BF16_MIN_DICE", "build_parser", "main", "choose", "export_pruned"]

EXIT_OK, EXIT_USAGE, EXIT_NO_LEVEL = 0, 2, 3
BF16_MIN_DICE = 0.995  # mask Dice of bf16 against fp32 on every validation case, to serve in bf16
DEFAULT_MAX_DICE_DROP = 0.01
TABLE_CSV, TABLE_JSON, PLOT = "prune_table.csv", "prune_table.json", "prune_tradeoff.png"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline prune",
        description="Measure UNet++ L1..L_depth and accurate mode on the bundle's validation cases, "
        "pick the cheapest that meets the budget, record it in models/settings.json.",
        epilog="Exit code: 0 chosen and recorded, 2 usage or setup error, 3 no level meets the budget.",
    )
    parser.add_argument("--bundle", required=True, help="a trained bundle folder (models/model.pt, models/settings.json)")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="seconds per volume allowed: the most accurate option within it (ties: the cheaper)")
    parser.add_argument("--max-dice-drop", type=float, default=None,
                        help=f"mean Dice allowed below the full network's best: the cheapest option within it "
                             f"(default {DEFAULT_MAX_DICE_DROP} when no budget is given)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: the bundle's)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="precision to serve in; auto: bf16 where the device supports it natively and the masks "
                             f"agree with fp32 (Dice >= {BF16_MIN_DICE} on every validation case), else fp32")
    parser.add_argument("--config", nargs="+", default=["configs/train.json", "configs/evaluate.json"],
                        help="bundle config files (later override earlier); add configs/demo.json for the demo bundle")
    parser.add_argument("--override", action="append", default=[], metavar="ID=VALUE", help="config override (repeatable)")
    parser.add_argument("--dataset-dir", "--dataset_dir", dest="dataset_dir", default=None, help="the datalist's root folder")
    parser.add_argument("--datalist", default=None, help="datalist .json (default: the bundle's)")
    parser.add_argument("--section", default="validation", help="datalist section to measure on (default: validation)")
    parser.add_argument("--max-cases", type=int, default=None, help="measure on the first N cases only")
    parser.add_argument("--export", default=None, metavar="OUT", help="also write a standalone bundle holding only the chosen L_k")
    parser.add_argument("--export-level", type=int, default=None, help="the level to export (default: the chosen one)")
    parser.add_argument("--no-record", action="store_true", help="measure and report, leave models/settings.json alone")
    return parser


# ----------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class _PeakMemory:
    """Peak memory of a block above its start: CUDA's allocator peak, else the process RSS sampled every 2 ms."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self.peak_rss = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak_rss = max(self.peak_rss, _rss_bytes())

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak_rss, _rss_bytes()) - self.base
        return False


def _parse_bundle(args) -> tuple[Any, dict]:
    from monai.bundle import ConfigParser
    from monai.bundle.reference_resolver import ReferenceResolver

    from pipeline.segment.bundle import parse_override

    bundle = Path(args.bundle)
    files = [str(f if Path(f).is_absolute() else bundle / f) for f in args.config]
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"bundle config {path} not found (is --bundle a MONAI bundle folder?)")
    parser = ConfigParser()
    parser.read_config(files)
    meta = bundle / "configs" / "metadata.json"
    if meta.is_file():
        parser.read_meta(str(meta))
    parser["bundle_root"] = str(bundle)
    overrides = {"eval_section": args.section, "num_workers": 0, "check_data": False}
    if args.dataset_dir:
        overrides["dataset_dir"] = str(Path(args.dataset_dir).absolute())
    if args.datalist:
        overrides["datalist"] = str(Path(args.datalist).absolute())
    if args.device:
        overrides["device"] = f"$torch.device({str(args.device)!r})"
    user = dict(parse_override(text) for text in args.override)
    for key in user:
        if ReferenceResolver.normalize_id(key).split(ReferenceResolver.sep)[0] not in parser:
            raise KeyError(f"override {key!r}: the bundle configs have no id {key.split('#')[0]!r} (a typo?)")
    overrides.update(user)
    for key, value in overrides.items():
        if ReferenceResolver.normalize_id(key).split(ReferenceResolver.sep)[0] in parser or key in ("eval_section",):
            parser[key] = value
    for needed in ("network_def", "validate#preprocessing", "validate#inferer", "validate#postprocessing"):
        if needed not in parser:
            raise KeyError(f"the bundle's configs {args.config} have no {needed!r} (prune needs the evaluation chain)")
    return parser, overrides


def _label_class_count(out_channels: int) -> list[int]:
    return [1] if out_channels == 1 else list(range(1, out_channels))


def _metrics(pred: torch.Tensor, label: torch.Tensor, out_channels: int) -> dict[str, list[float]]:
    """Dice, IoU, HD95 (mm) per foreground class of one case, as the bundle's metric handlers compute them."""
    from monai.metrics import compute_dice, compute_hausdorff_distance, compute_iou
    from monai.data import MetaTensor

    include_background = out_channels == 1
    spacing = None
    if isinstance(label, MetaTensor):
        dims = label.ndim - 1
        spacing = ([float(s) for s in torch.as_tensor(label.pixdim).reshape(-1)] + [1.0] * dims)[:dims]
    p, y = pred[None].float(), label[None].float()
    dice = compute_dice(p, y, include_background=include_background, ignore_empty=False)[0]
    iou = compute_iou(p, y, include_background=include_background, ignore_empty=False)[0]
    hd = compute_hausdorff_distance(p, y, include_background=include_background, percentile=95, spacing=spacing)[0]
    return {"dice": [float(v) for v in dice], "iou": [float(v) for v in iou], "hd95": [float(v) for v in hd]}


class _Evaluation:
    """The bundle's evaluation chain with the network, the preprocessed cases kept in memory."""

    def __init__(self, parser, args):
        from pipeline.checkpoints import load_weights

        self.parser = parser
        self.device = torch.device(parser.get_parsed_content("device")) if "device" in parser else torch.device("cpu")
        self.out_channels = int(parser.get_parsed_content("out_channels"))
        self.network = parser.get_parsed_content("network_def")
        if not all(hasattr(self.network, name) for name in ("mode", "prune_level", "depth", "prune")):
            raise TypeError(f"network_def is {type(self.network).__name__}, not a UNet++ with fast mode: nothing to prune")
        if not getattr(self.network, "deep_supervision", True):
            raise ValueError("the network has no deep supervision: only its deepest head exists, nothing to prune")
        self.checkpoint = parser.get_parsed_content("ckpt_path")
        if not os.path.isfile(self.checkpoint):
            raise FileNotFoundError(f"{self.checkpoint}: no trained weights; train the bundle first")
        settings = parser.get_parsed_content("model_settings") if "model_settings" in parser else None
        load_weights(self.network, self.checkpoint, settings=settings)
        self.network = self.network.to(self.device).eval()
        self.depth = int(self.network.depth)
        self.preprocessing = parser.get_parsed_content("validate#preprocessing")
        self.inferer = parser.get_parsed_content("validate#inferer")
        self.postprocessing = parser.get_parsed_content("validate#postprocessing")
        items = parser.get_parsed_content("validate#dataset").data
        if args.max_cases:
            items = items[: args.max_cases]
        if not items:
            raise ValueError(f"the datalist's {args.section!r} section is empty: nothing to measure on")
        self.items = list(items)
        self.cases = [self.preprocessing(dict(item)) for item in self.items]

    def set_option(self, option: str, head_weights: Sequence[float] | None = None) -> None:
        if option == "accurate":
            self.network.mode = "accurate"
            weights = head_weights or [1.0] * len(self.network.head_weights)
            total = float(sum(weights))
            self.network.head_weights = torch.tensor([w / total for w in weights], device=self.device)
        else:
            self.network.mode, self.network.prune_level = "fast", int(option[1:])

    def infer(self, case: dict, precision: str) -> tuple[Any, float, int]:
        """The sliding window over one preprocessed case: (logits MetaTensor on CPU, seconds, peak bytes)."""
        from monai.data import list_data_collate

        from pipeline.inferers import AutocastInferer

        batch = list_data_collate([case])
        image = batch["image"].to(self.device)
        with torch.no_grad(), _PeakMemory(self.device) as memory:
            start = time.perf_counter()
            logits = AutocastInferer(self.inferer, precision)(image, self.network)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - start
        return logits.float().cpu(), seconds, memory.peak

    def score(self, case: dict, logits) -> dict[str, list[float]]:
        """Postprocess (invert to the case's grid, discretise) and compute the metrics there."""
        from monai.data import decollate_batch, list_data_collate

        batch = list_data_collate([case])
        batch["pred"] = logits
        item = self.postprocessing(decollate_batch(batch)[0])
        return _metrics(item["pred"], item["label"], self.out_channels), item["pred"]


def _summarise(per_case: list[dict], key: str) -> list[float]:
    values = np.array([case[key] for case in per_case], dtype=float)  # cases x classes
    with np.errstate(invalid="ignore"):
        return [float(v) for v in np.nanmean(np.where(np.isinf(values), np.nan, values), axis=0)]


def _parameters(network, option: str) -> int:
    module = network if option == "accurate" else network.prune(int(option[1:]))
    return int(sum(p.numel() for p in module.parameters()))


def _simplex_grid(heads: int, steps: int) -> list[tuple[float, ...]]:
    """Every weight vector with entries in {0, 1/steps, ..., 1} summing to 1."""
    grid = []
    for combo in itertools.product(range(steps + 1), repeat=heads):
        if sum(combo) == steps:
            grid.append(tuple(c / steps for c in combo))
    return grid


def _grid_dice(logits: list[torch.Tensor], label: torch.Tensor, weights, out_channels: int) -> float:
    """Mean foreground Dice of the weighted logits on the preprocessed grid (the fitting score)."""
    combined = sum(w * l.float() for w, l in zip(weights, logits))
    if out_channels == 1:
        pred, truth = combined[0] > 0, label[0] > 0.5
        pairs = [(pred, truth)]
    else:
        index = combined.argmax(0)
        pairs = [(index == c, label[0].round() == c) for c in range(1, out_channels)]
    scores = []
    for p, t in pairs:
        total = float(p.sum() + t.sum())
        scores.append(1.0 if total == 0 else 2.0 * float((p & t).sum()) / total)
    return float(np.mean(scores))


def fit_head_weights(per_level_logits: list[list[torch.Tensor]], labels: list[torch.Tensor], out_channels: int,
                     steps: int | None = None) -> tuple[list[float], float]:
    """The weights of heads X(0,1)..X(0,depth) that maximise the mean Dice on the preprocessed grid.

    ``per_level_logits[case][k-1]`` are head k's logits (fast mode at level k computes exactly
    head k of the full network). A grid over the simplex (step 1/4 for up to 4 heads, 1/3 beyond).
    Ties keep the earlier candidate of the grid order; the equal mean and the deepest head alone
    are scored as well, so the result is never worse than them on this score.
    """
    heads = len(per_level_logits[0])
    steps = steps or (4 if heads <= 4 else 3)
    candidates = [tuple([1.0 / heads] * heads), tuple([0.0] * (heads - 1) + [1.0])] + _simplex_grid(heads, steps)
    best, best_score = None, -1.0
    for weights in candidates:
        score = float(np.mean([_grid_dice(l, y, weights, out_channels) for l, y in zip(per_level_logits, labels)]))
        if score > best_score + 1e-9:
            best, best_score = list(weights), score
    return best, best_score


# ----------------------------------------------------------------------------------------------
# choosing
# ----------------------------------------------------------------------------------------------


def choose(rows: list[dict], budget_seconds: float | None = None, max_dice_drop: float | None = None) -> tuple[dict | None, str]:
    """The option to serve, from the table's rows; ``(None, reason)`` when none meets the budget.

    * ``max_dice_drop`` D (default 0.01 without a budget): the cheapest option (seconds per
      volume, then parameters) whose mean Dice is at least the best full-network Dice (deepest
      head or accurate mode) minus D;
    * ``budget_seconds`` S alone: the most accurate option within S seconds per volume (ties:
      the cheaper);
    * both: the cheapest option meeting both.
    """
    if budget_seconds is None and max_dice_drop is None:
        max_dice_drop = DEFAULT_MAX_DICE_DROP
    full = [row for row in rows if row["option"] == "accurate" or row["level"] == max(r["level"] for r in rows)]
    reference = max(row["mean_dice"] for row in full)
    fits = list(rows)
    if budget_seconds is not None:
        fits = [row for row in fits if row["seconds_per_volume"] <= budget_seconds]
    if max_dice_drop is not None:
        fits = [row for row in fits if row["mean_dice"] >= reference - max_dice_drop - 1e-12]
    if not fits:
        cheapest = min(rows, key=lambda r: r["seconds_per_volume"])
        parts = []
        if budget_seconds is not None:
            parts.append(f"a budget of {budget_seconds:g} s per volume (the cheapest option, {cheapest['option']}, "
                         f"takes {cheapest['seconds_per_volume']:.3g} s)")
        if max_dice_drop is not None:
            parts.append(f"a Dice drop of at most {max_dice_drop:g} from {reference:.4f}")
        return None, "no level meets " + " and ".join(parts)
    if budget_seconds is not None and max_dice_drop is None:
        best = max(fits, key=lambda r: (round(r["mean_dice"], 6), -r["seconds_per_volume"]))
        return best, f"the most accurate option within {budget_seconds:g} s per volume"
    best = min(fits, key=lambda r: (r["seconds_per_volume"], r["parameters"]))
    return best, f"the cheapest option within a Dice drop of {max_dice_drop:g} from {reference:.4f}"


# ----------------------------------------------------------------------------------------------
# precision
# ----------------------------------------------------------------------------------------------


def _mask_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).round().long(), torch.as_tensor(b).round().long()
    classes = [c for c in torch.unique(torch.cat([a.flatten(), b.flatten()])).tolist() if c != 0]
    if not classes:
        return 1.0
    scores = []
    for c in classes:
        pa, pb = a == c, b == c
        scores.append(2.0 * float((pa & pb).sum()) / float(pa.sum() + pb.sum()))
    return float(np.mean(scores))


def _check_bf16(evaluation: _Evaluation, option: str, head_weights, fp32_masks: list) -> tuple[bool, list[float]]:
    evaluation.set_option(option, head_weights)
    scores = []
    for case, reference in zip(evaluation.cases, fp32_masks):
        logits, _, _ = evaluation.infer(case, "bf16")
        _, mask = evaluation.score(case, logits)
        scores.append(_mask_dice(mask, reference))
    return min(scores) >= BF16_MIN_DICE, scores


# ----------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------


def _write_table(docs: Path, report: dict) -> None:
    rows = report["rows"]
    classes = report["class_names"]
    columns = ["option", "level", "mean_dice", "mean_iou", "mean_hd95_mm", "seconds_per_volume", "share_of_deepest_s",
               "peak_memory_mb", "parameters", "head_weights"]
    for name in classes:
        columns += [f"dice_{name}", f"iou_{name}", f"hd95_mm_{name}"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        flat = dict(row)
        flat["head_weights"] = " ".join(f"{w:.3f}" for w in row["head_weights"]) if row.get("head_weights") else ""
        for position, name in enumerate(classes):
            for metric, column in (("dice", "dice"), ("iou", "iou"), ("hd95", "hd95_mm")):
                flat[f"{column}_{name}"] = row[metric][position]
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in flat.items()})
    docs.mkdir(parents=True, exist_ok=True)
    atomic_write_text(docs / TABLE_CSV, buffer.getvalue())
    atomic_write_text(docs / TABLE_JSON, json.dumps(report, indent=2) + "\n")


def _write_plot(docs: Path, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    chosen = (report.get("choice") or {}).get("option")
    figure, axis = plt.subplots(figsize=(6, 4.2), dpi=110)
    levels = [r for r in rows if r["option"] != "accurate"]
    axis.plot([r["seconds_per_volume"] for r in levels], [r["mean_dice"] for r in levels], "o-", color="tab:blue", label="fast mode L_k")
    for r in levels:
        axis.annotate(r["option"], (r["seconds_per_volume"], r["mean_dice"]), textcoords="offset points", xytext=(5, -12))
    for r in rows:
        if r["option"] == "accurate":
            label = "accurate (fitted head weights)" if r.get("head_weights_fitted") else "accurate (equal mean of heads)"
            axis.plot([r["seconds_per_volume"]], [r["mean_dice"]], "*", markersize=14, color="tab:red", label=label)
        if r["option"] == chosen:
            axis.plot([r["seconds_per_volume"]], [r["mean_dice"]], "o", markersize=16, markerfacecolor="none",
                      markeredgecolor="tab:green", markeredgewidth=2, label=f"chosen: {chosen}")
    budget = report["budget"].get("budget_seconds")
    if budget is not None:
        axis.axvline(budget, color="grey", linestyle="--", linewidth=1, label=f"budget {budget:g} s")
    axis.set_xlabel(f"seconds per volume ({report['device']}, {report['precision']}, sliding window)")
    axis.set_ylabel(f"mean Dice ({report['n_cases']} {report['section']} cases)")
    axis.set_title(f"UNet++ levels: {Path(report['bundle']).name}")
    axis.grid(alpha=0.3)
    axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(docs / PLOT, buffer.getvalue())


def record_choice(ckpt_dir: Path, values: dict) -> Path:
    from pipeline.settings import record_serving

    return record_serving(ckpt_dir, values)


def export_pruned(bundle: Path, destination: Path, network, level: int, settings_path: Path) -> Path:
    """A standalone bundle at ``destination`` holding only L_level's weights (``network.prune(level)``).

    The configs are copied with ``network_def#deep_supervision`` set to false (the pruned network
    has the one head X(0,level)); ``models/settings.json`` holds ``depth`` = level and the first
    level + 1 widths, so every command reads the pruned shape by itself. Refuses an existing
    non-empty destination.
    """
    destination = Path(destination)
    if destination.exists() and any(destination.iterdir()):
        raise FileExistsError(f"--export {destination}: exists and is not empty")
    if destination.resolve() == Path(bundle).resolve() or Path(bundle).resolve() in destination.resolve().parents:
        raise FileExistsError(f"--export {destination}: inside the bundle it exports; choose a folder outside it")
    shutil.copytree(bundle, destination, ignore=shutil.ignore_patterns("models", "logs", "eval", "manifest.json", "__pycache__"),
                    dirs_exist_ok=True)
    for config in sorted((destination / "configs").glob("*.json")):
        content = read_json(config)
        if isinstance(content.get("network_def"), dict):
            content["network_def"]["deep_supervision"] = False
            content["network_def"]["mode"] = "accurate"
            atomic_write_text(config, json.dumps(content, indent=4) + "\n")
    meta_path = destination / "configs" / "metadata.json"
    if meta_path.is_file():
        meta = read_json(meta_path)
        meta["description"] = f"{meta.get('description', '').rstrip('. ')}. Pruned to UNet++ L{level} (fast mode, one head).".lstrip(". ")
        atomic_write_text(meta_path, json.dumps(meta, indent=4) + "\n")
    pruned = network.prune(level).cpu()
    models = destination / "models"
    models.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(pruned.state_dict(), models / "model.pt")
    from pipeline.settings import SERVING_KEYS

    settings = read_json(settings_path) if settings_path.is_file() else {}
    settings = {k: v for k, v in settings.items() if k not in SERVING_KEYS or k == "precision"}
    settings["depth"] = level
    settings["features"] = [int(f) for f in network.features[: level + 1]]
    settings["pruned_from"] = {"depth": int(network.depth), "features": [int(f) for f in network.features], "level": level}
    from pipeline.bundle_sync import dumps

    atomic_write_text(models / "settings.json", dumps(settings) + "\n")
    return destination


# ----------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    for name in ("budget_seconds", "max_dice_drop"):
        value = getattr(args, name)
        if value is not None and value < 0:
            print(f"error: --{name.replace('_', '-')} must be >= 0", file=sys.stderr)
            return EXIT_USAGE
    from pipeline.cpu import apply_thread_count, native_bf16

    threads = apply_thread_count()
    try:
        parser, _ = _parse_bundle(args)
        evaluation = _Evaluation(parser, args)
        from pipeline.inferers import check_precision

        measure_precision = "bf16" if args.precision == "bf16" else "fp32"
        check_precision(measure_precision, evaluation.device)
    except Exception as err:  # noqa: BLE001 - a setup problem is one clear line
        from pipeline.segment.run import root_cause

        print(f"error: cannot prepare {args.bundle}: {root_cause(err)}", file=sys.stderr)
        return EXIT_USAGE

    depth, network = evaluation.depth, evaluation.network
    options = [f"L{k}" for k in range(1, depth + 1)] + ["accurate"]
    labels = [case["label"] for case in evaluation.cases]
    per_level_logits: list[list[torch.Tensor]] = [[] for _ in evaluation.cases]
    deepest_logits: list = [None] * len(evaluation.cases)  # MetaTensors: their meta carries the inversion
    rows, masks = [], {}
    # one warm-up window so that the first option does not pay for lazy initialisation
    evaluation.set_option("accurate")
    evaluation.infer(evaluation.cases[0], measure_precision)
    for option in options:
        evaluation.set_option(option)
        per_case, seconds, peaks, option_masks = [], [], [], []
        for index, case in enumerate(evaluation.cases):
            logits, took, peak = evaluation.infer(case, measure_precision)
            metrics, mask = evaluation.score(case, logits)
            per_case.append(metrics)
            seconds.append(took)
            peaks.append(peak)
            option_masks.append(mask)
            if option != "accurate":
                per_level_logits[index].append(logits[0].half())  # kept for the head-weight fit: half the memory
            if option == f"L{depth}":
                deepest_logits[index] = logits
        masks[option] = option_masks
        dice, iou, hd95 = _summarise(per_case, "dice"), _summarise(per_case, "iou"), _summarise(per_case, "hd95")
        rows.append({
            "option": option,
            "level": depth if option == "accurate" else int(option[1:]),
            "mean_dice": float(np.mean(dice)), "mean_iou": float(np.mean(iou)), "mean_hd95_mm": float(np.nanmean(hd95)),
            "dice": dice, "iou": iou, "hd95": hd95,
            "seconds_per_volume": float(np.mean(seconds)),
            "peak_memory_mb": float(max(peaks)) / 2**20,
            "parameters": _parameters(network, option),
            "head_weights": [1.0 / depth] * depth if option == "accurate" else None,
            "per_case": [{"image": str(item.get("image")), **m, "seconds": s} for item, m, s in zip(evaluation.items, per_case, seconds)],
        })  # fmt: skip
        print(f"prune: {option:>8}: mean Dice {rows[-1]['mean_dice']:.4f}, {rows[-1]['seconds_per_volume']:.3f} s/volume, "
              f"{rows[-1]['parameters']:,} parameters", file=sys.stderr)

    # accurate mode's head weights, fitted on the cases and kept only when they beat both references
    weights, grid_score = fit_head_weights(per_level_logits, labels, evaluation.out_channels)
    accurate = rows[-1]
    fitting = {"weights": weights, "grid_dice": grid_score, "kept": False,
               "equal_mean_dice": accurate["mean_dice"], "deepest_head_dice": rows[depth - 1]["mean_dice"]}
    equal = [1.0 / depth] * depth
    if not np.allclose(weights, equal):
        per_case = []
        for index, case in enumerate(evaluation.cases):
            logits = deepest_logits[index].clone()  # keeps the meta data the inversion needs
            logits.copy_(sum(w * l.float() for w, l in zip(weights, per_level_logits[index]))[None])
            metrics, _ = evaluation.score(case, logits)
            per_case.append(metrics)
        fitted_dice = float(np.mean(_summarise(per_case, "dice")))
        fitting["fitted_dice"] = fitted_dice
        if fitted_dice > accurate["mean_dice"] + 1e-9 and fitted_dice > rows[depth - 1]["mean_dice"] + 1e-9:
            fitting["kept"] = True
            dice, iou, hd95 = _summarise(per_case, "dice"), _summarise(per_case, "iou"), _summarise(per_case, "hd95")
            accurate.update(mean_dice=float(np.mean(dice)), mean_iou=float(np.mean(iou)), mean_hd95_mm=float(np.nanmean(hd95)),
                            dice=dice, iou=iou, hd95=hd95, head_weights=weights, head_weights_fitted=True,
                            equal_mean_dice=fitting["equal_mean_dice"])
            for entry, metrics in zip(accurate["per_case"], per_case):
                entry.update(metrics)
    deepest_seconds = rows[depth - 1]["seconds_per_volume"]
    for row in rows:
        row["share_of_deepest_s"] = row["seconds_per_volume"] / deepest_seconds if deepest_seconds > 0 else float("nan")

    choice, reason = choose(rows, args.budget_seconds, args.max_dice_drop)
    report = {
        "bundle": str(Path(args.bundle).absolute()),
        "checkpoint": str(Path(evaluation.checkpoint).absolute()),
        "section": args.section,
        "n_cases": len(evaluation.cases),
        "device": str(evaluation.device),
        "precision": measure_precision,
        "threads": threads,
        "class_names": [f"class{i}" for i in range(len(rows[0]["dice"]))],
        "budget": {"budget_seconds": args.budget_seconds, "max_dice_drop": args.max_dice_drop},
        "head_weight_fit": fitting,
        "rows": rows,
        "choice": None,
        "reason": reason,
    }
    code = EXIT_OK
    if choice is None:
        print(f"prune: {reason}; nothing recorded (the table is in {Path(args.bundle) / 'docs' / TABLE_CSV})", file=sys.stderr)
        code = EXIT_NO_LEVEL
    else:
        decision = {"mode": "accurate"} if choice["option"] == "accurate" else {"mode": "fast", "prune_level": choice["level"]}
        if choice["option"] == "accurate" and choice.get("head_weights_fitted"):
            decision["head_weights"] = choice["head_weights"]
        # serving precision: bf16 only where native and the masks agree with fp32
        precision, note = "fp32", "asked for with --precision fp32"
        if args.precision == "bf16":
            precision, note = "bf16", "asked for with --precision bf16 (measured in bf16)"
        elif args.precision == "auto":
            if evaluation.device.type == "cuda" or native_bf16(evaluation.device):
                agree, scores = _check_bf16(evaluation, choice["option"], decision.get("head_weights"), masks[choice["option"]])
                report["bf16_mask_dice"] = scores
                if agree:
                    precision, note = "bf16", f"bf16 masks agree with fp32 (Dice >= {min(scores):.5f} on every case)"
                else:
                    note = (f"bf16 masks disagree with fp32 (lowest Dice {min(scores):.5f} < {BF16_MIN_DICE}): "
                            "falling back to fp32")
            else:
                note = f"{evaluation.device} has no native bfloat16: fp32"
        decision["precision"] = precision
        report["choice"] = {"option": choice["option"], **decision, "precision_note": note}
        print(f"prune: chose {choice['option']} ({reason}): mean Dice {choice['mean_dice']:.4f}, "
              f"{choice['seconds_per_volume']:.3f} s/volume; precision {precision} ({note})", file=sys.stderr)
        if not args.no_record:
            path = record_choice(Path(evaluation.checkpoint).parent, decision)
            print(f"prune: recorded in {path}; segment uses it by default", file=sys.stderr)
    docs = Path(args.bundle) / "docs"
    _write_table(docs, report)
    _write_plot(docs, report)
    print(f"prune: table {docs / TABLE_CSV}, plot {docs / PLOT}", file=sys.stderr)

    if args.export and code == EXIT_OK:
        level = args.export_level or (choice["level"] if choice["option"] != "accurate" else None)
        if level is None:
            print("error: accurate mode was chosen: nothing to prune; pass --export-level K", file=sys.stderr)
            return EXIT_USAGE
        try:
            out = export_pruned(Path(args.bundle), Path(args.export), network, int(level),
                                Path(evaluation.checkpoint).parent / "settings.json")
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USAGE
        print(f"prune: standalone L{level} bundle written to {out}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
