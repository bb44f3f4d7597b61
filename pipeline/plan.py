"""``python -m pipeline plan``: nnU-Net-style planning from a datalist, written as a new bundle.

    python -m pipeline plan spleen.json --dataset-dir /data/Task09_Spleen --output bundles/spleen
    cd bundles/spleen && python -m monai.bundle run --config_file configs/train.json   # no override

Two phases, as in nnU-Net v2 (Isensee et al. 2021), each a function:

1. :func:`fingerprint` -- what the dataset is: per case the voxel spacing and shape (in RAS
   axis order, the order the bundles resample in) and orientation; intensity statistics of the
   foreground voxels (label > 0); the volume of every class; the modality (the datalist's
   ``modality``, else the DICOM ``Modality`` tag).
2. :func:`plan` -- what to train, from the fingerprint and a memory budget, with the reason for
   each choice:

   * target spacing: the median spacing; for an axis much coarser than the others (more than 3
     times, nnU-Net's threshold) that also has few voxels, the 10th percentile of its spacings
     (nnU-Net's rule: resampling thick slices to the median would invent detail);
   * 2D or 3D: 2D when the data are 2D or the target spacing stays anisotropic (more than 3
     times): UNet++ pools every axis alike, so a 3D patch would span a handful of thick slices;
   * patch size, depth, widths and batch size: the patch starts as the median resampled shape
     (capped at 256^3 / 2048^2 voxels, shaped by the spacing) and its relatively largest axis
     shrinks until one training step fits the budget; the depth is the number of halvings that
     leave at least 4 voxels per axis (at most 5), the widths double from 32 up to 320 (3D) or
     512 (2D); the batch size is what the budget allows (at least 2, at most 5% of the
     dataset's voxels per step, nnU-Net's caps). Memory is estimated from a forward pass on
     PyTorch's ``meta`` device (no memory, no computation): every layer's output is kept for
     the backward pass, in float32, plus the weights, their gradients and Adam's two moments
     (within 10% of the peak measured on a CPU; CUDA's float16 autocast needs less);
   * intensity by modality: CT as nnU-Net does (clip to the foreground's 0.5 and 99.5
     percentiles, z-score with the foreground's mean and standard deviation); MRI the ``mri``
     preset (z-score inside the body, the cross-site normalisation); anything else ``scale``.

:func:`write_bundle` copies a template bundle (``unetpp_3d_seg`` or ``unetpp_2d_seg``) to a new
folder and writes ``configs/plan.json`` (the model settings, which every config reads through
``@saved``, plus the fingerprint and the reasons), sets the planned data and schedule in the
copied configs, the truth about the planned network in ``configs/metadata.json``
(``spatial_shape``, channels, class names) and what was chosen and why in ``docs/README.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.data import load_datalist
from pipeline.fileio import atomic_write_text, read_json
from pipeline.readers import DataError, input_files, read_label, read_volume

__all__ = [
    "ANISOTROPY",
    "fingerprint",
    "target_spacing",
    "training_memory_gb",
    "plan",
    "template_dir",
    "write_bundle",
    "main",
]

ANISOTROPY = 3.0  # nnU-Net's threshold: an axis is anisotropic beyond 3x the others' spacing
MIN_BOTTOM = 4  # voxels per axis left at the deepest level
MAX_DEPTH = 5
SAMPLES_PER_CASE = 10_000  # foreground voxels kept per case for the intensity statistics (as nnU-Net)
MAX_BATCH_FRACTION = 0.05  # one step sees at most 5% of the dataset's voxels (as nnU-Net)
TEMPLATES = {2: "unetpp_2d_seg", 3: "unetpp_3d_seg"}


# --------------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------------


def _ras(shape: Sequence[int], affine: np.ndarray) -> tuple[list[float], list[int], str]:
    """Spacing and shape in RAS axis order (the bundles reorient to RAS first), and the axis codes.

    A 2D image keeps its own axis order (the 2D bundle reads it as one axial slice).
    """
    import nibabel as nib

    affine = np.asarray(affine, dtype=float)
    sizes = np.sqrt((affine[:3, : len(shape)] ** 2).sum(axis=0)).round(5)  # NIfTI headers hold float32
    if len(shape) == 2:
        return [float(s) for s in sizes], [int(s) for s in shape], "2D"
    spacing, ras_shape = [0.0] * 3, [0] * 3
    for axis, (world, _) in enumerate(nib.orientations.io_orientation(affine)):
        spacing[int(world)], ras_shape[int(world)] = float(sizes[axis]), int(shape[axis])
    return spacing, ras_shape, "".join(nib.aff2axcodes(affine))


def _modality_of(content: dict, image: str | list) -> str | None:
    """The datalist's ``modality`` (first channel), else the DICOM ``Modality`` tag of the first image."""
    declared = content.get("modality")
    if isinstance(declared, dict) and declared:
        return str(next(iter(declared.values())))
    if isinstance(declared, str):
        return declared
    path = image[0] if isinstance(image, list) else image
    if os.path.isdir(path):
        try:
            import pydicom

            first = input_files(path)[0]
            return str(pydicom.dcmread(str(first), stop_before_pixels=True).get("Modality", "")) or None
        except Exception:  # noqa: BLE001 - a folder that is not DICOM has no tag to offer
            return None
    return None


