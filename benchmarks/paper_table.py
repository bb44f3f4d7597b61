"""Reproduce the UNet++ paper's comparison and pruning results on data that runs offline on a CPU.

Zhou et al. (DLMIA 2018) compare U-Net, Wide U-Net and UNet++ without and with deep supervision
(Table 3: UNet++ with deep supervision gains 3.9 IoU points over U-Net and 3.4 over Wide U-Net on
average) and prune the deep-supervised UNet++ to L1..L4 at inference (Fig. 4: L3 is about a third
faster than L4 for about 0.6 IoU points). This script runs the same comparison, under one budget for
every model (same steps, optimizer, schedule, augmentation, data order and seeds), on:

* ``mni_2d`` / ``mni_3d``: the real MNI152 T1 shipped in nilearn (``pipeline.demo_data``, 2 mm, 4-class
  tissue label), split into **disjoint axial slabs**: training on z 0-27 and 56-93 (voxels along the
  RAS S axis), testing on z 32-51 (40 mm through the basal ganglia and lateral ventricles), with an
  8 mm gap on each side of the test slab. 2D trains on axial slices, 3D on 48x48x16 patches.
  Intensities: one fixed window and z-score from the training slabs' foreground (nnU-Net's dataset-level
  scheme via the CT preset; see ``write_mni_slabs`` for why not the per-volume MRI z-score).
* ``synthetic_2d`` / ``synthetic_3d``: the MONAI blob demo sets (16 training, 4 test cases).

Usage::

    python benchmarks/paper_table.py                     # full table, ~20-30 min on a 2-core CPU
    python benchmarks/paper_table.py --quick --out-dir /tmp/pt   # a few steps: checks the outputs

Writes under ``--out-dir`` (default ``docs/``): ``paper_results.json`` (everything, including the
machine and per-seed values), ``paper_table.md`` (the tables), ``paper_pruning.png`` (IoU against
inference time for L1..L4 with the baselines marked) and ``paper_curves.png`` (training curves).

Networks, losses and transforms are the library's (``pipeline.nets``, ``pipeline.losses``,
``pipeline.transforms``); training uses MONAI's ``SupervisedTrainer``. The loss is the paper's
0.5 * BCE + Dice on sigmoid outputs (one-hot tissue classes for MNI), averaged over the heads with
deep supervision. Widths are scaled down for the CPU (see ``EXPERIMENTS``); the Wide U-Net keeps the
paper's ratio (35/32 of U-Net's widths). The parameter counts of the paper configuration (2D,
32..512) are reported separately.

Timing: ``torch.set_num_threads(1)`` by default. On a shared 2-core machine two intra-op threads
were about 10x *slower* per training step than one (each OpenMP barrier waits for a descheduled thread).
Inference times are the median of interleaved passes over the whole test set, so background load
hits every model alike; absolute numbers still move with the load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(ROOT))

from monai.data import CacheDataset, DataLoader  # noqa: E402
from monai.engines import SupervisedTrainer  # noqa: E402
from monai.handlers import LrScheduleHandler  # noqa: E402
from monai.inferers import SliceInferer, SlidingWindowInferer  # noqa: E402
from monai.metrics import compute_dice, compute_iou  # noqa: E402
from monai.transforms import AsDiscreted, Compose  # noqa: E402
from monai.utils import set_determinism  # noqa: E402
from ignite.engine import Events  # noqa: E402

from pipeline.data import intensity_fingerprint  # noqa: E402
from pipeline.demo_data import MNI_LABEL, MNI_T1, demo_datalist, write_demo_data  # noqa: E402
from pipeline.losses import BCEDiceLoss, CEDiceLoss, DeepSupervisionLoss  # noqa: E402
from pipeline.nets import UNet, UNetPlusPlus, WideUNet  # noqa: E402
from pipeline.transforms import eval_transforms, train_transforms  # noqa: E402

DEPTH = 4  # the paper's L4 network: four downsamplings, five widths
MODELS = ("unet", "wide_unet", "unetpp", "unetpp_ds")
LEVELS = tuple(range(1, DEPTH + 1))
VARIANTS = ("unet", "wide_unet", "unetpp", "unetpp_ds_accurate") + tuple(f"unetpp_ds_L{k}" for k in LEVELS)
LABELS = {
    "unet": "U-Net",
    "wide_unet": "Wide U-Net",
    "unetpp": "UNet++ w/o DS",
    "unetpp_ds": "UNet++ w/ DS",
    "unetpp_ds_accurate": "UNet++ w/ DS, accurate",
    **{f"unetpp_ds_L{k}": f"UNet++ w/ DS, fast L{k}" for k in LEVELS},
}
# Axial slabs of the 2 mm MNI volume (98x116x94, RAS; brain in z ~1..79), as [start, stop) voxels.
MNI_SLABS = {"train_inferior": (0, 28), "test_middle": (32, 52), "train_superior": (56, 94)}
PAPER = {
    "source": "Zhou et al., UNet++: A Nested U-Net Architecture for Medical Image Segmentation, DLMIA 2018 (arXiv:1807.10165)",
    "parameters_2d": {"unet": 7.76e6, "wide_unet": 9.13e6, "unetpp": 9.04e6},
    "pruned_parameters_2d": {"L1": 0.1e6, "L2": 0.5e6, "L3": 2.2e6, "L4": 9.0e6},
    "iou_gain_ds_vs_unet": 3.9,
    "iou_gain_ds_vs_wide_unet": 3.4,
    "l3_vs_l4": "about a third less inference time for about 0.6 IoU points",
}
PAPER_FEATURES = (32, 64, 128, 256, 512)
WIDE_RATIO = 35 / 32  # the paper's Wide U-Net widths 35..560 against U-Net's 32..512


@dataclass
class Experiment:
    name: str
    description: str
    spatial_dims: int
    roi: tuple
    base_width: int
    steps: int
    seeds: int
    volumes_per_step: int
    samples_per_volume: int
    classes: dict  # foreground class index -> name (index 1 with one output channel for binary)
    lr: float = 3e-3
    loss: str = "bce_dice"  # the paper's sigmoid 0.5 BCE + Dice; "ce_dice": softmax CE + Dice on class indices
    curve_every: int = 5
    max_test_cases: int = 0  # 0: the whole test section
    extra: dict = field(default_factory=dict)

    @property
    def features(self) -> tuple:
        return tuple(self.base_width * 2**i for i in range(DEPTH + 1))

    @property
    def wide_features(self) -> tuple:
        return tuple(int(round(self.base_width * WIDE_RATIO * 2**i)) for i in range(DEPTH + 1))

    @property
    def out_channels(self) -> int:
        return 1 if len(self.classes) == 1 else len(self.classes) + 1  # multi-class: one-hot incl. background

    @property
    def batch_size(self) -> int:
        return self.volumes_per_step * self.samples_per_volume


MNI_CLASSES = {1: "CSF/other", 2: "grey matter", 3: "white matter"}
EXPERIMENTS = {
    "mni_2d": Experiment(
        "mni_2d", "MNI152 T1 (real MRI), 2D axial slices, 3 tissue classes; train/test on disjoint axial slabs",
        2, (64, 64), base_width=8, steps=200, seeds=3, volumes_per_step=2, samples_per_volume=4, classes=MNI_CLASSES,
    ),
    "mni_3d": Experiment(
        "mni_3d", "MNI152 T1 (real MRI), 3D 48x48x16 patches, 3 tissue classes; same slabs as mni_2d",
        3, (48, 48, 16), base_width=4, steps=120, seeds=2, volumes_per_step=2, samples_per_volume=1, classes=MNI_CLASSES,
    ),
    "synthetic_2d": Experiment(
        "synthetic_2d", "MONAI 2D blobs 128x128 (demo set), binary; 16 training / 4 test images",
        2, (64, 64), base_width=8, steps=100, seeds=3, volumes_per_step=2, samples_per_volume=4, classes={1: "blob"},
    ),
    "synthetic_3d": Experiment(
        "synthetic_3d", "MONAI 3D blobs 64^3 (demo set), binary; 16 training / 4 test volumes",
        3, (32, 32, 32), base_width=4, steps=80, seeds=2, volumes_per_step=2, samples_per_volume=1, classes={1: "blob"},
    ),
}


def quick_experiment(exp: Experiment) -> Experiment:
    """A smoke run: a few steps, one seed, the narrowest widths; checks the outputs, not the science."""
    return replace(exp, steps=3, seeds=1, base_width=2, curve_every=1, max_test_cases=2)


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


def write_mni_slabs(demo_dir: Path, out_dir: Path) -> dict:
    """Cut the demo MNI T1 and tissue label into the axial slabs of ``MNI_SLABS`` (NIfTI, own affines).

    Also writes ``out_dir/datalist.json`` and returns the sections plus the intensity normalisation:
    nnU-Net's dataset-level scheme (the CT preset's fixed window and z-score) with statistics of the
    *training* slabs' foreground (``pipeline.data.intensity_fingerprint``), lower bound 0 so the empty
    background stays apart from tissue. The MRI preset's per-volume z-score would normalise each slab
    with its own statistics: the test slab holds more white matter, so its grey and white matter land
    up to 0.5 std lower than in the training slabs, an artefact of cutting one brain into slabs.
    """
    image, label = nib.load(demo_dir / MNI_T1), nib.load(demo_dir / MNI_LABEL)
    if nib.aff2axcodes(image.affine) != ("R", "A", "S"):
        raise RuntimeError(f"expected the demo MNI volume in RAS, got {nib.aff2axcodes(image.affine)}")
    files = {}
    for slab, (start, stop) in MNI_SLABS.items():
        shift = np.eye(4)
        shift[2, 3] = start  # voxel k of the slab is voxel start + k of the volume
        affine = image.affine @ shift
        pair = {}
        for key, source in (("image", image), ("label", label)):
            path = out_dir / f"{key}s" / f"mni_{slab}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            array = np.asarray(source.dataobj)[:, :, start:stop]
            nib.save(nib.Nifti1Image(array, affine), path)
            pair[key] = str(path)
        files[slab] = pair
    sections = {"training": [files["train_inferior"], files["train_superior"]], "test": [files["test_middle"]]}
    datalist = out_dir / "datalist.json"
    datalist.write_text(json.dumps({"labels": {"0": "background", **{str(k): v for k, v in MNI_CLASSES.items()}}, **sections}, indent=1))
    stats = intensity_fingerprint(datalist, out_dir, section="training")
    intensity = {"a_min": 0.0, "a_max": round(stats["a_max"], 3), "mean": round(stats["mean"], 3), "std": round(stats["std"], 3), "output": "zscore"}
    return {**sections, "preset": "ct", "intensity": intensity}


def prepare_data(work: Path) -> dict:
    """Write the demo sets once; returns ``{experiment: {"training": [...], "test": [...]}}`` with absolute paths."""
    demo = work / "demo"
    write_demo_data(demo, sets=("synthetic_2d", "synthetic_3d", "mni"))
    mni = write_mni_slabs(demo, work / "mni_slabs")
    lists = {"mni_2d": mni, "mni_3d": mni}
    for name in ("synthetic_2d", "synthetic_3d"):
        datalist = demo_datalist(name)
        lists[name] = {
            section: [{k: str(demo / v) for k, v in item.items()} for item in datalist[section]]
            for section in ("training", "test")
        }
        lists[name].update(preset="scale", intensity=None)  # min-max per image, as the demo sets are made
    return lists


def one_hot_label(exp: Experiment, training: bool = False) -> list:
    if exp.out_channels == 1 or (training and exp.loss == "ce_dice"):  # CE + Dice one-hot encodes itself
        return []
    return [AsDiscreted("label", to_onehot=exp.out_channels)]


def make_loss(exp: Experiment) -> torch.nn.Module:
    if exp.loss == "bce_dice":
        return BCEDiceLoss(bce_weight=0.5, dice_weight=1.0)
    if exp.loss == "ce_dice":
        return CEDiceLoss(ce_weight=1.0, dice_weight=1.0)
    raise ValueError(f"unknown loss {exp.loss!r}")


def load_test_set(exp: Experiment, data: dict) -> list:
    """Whole test volumes through the library's eval chain: [(image (1, 1, *S), one-hot label (1, C, *S))]."""
    chain = Compose(
        [eval_transforms(spatial_dims=exp.spatial_dims, preset=data["preset"], intensity=data["intensity"])] + one_hot_label(exp)
    )
    out = []
    for item in data["test"][: exp.max_test_cases or None]:
        d = chain(dict(item))
        out.append((d["image"].as_tensor()[None], d["label"].as_tensor()[None]))
    return out


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------


