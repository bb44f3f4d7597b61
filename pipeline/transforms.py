"""Preset transform chains for CT and MRI, 2D and 3D, and the matching post-processing.

Bundle configs build them with ``_target_``, e.g.::

    "train_transforms": {"_target_": "pipeline.transforms.train_transforms",
                         "spatial_dims": 3, "preset": "ct", "pixdim": [1.5, 1.5, 2.0],
                         "roi_size": [96, 96, 96], "intensity": {"a_min": -175, "a_max": 250}}

Chains (all return :class:`monai.transforms.Compose`):

* training: load -> channel first -> 3D volume -> orientation RAS -> spacing -> intensity
  -> foreground crop -> pad to ROI -> [fg/bg indices] -> random pos/neg crops -> augmentation;
  with ``spatial_dims=2`` the crops are one slice thick ``(H, W, 1)`` and the slice axis is
  squeezed: 2D training samples come straight from the volumes, no slice files are written.
* evaluation/inference: the same deterministic part on whole volumes, then a crop to the
  body (non-zero) bounding box; everything is invertible so :func:`postprocessing` maps
  predictions back onto each input's own grid (shape and affine) with ``Invertd``.

Every volume is handled as 3D: a 2D image on disk (e.g. a 2D NIfTI) becomes a one-slice
volume ``(C, H, W, 1)``, so the 2D bundle's ``SliceInferer`` runs on the same tensors.

Presets (``preset`` and ``intensity``) are one table, :data:`PRESETS`: name ->
:class:`Preset` (intensity builder, foreground rule for the body crop, accepted
``intensity`` options, description). Adding a preset is one entry there; every chain
and its error messages read the table.

* ``"ct"``: clip to an HU window ``{"a_min": -1000, "a_max": 1000}`` (default) or to
  per-volume percentiles ``{"percentiles": [0.5, 99.5]}``; then ``"output": "scale"``
  (to [0, 1], default) or ``"zscore"`` (with ``"mean"``/``"std"``, e.g. from
  :func:`pipeline.data.intensity_fingerprint`, else per volume). Body: above the minimum.
* ``"mri"``: per-volume z-score on non-zero voxels (background stays 0). Body: non-zero.
* ``"scale"``: min-max to [0, 1] per volume (synthetic demo data). Body: above the minimum.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import convert_to_dst_type
from scipy import ndimage
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    ClipIntensityPercentilesd,
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    EnsureTyped,
    FgBgToIndicesd,
    Invertd,
    LoadImage,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SaveImaged,
    ScaleIntensityd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
    SqueezeDimd,
)

from pipeline.readers import DataError, GuardedNibabelReader, SimpleITKReader, is_nifti

__all__ = [
    "PRESETS",
    "Preset",
    "LoadVolumed",
    "EnsureVolumed",
    "MatchInputDimsd",
    "KeepLargestComponentd",
    "intensity_transforms",
    "train_transforms",
    "eval_transforms",
    "inference_transforms",
    "postprocessing",
]

# metadata kept after loading: what Orientationd/Spacingd/Invertd/SaveImaged read, plus DICOM identity
META_KEEP = {
    "affine", "original_affine", "spatial_shape", "original_channel_dim", "filename_or_obj", "space",
    "spacing", "pixdim", "modality", "series_instance_uid", "series_description", "dicom_num_files",
}
FG_KEY, BG_KEY = "label_fg_indices", "label_bg_indices"


# --------------------------------------------------------------------------------------------
# small transforms MONAI has no ready part for
# --------------------------------------------------------------------------------------------


class LoadVolumed(MapTransform):
    """Load each key with the right reader: NIfTI via nibabel, everything else via SimpleITK.

    ``LoadImaged(reader=[...])`` would try the readers in turn and swallow their errors (a
    folder holding two DICOM series would then fall through to ``PydicomReader``, which
    stacks by instance number); choosing the reader by path keeps our clear errors.
    A value may be a list of paths (channels, e.g. nnU-Net ``_0000``/``_0001`` files).
    """

    def __init__(self, keys, series_uid: str | None = None, dtype=np.float32, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        with warnings.catch_warnings():
            # LoadImage also builds MONAI's default readers; their optional GPU codec warns on CPU machines
            warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
            self.loader = LoadImage(image_only=True, dtype=dtype)
        self.nibabel = GuardedNibabelReader()  # header size and NaN/Inf guards
        self.sitk = SimpleITKReader(series_uid=series_uid)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            paths = d[key]
            first = str(paths[0] if isinstance(paths, (list, tuple)) else paths)
            reader = self.nibabel if is_nifti(first) else self.sitk
            try:
                image = self.loader(paths, reader)
            except DataError:
                raise
            except Exception as err:  # nibabel/zlib errors do not name the file
                raise DataError(f"{first}: cannot load ({type(err).__name__}: {err})") from err
            if isinstance(image, MetaTensor):
                # ~40 raw NIfTI header fields would be deep-copied with every cached sample
                image.meta = {k: v for k, v in image.meta.items() if k in META_KEEP}
            d[key] = image
        return d


class EnsureVolumed(MapTransform):
    """``(C, H, W)`` -> ``(C, H, W, 1)``: 2D images become one-slice volumes (affine stays 4x4).

    Not invertible on purpose: :class:`MatchInputDimsd` drops the axis again after ``Invertd``.
    """

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key].ndim == 3:
                d[key] = d[key].unsqueeze(-1)
        return d


class MatchInputDimsd(MapTransform):
    """Squeeze trailing singleton axes so a prediction has the input's spatial rank.

    A 2D input goes through the pipeline as ``(C, H, W, 1)``; after ``Invertd`` this gives
    back ``(C, H, W)`` so the saved mask has exactly the input's shape.
    """

    def __init__(self, keys, ref_key: str = "image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key

    def __call__(self, data):
        d = dict(data)
        ref = d.get(self.ref_key)
        for key in self.key_iterator(d):
            source = ref if isinstance(ref, MetaTensor) else d[key]
            shape = getattr(source, "meta", {}).get("spatial_shape")
            if shape is None:
                continue
            rank = len(np.atleast_1d(np.asarray(shape)))
            while d[key].ndim - 1 > rank and d[key].shape[-1] == 1:
                d[key] = d[key].squeeze(-1)
        return d


class KeepLargestComponentd(MapTransform):
    """Per class value, keep only the largest connected component (full connectivity).

    For one-channel masks of class values ``(1, *spatial)``. MONAI's
    ``KeepLargestConnectedComponentd`` needs scikit-image; scipy is already a dependency.
    """

    def __init__(self, keys, labels: Sequence[int], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.labels = [int(v) for v in labels]

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            mask = torch.as_tensor(d[key]).detach().cpu().numpy()
            out = mask.copy()
            for channel in range(mask.shape[0]):
                for value in self.labels:
                    selected = mask[channel] == value
                    components, count = ndimage.label(selected, structure=np.ones((3,) * selected.ndim))
                    if count > 1:
                        sizes = np.bincount(components.ravel())
                        sizes[0] = 0
                        out[channel][selected & (components != sizes.argmax())] = 0
            d[key] = convert_to_dst_type(out, d[key])[0]
        return d


def above_minimum(x: torch.Tensor) -> torch.Tensor:
    """Foreground = above the volume's minimum (CT air/padding after clipping, any scaled image)."""
    return x > x.min()