def modality_kind(modality: str | None) -> str:
    """``"ct"``, ``"mri"`` or ``"other"`` for a modality name (``CT``, ``MR``, ``MRI``, ``T1w``, ...)."""
    name = (modality or "").strip().upper()
    if name in ("CT", "CTA", "PET/CT") or name.startswith("CT"):
        return "ct"
    if name.startswith("MR") or name in ("T1", "T2", "T1W", "T2W", "FLAIR", "PD", "DWI", "ADC", "T1C", "T1GD"):
        return "mri"
    return "other"


def fingerprint(
    datalist: str | os.PathLike,
    dataset_dir: str | os.PathLike | None = None,
    sections: Sequence[str] = ("training", "validation"),
    modality: str | None = None,
    seed: int = 0,
) -> dict:
    """What the dataset is (see the module docstring); JSON-ready.

    Args:
        datalist: MSD-style datalist with labelled ``sections``.
        dataset_dir: the folder its paths are relative to (default: the datalist's folder).
        modality: overrides the datalist's ``modality`` and the DICOM tags.

    Returns:
        ``{"cases", "dims", "modality", "spacings", "shapes", "orientations", "intensity",
        "classes", "class_volumes_ml", "labels"}``; spacings and shapes in RAS order, one per case.
    """
    content = read_json(datalist)
    entries = [entry for section in sections if section in content for entry in load_datalist(datalist, dataset_dir, section)]
    entries = [entry for entry in entries if "label" in entry]
    if not entries:
        raise DataError(f"{datalist}: no labelled cases in {list(sections)} to plan from")
    rng = np.random.RandomState(seed)
    spacings, shapes, orientations, samples, volumes = [], [], Counter(), [], {}
    found_classes: set[int] = set()
    for entry in entries:
        first = entry["image"] if isinstance(entry["image"], str) else entry["image"][0]
        image, affine = read_volume(first)
        label, _ = read_label(entry["label"], first, entry.get("label_classes"))  # a SEG / RTSTRUCT onto its image
        image = image[..., 0] if image.ndim == label.ndim + 1 else image  # the first channel of a multi-channel image
        if image.shape != label.shape:
            raise DataError(f"{entry['image']}: shape {image.shape} differs from its label's {label.shape}")
        spacing, shape, codes = _ras(image.shape, affine)
        spacings.append(spacing)
        shapes.append(shape)
        orientations[codes] += 1
        label = np.rint(label).astype(np.int64)
        foreground = image[label > 0]
        if foreground.size > SAMPLES_PER_CASE:
            foreground = rng.choice(foreground, SAMPLES_PER_CASE, replace=False)
        samples.append(foreground.astype(np.float64))
        voxel_ml = float(np.prod(spacing)) / 1000.0
        values, counts = np.unique(label, return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist()):
            if value > 0:
                found_classes.add(value)
                volumes.setdefault(value, []).append(count * voxel_ml)
    values = np.concatenate(samples) if samples else np.zeros(0)
    if values.size == 0:
        raise DataError(f"{datalist}: the labels hold no foreground voxel; nothing to plan for")
    p005, p50, p995 = np.percentile(values, [0.5, 50.0, 99.5])
    declared = content.get("labels") if isinstance(content.get("labels"), dict) else None
    labels = {str(k): str(v) for k, v in declared.items()} if declared else {"0": "background", **{str(c): f"class_{c}" for c in sorted(found_classes)}}
    classes = sorted({int(k) for k in labels if int(k) > 0} | found_classes)
    names = {c: labels.get(str(c), f"class_{c}") for c in classes}
    return {
        "datalist": str(Path(datalist).absolute()),
        "cases": len(entries),
        "dims": len(shapes[0]),
        "modality": modality or _modality_of(content, entries[0]["image"]) or "unknown",
        "spacings": spacings,
        "shapes": shapes,
        "orientations": dict(orientations),
        "intensity": {
            "foreground_voxels_sampled": int(values.size),
            "mean": float(values.mean()),
            "std": float(values.std()),
            "min": float(values.min()),
            "max": float(values.max()),
            "percentile_00_5": float(p005),
            "median": float(p50),
            "percentile_99_5": float(p995),
        },
        "labels": labels,
        "classes": classes,
        "class_volumes_ml": {
            names[c]: {
                "cases": len(volumes.get(c, [])),
                "median": float(np.median(volumes[c])) if c in volumes else 0.0,
                "mean": float(np.mean(volumes[c])) if c in volumes else 0.0,
            }
            for c in classes
        },
    }