def build(model: str, exp: Experiment) -> torch.nn.Module:
    dims, out = exp.spatial_dims, exp.out_channels
    if model == "unet":
        return UNet(dims, 1, out, features=exp.features, depth=DEPTH)
    if model == "wide_unet":
        return WideUNet(dims, 1, out, features=exp.wide_features, depth=DEPTH)
    if model in ("unetpp", "unetpp_ds"):
        return UNetPlusPlus(dims, 1, out, features=exp.features, depth=DEPTH, deep_supervision=model == "unetpp_ds")
    raise ValueError(model)


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def paper_preset_parameters() -> dict:
    """Parameters of the paper configuration: 2D, one channel in and out, widths 32..512."""
    counts = {
        "unet": count(UNet(2, 1, 1, features=PAPER_FEATURES)),
        "wide_unet": count(WideUNet(2, 1, 1)),
        "unetpp": count(UNetPlusPlus(2, 1, 1, features=PAPER_FEATURES, deep_supervision=False)),
    }
    ds = UNetPlusPlus(2, 1, 1, features=PAPER_FEATURES, deep_supervision=True)
    counts["unetpp_ds"] = count(ds)
    counts.update({f"unetpp_ds_L{k}": count(ds.prune(k)) for k in LEVELS})
    return counts


# --------------------------------------------------------------------------------------------
# training (MONAI SupervisedTrainer) and evaluation
# --------------------------------------------------------------------------------------------