def nonzero(x: torch.Tensor) -> torch.Tensor:
    """Foreground = non-zero (MRI: background is exactly 0 before and after non-zero z-scoring)."""
    return x != 0


# --------------------------------------------------------------------------------------------
# presets: one table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """One intensity preset: everything a chain needs to know about it.

    Attributes:
        intensity: ``(options, key) -> [transforms]``; ``options`` is the ``intensity`` dict,
            already checked against ``options``.
        foreground: ``(C, *spatial) tensor -> bool tensor``: the body the chains crop to;
            it sees the image after ``intensity``, so it must suit the normalised values.
        options: the ``intensity`` keys the builder accepts; empty = none.
        description: one line for docs and listings.
    """

    intensity: Callable[[dict, str], list]
    foreground: Callable[[torch.Tensor], torch.Tensor]
    options: frozenset = frozenset()
    description: str = ""


def _ct_intensity(intensity: dict, key: str) -> list:
    output = intensity.get("output", "scale")
    if output not in ("scale", "zscore"):
        raise ValueError(f"intensity output must be 'scale' or 'zscore', got {output!r}")
    if "percentiles" in intensity:
        lower, upper = intensity["percentiles"]
        if output == "scale":
            return [ScaleIntensityRangePercentilesd(key, lower, upper, b_min=0.0, b_max=1.0, clip=True)]
        chain = [ClipIntensityPercentilesd(key, lower, upper)]
    else:
        a_min, a_max = float(intensity.get("a_min", -1000.0)), float(intensity.get("a_max", 1000.0))
        if output == "scale":
            return [ScaleIntensityRanged(key, a_min, a_max, b_min=0.0, b_max=1.0, clip=True)]
        chain = [ScaleIntensityRanged(key, a_min, a_max, b_min=a_min, b_max=a_max, clip=True)]  # clip only
    if "mean" in intensity and "std" in intensity:
        chain.append(NormalizeIntensityd(key, subtrahend=float(intensity["mean"]), divisor=float(intensity["std"])))
    else:
        chain.append(NormalizeIntensityd(key))
    return chain


# name -> Preset: the one place a preset is defined (see the module docstring)
PRESETS: dict[str, Preset] = {
    "ct": Preset(
        intensity=_ct_intensity,
        # after clipping, air and scanner padding sit at the window's lower end, the volume minimum
        foreground=above_minimum,
        options=frozenset({"a_min", "a_max", "percentiles", "output", "mean", "std"}),
        description="clip to an HU window or percentiles, then scale to [0, 1] or z-score",
    ),
    "mri": Preset(
        intensity=lambda intensity, key: [NormalizeIntensityd(key, nonzero=True, channel_wise=True)],
        foreground=nonzero,  # the non-zero z-score leaves background at exactly 0
        description="per-volume z-score on non-zero voxels (background stays 0)",
    ),
    "scale": Preset(
        intensity=lambda intensity, key: [ScaleIntensityd(key, minv=0.0, maxv=1.0)],
        foreground=above_minimum,
        description="min-max to [0, 1] per volume (synthetic demo data)",
    ),
}


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {name!r}")
    return PRESETS[name]


def intensity_transforms(preset: str = "ct", intensity: dict | None = None, key: str = "image") -> list:
    """Intensity normalisation for a preset (see the module docstring for ``intensity``)."""
    entry = _preset(preset)
    intensity = dict(intensity or {})
    if intensity and not entry.options:
        raise ValueError(f"preset {preset!r} takes no intensity options, got {intensity}")
    unknown = set(intensity) - entry.options
    if unknown:
        raise ValueError(
            f"unknown {preset.upper()} intensity options {sorted(unknown)}; known: {sorted(entry.options)}"
        )
    return entry.intensity(intensity, key)


# --------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------


def _pixdim3(pixdim: Sequence[float] | None, spatial_dims: int) -> tuple[float, ...] | None:
    """Target spacing for the 3D volume; for 2D the slice spacing is kept (0 = keep)."""
    if pixdim is None:
        return None
    pixdim = tuple(float(p) for p in np.atleast_1d(pixdim))
    if len(pixdim) != spatial_dims:
        raise ValueError(f"pixdim needs {spatial_dims} values for spatial_dims={spatial_dims}, got {pixdim}")
    return pixdim if spatial_dims == 3 else pixdim + (0.0,)


def _deterministic(keys, spatial_dims, preset, pixdim, intensity) -> list:
    """Load -> channel first -> 3D -> RAS -> spacing -> intensity -> body crop (shared by all chains)."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    entry = _preset(preset)
    keys = list(keys)
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    chain = [LoadVolumed(keys), EnsureChannelFirstd(keys), EnsureVolumed(keys), Orientationd(keys, axcodes="RAS", labels=None)]
    target = _pixdim3(pixdim, spatial_dims)
    if target is not None:
        chain.append(Spacingd(keys, pixdim=target, mode=modes))
    chain += intensity_transforms(preset, intensity)
    chain.append(CropForegroundd(keys, source_key="image", select_fn=entry.foreground, allow_smaller=True))
    return chain