# --------------------------------------------------------------------------------------------
# plan
# --------------------------------------------------------------------------------------------


def target_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]]) -> tuple[list[float], str]:
    """nnU-Net's target spacing: the median, except for an anisotropic axis with few voxels (10th percentile).

    Returns the spacing and the reason, in words.
    """
    spacings, shapes = np.asarray(spacings, dtype=float), np.asarray(shapes, dtype=float)
    target = np.median(spacings, axis=0)
    if len(target) < 3:
        return [float(s) for s in target], "median spacing of the training cases"
    size = np.median(shapes * spacings / target, axis=0)
    worst = int(np.argmax(target))
    others = [axis for axis in range(len(target)) if axis != worst]
    anisotropic_spacing = target[worst] > ANISOTROPY * max(target[others])
    few_voxels = size[worst] * ANISOTROPY < min(size[others])
    if anisotropic_spacing and few_voxels:
        coarse = float(np.percentile(spacings[:, worst], 10))
        target[worst] = max(coarse, float(max(target[others])) + 1e-5)
        return [float(s) for s in target], (
            f"median spacing, but axis {worst} ({target[worst]:.3g} mm) is more than {ANISOTROPY:g}x coarser than the "
            "others and has few voxels: the 10th percentile of its spacings (nnU-Net's rule)"
        )
    return [float(s) for s in target], "median spacing of the training cases"


def widths(depth: int, base: int, cap: int) -> list[int]:
    """``base`` doubling per level, at most ``cap``: one width per level (``depth + 1``)."""
    return [min(base * 2**level, cap) for level in range(depth + 1)]


def depth_for(patch: Sequence[int]) -> int:
    """Halvings that leave at least :data:`MIN_BOTTOM` voxels on every axis (1..:data:`MAX_DEPTH`)."""
    return max(1, min(MAX_DEPTH, int(math.floor(math.log2(min(patch) / MIN_BOTTOM)))))


def training_memory_gb(features: Sequence[int], depth: int, patch: Sequence[int], batch: int, in_channels: int = 1,
                       out_channels: int = 1, norm: Any = ("instance", {"affine": True})) -> float:  # fmt: skip
    """Estimated memory of one training step of ``UNetPlusPlus`` (deep supervision), in GB.

    A forward pass on PyTorch's ``meta`` device gives every layer's output size without
    computing anything; training keeps those outputs for the backward pass (float32), and
    holds the weights with their gradients and two Adam moments.
    """
    import torch

    from pipeline.nets import UNetPlusPlus

    with torch.device("meta"):
        network = UNetPlusPlus(len(patch), in_channels, out_channels, features=features, depth=depth, norm=norm)
        elements = 0

        def count(module, inputs, output):
            nonlocal elements
            for tensor in output if isinstance(output, (list, tuple)) else [output]:
                if isinstance(tensor, torch.Tensor):
                    elements += tensor.numel()

        hooks = [m.register_forward_hook(count) for m in network.modules() if not list(m.children())]
        network.train()(torch.empty((batch, in_channels, *patch)))
        for hook in hooks:
            hook.remove()
        parameters = sum(p.numel() for p in network.parameters())
    return (elements * 4 + parameters * 4 * 4) / 1024**3