class CurveRecorder:
    """The training loss and the final head's loss (comparable across models), averaged over every ``every`` steps."""

    def __init__(self, every: int, loss: torch.nn.Module):
        self.every = every
        self.final_head = loss
        self.curve = {"step": [], "loss": [], "final_head_loss": []}
        self._pending = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine) -> None:
        output = engine.state.output
        pred = output["pred"]
        final = pred[0] if isinstance(pred, (list, tuple)) else pred  # heads are deepest first
        with torch.no_grad():
            head_loss = float(self.final_head(final.detach(), output["label"]))
        self._pending.append((float(torch.as_tensor(output["loss"]).detach()), head_loss))
        step = engine.state.iteration
        if step % self.every == 0 or step == engine.state.epoch_length:
            loss, head = np.mean(self._pending, axis=0)
            self._pending = []
            self.curve["step"].append(step)
            self.curve["loss"].append(round(float(loss), 5))
            self.curve["final_head_loss"].append(round(float(head), 5))


def train(model: str, exp: Experiment, dataset: CacheDataset, seed: int) -> tuple:
    """Train one model for ``exp.steps`` steps; the data order and augmentation depend on ``seed`` only."""
    set_determinism(seed)
    torch.manual_seed(seed)
    net = build(model, exp)
    sampler = torch.utils.data.RandomSampler(
        dataset, replacement=True, num_samples=exp.steps * exp.volumes_per_step, generator=torch.Generator().manual_seed(seed)
    )
    # MONAI's DataLoader seeds the dataset's random transforms from this generator (num_workers=0)
    loader = DataLoader(dataset, batch_size=exp.volumes_per_step, sampler=sampler, num_workers=0, generator=torch.Generator().manual_seed(seed + 1))
    optimizer = torch.optim.Adam(net.parameters(), lr=exp.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=exp.steps)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=loader,
        network=net,
        optimizer=optimizer,
        loss_function=DeepSupervisionLoss(make_loss(exp), weights="equal"),
        decollate=False,  # the deep-supervised network returns a list of heads
        train_handlers=[LrScheduleHandler(schedule, print_lr=False, epoch_level=False)],
    )
    recorder = CurveRecorder(exp.curve_every, make_loss(exp))
    recorder.attach(trainer)
    start = time.perf_counter()
    trainer.run()
    seconds = time.perf_counter() - start
    if trainer.state.iteration != exp.steps:
        raise RuntimeError(f"{model}: ran {trainer.state.iteration} steps, expected {exp.steps}")
    return net.eval(), seconds, recorder.curve