# --------------------------------------------------------------------------------------------
# public factories
# --------------------------------------------------------------------------------------------


def train_transforms(
    spatial_dims: int = 3,
    preset: str = "ct",
    pixdim: Sequence[float] | None = None,
    roi_size: Sequence[int] = (96, 96, 96),
    num_samples: int = 2,
    pos: float = 1.0,
    neg: float = 1.0,
    intensity: dict | None = None,
    augment: bool = True,
    cache_safe: bool = True,
) -> Compose:
    """Training chain on ``{"image", "label"}`` dicts; returns ``num_samples`` crops per volume.

    Output per sample: image ``(C, *roi_size)`` float32, label ``(1, *roi_size)`` float32.
    For ``spatial_dims=2`` ``roi_size`` is ``(H, W)`` and samples are axial (RAS) slices.

    Args:
        cache_safe: compute the foreground/background voxel indices in the deterministic
            prefix, so ``CacheDataset``/``PersistentDataset`` store them and each epoch's
            random crop does not rescan the label. ``False`` saves that memory.
    """
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != spatial_dims:
        raise ValueError(f"roi_size needs {spatial_dims} values for spatial_dims={spatial_dims}, got {roi}")
    keys = ["image", "label"]
    crop = roi if spatial_dims == 3 else roi + (1,)
    chain = _deterministic(keys, spatial_dims, preset, pixdim, intensity)
    chain += [SpatialPadd(keys, spatial_size=crop), EnsureTyped(keys, dtype=torch.float32)]
    index_keys = {}
    if cache_safe:
        chain += [
            FgBgToIndicesd("label", fg_postfix="_fg_indices", bg_postfix="_bg_indices"),
            EnsureTyped([FG_KEY, BG_KEY], data_type="numpy"),  # plain arrays: cheap to copy from a cache
        ]
        index_keys = {"fg_indices_key": FG_KEY, "bg_indices_key": BG_KEY}
    chain.append(
        RandCropByPosNegLabeld(
            keys, label_key="label", spatial_size=crop, pos=pos, neg=neg, num_samples=num_samples, **index_keys
        )
    )
    if spatial_dims == 2:
        chain.append(SqueezeDimd(keys, dim=3))  # (C, H, W, 1) -> (C, H, W)
    if augment:
        chain += _augmentation(keys, roi)
    chain.append(EnsureTyped(keys, dtype=torch.float32))
    return Compose(chain)


