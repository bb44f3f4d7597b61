"""Embedded demo data: synthetic 2D/3D sets and a real MNI152 brain MRI (NIfTI and DICOM).

``python -m pipeline demo-data OUT [--sets synthetic_3d synthetic_2d mni]`` writes the
files under ``OUT`` with fixed names, so the committed datalists ``data_lists/<set>.json``
work with ``--dataset_dir OUT`` (a copy of each datalist is also written to ``OUT``).

* ``synthetic_3d``: 24 volumes of 64^3 blobs (``monai.data.create_test_image_3d``),
  binary labels, 1 mm isotropic; odd cases are stored LPS and with shifted origins so
  ``Orientationd``/``Invertd`` are exercised. 16 training, 4 validation, 4 test (labelled).
* ``synthetic_2d``: the same with 128^2 2D NIfTI images (``create_test_image_2d``).
* ``mni``: the MNI152 2009c T1 shipped inside the ``nilearn`` package, block-averaged to
  2 mm (98x116x94, to keep CPU training fast) with a 4-class tissue label
  (0 background, 1 CSF/other, 2 grey matter, 3 white matter: argmax of
  (1 - gm - wm, gm, wm) inside T1 > 0), plus the same T1 written as an MR DICOM series
  with SimpleITK. One subject: training uses the NIfTI, validation and test the DICOM
  series with the NIfTI label; it checks the pipeline end to end, not generalisation.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from pipeline.readers import DataError, write_dicom_series

__all__ = ["SETS", "demo_datalist", "write_demo_data", "nilearn_mni_files", "main"]

SETS = ("synthetic_3d", "synthetic_2d", "mni")
SPLIT = {"training": 16, "validation": 4, "test": 4}
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
MNI_LABELS = {"0": "background", "1": "csf_other", "2": "grey_matter", "3": "white_matter"}
MNI_T1 = "mni/images/mni152_t1_2mm.nii.gz"
MNI_LABEL = "mni/labels/mni152_tissue_2mm.nii.gz"
MNI_DICOM = "mni/dicom/mni152_t1_2mm/"


def _synthetic_names(name: str) -> list[tuple[str, str, str]]:
    """(section, image path, label path) of every synthetic case, relative to the output folder."""
    tag = "syn3d" if name == "synthetic_3d" else "syn2d"
    rows, index = [], 0
    for section, count in SPLIT.items():
        images, labels = ("imagesTs", "labelsTs") if section == "test" else ("imagesTr", "labelsTr")
        for _ in range(count):
            case = f"{tag}_{index:03d}.nii.gz"
            rows.append((section, f"{name}/{images}/{case}", f"{name}/{labels}/{case}"))
            index += 1
    return rows


def demo_datalist(name: str) -> dict:
    """The datalist of a demo set (what ``data_lists/<name>.json`` holds)."""
    if name == "mni":
        return {
            "name": "mni152_tissue",
            "description": "MNI152 2009c T1 (nilearn package data) at 2 mm with a 4-class tissue label; "
            "validation/test read the same T1 from a DICOM series",
            "tensorImageSize": "3D",
            "modality": {"0": "MRI"},
            "labels": dict(MNI_LABELS),
            "training": [{"image": MNI_T1, "label": MNI_LABEL}],
            "validation": [{"image": MNI_DICOM, "label": MNI_LABEL}],
            "test": [{"image": MNI_DICOM, "label": MNI_LABEL}],
        }
    if name not in SETS:
        raise ValueError(f"unknown demo set {name!r}; choose from {SETS}")
    dims = "3D" if name == "synthetic_3d" else "2D"
    content = {
        "name": name,
        "description": f"synthetic {dims} blobs (monai.data.create_test_image_{dims.lower()}), binary labels",
        "tensorImageSize": dims,
        "modality": {"0": "synthetic"},
        "labels": {"0": "background", "1": "foreground"},
    }
    for section in SPLIT:
        content[section] = [{"image": i, "label": l} for s, i, l in _synthetic_names(name) if s == section]
    return content


def _case_affine(index: int, dims: int) -> np.ndarray:
    """1 mm grid; odd cases LPS with a shifted origin (exercises orientation and inversion)."""
    affine = np.eye(4)
    if index % 2:
        affine = LPS.copy()
        affine[:3, 3] = [63.0, 63.0, -10.0 * (index % 5)] if dims == 3 else [127.0, 127.0, 0.0]
    return affine


def _write_synthetic(out: Path, name: str, seed: int) -> int:
    from monai.data import create_test_image_2d, create_test_image_3d

    count = 0
    for index, (_, image_path, label_path) in enumerate(_synthetic_names(name)):
        rs = np.random.RandomState(seed * 1000 + index)
        if name == "synthetic_3d":
            image, label = create_test_image_3d(
                64, 64, 64, num_objs=8, rad_max=14, rad_min=5, noise_max=0.4, num_seg_classes=1, random_state=rs
            )
        else:
            image, label = create_test_image_2d(
                128, 128, num_objs=8, rad_max=24, rad_min=6, noise_max=0.4, num_seg_classes=1, random_state=rs
            )
        affine = _case_affine(index, image.ndim)
        for path, array in ((image_path, image.astype(np.float32)), (label_path, label.astype(np.uint8))):
            (out / path).parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, affine), out / path)
            count += 1
    return count


def nilearn_mni_files() -> dict[str, Path]:
    """Paths of the MNI152 T1/GM/WM maps inside the installed nilearn package (not imported)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise DataError("the 'mni' demo set needs the nilearn package data: pip install --no-deps nilearn")
    folder = Path(spec.origin).parent / "datasets" / "data"
    files = {kind: folder / f"mni_icbm152_{kind}_tal_nlin_sym_09a_converted.nii.gz" for kind in ("t1", "gm", "wm")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(f"nilearn is installed but lacks the MNI152 maps: {', '.join(missing)}")
    return files


def _block_mean(volume: np.ndarray, factor: int = 2) -> np.ndarray:
    """Average ``factor``^3 blocks (odd edges trimmed): a 1 mm volume becomes 2 mm, alias-free."""
    shape = [s // factor for s in volume.shape]
    trimmed = volume[: shape[0] * factor, : shape[1] * factor, : shape[2] * factor]
    return trimmed.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean(axis=(1, 3, 5))


def mni_tissue_volumes(factor: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(T1 int16, tissue label uint8, affine) of the MNI152 brain at ``factor`` mm."""
    files = nilearn_mni_files()
    maps = {kind: nib.load(path) for kind, path in files.items()}
    t1 = np.round(_block_mean(maps["t1"].get_fdata(dtype=np.float32), factor)).astype(np.int16)
    gm = _block_mean(maps["gm"].get_fdata(dtype=np.float32), factor)
    wm = _block_mean(maps["wm"].get_fdata(dtype=np.float32), factor)
    scale = max(float(gm.max()), float(wm.max()), 1.0)  # the maps are stored as 0..255
    gm, wm = gm / scale, wm / scale
    tissue = np.argmax(np.stack([1.0 - gm - wm, gm, wm]), axis=0).astype(np.uint8) + 1
    tissue[t1 <= 0] = 0
    # voxel (i, j, k) of the new grid is the centre of block (2i..2i+1, ...) of the old one
    scaling = np.diag([factor, factor, factor, 1.0])
    scaling[:3, 3] = (factor - 1) / 2.0
    return t1, tissue, maps["t1"].affine @ scaling


def _write_mni(out: Path) -> int:
    t1, tissue, affine = mni_tissue_volumes()
    for path, array in ((MNI_T1, t1), (MNI_LABEL, tissue)):
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(array, affine), out / path)
    series = out / MNI_DICOM
    for stale in series.glob("*.dcm") if series.is_dir() else []:
        stale.unlink()  # a rerun must not leave extra slices of an older export behind
    files = write_dicom_series(t1, affine, series, modality="MR", series_description="MNI152 T1 2mm (demo)")
    return 2 + len(files)


def write_demo_data(out_dir, sets=SETS, seed: int = 0) -> dict:
    """Write the demo sets under ``out_dir``; returns ``{set: {"datalist": path, "files": n}}``.

    Deterministic: the same ``seed`` gives the same voxels and names. Takes a few seconds.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [s for s in sets if s not in SETS]
    if unknown:
        raise ValueError(f"unknown demo sets {unknown}; choose from {SETS}")
    written = {}
    for name in sets:
        count = _write_mni(out) if name == "mni" else _write_synthetic(out, name, seed)
        datalist = out / f"{name}.json"
        datalist.write_text(json.dumps(demo_datalist(name), indent=2) + "\n", encoding="utf-8")
        written[name] = {"dataset_dir": str(out), "datalist": str(datalist), "files": count}
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline demo-data OUT [--sets ...] [--seed S]``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m pipeline demo-data", description="Write the embedded demo data sets.")
    parser.add_argument("out", help="output folder (the dataset_dir for data_lists/*.json)")
    parser.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        written = write_demo_data(args.out, args.sets, args.seed)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for name, info in written.items():
        print(f"{name}: {info['files']} files, datalist {info['datalist']}")
    return 0


# --------------------------------------------------------------------------------------------
# the main job's data: the MNI152 brain split into hemispheres, and a simulated second site
# --------------------------------------------------------------------------------------------

MNI_SLABS = "mni_slabs"
# voxel boxes ((x0, x1), (z0, z1)) of the 2 mm volume (98 columns from left to right, the midline
# near 49; 94 slices, the brain fills 0..77). Training: the left hemisphere below z 64; validation:
# the top of the left hemisphere; test: the right hemisphere, never seen in training or model
# selection (the halves mirror each other as two subjects' brains resemble each other, with a
# 6-column gap at the midline). Every tissue class lies in each box.
MNI_SLAB_BOXES = {
    "train": ((0, 46), (0, 64)),
    "validation": ((0, 46), (64, 94)),
    "test": ((52, 98), (0, 94)),
}


def _second_site(t1: np.ndarray, label: np.ndarray, seed: int = 0) -> np.ndarray:
    """The same anatomy as another scanner would give it (what a lab sees at a second site).

    A smooth multiplicative bias field (+-20% across the slab), a different contrast (gamma 0.8),
    another intensity scale and offset (x4 + 300, as a 12-bit scanner), and Gaussian noise
    everywhere, so the air is noise instead of exact zeros.
    """
    rs = np.random.RandomState(seed + 4711)
    grids = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in t1.shape], indexing="ij")
    bias = 1.0 + 0.12 * grids[0] - 0.15 * grids[1] + 0.08 * grids[0] * grids[1]
    scaled = (np.clip(t1.astype(np.float32), 0, None) / 255.0) ** 0.8 * 255.0
    image = scaled * bias * 4.0 + 300.0 * (label > 0)
    image += rs.normal(0.0, 12.0, size=t1.shape)
    return np.clip(image, 0, None).astype(np.float32)


def mni_slabs_datalist() -> dict:
    """The datalist of the main job's MNI152 slab set (written next to its files)."""
    def case(name):
        return {"image": f"{MNI_SLABS}/images/{name}.nii.gz", "label": f"{MNI_SLABS}/labels/{name}.nii.gz"}

    return {
        "name": "mni152_tissue_slabs",
        "description": "MNI152 2009c T1 (nilearn package data) at 2 mm, 4-class tissue label, split into "
        f"voxel boxes ((x0, x1), (z0, z1)): training {MNI_SLAB_BOXES['train']} (left hemisphere), validation "
        f"{MNI_SLAB_BOXES['validation']} (its top), test {MNI_SLAB_BOXES['test']} (right hemisphere, held out), once as acquired "
        "and once as a simulated second site (bias field, gamma, scale, noisy air, stored LPS)",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": dict(MNI_LABELS),
        "training": [case("mni_train")],
        "validation": [case("mni_validation")],
        "test": [case("mni_test_site_a"), case("mni_test_site_b")],
    }


def write_mni_slabs(out_dir, seed: int = 0) -> dict:
    """Write the main job's data: the 2 mm MNI152 T1 and tissue label cut into boxes.

    Training sees the left hemisphere, validation its top, test the right hemisphere (see
    :data:`MNI_SLAB_BOXES`). The test box is written twice: as acquired (``site_a``) and as a
    simulated second scanner (``site_b``, see :func:`_second_site`, stored LPS so orientation
    and inversion are exercised). Returns ``{"dataset_dir", "datalist", "files"}``.
    """
    out = Path(out_dir)
    t1, tissue, affine = mni_tissue_volumes()
    cases = {}
    for part, ((x0, x1), (z0, z1)) in MNI_SLAB_BOXES.items():
        shifted = affine.copy()
        shifted[:3, 3] = affine[:3, :3] @ np.array([x0, 0.0, z0]) + affine[:3, 3]
        cases[part] = (t1[x0:x1, :, z0:z1], tissue[x0:x1, :, z0:z1], shifted)
    names = {"train": "mni_train", "validation": "mni_validation", "test": "mni_test_site_a"}
    written = []
    for part, name in names.items():
        image, label, slab_affine = cases[part]
        written.append((name, image, label, slab_affine))
    image, label, slab_affine = cases["test"]
    site_b = _second_site(image, label, seed)
    lps = slab_affine @ np.array([[-1, 0, 0, image.shape[0] - 1], [0, -1, 0, image.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    written.append(("mni_test_site_b", site_b[::-1, ::-1].copy(), label[::-1, ::-1].copy(), lps))
    for name, image, label, slab_affine in written:
        for folder, array in (("images", image), ("labels", label.astype(np.uint8))):
            path = out / MNI_SLABS / folder / f"{name}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, slab_affine), path)
    datalist = out / f"{MNI_SLABS}.json"
    datalist.write_text(json.dumps(mni_slabs_datalist(), indent=2) + "\n", encoding="utf-8")
    return {"dataset_dir": str(out), "datalist": str(datalist), "files": 2 * len(written)}
