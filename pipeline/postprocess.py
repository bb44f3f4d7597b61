"""Post-processing decided on validation cases, as nnU-Net does: ``python -m pipeline postprocess``.

For each foreground class, candidate rules for its connected components are tried on the
masks the bundle's own evaluation chain (``train.json`` + ``evaluate.json``, on the input
grid) predicts for the ``validation`` section:

* nothing (the reference);
* keep the largest connected component;
* drop components smaller than a volume (fractions of the smallest true component seen in the
  validation labels, in mm^3, so that the rule holds on another grid).

A rule is kept only when it raises the class's mean validation Dice (by more than
``--min-gain``, default 0.001); otherwise the class is left alone. The choice is stored in the
trained bundle's ``models/settings.json`` under ``postprocessing`` (with the Dice of every
candidate), and from then on evaluate, inference and ``python -m pipeline segment`` apply it by
default (the configs' ``components`` id; ``--components None`` turns it off for one run).
Training writes ``settings.json`` afresh, so new weights start without rules.

Usage::

    python -m pipeline postprocess --bundle BUNDLE --dataset-dir DATA --datalist DATA/datalist.json
    python -m pipeline postprocess --bundle BUNDLE ... --dry-run      # print the choice, store nothing
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from pipeline.transforms import apply_component_rule

__all__ = ["choose_rules", "validation_masks", "main"]

FRACTIONS = (0.1, 0.25, 0.5)  # of the smallest true component, as min_size_mm3 candidates


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else float(2 * (pred & truth).sum() / total)


def _smallest_true_component(truths: Iterable[tuple[np.ndarray, float]]) -> float | None:
    from scipy import ndimage

    smallest = None
    for truth, voxel_mm3 in truths:
        components, count = ndimage.label(truth, structure=np.ones((3,) * truth.ndim))
        if count:
            size = float(np.bincount(components.ravel())[1:].min()) * voxel_mm3
            smallest = size if smallest is None else min(smallest, size)
    return smallest


def choose_rules(cases: Sequence[tuple[np.ndarray, np.ndarray, float]], classes: Sequence[int], min_gain: float = 1e-3) -> dict:
    """Pick per class the component rule that raises the mean validation Dice most (or none).

    Args:
        cases: ``(predicted class map, true class map, voxel volume in mm^3)`` per validation case,
            maps of class values on the same grid.
        classes: the foreground class values to decide for.
        min_gain: a rule must raise the class's mean Dice by more than this.

    Returns ``{"classes": {value: rule}, "dice": {value: {candidate: mean Dice}}, "cases": n,
    "mean_dice_before": ..., "mean_dice_after": ...}``; ``classes`` holds only the classes that
    got a rule (``{"largest_component": bool, "min_size_mm3": float}``).
    """
    chosen, table, before, after = {}, {}, [], []
    for value in classes:
        preds = [(pred == value, voxel) for pred, _, voxel in cases]
        truths = [(truth == value, voxel) for _, truth, voxel in cases]
        candidates: dict[str, dict] = {"none": {"largest_component": False, "min_size_mm3": 0.0},
                                       "largest_component": {"largest_component": True, "min_size_mm3": 0.0}}
        smallest = _smallest_true_component(truths)
        for fraction in FRACTIONS if smallest else ():
            size = round(fraction * smallest, 3)
            candidates[f"min_size_mm3={size:g}"] = {"largest_component": False, "min_size_mm3": size}
        scores = {}
        for name, rule in candidates.items():
            scores[name] = float(np.mean([
                _dice(apply_component_rule(p, voxel, **rule), t) for (p, voxel), (t, _) in zip(preds, truths)
            ])) if cases else float("nan")
        best = max(scores, key=lambda name: (scores[name], name == "none"))
        if best != "none" and scores[best] > scores["none"] + min_gain:
            chosen[str(value)] = candidates[best]
        else:
            best = "none"
        table[str(value)] = {name: round(score, 5) for name, score in scores.items()}
        before.append(scores["none"])
        after.append(scores[best])
    return {
        "classes": chosen,
        "chosen_on": "validation",
        "cases": len(cases),
        "min_gain": min_gain,
        "dice": table,
        "mean_dice_before": round(float(np.mean(before)), 5) if before else None,
        "mean_dice_after": round(float(np.mean(after)), 5) if after else None,
    }


def _class_map(tensor: torch.Tensor) -> np.ndarray:
    """(1, *spatial) binary or (K, *spatial) one-hot -> (*spatial) class values."""
    array = torch.as_tensor(tensor).detach().cpu().numpy()
    return (array[0] > 0.5).astype(np.uint8) if array.shape[0] == 1 else array.argmax(axis=0).astype(np.uint8)


def _voxel_mm3(tensor: Any, spatial: int) -> float:
    pixdim = getattr(tensor, "pixdim", None)
    return float(np.prod(np.asarray(pixdim, dtype=float)[:spatial])) if pixdim is not None else 1.0


def validation_masks(parser, section: str = "validation") -> tuple[list[tuple[np.ndarray, np.ndarray, float]], int]:
    """Run the bundle's evaluator (``validate#evaluator`` of train.json + evaluate.json) on ``section``
    with no component rules, and return ``(predicted, true, voxel mm^3)`` per case on the input grid,
    and ``out_channels``.
    """
    from ignite.engine import Events

    from pipeline.settings import require_datalist

    parser["eval_section"] = section
    parser["components"] = None
    require_datalist(parser.get_parsed_content("datalist"), parser.get_parsed_content("dataset_dir"))
    evaluator = parser.get_parsed_content("validate#evaluator")
    cases: list[tuple[np.ndarray, np.ndarray, float]] = []

    def keep(engine) -> None:
        for item in engine.state.output:
            pred = item["pred"]
            cases.append((_class_map(pred), _class_map(item["label"]), _voxel_mm3(pred, pred.ndim - 1)))

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, keep)
    evaluator.run()
    return cases, int(parser.get_parsed_content("out_channels"))


def main(argv: list[str] | None = None) -> int:
    from monai.bundle import ConfigParser

    from pipeline.segment.bundle import parse_override
    from pipeline.settings import save_postprocessing

    parser = argparse.ArgumentParser(prog="python -m pipeline postprocess", description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True, help="the trained bundle folder (models/model.pt, models/settings.json)")
    parser.add_argument("--config", nargs="+", default=["configs/train.json", "configs/evaluate.json"],
                        help="configs whose validate#evaluator predicts the cases (default: train.json evaluate.json)")
    parser.add_argument("--dataset-dir", "--dataset_dir", dest="dataset_dir", default=None, help="the datalist's root folder")
    parser.add_argument("--datalist", default=None, help="MSD-style datalist (default: the bundle's)")
    parser.add_argument("--section", default="validation", help="datalist section to decide on (default: validation)")
    parser.add_argument("--override", action="append", default=[], metavar="ID=VALUE", help="config override, repeatable")
    parser.add_argument("--min-gain", type=float, default=1e-3, help="mean Dice a rule must add to be kept (default 0.001)")
    parser.add_argument("--dry-run", action="store_true", help="print the choice, do not store it")
    args = parser.parse_args(argv)

    bundle = Path(args.bundle)
    config = ConfigParser()
    config.read_config([str(c if Path(c).is_absolute() else bundle / c) for c in args.config])
    config["bundle_root"] = str(bundle)
    for key, value in (("dataset_dir", args.dataset_dir), ("datalist", args.datalist)):
        if value is not None:
            config[key] = os.path.abspath(value)
    for text in args.override:
        key, value = parse_override(text)
        config[key] = value
    config["progress_bar"] = False
    with tempfile.TemporaryDirectory(prefix="postprocess_") as scratch:
        config["output_dir"] = scratch  # the evaluator's metric CSVs are not the result here
        cases, out_channels = validation_masks(config, args.section)
    if not cases:
        print(f"no cases in the {args.section!r} section: nothing to decide on", file=sys.stderr)
        return 1
    classes = [1] if out_channels == 1 else list(range(1, out_channels))
    record = choose_rules(cases, classes, args.min_gain)
    record["section"] = args.section
    if not args.dry_run:
        record["settings_file"] = str(save_postprocessing(config.get_parsed_content("ckpt_dir"), record))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