def _round_to(values: Sequence[float], multiple: int) -> list[int]:
    return [max(multiple, int(round(v / multiple)) * multiple) for v in values]


def plan(
    fingerprint_: dict,
    memory_gb: float = 8.0,
    base_features: int = 32,
    max_features: int | None = None,
    dims: int | None = None,
    features: Sequence[int] | None = None,
) -> dict:
    """What to train, from a :func:`fingerprint` and a memory budget (see the module docstring).

    Args:
        memory_gb: memory one training step may use (a GPU's, or what a CPU run may take).
        base_features, max_features: widths double from ``base_features`` up to ``max_features``
            (default 320 in 3D, 512 in 2D).
        dims: force 2D or 3D (default: the recommendation).
        features: force the widths (their count sets the depth); the patch still fits the budget.

    Returns:
        ``{"settings": {config id: value}, "choices": {...}, "reasons": {...}}``; ``settings`` is
        what ``configs/plan.json`` holds for the configs' ``@saved``.
    """
    spacing, spacing_reason = target_spacing(fingerprint_["spacings"], fingerprint_["shapes"])
    reasons = {"pixdim": spacing_reason}
    ratio = max(spacing) / min(spacing)
    data_dims = fingerprint_["dims"]
    if dims is None:
        if data_dims == 2:
            dims, reasons["dims"] = 2, "the images are 2D"
        elif ratio > ANISOTROPY:
            dims, reasons["dims"] = 2, (
                f"the target spacing is {ratio:.1f}x anisotropic (> {ANISOTROPY:g}): UNet++ pools every axis alike, "
                "so 3D patches would span few slices; 2D on axial slices"
            )
        else:
            dims, reasons["dims"] = 3, f"the target spacing is near isotropic ({ratio:.1f}x <= {ANISOTROPY:g}): 3D patches"
    else:
        reasons["dims"] = f"{dims}D as asked"
    spacings, shapes = np.asarray(fingerprint_["spacings"], float), np.asarray(fingerprint_["shapes"], float)
    resampled = np.median(shapes * spacings / np.asarray(spacing), axis=0)
    if dims == 2:
        resampled, spacing = resampled[:2], spacing[:2]  # in-plane (RAS x, y): the 2D bundle keeps the slice spacing
    cap = max_features or (320 if dims == 3 else 512)

    # the initial patch: as many voxels as 256^3 (2048^2), shaped like the spacing (isotropic in mm), within the median shape
    budget_voxels = 256**3 if dims == 3 else 2048**2
    shape_mm = 1.0 / np.asarray(spacing)
    initial = shape_mm * (budget_voxels / np.prod(shape_mm)) ** (1.0 / dims)
    patch = np.minimum(initial, resampled)
    depth = len(features) - 1 if features else depth_for(patch)
    patch = _round_to(patch, 2**depth)
    chosen = list(features) if features else widths(depth, base_features, cap)
    while training_memory_gb(chosen, depth, patch, 2) > memory_gb:
        relative = np.asarray(patch) / resampled
        axis = int(np.argmax(relative))
        smaller = patch[axis] - 2**depth
        if smaller < 2**depth * 2 or (not features and depth_for(patch[:axis] + [smaller] + patch[axis + 1:]) < depth):
            if features or depth == 1:
                if smaller < 2**depth * 2:
                    raise ValueError(f"no patch of this network fits in {memory_gb} GB: give more memory or smaller --features")
            else:
                depth -= 1
                chosen = widths(depth, base_features, cap)
                patch = _round_to(patch, 2**depth)
                continue
        patch[axis] = smaller
    one, two = training_memory_gb(chosen, depth, patch, 1), training_memory_gb(chosen, depth, patch, 2)
    per_volume, fixed = two - one, 2 * one - two  # memory grows linearly with the batch
    per_case = shapes * spacings  # each case's extent in mm, then in voxels of the target grid
    if dims == 3 or data_dims == 2:
        per_case = per_case / np.asarray(spacing)
    else:  # 2D on 3D data: the slices keep their spacing
        per_case = np.column_stack([per_case[:, :2] / np.asarray(spacing), shapes[:, 2]])
    dataset_voxels = float(np.prod(per_case, axis=1).sum())
    most = max(2, int(MAX_BATCH_FRACTION * dataset_voxels / np.prod(patch)))
    batch = max(2, min(int((memory_gb - fixed) // per_volume), most))
    reasons["roi_size"] = (
        f"median resampled shape {[int(round(s)) for s in resampled]}, shrunk until a step of batch 2 fits {memory_gb:g} GB "
        f"(estimated {two:.2f} GB); a multiple of 2**depth"
    )
    reasons["depth"] = f"halvings leaving >= {MIN_BOTTOM} voxels per axis of the patch (at most {MAX_DEPTH})" if not features else "as asked"
    reasons["features"] = f"{chosen[0]} doubling per level, at most {cap}" if not features else "as asked"
    reasons["batch_size"] = f"what {memory_gb:g} GB holds ({per_volume:.2f} GB per volume), at least 2, at most 5% of the dataset's voxels per step"

    kind = modality_kind(fingerprint_["modality"])
    stats = fingerprint_["intensity"]
    if kind == "ct":
        preset = "ct"
        intensity = {"a_min": round(stats["percentile_00_5"], 2), "a_max": round(stats["percentile_99_5"], 2), "output": "zscore",
                     "mean": round(stats["mean"], 3), "std": round(max(stats["std"], 1e-3), 3)}  # fmt: skip
        reasons["intensity"] = "CT: clip to the foreground's 0.5/99.5 percentiles, z-score with its mean and std (nnU-Net)"
    elif kind == "mri":
        preset, intensity = "mri", None
        reasons["intensity"] = "MRI: z-score inside the body mask, one fixed value outside (the cross-site mri preset)"
    else:
        preset, intensity = "scale", None
        reasons["intensity"] = f"modality {fingerprint_['modality']!r} is neither CT nor MRI: min-max per volume (pass --modality)"
    classes = fingerprint_["classes"]
    out_channels = 1 if len(classes) == 1 else len(classes) + 1
    reasons["out_channels"] = "one foreground class: one sigmoid output" if out_channels == 1 else f"{len(classes)} classes + background: softmax"
    settings = {
        "in_channels": 1,
        "out_channels": out_channels,
        "features": chosen,
        "depth": depth,
        "norm": ["instance", {"affine": True}],
        "preset": preset,
        "intensity": intensity,
        "pixdim": [round(s, 4) for s in spacing],
        "roi_size": [int(p) for p in patch],
    }
    estimate = training_memory_gb(chosen, depth, patch, batch)
    choices = {"dims": dims, "template": TEMPLATES[dims], "batch_size": batch, "estimated_memory_gb": round(estimate, 3), "memory_gb": memory_gb}
    return {"settings": settings, "choices": choices, "reasons": reasons}


# --------------------------------------------------------------------------------------------
# the new bundle
# --------------------------------------------------------------------------------------------


def template_dir(name: str) -> Path:
    """A template bundle folder: packaged with the installed ``pipeline``, else this checkout's ``bundles/``."""
    for root in (Path(__file__).resolve().parent / "bundles", Path(__file__).resolve().parent.parent / "bundles"):
        if (root / name / "configs" / "train.json").is_file():
            return root / name
    raise FileNotFoundError(f"template bundle {name!r} not found (neither packaged nor in a checkout)")


def _set(config: dict, config_id: str, value: Any) -> None:
    from pipeline.bundle_sync import set_id

    set_id(config, config_id, value)


def _readme(result: dict, fp: dict, name: str) -> str:
    settings, choices, reasons = result["settings"], result["choices"], result["reasons"]
    rows = [
        ("dimension", f"{choices['dims']}D (`{choices['template']}`)", reasons["dims"]),
        ("`pixdim`", settings["pixdim"], reasons["pixdim"]),
        ("`roi_size`", settings["roi_size"], reasons["roi_size"]),
        ("`depth`", settings["depth"], reasons["depth"]),
        ("`features`", settings["features"], reasons["features"]),
        ("`batch_size`", choices["batch_size"], reasons["batch_size"]),
        ("`preset`, `intensity`", f"`{settings['preset']}`, `{json.dumps(settings['intensity'])}`", reasons["intensity"]),
        ("`out_channels`", settings["out_channels"], reasons["out_channels"]),
    ]
    table = "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    spacings = np.asarray(fp["spacings"])
    shapes = np.asarray(fp["shapes"])
    return (
        f"# {name}: a planned UNet++ bundle\n\n"
        f"Planned by `python -m pipeline plan` from `{fp['datalist']}` ({fp['cases']} labelled cases, modality "
        f"{fp['modality']}). The settings below are in `configs/plan.json` (with the whole fingerprint); every config "
        "reads them, so the standard commands need no override:\n\n"
        "```bash\npython -m monai.bundle run --config_file configs/train.json\n"
        "python -m monai.bundle run --config_file \"['configs/train.json','configs/evaluate.json']\"\n"
        "python -m pipeline segment --bundle . --input IMAGES --output MASKS\n```\n\n"
        "## What was chosen and why\n\n| setting | value | why |\n| --- | --- | --- |\n" + table + "\n\n"
        "## The dataset (fingerprint)\n\n"
        f"* spacing (RAS, mm): median {np.median(spacings, 0).round(3).tolist()}, min {spacings.min(0).round(3).tolist()}, "
        f"max {spacings.max(0).round(3).tolist()}\n"
        f"* shape (RAS, voxels): median {np.median(shapes, 0).astype(int).tolist()}, min {shapes.min(0).tolist()}, max {shapes.max(0).tolist()}\n"
        f"* orientations: {fp['orientations']}\n"
        f"* foreground intensity: mean {fp['intensity']['mean']:.4g}, std {fp['intensity']['std']:.4g}, "
        f"0.5-99.5 percentiles [{fp['intensity']['percentile_00_5']:.4g}, {fp['intensity']['percentile_99_5']:.4g}]\n"
        f"* classes (median volume, ml): "
        + ", ".join(f"{k} {v['median']:.3g} ({v['cases']} cases)" for k, v in fp["class_volumes_ml"].items())
        + "\n\nThe rest of this folder is the template bundle; its documentation follows.\n\n---\n\n"
    )


def write_bundle(
    result: dict,
    fp: dict,
    output: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    template: str | None = None,
    epochs: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Copy the template to ``output`` and write the plan into it (see the module docstring). Returns the folder."""
    from pipeline.bundle_sync import dumps

    output = Path(output)
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"{output} exists and is not a folder; choose another --output")
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{output} exists and is not empty; choose another --output or pass --overwrite")
        # --overwrite replaces a planned bundle, never an arbitrary folder (its data, the checkout, home)
        if not (output / "configs" / "plan.json").is_file():
            raise FileExistsError(f"{output} is not a bundle written by plan (no configs/plan.json); --overwrite only replaces those")
    source = template_dir(template or result["choices"]["template"])
    resolved = output.resolve()
    for protected in (Path(dataset_dir).resolve(), source.resolve(), Path.cwd().resolve(), Path.home().resolve()):
        if resolved == protected or resolved in protected.parents:
            raise FileExistsError(f"{output} holds {protected}; choose a new folder for the planned bundle")
    if output.exists():
        shutil.rmtree(output)
    shutil.copytree(source, output, ignore=shutil.ignore_patterns("models", "logs", "eval", "data", "overlay_2d.json", "__pycache__"))
    settings = dict(result["settings"])
    dims = result["choices"]["dims"]
    if dims == 2 and settings.get("pixdim") and len(settings["pixdim"]) != 2:
        settings["pixdim"] = settings["pixdim"][:2]
    plan_file = {**settings, "plan": {"choices": result["choices"], "reasons": result["reasons"]}, "fingerprint": fp}
    atomic_write_text(output / "configs" / "plan.json", dumps(plan_file) + "\n")

    data = {"dataset_dir": str(Path(dataset_dir).absolute()), "datalist": fp["datalist"]}
    for name in ("train.json", "inference.json"):
        path = output / "configs" / name
        config = json.loads(path.read_text(encoding="utf-8"))
        for key, value in data.items():
            _set(config, key, value)
        if name == "train.json":
            _set(config, "batch_size", result["choices"]["batch_size"])
            if epochs is not None:
                _set(config, "max_epochs", int(epochs))
                _set(config, "val_interval", 1 if epochs < 5 else config["val_interval"])
            if settings["out_channels"] > 1:
                _set(config, "loss#loss#_target_", "pipeline.losses.CEDiceLoss")
        atomic_write_text(path, dumps(config) + "\n")

    meta_path = output / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    multiple = f"{2 ** (settings['depth'] + 1)}*n"
    image, pred = meta["network_data_format"]["inputs"]["image"], meta["network_data_format"]["outputs"]["pred"]
    for item in (image, pred):
        item["spatial_shape"] = [multiple] * dims
    image["num_channels"], pred["num_channels"] = settings["in_channels"], settings["out_channels"]
    image["modality"] = fp["modality"]
    if settings["preset"] != "scale":
        image["value_range"] = [-5, 10]  # z-scores (air -5); the schema wants a range, not a promise
    pred["channel_def"] = {k: v for k, v in fp["labels"].items()}
    meta["name"] = f"{meta['name']} ({output.name})"
    meta["data_source"] = f"{fp['datalist']} (planned by python -m pipeline plan)"
    atomic_write_text(meta_path, json.dumps(meta, indent=4, ensure_ascii=False) + "\n")

    readme = output / "docs" / "README.md"
    readme.write_text(_readme(result, fp, output.name) + readme.read_text(encoding="utf-8"), encoding="utf-8")
    return output


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline plan",
        description="Fingerprint a dataset (spacings, shapes, foreground intensities, class volumes, modality) and "
        "write a new bundle planned for it: spacing, 2D/3D, patch, depth, widths, batch size, intensity preset.",
    )
    parser.add_argument("datalist", help="MSD-style datalist with labelled training (and validation) cases")
    parser.add_argument("--dataset-dir", "--dataset_dir", dest="dataset_dir", default=None, help="the folder its paths are relative to (default: its folder)")
    parser.add_argument("--output", required=True, help="the new bundle folder")
    parser.add_argument("--from", dest="template", choices=sorted(TEMPLATES.values()), default=None,
                        help="template bundle (default: the 2D or 3D one the plan recommends)")
    parser.add_argument("--gpu-memory", type=float, default=8.0, help="GB one training step may use (default 8, nnU-Net's reference GPU)")
    parser.add_argument("--cpu", action="store_true", help="plan for CPU training: 1 GB per step, widths from 16 up to 128")
    parser.add_argument("--modality", default=None, help="CT, MR, ... (default: the datalist's modality or the DICOM tag)")
    parser.add_argument("--features", type=int, nargs="+", default=None, help="force the widths (their count minus one is the depth)")
    parser.add_argument("--epochs", type=int, default=None, help="max_epochs of the new bundle (default: the template's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    args = parser.parse_args(argv)

    dataset_dir = args.dataset_dir if args.dataset_dir is not None else str(Path(args.datalist).parent)
    try:
        fp = fingerprint(args.datalist, dataset_dir, modality=args.modality)
        dims = {"unetpp_3d_seg": 3, "unetpp_2d_seg": 2}.get(args.template)
        memory = 1.0 if args.cpu else args.gpu_memory
        result = plan(fp, memory, base_features=16 if args.cpu else 32, max_features=128 if args.cpu else None,
                      dims=dims, features=args.features)  # fmt: skip
        folder = write_bundle(result, fp, args.output, dataset_dir, args.template, args.epochs, args.overwrite)
    except (DataError, ValueError, FileExistsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    settings, choices = result["settings"], result["choices"]
    print(f"plan for {fp['cases']} cases ({fp['modality']}): {choices['dims']}D, pixdim {settings['pixdim']}, "
          f"roi_size {settings['roi_size']}, depth {settings['depth']}, features {settings['features']}, "
          f"batch {choices['batch_size']}, preset {settings['preset']}")  # fmt: skip
    print(f"wrote {folder} (configs/plan.json, docs/README.md); train it with:\n"
          f"  cd {folder} && python -m monai.bundle run --config_file configs/train.json")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
