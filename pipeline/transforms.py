"""Preset transform chains for CT and MRI, 2D and 3D, and the matching post-processing.

Bundle configs build them with ``_target_``, e.g.::

    "train_transforms": {"_target_": "pipeline.transforms.train_transforms",
                         "spatial_dims": 3, "preset": "ct", "pixdim": [1.5, 1.5, 2.0],
                         "roi_size": [96, 96, 96], "intensity": {"a_min": -175, "a_max": 250}}

Chains (all return :class:`monai.transforms.Compose`):

* training: load -> channel first -> 3D volume -> orientation RAS -> spacing -> intensity
  -> body crop -> pad to ROI -> [fg/bg indices] -> random pos/neg crops -> augmentation;
  with ``spatial_dims=2`` the crops are one slice thick ``(H, W, 1)`` and the slice axis is
  squeezed: 2D training samples come straight from the volumes, no slice files are written.
* evaluation/inference: the same deterministic part on whole volumes; everything is
  invertible so :func:`postprocessing` maps the predicted probabilities back onto each
  input's own grid (shape and affine) with ``Invertd``, then thresholds them there.

Every volume is handled as 3D: a 2D image on disk (e.g. a 2D NIfTI) becomes a one-slice
volume ``(C, H, W, 1)``, so the 2D bundle's ``SliceInferer`` runs on the same tensors.

Presets (``preset`` and ``intensity``) are one table, :data:`PRESETS`: name ->
:class:`Preset` (intensity builder, foreground rule for the body crop, accepted
``intensity`` options, description, body mask, the modality's air, default
augmentations). Adding a preset is one entry there; every chain and its error messages
read the table.

Scanners disagree about air: exact zeros, noise, or an out-of-field padding value
(-1024/-2000/-3024 in CT). The ``ct`` and ``mri`` presets make the network input
independent of that (:class:`NormalizeBodyd`): a :class:`BodyMask` computed from the
volume itself (a fixed HU threshold for CT, a noise-aware threshold from the histogram for
MRI; then components, closing, hole filling, on a coarse grid: 0.2 s for a 512x512x300 CT),
statistics from inside it only, and every voxel outside it set to one constant below any
body value (:func:`background_value`: -5 for z-scores, -1 for [0, 1] outputs). The body
crop is the bounding box of that same mask. Nothing is stored per dataset: it works on
one unseen volume.

* ``"ct"``: body above ``"body_threshold"`` (-500 HU); clip to an HU window
  ``{"a_min": -1000, "a_max": 1000}`` (default) or to the body's percentiles
  ``{"percentiles": [0.5, 99.5]}``; then ``"output": "scale"`` (to [0, 1], default) or
  ``"zscore"`` (with ``"mean"``/``"std"``, e.g. from :func:`pipeline.data.intensity_fingerprint`,
  else the body's); air -1 (scale) or -5 (z-score).
* ``"mri"``: body above a threshold from the volume's histogram (``"body_threshold":
  "otsu"``, or a number); z-score with the body's mean and std, floored at -4; air -5.
* ``"scale"``: min-max to [0, 1] per volume (synthetic demo data); no body mask.

Augmentation (``train_transforms(augment=...)``, items in :data:`AUGMENTATIONS`, each
switchable): what a scanner does to raw intensities runs before the body mask and the
normalisation, which therefore run per epoch on the cached body box (``background``: the
air rewritten as zeros, noise or field-of-view padding; ``bias_field``: a smooth
multiplicative field; both on by default for MRI only: CT's fixed HU threshold already
sees every air convention alike). Everything else runs on the normalised patch,
where it is cheap and where gamma keeps the background constant (``spatial``, ``contrast``:
gamma, ``intensity``: scale/shift, ``resolution``: low-resolution simulation and thick
slices along one axis, ``noise``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import convert_to_dst_type
from scipy import ndimage
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    CropForegroundd,
    DeleteItemsd,
    EnsureChannelFirstd,
    EnsureTyped,
    FgBgToIndicesd,
    Invertd,
    LoadImage,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandomizableTransform,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    SaveImaged,
    ScaleIntensityd,
    ShiftIntensityd,
    Spacingd,
    SpatialPad,
    SpatialPadd,
    SqueezeDimd,
)

from pipeline.readers import (
    LABEL_CLASSES_KEY,
    DataError,
    DicomLabelReader,
    GuardedNibabelReader,
    SimpleITKReader,
    dicom_label_kind,
    is_nifti,
)

__all__ = [
    "PRESETS",
    "Preset",
    "LoadVolumed",
    "EnsureVolumed",
    "MatchInputDimsd",
    "KeepLargestComponentd",
    "ComponentRulesd",
    "BodyMask",
    "BodyMaskd",
    "NormalizeBodyd",
    "Air",
    "RandBackgroundd",
    "RandThickSlicesd",
    "AUGMENTATIONS",
    "background_value",
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

    A DICOM SEG or RTSTRUCT label is read onto the grid of the entry's ``image_key`` series, its
    segment labels / ROI names mapped to classes through the entry's ``label_classes`` (the
    datalist's ``labels``, set by :func:`pipeline.data.load_datalist`; popped here, so that it
    travels no further): see :func:`pipeline.readers.read_label_object`.
    """

    def __init__(
        self, keys, series_uid: str | None = None, dtype=np.float32, allow_missing_keys: bool = False, image_key: str = "image"
    ):
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        with warnings.catch_warnings():
            # LoadImage also builds MONAI's default readers; their optional GPU codec warns on CPU machines
            warnings.filterwarnings("ignore", message=".*nvImageCodec.*")
            self.loader = LoadImage(image_only=True, dtype=dtype)
        self.nibabel = GuardedNibabelReader()  # header size and NaN/Inf guards
        self.sitk = SimpleITKReader(series_uid=series_uid)

    def __call__(self, data):
        d = dict(data)
        classes = d.pop(LABEL_CLASSES_KEY, None)
        for key in self.key_iterator(d):
            paths = d[key]
            first = str(paths[0] if isinstance(paths, (list, tuple)) else paths)
            reader = self.nibabel if is_nifti(first) else self.sitk
            if key != self.image_key and isinstance(paths, (str, os.PathLike)) and dicom_label_kind(paths):
                reader = DicomLabelReader(self._image_path(data), classes)
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

    def _image_path(self, data) -> str | None:
        """The entry's image path (the first channel's), also when it is loaded already."""
        image = data.get(self.image_key)
        if isinstance(image, MetaTensor):
            image = image.meta.get("filename_or_obj")
        if isinstance(image, (list, tuple)):
            image = image[0] if image else None
        return None if image is None else str(image)


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