def make_inferer(exp: Experiment):
    if exp.spatial_dims == 2:  # axial slices (the last, S axis) with 2D windows of the training size
        return SliceInferer(roi_size=exp.roi, sw_batch_size=32, spatial_dim=2, overlap=0.25, progress=False)
    # 3D windows tile without overlap: 0.25 would triple the windows (27 instead of 8 on a 64^3 volume)
    return SlidingWindowInferer(roi_size=exp.roi, sw_batch_size=4, overlap=0.0, progress=False)


def discretise(logits: torch.Tensor, exp: Experiment) -> torch.Tensor:
    if exp.out_channels == 1:
        return (logits > 0).float()
    return torch.nn.functional.one_hot(logits.argmax(1), exp.out_channels).movedim(-1, 1).float()


@torch.no_grad()
def predict(net, test_set: list, inferer) -> tuple:
    start = time.perf_counter()
    outputs = [inferer(image, net) for image, _ in test_set]
    return outputs, time.perf_counter() - start


def scores(outputs: list, test_set: list, exp: Experiment) -> dict:
    """Per-class IoU and Dice (x100), each the mean over test volumes, and their means over classes."""
    background = exp.out_channels == 1  # binary: the single channel is the foreground class
    ious, dices = [], []
    for logits, (_, label) in zip(outputs, test_set):
        pred = discretise(logits, exp)
        ious.append(compute_iou(pred, label, include_background=background)[0])
        dices.append(compute_dice(pred, label, include_background=background)[0])
    iou = torch.nanmean(torch.stack(ious), 0) * 100
    dice = torch.nanmean(torch.stack(dices), 0) * 100
    names = list(exp.classes.values())
    return {
        "iou": {n: round(float(v), 3) for n, v in zip(names, iou)},
        "dice": {n: round(float(v), 3) for n, v in zip(names, dice)},
        "mean_iou": round(float(iou.mean()), 3),
        "mean_dice": round(float(dice.mean()), 3),
    }


