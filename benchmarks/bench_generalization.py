"""Cross-site generalisation: train on one "scanner", segment scans from others. Prints JSON, writes a PNG.

Usage::

    python benchmarks/bench_generalization.py                  # the real run, ~10-15 min on a busy 2-core CPU
    python benchmarks/bench_generalization.py --quick          # a smoke run (< 2 min), used by the tests
    python benchmarks/bench_generalization.py --output gen.json --png gen.png --workdir /tmp/gen

Data (offline): the MNI152 2009c T1 from nilearn's package data, block-averaged to 2 mm (4 mm
with ``--quick``) so that a real run fits a busy 2-core CPU; the label is the brain,
grey + white matter probability > 0.5 (brain extraction, one sigmoid channel). Three copies of
the anatomy: the template itself (training), and two smoothly deformed copies (random elastic
field of a few mm, a small rotation and shift; one for validation, one for the test sites), so
that no test volume is the training volume.

Sites (every image written as NIfTI, the label on the image's own grid):

* training site ``noisy``: Rician noise over the whole field of view (air is never exactly 0);
* ``in_domain``: the test anatomy from the training site (the in-domain Dice);
* ``zero_air``: air exactly 0 (de-faced / masked / converted scans);
* ``padded_air``: noise inside an axial circular field of view, -1024 outside (CT-like padding);
* ``bias_gamma``: smooth multiplicative bias field (about +-30 %) and gamma 1.5;
* ``thick_slices``: 3x thicker slices along z (6 mm for the 2 mm data, against 2 mm in training);
* ``orientation``: stored LPS with the axes in coronal order (flipped and transposed voxels);
* ``cropped_fov``: the top 30 % of the head and the front 10 % cut off.

What runs, as a user runs it (no benchmark-only path for our bundle):

1. the 3D bundle is copied to ``WORKDIR/bundle`` and trained from inside it with
   ``python -m monai.bundle run --config_file configs/train.json`` and overrides
   (``--preset mri``, 2 mm, widths 8-16-32, depth 2, 48^3 patches, 40 steps of 2 patches, best
   model on the validation copy every 10 steps);
2. ``python -m pipeline segment --bundle WORKDIR/bundle --input WORKDIR/sites/images`` writes
   each site's mask on its own grid;
3. a plain MONAI pipeline (``BasicUNet``; orientation, 2 mm, crop to the head box, whole-volume
   z-score; ``DiceCELoss``; the same steps, patches, learning rate and validation selection)
   is trained and applied in this process, masks inverted with ``Invertd``.

Reported per test site and method: Dice, HD95 (mm), ``fg_at_background_value`` (the fraction
of predicted foreground in voxels exactly equal to the site's constant air value; ``null`` for
noisy air) and ``fg_in_air`` (fraction of predicted foreground outside the head), plus
``gap_to_in_domain`` (in-domain Dice minus the site's Dice).

Older bundles (before ``models/settings.json`` and top-level ``features``/``depth`` ids) are
handled by :func:`bundle_overrides`: ``network_def#features`` / ``network_def#depth`` for
training, and the settings repeated as ``--override`` for ``segment``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
BUNDLE = ROOT / "bundles" / "unetpp_3d_seg"
SITES = ("in_domain", "zero_air", "padded_air", "bias_gamma", "thick_slices", "orientation", "cropped_fov")
PAD_VALUE = -1024.0


# ----------------------------------------------------------------------------------------- data
def mni_files() -> dict[str, Path]:
    import nilearn

    data = Path(nilearn.__file__).parent / "datasets" / "data"
    return {k: data / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}


def block_mean(x: np.ndarray, step: int) -> np.ndarray:
    if step == 1:
        return x
    shape = [s // step * step for s in x.shape]
    x = x[: shape[0], : shape[1], : shape[2]]
    return x.reshape(shape[0] // step, step, shape[1] // step, step, shape[2] // step, step).mean(axis=(1, 3, 5))


def load_anatomy(step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1, brain probability, affine) at ``step`` mm."""
    files = mni_files()
    t1_img = nib.load(files["t1"])
    t1 = block_mean(np.asarray(t1_img.dataobj, dtype=np.float32), step)
    brain = block_mean(
        np.asarray(nib.load(files["gm"]).dataobj, dtype=np.float32) + np.asarray(nib.load(files["wm"]).dataobj, dtype=np.float32), step
    )
    affine = t1_img.affine.copy()
    affine[:3, 3] += affine[:3, :3] @ np.full(3, (step - 1) / 2)  # centre of the first block
    affine[:3, :3] *= step
    return t1, brain, affine