def _augmentation(keys: list[str], roi: tuple[int, ...]) -> list:
    """Flips, 90-degree rotations, small affine (rotation/scale), intensity shift/scale, noise."""
    dims = len(roi)
    chain = [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(dims)]
    if roi[0] == roi[1]:  # a 90-degree turn of a non-square crop would change the batch shape
        chain.append(RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(0, 1)))
    chain += [
        RandAffined(
            keys,
            prob=0.2,
            rotate_range=(0.26,) * (1 if dims == 2 else 3),  # about 15 degrees
            scale_range=(0.1,) * dims,
            mode=["bilinear" if k == "image" else "nearest" for k in keys],
            padding_mode="zeros",
            spatial_size=roi,
            cache_grid=True,
        ),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        RandGaussianNoised("image", prob=0.15, std=0.01),
    ]
    return chain


def eval_transforms(
    spatial_dims: int = 3,
    preset: str = "ct",
    pixdim: Sequence[float] | None = None,
    intensity: dict | None = None,
    keys: Sequence[str] = ("image", "label"),
) -> Compose:
    """Whole-volume chain for validation/evaluation (and the 2D bundle's ``SliceInferer``).

    Output: image ``(C, X, Y, Z)`` cropped to the body bounding box (nnU-Net-style: sliding
    windows over empty air are normalised to nothing by instance norm and predict
    spurious foreground), label on the same grid. Invertible with ``Invertd``.
    """
    chain = _deterministic(list(keys), spatial_dims, preset, pixdim, intensity)
    chain.append(EnsureTyped(list(keys), dtype=torch.float32))
    return Compose(chain)


def inference_transforms(
    spatial_dims: int = 3, preset: str = "ct", pixdim: Sequence[float] | None = None, intensity: dict | None = None
) -> Compose:
    """:func:`eval_transforms` for unlabelled images (key ``"image"`` only)."""
    return eval_transforms(spatial_dims, preset, pixdim, intensity, keys=("image",))


def postprocessing(
    preprocessing: Compose,
    out_channels: int = 1,
    output_dir: str | None = None,
    output_postfix: str = "seg",
    largest_component: bool = False,
    keys: Sequence[str] = ("pred",),
    invert: bool = True,
) -> Compose:
    """Logits -> discrete mask -> [largest component] -> input grid -> [``<name>_seg.nii.gz``].

    ``out_channels == 1``: sigmoid and threshold 0.5; otherwise softmax and argmax (one
    channel of class indices). ``Invertd`` undoes ``preprocessing`` (crop, spacing,
    orientation) with nearest interpolation, using the ``"image"`` key's transform trace,
    so the mask has the input's exact shape and affine. Masks are saved as uint8.
    """
    keys = list(keys)
    if out_channels == 1:
        chain = [Activationsd(keys, sigmoid=True), AsDiscreted(keys, threshold=0.5)]
        labels = [1]
    else:
        chain = [Activationsd(keys, softmax=True), AsDiscreted(keys, argmax=True)]
        labels = list(range(1, out_channels))
    if largest_component:
        chain.append(KeepLargestComponentd(keys, labels))
    if invert:
        chain += [
            Invertd(keys, transform=preprocessing, orig_keys="image", nearest_interp=True, to_tensor=True),
            MatchInputDimsd(keys),
        ]
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        chain.append(
            SaveImaged(
                keys,
                output_dir=str(output_dir),
                output_postfix=output_postfix,
                separate_folder=False,
                resample=False,
                output_dtype=np.uint8,
                print_log=False,
            )
        )
    return Compose(chain)