def variants_of(trained: dict) -> dict:
    """Every network we evaluate: the three baselines, UNet++ w/ DS accurate mode and its pruned L1..L4."""
    nets = {name: trained[name] for name in ("unet", "wide_unet", "unetpp")}
    ds = trained["unetpp_ds"]
    ds.mode = "accurate"
    nets["unetpp_ds_accurate"] = ds
    for k in LEVELS:  # standalone sub-networks (same output as fast mode), so timing sees only L_k's work
        nets[f"unetpp_ds_L{k}"] = ds.prune(k).eval()
    return nets


def evaluate_seed(trained: dict, exp: Experiment, test_set: list, inferer, repeats: int) -> dict:
    nets = variants_of(trained)
    results = {}
    for name, net in nets.items():  # first pass: metrics (and warm-up)
        outputs, _ = predict(net, test_set, inferer)
        results[name] = {"parameters": count(net), **scores(outputs, test_set, exp), "infer_seconds": []}
    for _ in range(repeats):  # timed passes, interleaved so background load hits every network alike
        for name, net in nets.items():
            results[name]["infer_seconds"].append(round(predict(net, test_set, inferer)[1], 4))
    return results


# --------------------------------------------------------------------------------------------
# summary
# --------------------------------------------------------------------------------------------


def spread(values: list) -> dict:
    values = [float(v) for v in values]
    return {
        "mean": round(statistics.fmean(values), 3),
        "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
        "values": [round(v, 3) for v in values],
    }


def summarise(exp: Experiment, runs: list) -> dict:
    """Mean and spread over seeds per variant; paired (same seed) IoU differences against U-Net."""
    summary = {}
    for variant in VARIANTS:
        per_seed = [run["variants"][variant] for run in runs]
        model = variant if variant in MODELS else "unetpp_ds"
        entry = {
            "label": LABELS[variant],
            "parameters": per_seed[0]["parameters"],
            "train_seconds": spread([run["train_seconds"][model] for run in runs]),
            "mean_iou": spread([r["mean_iou"] for r in per_seed]),
            "mean_dice": spread([r["mean_dice"] for r in per_seed]),
            "iou": {c: spread([r["iou"][c] for r in per_seed]) for c in exp.classes.values()},
            "dice": {c: spread([r["dice"][c] for r in per_seed]) for c in exp.classes.values()},
            "infer_seconds_median": round(statistics.median(t for r in per_seed for t in r["infer_seconds"]), 4),
        }
        for reference in ("unet", "wide_unet"):
            entry[f"delta_iou_vs_{reference}"] = spread(
                [run["variants"][variant]["mean_iou"] - run["variants"][reference]["mean_iou"] for run in runs]
            )
        summary[variant] = entry
    l4 = summary["unetpp_ds_L4"]
    for k in LEVELS:
        entry = summary[f"unetpp_ds_L{k}"]
        entry["time_vs_L4"] = round(entry["infer_seconds_median"] / l4["infer_seconds_median"], 3)
        entry["delta_iou_vs_L4"] = spread(
            [run["variants"][f"unetpp_ds_L{k}"]["mean_iou"] - run["variants"]["unetpp_ds_L4"]["mean_iou"] for run in runs]
        )
    return summary


def claims(experiments: dict) -> dict:
    """The paper's headline numbers next to ours, averaged over our data sets (as the paper averages over its four)."""
    out = {"per_experiment": {}}
    for name, result in experiments.items():
        s = result["summary"]
        out["per_experiment"][name] = {
            "ds_accurate_minus_unet": s["unetpp_ds_accurate"]["delta_iou_vs_unet"]["mean"],
            "ds_accurate_minus_wide_unet": s["unetpp_ds_accurate"]["delta_iou_vs_wide_unet"]["mean"],
            "ds_L4_minus_unet": s["unetpp_ds_L4"]["delta_iou_vs_unet"]["mean"],
            "unetpp_no_ds_minus_unet": s["unetpp"]["delta_iou_vs_unet"]["mean"],
            "L3_time_saving_vs_L4": round(1 - s["unetpp_ds_L3"]["time_vs_L4"], 3),
            "L3_minus_L4_iou": s["unetpp_ds_L3"]["delta_iou_vs_L4"]["mean"],
        }
    per = out["per_experiment"].values()
    out["average"] = {key: round(statistics.fmean(e[key] for e in per), 3) for key in next(iter(per))}
    out["paper"] = {
        "ds_minus_unet": PAPER["iou_gain_ds_vs_unet"],
        "ds_minus_wide_unet": PAPER["iou_gain_ds_vs_wide_unet"],
        "L3": PAPER["l3_vs_l4"],
    }
    return out