def deform(t1: np.ndarray, brain: np.ndarray, seed: int, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random elastic deformation (~4 mm), a rotation (<= 6 deg) and a shift (<= 4 mm)."""
    rng = np.random.default_rng(seed)
    shape = np.array(t1.shape)
    coarse = rng.normal(size=(3, 5, 5, 5)) * (4.0 / spacing)
    field = np.stack([ndimage.zoom(c, shape / 5, order=3)[: shape[0], : shape[1], : shape[2]] for c in coarse])
    angle = np.deg2rad(rng.uniform(-6, 6))
    rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    centre = (shape - 1) / 2
    grid = np.indices(t1.shape, dtype=np.float32).reshape(3, -1)
    coords = rot @ (grid - centre[:, None]) + centre[:, None] + rng.uniform(-4, 4, size=(3, 1)) / spacing
    coords = coords.reshape(3, *t1.shape) + field
    return (
        ndimage.map_coordinates(t1, coords, order=1, mode="constant", cval=0.0).astype(np.float32),
        ndimage.map_coordinates(brain, coords, order=1, mode="constant", cval=0.0).astype(np.float32),
    )


def head_mask(t1: np.ndarray) -> np.ndarray:
    mask = t1 > 0.05 * np.percentile(t1, 99)
    mask = ndimage.binary_closing(mask, iterations=2)
    return ndimage.binary_fill_holes(mask)


def rician(t1: np.ndarray, sigma: float, rng) -> np.ndarray:
    return np.hypot(t1 + rng.normal(0, sigma, t1.shape), rng.normal(0, sigma, t1.shape)).astype(np.float32)


def reorient(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """LPS, coronal voxel order: new[i, j, k] = old[nx-1-i, ny-1-k, j]."""
    nx, ny, _ = array.shape
    new = array[::-1, ::-1, :].transpose(0, 2, 1)
    index = np.array([[-1, 0, 0, nx - 1], [0, 0, -1, ny - 1], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float)
    return np.ascontiguousarray(new), affine @ index


def make_sites(folder: Path, step: int, seed: int = 0) -> dict:
    """Write the training, validation and test-site volumes; return the site table."""
    rng = np.random.default_rng(seed)
    t1, brain, affine = load_anatomy(step)
    spacing = float(step)
    sigma = 0.03 * float(np.percentile(t1, 99))
    images, labels = folder / "images", folder / "labels"
    train_dir = folder / "train"
    for d in (images, labels, train_dir):
        d.mkdir(parents=True, exist_ok=True)

    def save(path: Path, array, aff, dtype=np.float32):
        nib.save(nib.Nifti1Image(np.asarray(array, dtype=dtype), aff), str(path))

    # training anatomy (the template) and a deformed validation copy, both from the training site
    save(train_dir / "train_image.nii.gz", rician(t1, sigma, rng), affine)
    save(train_dir / "train_label.nii.gz", brain > 0.5, affine, np.uint8)
    v_t1, v_brain = deform(t1, brain, seed + 1, spacing)
    save(train_dir / "val_image.nii.gz", rician(v_t1, sigma, rng), affine)
    save(train_dir / "val_label.nii.gz", v_brain > 0.5, affine, np.uint8)

    # the test anatomy
    t_t1, t_brain = deform(t1, brain, seed + 2, spacing)
    label = t_brain > 0.5
    head = head_mask(t_t1) | label  # the brain is in the head, also where the template's T1 is dark
    noisy = rician(t_t1, sigma, rng)
    sites: dict[str, dict] = {}

    def site(name, image, lab, air, aff, background=None):
        save(images / f"{name}.nii.gz", image, aff)
        save(labels / f"{name}.nii.gz", lab, aff, np.uint8)
        save(labels / f"{name}_air.nii.gz", air, aff, np.uint8)
        sites[name] = {"image": f"images/{name}.nii.gz", "label": f"labels/{name}.nii.gz", "background_value": background}

    site("in_domain", noisy, label, ~head, affine)
    site("zero_air", noisy * head, label, ~head, affine, 0.0)
    # padded: noise inside a circular axial field of view that just holds the head, constant outside
    xs, ys = np.nonzero(head.any(axis=2))
    centre = np.array([xs.mean(), ys.mean()])
    radius = np.sqrt(((np.stack([xs, ys], 1) - centre) ** 2).sum(1)).max() + 2
    ii, jj = np.indices(head.shape[:2])
    disc = ((ii - centre[0]) ** 2 + (jj - centre[1]) ** 2 <= radius**2)[..., None] & np.ones(head.shape, bool)
    site("padded_air", np.where(disc, noisy, PAD_VALUE), label, ~head, affine, PAD_VALUE)
    # bias field (smooth, ~ +-30 %) and gamma 1.5
    grid = [np.linspace(-1, 1, n) for n in head.shape]
    gx, gy, gz = np.meshgrid(*grid, indexing="ij")
    bias = np.exp(0.25 * gx - 0.2 * gy + 0.15 * gz + 0.15 * gx * gz).astype(np.float32)
    top = float(np.percentile(noisy, 99))
    site("bias_gamma", (np.clip(noisy / top, 0, None) ** 1.5) * top * bias, label, ~head, affine)
    # thick slices: 3x along z (block mean of the image, majority of the label)
    thick_affine = affine.copy()
    thick_affine[:3, 2] *= 3
    thick_affine[:3, 3] += affine[:3, 2] * 1.0  # centre of the first 3 slices
    site(
        "thick_slices",
        _block_z(noisy, 3),
        _block_z(label.astype(np.float32), 3) > 0.5,
        _block_z((~head).astype(np.float32), 3) > 0.5,
        thick_affine,
    )
    o_img, o_aff = reorient(noisy, affine)
    site("orientation", o_img, reorient(label, affine)[0], reorient(~head, affine)[0], o_aff)
    # cropped field of view: the top 30 % and the front 10 % cut off
    nz, ny = head.shape[2], head.shape[1]
    crop = (slice(None), slice(0, int(ny * 0.9)), slice(0, int(nz * 0.7)))
    site("cropped_fov", noisy[crop], label[crop], ~head[crop], affine)
    return sites


def _block_z(x: np.ndarray, factor: int) -> np.ndarray:
    n = x.shape[2] // factor * factor
    return x[:, :, :n].reshape(x.shape[0], x.shape[1], n // factor, factor).mean(axis=3)


def write_datalist(folder: Path) -> Path:
    datalist = {
        "name": "mni_brain_sites",
        "labels": {"0": "background", "1": "brain"},
        "training": [{"image": "train/train_image.nii.gz", "label": "train/train_label.nii.gz"}],
        "validation": [{"image": "train/val_image.nii.gz", "label": "train/val_label.nii.gz"}],
        "test": [{"image": "images/in_domain.nii.gz", "label": "labels/in_domain.nii.gz"}],
    }
    path = folder / "datalist.json"
    path.write_text(json.dumps(datalist, indent=2))
    return path


# ------------------------------------------------------------------------------ our bundle (CLI)
def bundle_overrides(bundle: Path, settings: dict) -> tuple[list[str], list[str]]:
    """(training overrides, segment overrides) for this bundle's configs.

    Bundles whose ``network_def`` hard-codes ``features``/``depth`` (before ``models/settings.json``)
    get ``network_def#...`` overrides, and ``segment`` repeats the settings the weights were
    trained with; current bundles read them from ``models/settings.json``.
    """
    train_cfg = json.loads((bundle / "configs" / "train.json").read_text())
    train, seg = [], []
    for key, value in settings.items():
        top_level = key in train_cfg or key in ("preset", "pixdim", "intensity", "roi_size")
        train += [f"--{key if top_level else 'network_def#' + key}", repr(value)]
        if not (bundle / "models" / "settings.json").exists():
            seg += ["--override", f"{key if top_level else 'network_def#' + key}={json.dumps(value)}"]
    return train, seg


def run(cmd: list[str], cwd: Path, log: Path, env: dict) -> float:
    start = time.perf_counter()
    with open(log, "a") as out:
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        done = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        sys.stderr.write(log.read_text()[-6000:])
        raise SystemExit(f"command failed ({done.returncode}): {' '.join(cmd)}")
    return time.perf_counter() - start


def train_and_segment_bundle(work: Path, data: Path, budget: dict, env: dict, log: Path) -> tuple[dict, list[str], dict]:
    bundle = work / "bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    shutil.copytree(BUNDLE, bundle, ignore=shutil.ignore_patterns("models", "logs", "eval"))
    settings = {
        "preset": "mri",
        "pixdim": [budget["pixdim"]] * 3,
        "features": budget["features"],
        "depth": budget["depth"],
        "roi_size": [budget["roi"]] * 3,
    }
    train_over, _ = bundle_overrides(bundle, settings)
    schedule = [
        "--max_epochs", str(budget["steps"]), "--val_interval", str(budget["val_interval"]),
        "--num_samples", "2", "--batch_size", "2", "--num_workers", "0", "--learning_rate", "0.003",
        "--early_stop_patience", "1000", "--progress_bar", "False", "--sw_batch_size", "2",
    ]
    train_cmd = [
        sys.executable, "-m", "monai.bundle", "run", "--config_file", "configs/train.json",
        "--dataset_dir", str(data), "--datalist", str(data / "datalist.json"), *train_over, *schedule,
    ]
    times = {"train_s": run(train_cmd, bundle, log, env)}
    _, seg_over = bundle_overrides(bundle, settings)
    masks = work / "masks_bundle"
    seg_cmd = [
        sys.executable, "-m", "pipeline", "segment", "--bundle", str(bundle), "--input", str(data / "images"),
        "--output", str(masks), "--quiet", "--workers", "0", "--overwrite", *seg_over,
    ]
    times["segment_s"] = run(seg_cmd, ROOT, log, env)
    preds = {}
    for name in SITES:
        found = sorted(masks.rglob(f"{name}*_seg.nii.gz"))
        if not found:
            raise SystemExit(f"segment wrote no mask for {name} in {masks}")
        preds[name] = np.asarray(nib.load(str(found[0])).dataobj) > 0
    commands = [" ".join(train_cmd).replace(sys.executable, "python"), " ".join(seg_cmd).replace(sys.executable, "python")]
    return preds, commands, times


# ------------------------------------------------------------------------ plain MONAI baseline
def head_box(x):
    return x > 0.1 * x.max()


def baseline_transforms(keys, pixdim):
    from monai.transforms import (
        Compose, CropForegroundd, EnsureChannelFirstd, EnsureTyped, LoadImaged, NormalizeIntensityd, Orientationd, Spacingd,
    )

    modes = ("bilinear", "nearest")[: len(keys)]
    return Compose([
        LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS"),
        Spacingd(keys, pixdim=[pixdim] * 3, mode=modes), CropForegroundd(keys, source_key="image", select_fn=head_box),
        NormalizeIntensityd("image"), EnsureTyped(keys, dtype=torch.float32),
    ])


def train_and_segment_baseline(data: Path, budget: dict, seed: int, out: Path | None = None) -> tuple[dict, dict]:
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.networks.nets import BasicUNet
    from monai.transforms import Compose, Invertd, RandCropByPosNegLabeld, RandFlipd
    from monai.utils import set_determinism

    set_determinism(seed)
    start = time.perf_counter()
    roi = [budget["roi"]] * 3
    pre = baseline_transforms(["image", "label"], budget["pixdim"])
    train_case = pre({"image": str(data / "train/train_image.nii.gz"), "label": str(data / "train/train_label.nii.gz")})
    val_case = pre({"image": str(data / "train/val_image.nii.gz"), "label": str(data / "train/val_label.nii.gz")})
    rand = Compose([
        RandCropByPosNegLabeld(["image", "label"], "label", spatial_size=roi, pos=1, neg=1, num_samples=2),
        RandFlipd(["image", "label"], prob=0.5, spatial_axis=0),
    ])
    features = list(budget["features"]) + [budget["features"][-1] * 2] * max(0, 5 - len(budget["features"]))
    net = BasicUNet(3, 1, 1, features=tuple(features[:5]) + (features[0],))
    loss_fn = DiceCELoss(sigmoid=True)
    opt = torch.optim.AdamW(net.parameters(), lr=0.003, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=budget["steps"], eta_min=1e-6)

    def infer(image):
        net.eval()
        with torch.no_grad():
            return sliding_window_inference(image[None], roi, 2, net, overlap=0.5, mode="gaussian")[0]

    best, best_state = -1.0, None
    for step in range(1, budget["steps"] + 1):
        net.train()
        patches = rand(train_case)
        x = torch.stack([p["image"].as_tensor() for p in patches])
        y = torch.stack([p["label"].as_tensor() for p in patches])
        opt.zero_grad()
        loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        sched.step()
        if step % budget["val_interval"] == 0:
            pred = infer(val_case["image"]) > 0
            truth = val_case["label"] > 0.5
            dice = float(2 * (pred & truth).sum() / max(1, int(pred.sum() + truth.sum())))
            if dice > best:
                best, best_state = dice, {k: v.clone() for k, v in net.state_dict().items()}
    train_s = time.perf_counter() - start
    if best_state is not None:
        net.load_state_dict(best_state)
    start = time.perf_counter()
    pre_image = baseline_transforms(["image"], budget["pixdim"])
    invert = Invertd("pred", transform=pre_image, orig_keys="image", nearest_interp=False, to_tensor=True)
    preds = {}
    for name in SITES:
        item = pre_image({"image": str(data / "images" / f"{name}.nii.gz")})
        item["pred"] = torch.sigmoid(infer(item["image"]))
        preds[name] = invert(item)["pred"][0].numpy() > 0.5
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            affine = nib.load(str(data / "images" / f"{name}.nii.gz")).affine
            nib.save(nib.Nifti1Image(preds[name].astype(np.uint8), affine), str(out / f"{name}_seg.nii.gz"))
    return preds, {"train_s": train_s, "segment_s": time.perf_counter() - start, "best_val_dice": best}


# -------------------------------------------------------------------------------------- metrics
def metrics(pred: np.ndarray, truth: np.ndarray, image: np.ndarray, air: np.ndarray, spacing, background) -> dict:
    from monai.metrics import compute_hausdorff_distance

    pred, truth = pred.astype(bool), truth.astype(bool)
    if pred.shape != truth.shape:
        raise SystemExit(f"mask shape {pred.shape} differs from the label's {truth.shape}")
    total = int(pred.sum())
    dice = float(2 * (pred & truth).sum() / max(1, total + int(truth.sum())))
    if total:
        to = lambda m: torch.from_numpy(np.stack([~m, m]))[None].float()  # noqa: E731
        hd95 = float(compute_hausdorff_distance(to(pred), to(truth), percentile=95, spacing=list(spacing))[0, 0])
    else:
        hd95 = float("inf")
    at_background = None if background is None else float((pred & (image == background)).sum() / max(1, total))
    return {
        "dice": round(dice, 4),
        "hd95_mm": round(hd95, 2),
        "fg_at_background_value": None if at_background is None else round(at_background, 5),
        "fg_in_air": round(float((pred & air).sum() / max(1, total)), 5),
        "predicted_over_true_volume": round(total / max(1, int(truth.sum())), 3),
    }


def score(data: Path, sites: dict, preds: dict) -> dict:
    results = {}
    for name in SITES:
        img = nib.load(str(data / sites[name]["image"]))
        spacing = np.sqrt((img.affine[:3, :3] ** 2).sum(0))
        results[name] = metrics(
            preds[name], np.asarray(nib.load(str(data / sites[name]["label"])).dataobj) > 0, np.asarray(img.dataobj),
            np.asarray(nib.load(str(data / "labels" / f"{name}_air.nii.gz")).dataobj) > 0, spacing, sites[name]["background_value"],
        )
    in_domain = results["in_domain"]["dice"]
    for name in SITES:
        results[name]["gap_to_in_domain"] = round(in_domain - results[name]["dice"], 4)
    return results


def picture(data: Path, preds: dict[str, dict], path: Path) -> None:
    """One row per site: the image (axial slice through the brain, in RAS) with the true outline, then each method's mask."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(preds)
    fig, axes = plt.subplots(len(SITES), 1 + len(methods), figsize=(3.2 * (1 + len(methods)), 3.0 * len(SITES)))
    for row, name in enumerate(SITES):
        img = nib.as_closest_canonical(nib.load(str(data / "images" / f"{name}.nii.gz")))
        ornt = nib.orientations.io_orientation(nib.load(str(data / "images" / f"{name}.nii.gz")).affine)
        canon = lambda a: nib.orientations.apply_orientation(a, ornt)  # noqa: E731
        image = np.asarray(img.dataobj)
        truth = canon(np.asarray(nib.load(str(data / "labels" / f"{name}.nii.gz")).dataobj) > 0)
        z = int(np.round(np.nonzero(truth)[2].mean())) if truth.any() else image.shape[2] // 2
        shown = image[image != PAD_VALUE]
        low, high = np.percentile(shown if shown.size else image, [1, 99.5])
        for col in range(1 + len(methods)):
            ax = axes[row, col]
            ax.imshow(image[:, :, z].T, cmap="gray", origin="lower", vmin=low, vmax=high)
            ax.contour(truth[:, :, z].T, levels=[0.5], colors="lime", linewidths=0.8)
            if col:
                method = methods[col - 1]
                mask = canon(preds[method][name]).astype(float)[:, :, z].T
                ax.imshow(np.ma.masked_where(mask < 0.5, mask), cmap="autumn", alpha=0.45, origin="lower")
                ax.set_title(f"{method}", fontsize=9)
            else:
                ax.set_title(name, fontsize=9)
            ax.axis("off")
    fig.suptitle("green: true brain outline; red: predicted brain", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=70)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny schedule on 2 mm data (< 2 min), for the tests")
    parser.add_argument("--steps", type=int, default=None, help="training iterations for each method")
    parser.add_argument("--workdir", default=None, help="where data, bundle and masks go (default: a temporary folder)")
    parser.add_argument("--output", default=None, help="also write the JSON here")
    parser.add_argument("--png", default=None, help="the picture (default: next to --output, else WORKDIR/generalization.png)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import tempfile

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_generalization_"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    budget = (
        {"step_mm": 2, "pixdim": 4.0, "features": [4, 8, 16], "depth": 2, "roi": 32, "steps": 4, "val_interval": 2}
        if args.quick
        else {"step_mm": 2, "pixdim": 2.0, "features": [8, 16, 32], "depth": 2, "roi": 48, "steps": 40, "val_interval": 10}
    )
    if args.steps:
        budget["steps"] = args.steps
        budget["val_interval"] = max(1, args.steps // 6)
    torch.set_num_threads(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    start = time.perf_counter()
    if data.exists():
        shutil.rmtree(data)
    sites = make_sites(data, budget["step_mm"], args.seed)
    write_datalist(data)
    data_s = time.perf_counter() - start
    log = work / "commands.log"
    ours, commands, our_times = train_and_segment_bundle(work, data, budget, env, log)
    plain, plain_times = train_and_segment_baseline(data, budget, args.seed, work / "masks_basicunet")
    results = {"unetpp_bundle": score(data, sites, ours), "monai_basicunet": score(data, sites, plain)}
    png = Path(args.png) if args.png else (Path(args.output).with_suffix(".png") if args.output else work / "generalization.png")
    picture(data, {"UNet++ bundle (mri preset)": ours, "plain MONAI BasicUNet": plain}, png)
    worst_gap = max(results["unetpp_bundle"][s]["gap_to_in_domain"] for s in SITES)
    report = {
        "benchmark": "generalization",
        "git_commit": _git_commit(),
        "quick": args.quick,
        "budget": budget,
        "sites": {name: {k: v for k, v in sites[name].items() if k == "background_value"} for name in SITES},
        "commands": commands,
        "results": results,
        "summary": {
            "in_domain_dice": {m: results[m]["in_domain"]["dice"] for m in results},
            "worst_gap_to_in_domain_unetpp": round(worst_gap, 4),
            "mean_test_site_dice": {m: round(float(np.mean([results[m][s]["dice"] for s in SITES[1:]])), 4) for m in results},
        },
        "seconds": {"data": round(data_s, 1), **{f"unetpp_{k}": round(v, 1) for k, v in our_times.items()},
                    **{f"basicunet_{k}": round(v, 1) if isinstance(v, float) and k.endswith("_s") else v for k, v in plain_times.items()},
                    "total": round(time.perf_counter() - start, 1)},
        "png": str(png),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__},
    }
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)
    return 0


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip() or None
    except OSError:
        return None


if __name__ == "__main__":
    sys.exit(main())