class ComponentRulesd(MapTransform):
    """Per class value: keep the largest connected component, and/or drop components below a volume.

    For one-channel masks of class values ``(1, *spatial)`` (what :func:`postprocessing`
    discretises to). ``rules`` maps a class value to ``{"largest_component": bool,
    "min_size_mm3": float}`` (as ``python -m pipeline postprocess`` chooses them on validation
    cases and keeps them in ``models/settings.json``); keys may be strings (JSON). Volumes are in
    mm^3 from the mask's ``pixdim`` (its affine), so a rule chosen on one grid holds on another;
    without spacing metadata a voxel counts as 1 mm^3. Removed voxels become background (0).
    Full connectivity (26 neighbours in 3D), as :class:`KeepLargestComponentd`.
    """

    def __init__(self, keys, rules: Mapping | None, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.rules = {int(value): dict(rule) for value, rule in (rules or {}).items()}

    def __call__(self, data):
        d = dict(data)
        if not self.rules:
            return d
        for key in self.key_iterator(d):
            pixdim = getattr(d[key], "pixdim", None)
            mask = torch.as_tensor(d[key]).detach().cpu().numpy()
            spatial = mask.ndim - 1
            voxel_mm3 = float(np.prod(np.asarray(pixdim, dtype=float)[:spatial])) if pixdim is not None else 1.0
            out = mask.copy()
            for channel in range(mask.shape[0]):
                for value, rule in self.rules.items():
                    keep = apply_component_rule(mask[channel] == value, voxel_mm3, **rule)
                    out[channel][(mask[channel] == value) & ~keep] = 0
            d[key] = convert_to_dst_type(out, d[key])[0]
        return d


def apply_component_rule(selected: np.ndarray, voxel_mm3: float = 1.0, largest_component: bool = False, min_size_mm3: float = 0.0) -> np.ndarray:
    """The voxels of boolean ``selected`` that a component rule keeps (see :class:`ComponentRulesd`)."""
    if not (largest_component or min_size_mm3):
        return selected
    components, count = ndimage.label(selected, structure=np.ones((3,) * selected.ndim))
    if count == 0:
        return selected
    sizes = np.bincount(components.ravel()).astype(float) * voxel_mm3
    sizes[0] = 0
    kept = sizes >= float(min_size_mm3 or 0.0)
    if largest_component:
        kept[:] = False
        kept[int(sizes.argmax())] = True
    kept[0] = False
    return kept[components]


def above_minimum(x: torch.Tensor) -> torch.Tensor:
    """Foreground = above the volume's minimum.

    After :class:`NormalizeBodyd` everything outside the body is the minimum (the background
    constant) and every body voxel lies above it, so this is exactly the body mask.
    """
    return x > x.min()


# --------------------------------------------------------------------------------------------
# the body mask and normalisation from inside it
# --------------------------------------------------------------------------------------------


def _plain(x) -> torch.Tensor:
    """A MetaTensor's data as a plain tensor (indexing a MetaTensor drags its metadata along)."""
    return x.as_tensor() if isinstance(x, MetaTensor) else torch.as_tensor(x)


Z_FLOOR, Z_BACKGROUND = -4.0, -5.0  # z-scores: body voxels are floored at -4, everything outside is -5
SCALE_BACKGROUND = -1.0  # [0, 1] outputs: everything outside the body is -1


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of a 1D sample: the cut that maximises the between-class variance."""
    hist, edges = np.histogram(values, bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist, dtype=np.float64)
    w1 = w0[-1] - w0
    s0 = np.cumsum(hist * centres)
    between = w0 * w1 * (s0 / np.maximum(w0, 1) - (s0[-1] - s0) / np.maximum(w1, 1)) ** 2
    return float(centres[np.argmax(between[:-1])])


def _drop_padding(values: np.ndarray) -> np.ndarray:
    """Drop an out-of-field padding value (-1024, -3024, ...) from a sample of raw intensities.

    Padding is a negative constant at the minimum, further below the rest than half the
    rest's spread: air by definition, and left in it would be Otsu's first class (air would
    count as body). Zero-filled air is not negative and stays: it is the air class itself.
    """
    lowest = values.min()
    padding = values == lowest
    if lowest >= 0 or padding.mean() < 0.01 or padding.all():
        return values
    rest = values[~padding]
    low, high = rest.min(), np.percentile(rest, 99)
    return rest if low - lowest > 0.5 * (high - low) else values


def air_threshold(values: np.ndarray) -> float:
    """Threshold between air and body from a sample of raw intensities (any units).

    Otsu splits air from tissue, but in a wide tissue distribution it cuts inside the tissue
    (dark tissue at the skin would be lost). So the threshold is placed above the air class
    instead: its median plus six robust standard deviations (Rician noise exceeds that in
    about 1e-5 of the air voxels), and at least a quarter of the way to the tissue's median.
    The quarter decides for exact zero or constant air (no spread) and for the usual noise
    levels alike, so the boundary does not move with the scanner's air; it is never above
    Otsu's cut.
    """
    values = _drop_padding(values)
    cut = otsu_threshold(values)
    lower, upper = values[values <= cut], values[values > cut]
    if not lower.size or not upper.size:
        return cut
    air = np.median(lower)
    spread = 1.4826 * np.median(np.abs(lower - air))
    return float(min(cut, air + max(6 * spread, 0.25 * (np.median(upper) - air))))


class BodyMask:
    """Robust body/head mask from raw intensities: ``(C, *spatial)`` -> ``(*spatial)`` bool.

    Threshold (a number in raw units, e.g. -500 HU between air and fat, or ``"otsu"``:
    :func:`air_threshold` from the volume's own histogram), then on a grid of at most ``grid``
    voxels per axis (strided, so a 512x512x300 CT costs a fraction of a second): the connected
    components at least ``keep`` times the largest (drops noise specks, the CT table, but keeps
    two legs), a closing of ``closing`` coarse voxels, 3D hole filling and axial (last axis) 2D
    hole filling (lungs and airways open to the edge of the field of view in 3D). Back on the
    full grid the boundary is re-thresholded within one coarse voxel, so air next to the skin
    is outside whatever its value. Channels share one mask (their union).

    Zero-filled, noisy and padded air all fall below the threshold, so all give the same mask.
    An image with nothing above the threshold is all body (normalisation stays defined).
    """

    def __init__(self, threshold: float | str = "otsu", grid: int = 64, closing: int = 1, keep: float = 0.1):
        if not (threshold == "otsu" or isinstance(threshold, (int, float))):
            raise ValueError(f"body threshold must be a number or 'otsu', got {threshold!r}")
        self.threshold, self.grid, self.closing, self.keep = threshold, int(grid), int(closing), float(keep)

    def __call__(self, image) -> np.ndarray:
        return self.masks(image)[0]

    def masks(self, image) -> tuple[np.ndarray, np.ndarray]:
        """``(body, core)``: the mask, and its interior two coarse voxels in (for statistics)."""
        image = _plain(image).detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
        spatial = image.shape[1:]
        step = [max(1, -(-s // self.grid)) for s in spatial]
        sample = tuple(slice(k // 2, None, k) for k in step)  # block centres
        coarse = np.zeros([len(range(s)[k // 2 :: k]) for s, k in zip(spatial, step)], bool)
        thresholds = []
        for channel in image:
            values = np.ascontiguousarray(channel[sample], dtype=np.float32)
            t = air_threshold(values.ravel()) if self.threshold == "otsu" else float(self.threshold)
            thresholds.append(t)
            coarse |= values > t
        coarse = self._clean(coarse) if coarse.any() else coarse
        if not coarse.any():
            everything = np.ones(spatial, bool)
            return everything, everything
        inner = ndimage.binary_erosion(coarse, border_value=1)
        outer = ndimage.binary_dilation(coarse)
        mask = self._upsample(inner, step, spatial)
        shell = self._upsample(outer & ~inner, step, spatial)
        above = np.zeros(spatial, bool)
        for channel, t in zip(image, thresholds):
            above |= channel > t
        mask |= shell & above
        # where the boundary lies depends on the air's noise (partial-volume voxels near the
        # threshold); statistics from the core do not
        core = ndimage.binary_erosion(inner, border_value=1)
        return mask, (self._upsample(core, step, spatial) & mask if core.any() else mask)

    def _clean(self, mask: np.ndarray) -> np.ndarray:
        components, count = ndimage.label(mask)
        if count > 1:
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            mask = sizes[components] >= self.keep * sizes.max()
        if self.closing:
            r = self.closing  # edge padding: the closing must not erode the body where it leaves the field of view
            padded = np.pad(mask, r, mode="edge")
            mask = ndimage.binary_closing(padded, iterations=r)[(slice(r, -r),) * mask.ndim]
        mask = ndimage.binary_fill_holes(mask)
        if mask.ndim == 3:  # in-plane neighbours only: also right for one-slice (2D) volumes
            axial = np.zeros((3, 3, 3), bool)
            axial[:, :, 1] = ndimage.generate_binary_structure(2, 1)
            mask = ndimage.binary_fill_holes(mask, axial)
        return mask

    @staticmethod
    def _upsample(mask: np.ndarray, step, spatial) -> np.ndarray:
        for axis, (k, s) in enumerate(zip(step, spatial)):
            if k > 1:
                mask = mask.take(np.minimum(np.arange(s) // k, mask.shape[axis] - 1), axis=axis)
        return mask


class BodyMaskd(MapTransform):
    """Store the :class:`BodyMask` of the image as ``mask_key``: ``(1, *spatial)`` bool, on the image's grid."""

    def __init__(self, keys, mask: BodyMask, mask_key: str = "body", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.mask, self.mask_key = mask, mask_key

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            body = torch.as_tensor(self.mask(d[key]))[None]
            d[self.mask_key] = MetaTensor(body, meta=dict(d[key].meta)) if isinstance(d[key], MetaTensor) else body
        return d


class NormalizeBodyd(MapTransform):
    """Normalise from inside a body mask; everything outside it becomes one constant below tissue.

    ``(C, *spatial)`` raw -> float32, same shape. Per channel: clip to ``window`` (raw units,
    e.g. HU) or to the body's ``percentiles``; then ``output="zscore"``: ``(x - mean) / std``
    with the body's mean/std (or the given ``mean``/``std``), floored at ``Z_FLOOR`` (-4),
    outside ``Z_BACKGROUND`` (-5); ``output="scale"``: the clip range to [0, 1], outside
    ``SCALE_BACKGROUND`` (-1). Statistics come from the mask's core (:meth:`BodyMask.masks`)
    and never see air, so zero-filled, noisy and padded air give the same body values, and
    the same constant outside.
    """

    def __init__(
        self,
        keys,
        mask: BodyMask,
        window: Sequence[float] | None = None,
        percentiles: Sequence[float] | None = None,
        output: str = "zscore",
        mean: float | None = None,
        std: float | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        if output not in ("scale", "zscore"):
            raise ValueError(f"intensity output must be 'scale' or 'zscore', got {output!r}")
        if output == "scale" and window is None and percentiles is None:
            raise ValueError("output='scale' needs a window or percentiles")
        self.mask, self.output, self.mean, self.std = mask, output, mean, std
        self.window = None if window is None else tuple(float(v) for v in window)
        self.percentiles = None if percentiles is None else tuple(float(v) for v in percentiles)

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            raw = _plain(image)
            body, core = (torch.as_tensor(m) for m in self.mask.masks(raw))
            out = raw.to(torch.float32, copy=True)
            for c in range(out.shape[0]):
                out[c] = self._normalise(out[c], core)
            out.masked_fill_(~body[None].expand_as(out), self.background)
            d[key] = convert_to_dst_type(out, image, dtype=torch.float32)[0]
        return d

    @property
    def background(self) -> float:
        return Z_BACKGROUND if self.output == "zscore" else SCALE_BACKGROUND

    def _normalise(self, x: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
        """One channel; ``body``: the voxels the statistics come from."""
        low, high = self.window if self.window else (None, None)
        if self.percentiles:
            inside = x[body][:: max(1, int(body.sum()) // 2_000_000)]  # a 2M-voxel sample is plenty for percentiles
            low, high = np.percentile(inside.numpy(), self.percentiles) if inside.numel() else (0.0, 1.0)
        if low is not None:
            x = x.clamp_(float(low), float(high))
        if self.output == "scale":
            return x.sub_(float(low)).div_(max(float(high) - float(low), 1e-8))
        if self.mean is not None and self.std is not None:
            mean, std = float(self.mean), float(self.std)
        else:
            inside = x[body].double()
            mean, std = (inside.mean().item(), inside.std(unbiased=False).item()) if inside.numel() else (0.0, 1.0)
        return x.sub_(mean).div_(std if std > 1e-8 else 1.0).clamp_(min=Z_FLOOR)


# --------------------------------------------------------------------------------------------
# presets: one table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Air:
    """How scanners of one modality write air, in raw units (for :class:`RandBackgroundd`).

    Attributes:
        level: physical air: 0 (MRI magnitude), -1000 (CT HU); bias fields scale ``x - level``.
        fills: constants written over all air (zero filling, air clipped to a value).
        pads: out-of-field values, written outside an axial field-of-view disc.
        noise: range of the noise standard deviation: raw units, or with ``magnitude`` a
            fraction of the body's 99th percentile (MRI: Rician magnitude noise around 0).
    """

    level: float
    fills: tuple = ()
    pads: tuple = ()
    noise: tuple = (0.0, 0.0)
    magnitude: bool = False


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
        body: ``options -> BodyMask`` on raw intensities, for presets that normalise inside
            a body mask; training uses it to crop before it randomises the background.
        air: how this modality's scanners write air (:class:`Air`); ``None``: no background
            augmentation.
        augment: the augmentations (:data:`AUGMENTATIONS`) on by default.
    """

    intensity: Callable[[dict, str], list]
    foreground: Callable[[torch.Tensor], torch.Tensor]
    options: frozenset = frozenset()
    description: str = ""
    body: Callable[[dict], BodyMask] | None = None
    air: Air | None = None
    augment: frozenset = frozenset({"spatial", "intensity", "noise"})


def _ct_body(intensity: dict) -> BodyMask:
    # HU are calibrated: -500 lies between air (-1000) and fat (-100) on every scanner
    return BodyMask(intensity.get("body_threshold", -500.0))


def _mri_body(intensity: dict) -> BodyMask:
    return BodyMask(intensity.get("body_threshold", "otsu"))


def _ct_intensity(intensity: dict, key: str) -> list:
    window = percentiles = None
    if "percentiles" in intensity:
        percentiles = intensity["percentiles"]
    else:
        window = (float(intensity.get("a_min", -1000.0)), float(intensity.get("a_max", 1000.0)))
    return [
        NormalizeBodyd(
            key,
            _ct_body(intensity),
            window=window,
            percentiles=percentiles,
            output=intensity.get("output", "scale"),
            mean=intensity.get("mean"),
            std=intensity.get("std"),
        )
    ]


AUGMENTATIONS = ("spatial", "background", "bias_field", "intensity", "contrast", "resolution", "noise")

# name -> Preset: the one place a preset is defined (see the module docstring)
PRESETS: dict[str, Preset] = {
    "ct": Preset(
        intensity=_ct_intensity,
        foreground=above_minimum,  # outside the body mask is the (minimum) background constant
        options=frozenset({"a_min", "a_max", "percentiles", "output", "mean", "std", "body_threshold"}),
        description="body mask (-500 HU); clip to an HU window or the body's percentiles, then scale to [0, 1] or z-score; air -1 (-5)",
        body=_ct_body,
        air=Air(level=-1000.0, fills=(-1000.0, -1024.0), pads=(-1024.0, -2000.0, -3024.0), noise=(5.0, 40.0)),
        # HU are calibrated: a bias field is not a CT artefact, and air (-1000), -1024 or
        # -3024 padding all fall below -500 HU, so randomising them would change nothing
        augment=frozenset({"spatial", "intensity", "contrast", "resolution", "noise"}),
    ),
    "mri": Preset(
        intensity=lambda intensity, key: [NormalizeBodyd(key, _mri_body(intensity), output="zscore")],
        foreground=above_minimum,
        options=frozenset({"body_threshold"}),
        description="z-score inside a head/body mask (Otsu), air -5",
        body=_mri_body,
        air=Air(level=0.0, fills=(0.0,), pads=(0.0,), noise=(0.005, 0.05), magnitude=True),
        augment=frozenset(AUGMENTATIONS),
    ),
    "scale": Preset(
        intensity=lambda intensity, key: [ScaleIntensityd(key, minv=0.0, maxv=1.0)],
        foreground=above_minimum,
        description="min-max to [0, 1] per volume (synthetic demo data)",
    ),
}


def background_value(preset: str = "ct", intensity: dict | None = None) -> float:
    """The network-input value of everything outside the body (and of any padding).

    -5 for z-scores, -1 for CT's [0, 1] ``scale`` output, 0 for the ``scale`` preset (its
    minimum). Pad with it: ``SlidingWindowInferer(..., cval=background_value(preset, intensity))``.
    """
    entry = _preset(preset)
    if entry.body is None:
        return 0.0
    for transform in intensity_transforms(preset, intensity):
        if isinstance(transform, NormalizeBodyd):
            return transform.background
    return 0.0


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


def _load(keys, spatial_dims, pixdim) -> list:
    """Load -> channel first -> 3D -> RAS -> spacing: raw intensities on the working grid."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    keys = list(keys)
    modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    chain = [LoadVolumed(keys), EnsureChannelFirstd(keys), EnsureVolumed(keys), Orientationd(keys, axcodes="RAS", labels=None)]
    target = _pixdim3(pixdim, spatial_dims)
    if target is not None:
        chain.append(Spacingd(keys, pixdim=target, mode=modes))
    return chain


def _deterministic(keys, spatial_dims, preset, pixdim, intensity) -> list:
    """:func:`_load` -> intensity -> body crop (shared by all chains)."""
    entry = _preset(preset)
    chain = _load(keys, spatial_dims, pixdim) + intensity_transforms(preset, intensity)
    chain.append(CropForegroundd(list(keys), source_key="image", select_fn=entry.foreground, allow_smaller=True))
    return chain


class SpatialPadAird(MapTransform):
    """Pad each key to ``spatial_size`` with its own minimum: raw air, before the body mask is computed."""

    def __init__(self, keys, spatial_size: Sequence[int], allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.spatial_size = spatial_size

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = SpatialPad(self.spatial_size, value=float(d[key].min()))(d[key])
        return d


class RandBackgroundd(RandomizableTransform, MapTransform):
    """Rewrite the air outside ``mask_key`` as another scanner would (raw intensities).

    One of: a fill constant over all air (``air.fills``: zero filling, clipped air), noise
    (``air.noise``; Rician magnitude noise for MRI), or noise inside an axial field-of-view
    disc with an out-of-field value outside it (``air.pads``). Body voxels are never touched.
    Runs before :class:`NormalizeBodyd`, which must then find the same body.
    """

    def __init__(self, keys, air: Air, mask_key: str = "body", prob: float = 0.5, allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.air, self.mask_key = air, mask_key
        self.modes = [m for m, on in (("fill", air.fills), ("noise", air.noise[1] > 0), ("pad", air.pads)) if on]

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if not self._do_transform or not self.modes:
            return d
        air = ~_plain(d[self.mask_key]).bool()[0]
        mode = self.modes[self.R.randint(len(self.modes))]
        for key in self.key_iterator(d):
            image = _plain(d[key]).to(torch.float32, copy=True)
            if mode == "fill":
                image[:, air] = float(self.R.choice(self.air.fills))
            else:
                image[:, air] = self._noise(image, air)
            if mode == "pad":
                image[:, air & ~self._disc(air.shape)] = float(self.R.choice(self.air.pads))
            d[key] = convert_to_dst_type(image, d[key])[0]
        return d

    def _noise(self, image: torch.Tensor, air: torch.Tensor) -> torch.Tensor:
        sigma = self.R.uniform(*self.air.noise)
        shape = (image.shape[0], int(air.sum()))
        if not self.air.magnitude:
            return torch.from_numpy(self.air.level + sigma * self.R.standard_normal(shape).astype(np.float32))
        body = image[:, ~air]
        scale = float(np.percentile(body[:, :: max(1, body.shape[1] // 100_000)].numpy(), 99)) if body.numel() else 1.0
        sigma *= abs(scale)
        real, imag = (sigma * self.R.standard_normal(shape).astype(np.float32) for _ in range(2))
        return torch.from_numpy(self.air.level + np.hypot(real, imag))

    def _disc(self, shape) -> torch.Tensor:
        """An axial (first two axes) ellipse centred in the volume, 0.8..1.2 times the inscribed one."""
        radius = self.R.uniform(0.8, 1.2)
        x, y = (torch.linspace(-1, 1, n) for n in shape[:2])
        inside = (x[:, None] ** 2 + y[None, :] ** 2) <= radius**2
        return inside.reshape(inside.shape + (1,) * (len(shape) - 2)).expand(shape)


class RandThickSlicesd(RandomizableTransform, MapTransform):
    """Thick slices along one random axis: average ``factor`` voxels into one, interpolate back.

    ``(C, *spatial)`` -> same shape; ``factor`` is uniform in ``factors`` (2..4: 1 mm -> 2-4 mm
    slices). MONAI's ``RandSimulateLowResolutiond`` zooms all axes alike.
    """

    def __init__(self, keys, prob: float = 0.15, factors: tuple = (2.0, 4.0), allow_missing_keys: bool = False):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.factors = factors

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        factor = self.R.uniform(*self.factors)
        for key in self.key_iterator(d):
            image = _plain(d[key]).float()
            spatial = list(image.shape[1:])
            axis = self.R.randint(len(spatial))
            thick = spatial.copy()
            thick[axis] = max(1, int(round(spatial[axis] / factor)))
            mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(spatial)]
            down = torch.nn.functional.interpolate(image[None], size=thick, mode="area")
            up = torch.nn.functional.interpolate(down, size=spatial, mode=mode, align_corners=False)[0]
            d[key] = convert_to_dst_type(up, d[key])[0]
        return d


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
    augment: bool | Mapping[str, bool] = True,
    cache_safe: bool = True,
) -> Compose:
    """Training chain on ``{"image", "label"}`` dicts; returns ``num_samples`` crops per volume.

    Output per sample: image ``(C, *roi_size)`` float32, label ``(1, *roi_size)`` float32.
    For ``spatial_dims=2`` ``roi_size`` is ``(H, W)`` and samples are axial (RAS) slices.

    Args:
        augment: ``True``: the preset's default augmentations (``Preset.augment``); ``False``:
            none; a dict switches single items of :data:`AUGMENTATIONS` on or off, e.g.
            ``{"bias_field": False}`` (the rest keep the preset's default).
        cache_safe: compute the foreground/background voxel indices in the deterministic
            prefix, so ``CacheDataset``/``PersistentDataset`` store them and each epoch's
            random crop does not rescan the label. ``False`` saves that memory.

    With ``background`` or ``bias_field`` on (presets with a body mask), the cached prefix
    stops at the raw body-box crop: those two change raw intensities, so the body mask and
    the normalisation run again each epoch, on the body box only.
    """
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != spatial_dims:
        raise ValueError(f"roi_size needs {spatial_dims} values for spatial_dims={spatial_dims}, got {roi}")
    entry = _preset(preset)
    normalisation = intensity_transforms(preset, intensity)  # checks the options
    enabled = _enabled_augmentations(preset, augment)
    background = background_value(preset, intensity)
    keys = ["image", "label"]
    crop = roi if spatial_dims == 3 else roi + (1,)
    raw_stage = enabled["background"] or (enabled["bias_field"] and entry.body is not None)
    if raw_stage:
        chain = _load(keys, spatial_dims, pixdim) + [
            BodyMaskd("image", entry.body(dict(intensity or {}))),
            CropForegroundd(keys + ["body"], source_key="body", allow_smaller=True),
            SpatialPadAird("image", crop),
            SpatialPadd(["label", "body"], spatial_size=crop),
        ]
    else:
        chain = _deterministic(keys, spatial_dims, preset, pixdim, intensity)
        chain += [SpatialPadd("image", spatial_size=crop, value=background), SpatialPadd("label", spatial_size=crop)]
    chain.append(EnsureTyped(keys, dtype=torch.float32))
    index_keys = {}
    if cache_safe:
        chain += [
            FgBgToIndicesd("label", fg_postfix="_fg_indices", bg_postfix="_bg_indices"),
            EnsureTyped([FG_KEY, BG_KEY], data_type="numpy"),  # plain arrays: cheap to copy from a cache
        ]
        index_keys = {"fg_indices_key": FG_KEY, "bg_indices_key": BG_KEY}
    if raw_stage:
        # the scanner's own effects, on raw intensities and before the body mask sees them:
        # a bias field multiplies the signal (x - air level); air is written after it
        if enabled["bias_field"]:
            level = entry.air.level if entry.air else 0.0
            chain += [
                ShiftIntensityd("image", offset=-level),
                RandBiasFieldd("image", prob=0.3, coeff_range=(-0.1, 0.1)),
                ShiftIntensityd("image", offset=level),
            ]
        if enabled["background"]:
            chain.append(RandBackgroundd("image", entry.air))
        chain += normalisation + [DeleteItemsd("body")]
    chain.append(
        RandCropByPosNegLabeld(
            keys, label_key="label", spatial_size=crop, pos=pos, neg=neg, num_samples=num_samples, **index_keys
        )
    )
    if spatial_dims == 2:
        chain.append(SqueezeDimd(keys, dim=3))  # (C, H, W, 1) -> (C, H, W)
    chain += _augmentation(keys, roi, enabled, background, bias_on_patch=enabled["bias_field"] and not raw_stage,
                           noise_std=0.01 if background > Z_BACKGROUND else 0.1)
    chain.append(EnsureTyped(keys, dtype=torch.float32))
    return Compose(chain)


def _enabled_augmentations(preset: str, augment: bool | Mapping[str, bool]) -> dict[str, bool]:
    """``augment`` (bool or partial dict) -> ``{name: on}`` for every name in :data:`AUGMENTATIONS`."""
    entry = _preset(preset)
    if isinstance(augment, bool):
        enabled = {name: augment and name in entry.augment for name in AUGMENTATIONS}
    else:
        unknown = set(augment) - set(AUGMENTATIONS)
        if unknown:
            raise ValueError(f"unknown augmentations {sorted(unknown)}; known: {list(AUGMENTATIONS)}")
        enabled = {name: bool(augment.get(name, name in entry.augment)) for name in AUGMENTATIONS}
    if enabled["background"] and entry.air is None:
        raise ValueError(f"preset {preset!r} has no body mask, so its background cannot be randomised")
    return enabled


def _augmentation(keys, roi, enabled: dict, background: float, bias_on_patch: bool, noise_std: float) -> list:
    """Patch augmentations on normalised intensities (cheap: patch-sized, and the background stays put).

    Gamma keeps the patch's minimum and maximum, so the background constant survives it;
    on raw intensities it would depend on the padding value. Noise is in normalised units:
    0.1 body standard deviations for z-scores, 0.01 of the [0, 1] range otherwise.
    """
    dims = len(roi)
    chain = []
    if enabled["spatial"]:
        chain += [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(dims)]
        if roi[0] == roi[1]:  # a 90-degree turn of a non-square crop would change the batch shape
            chain.append(RandRotate90d(keys, prob=0.5, max_k=3, spatial_axes=(0, 1)))
        affine = RandAffined(
            keys,
            prob=0.2,
            rotate_range=(0.26,) * (1 if dims == 2 else 3),  # about 15 degrees
            scale_range=(0.1,) * dims,
            mode=["bilinear" if k == "image" else "nearest" for k in keys],
            padding_mode="zeros",
            spatial_size=roi,
            cache_grid=True,
        )
        # corners rotated in from outside must be background, not 0 (the mean tissue of a z-score)
        chain += [ShiftIntensityd("image", offset=-background), affine, ShiftIntensityd("image", offset=background)] if background else [affine]
    if bias_on_patch:
        chain.append(RandBiasFieldd("image", prob=0.3, coeff_range=(-0.1, 0.1)))
    if enabled["contrast"]:
        chain.append(RandAdjustContrastd("image", prob=0.3, gamma=(0.7, 1.5)))
    if enabled["intensity"]:
        chain += [RandScaleIntensityd("image", factors=0.1, prob=0.5), RandShiftIntensityd("image", offsets=0.1, prob=0.5)]
    if enabled["resolution"]:
        chain += [
            RandSimulateLowResolutiond("image", prob=0.15, zoom_range=(0.5, 1.0), upsample_mode="trilinear" if dims == 3 else "bilinear"),
            RandThickSlicesd("image", prob=0.15),
        ]
    if enabled["noise"]:
        chain.append(RandGaussianNoised("image", prob=0.15, std=noise_std))
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
    spurious foreground), label on the same grid. Invertible with ``Invertd``. Air left in
    the box's corners holds :func:`background_value`; pad with it too (``cval``).
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
    components: Mapping | None = None,
) -> Compose:
    """Logits -> probabilities -> [input grid] -> discrete mask -> [component rules] -> [``<name>_seg.nii.gz``].

    ``out_channels == 1``: sigmoid, threshold 0.5; otherwise softmax, argmax (one channel of
    class indices). With ``invert``, ``Invertd`` undoes ``preprocessing`` (crop, spacing,
    orientation) on the *probabilities*, with the image's (linear) interpolation, and only
    then are they discretised (nnU-Net does the same): boundaries are placed at 0.5 on the
    input grid instead of being blocks of the working grid. ``components``: per-class rules
    for connected components (:class:`ComponentRulesd`; the bundles pass the ones
    ``python -m pipeline postprocess`` chose on validation cases and kept with the weights);
    ``largest_component`` keeps the largest component of every class. Outside the body crop the
    probabilities are padded with 0, i.e. background. The mask has the input's exact shape
    and affine; saved masks are uint8.

    Memory: the input grid holds the probabilities, ``out_channels`` float32 arrays (1 for
    sigmoid), e.g. 2 x 4 B x 512x512x300 = 630 MB for two classes; the discrete mask
    replaces them. That is one channel more than resampling a label map (+0.3 GB here);
    the peak is set by ``Invertd``'s resampling grid either way (measured: +4.5 GB over
    the preprocessed case for a 512x512x300 CT, labels or probabilities alike).
    """
    keys = list(keys)
    if out_channels == 1:
        chain, discrete, labels = [Activationsd(keys, sigmoid=True)], AsDiscreted(keys, threshold=0.5), [1]
    else:
        chain, discrete, labels = [Activationsd(keys, softmax=True)], AsDiscreted(keys, argmax=True), list(range(1, out_channels))
    if invert:
        chain += [
            Invertd(keys, transform=preprocessing, orig_keys="image", nearest_interp=False, to_tensor=True),
            MatchInputDimsd(keys),
        ]
    chain.append(discrete)
    if largest_component:
        chain.append(KeepLargestComponentd(keys, labels))
    if components:
        chain.append(ComponentRulesd(keys, components))
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