def pm(s: dict, digits: int = 1) -> str:
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}" if s["std"] else f"{s['mean']:.{digits}f}"


def markdown(report: dict) -> str:
    lines = [
        "# UNet++ paper comparison on offline data (generated by `benchmarks/paper_table.py`)",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['machine']['cpu_model']}, {report['machine']['nproc']} cores (shared), "
        f"torch {report['machine']['torch']} with {report['settings']['threads']} thread(s), MONAI {report['machine']['monai']}; "
        f"wall time {report['wall_seconds'] / 60:.1f} min{' (QUICK smoke run: numbers mean nothing)' if report['quick'] else ''}.",
        "",
        "IoU and Dice in %, foreground classes, mean ± sample std over seeds (each seed: one training run per model "
        "with the same data order and augmentation). ΔIoU: paired difference to U-Net over seeds. "
        "Inference: seconds for the whole test set, median of interleaved passes, 1 CPU thread.",
        "",
    ]
    for name, result in report["experiments"].items():
        exp = result["settings"]
        s = result["summary"]
        classes = list(exp["classes"].values())
        lines += [
            f"## {name}: {exp['description']}",
            "",
            f"Widths {tuple(exp['features'])} (Wide U-Net {tuple(exp['wide_features'])}), depth {DEPTH}, "
            f"{exp['steps']} steps of batch {exp['batch_size']} ({'x'.join(map(str, exp['roi']))} crops), "
            f"{exp['seeds']} seed(s), Adam lr {exp['lr']} with cosine decay; intensity: preset `{exp['preset']}`"
            + (f" {exp['intensity']}" if exp["intensity"] else "") + f"; {result['wall_seconds'] / 60:.1f} min for this block.",
            "",
            "| model | params | train s | " + " | ".join(f"IoU {c}" for c in classes) + " | mean IoU | mean Dice | ΔIoU vs U-Net | infer s |",
            "|---|---:|---:|" + "---:|" * len(classes) + "---:|---:|---:|---:|",
        ]
        for variant in VARIANTS:
            e = s[variant]
            lines.append(
                f"| {e['label']} | {e['parameters'] / 1e6:.3f}M | {e['train_seconds']['mean']:.0f} | "
                + " | ".join(pm(e["iou"][c]) for c in classes)
                + f" | **{pm(e['mean_iou'])}** | {pm(e['mean_dice'])} | {pm(e['delta_iou_vs_unet'])} | {e['infer_seconds_median']:.3f} |"
            )
        lines += ["", "Pruning (UNet++ w/ DS, fast mode):", "", "| level | params | infer s | time vs L4 | mean IoU | ΔIoU vs L4 |", "|---|---:|---:|---:|---:|---:|"]
        for k in LEVELS:
            e = s[f"unetpp_ds_L{k}"]
            lines.append(
                f"| L{k} | {e['parameters'] / 1e6:.3f}M | {e['infer_seconds_median']:.3f} | {e['time_vs_L4']:.2f} | "
                f"{pm(e['mean_iou'])} | {pm(e['delta_iou_vs_L4'])} |"
            )
        lines.append("")
    c = report["claims"]
    lines += [
        "## Against the paper's claims",
        "",
        "| | " + " | ".join(c["per_experiment"]) + " | average | paper |",
        "|---|" + "---:|" * (len(c["per_experiment"]) + 2),
    ]
    rows = [
        ("UNet++ w/ DS (accurate) − U-Net, IoU points", "ds_accurate_minus_unet", f"+{PAPER['iou_gain_ds_vs_unet']}"),
        ("UNet++ w/ DS (accurate) − Wide U-Net", "ds_accurate_minus_wide_unet", f"+{PAPER['iou_gain_ds_vs_wide_unet']}"),
        ("UNet++ w/ DS (L4 head) − U-Net", "ds_L4_minus_unet", "–"),
        ("UNet++ w/o DS − U-Net", "unetpp_no_ds_minus_unet", "–"),
        ("L3 inference time saved vs L4", "L3_time_saving_vs_L4", "about 1/3"),
        ("L3 − L4, IoU points", "L3_minus_L4_iou", "about −0.6"),
    ]
    for title, key, paper in rows:
        values = [e[key] for e in c["per_experiment"].values()] + [c["average"][key]]
        fmt = (lambda v: f"{v:.0%}") if "time" in key else (lambda v: f"{v:+.2f}")
        lines.append(f"| {title} | " + " | ".join(fmt(v) for v in values) + f" | {paper} |")
    p = report["paper_preset_parameters"]
    lines += [
        "",
        "## Parameters of the paper configuration (2D, 1 channel in/out, widths 32..512; Wide U-Net 35..560)",
        "",
        "| network | ours | paper |",
        "|---|---:|---:|",
        f"| U-Net | {p['unet'] / 1e6:.2f}M | 7.76M |",
        f"| Wide U-Net | {p['wide_unet'] / 1e6:.2f}M | 9.13M |",
        f"| UNet++ (one head) | {p['unetpp'] / 1e6:.2f}M | 9.04M |",
    ]
    for k in LEVELS:
        lines.append(f"| UNet++ L{k} | {p[f'unetpp_ds_L{k}'] / 1e6:.2f}M | {PAPER['pruned_parameters_2d'][f'L{k}'] / 1e6:.1f}M |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------

MARKERS = {"unet": ("s", "tab:blue"), "wide_unet": ("D", "tab:orange"), "unetpp": ("^", "tab:green"), "unetpp_ds_accurate": ("*", "tab:red")}


def experiment_grid(report: dict, panel_height: float):
    """A figure with one panel per experiment, two per row: returns (plt, fig, axes, names)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["experiments"])
    cols = min(2, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, panel_height * rows), squeeze=False)
    return plt, fig, axes, names


def plot_pruning(report: dict, path: Path) -> None:
    plt, fig, axes, names = experiment_grid(report, panel_height=3.9)
    for ax, name in zip(axes.flat, names):
        s = report["experiments"][name]["summary"]
        t = [s[f"unetpp_ds_L{k}"]["infer_seconds_median"] for k in LEVELS]
        iou = [s[f"unetpp_ds_L{k}"]["mean_iou"]["mean"] for k in LEVELS]
        err = [s[f"unetpp_ds_L{k}"]["mean_iou"]["std"] for k in LEVELS]
        ax.errorbar(t, iou, yerr=err, fmt="o-", color="tab:red", alpha=0.8, capsize=3, label="UNet++ w/ DS, fast L1..L4")
        for k, x, y in zip(LEVELS, t, iou):
            params = s[f"unetpp_ds_L{k}"]["parameters"]
            ax.annotate(f"L{k} ({params / 1e6:.2f}M)", (x, y), textcoords="offset points", xytext=(5, -11), fontsize=7)
        for variant, (marker, color) in MARKERS.items():
            e = s[variant]
            ax.errorbar(
                e["infer_seconds_median"], e["mean_iou"]["mean"], yerr=e["mean_iou"]["std"], fmt=marker, color=color,
                markersize=9 if marker == "*" else 6, capsize=3, label=f"{e['label']} ({e['parameters'] / 1e6:.2f}M)",
            )
        ax.set_xscale("log")
        ax.set_xlabel("inference time for the test set (s, 1 CPU thread, log)")
        ax.set_ylabel("mean IoU (%)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6.5, loc="lower right")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("UNet++ pruning: IoU vs inference time (mean ± std over seeds)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_curves(report: dict, path: Path) -> None:
    plt, fig, axes, names = experiment_grid(report, panel_height=3.6)
    colours = {"unet": "tab:blue", "wide_unet": "tab:orange", "unetpp": "tab:green", "unetpp_ds": "tab:red"}
    for ax, name in zip(axes.flat, names):
        runs = report["experiments"][name]["runs"]
        for model in MODELS:
            curves = [run["curves"][model] for run in runs]
            steps = curves[0]["step"]
            mean = np.mean([c["final_head_loss"] for c in curves], axis=0)
            window = max(1, min(4, len(mean) // 8))
            smooth = np.convolve(mean, np.ones(window) / window, mode="valid")
            ax.plot(steps[window - 1:], smooth, color=colours[model], label=LABELS[model])
        ax.set_xlabel("training step")
        ax.set_ylabel("final-head loss (0.5 BCE + Dice)")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle("Training curves: loss of the final head (mean over seeds and 5-step bins, smoothed)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def machine(threads: int) -> dict:
    import monai

    cpu_model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform_processor": platform.processor(),
        "cpu_model": cpu_model,
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "threads": threads,
        "load_average_start": [round(v, 2) for v in os.getloadavg()],
    }


def run_experiment(exp: Experiment, data: dict, repeats: int, log) -> dict:
    chain = Compose([train_transforms(
        spatial_dims=exp.spatial_dims, preset=data["preset"], intensity=data["intensity"], roi_size=exp.roi,
        num_samples=exp.samples_per_volume,
    )] + one_hot_label(exp, training=True))
    dataset = CacheDataset(data["training"], chain, progress=False, num_workers=0)
    test_set = load_test_set(exp, data)
    inferer = make_inferer(exp)
    runs = []
    for seed in range(exp.seeds):
        trained, seconds, curves = {}, {}, {}
        for model in MODELS:
            trained[model], seconds[model], curves[model] = train(model, exp, dataset, seed)
            log(f"{exp.name} seed {seed} {model}: {seconds[model]:.1f} s, final loss {curves[model]['final_head_loss'][-1]:.3f}")
        variants = evaluate_seed(trained, exp, test_set, inferer, repeats)
        log(f"{exp.name} seed {seed} mean IoU: " + ", ".join(f"{k} {v['mean_iou']:.1f}" for k, v in variants.items()))
        runs.append({"seed": seed, "train_seconds": {m: round(s, 2) for m, s in seconds.items()}, "curves": curves, "variants": variants})
    settings = asdict(exp)
    settings.update(features=list(exp.features), wide_features=list(exp.wide_features), batch_size=exp.batch_size,
                    out_channels=exp.out_channels, classes={str(k): v for k, v in exp.classes.items()},
                    test_shapes=[list(image.shape[2:]) for image, _ in test_set], training_cases=len(data["training"]))
    settings.update(preset=data["preset"], intensity=data["intensity"])
    if exp.name.startswith("mni"):
        settings["slabs_z"] = {k: list(v) for k, v in MNI_SLABS.items()}
    return {"settings": settings, "runs": runs, "summary": summarise(exp, runs)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=str(ROOT / "docs"), help="where the JSON, markdown and PNGs go (default docs/)")
    parser.add_argument("--work-dir", default=None, help="scratch folder for the demo data (default: a temporary folder)")
    parser.add_argument("--quick", action="store_true", help="a few steps, one seed, tiny widths: checks the outputs")
    parser.add_argument("--experiments", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    parser.add_argument("--seeds", type=int, default=None, help="override the seeds of every experiment")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiply every experiment's steps")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest on a shared 2-core CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed inference passes per seed (default 2, quick 1)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    repeats = args.repeats or (1 if args.quick else 2)

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - wall:7.1f} s] {message}", file=sys.stderr, flush=True)

    report = {
        "command": " ".join(["python benchmarks/paper_table.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "machine": machine(args.threads),
        "settings": {
            "threads": args.threads,
            "depth": DEPTH,
            "loss": "DeepSupervisionLoss(BCEDiceLoss(0.5 BCE + 1.0 Dice), equal head weights); one-hot classes with sigmoid",
            "optimizer": "Adam, cosine decay to 0 over the steps, no weight decay",
            "trainer": "monai.engines.SupervisedTrainer, 1 epoch of exactly `steps` iterations (RandomSampler with replacement)",
            "augmentation": "pipeline.transforms.train_transforms: pos/neg crops, flips, rot90, small affine, intensity scale/shift, noise",
            "evaluation": "pipeline.transforms.eval_transforms on whole test volumes (body crop); 2D: SliceInferer over axial "
            "slices (overlap 0.25), 3D: SlidingWindowInferer (overlap 0); windows = training crop size; multi-class: argmax, "
            "binary: logit > 0",
            "metrics": "monai.metrics.compute_iou / compute_dice per test volume and class, averaged over volumes",
            "inference_repeats_per_seed": repeats,
        },
        "paper": PAPER,
        "paper_preset_parameters": paper_preset_parameters(),
        "experiments": {},
    }
    with tempfile.TemporaryDirectory(prefix="paper_table_") as scratch:
        work = Path(args.work_dir or scratch)
        data = prepare_data(work)
        log(f"demo data written under {work}")
        for name in args.experiments:
            exp = EXPERIMENTS[name]
            if args.quick:
                exp = quick_experiment(exp)
            if args.seeds:
                exp = replace(exp, seeds=args.seeds)
            exp = replace(exp, steps=max(1, int(round(exp.steps * args.steps_scale))))
            started = time.perf_counter()
            report["experiments"][name] = run_experiment(exp, data[name], repeats, log)
            report["experiments"][name]["wall_seconds"] = round(time.perf_counter() - started, 1)
            log(f"{name} done")
    report["claims"] = claims(report["experiments"])
    report["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    report["wall_seconds"] = round(time.perf_counter() - wall, 1)

    (out_dir / "paper_results.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (out_dir / "paper_table.md").write_text(markdown(report), encoding="utf-8")
    plot_pruning(report, out_dir / "paper_pruning.png")
    plot_curves(report, out_dir / "paper_curves.png")
    log(f"wrote {out_dir}/paper_results.json, paper_table.md, paper_pruning.png, paper_curves.png")
    print(json.dumps({"wall_seconds": report["wall_seconds"], "claims": report["claims"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
