"""One autocast wrapper for every inferer: the bundles' engines and batch segmentation.

MONAI's engines have ``amp`` (CUDA float16 autocast, with a grad scaler in training) but no
bfloat16 and nothing for CPUs; batch segmentation runs the network outside an engine. Both
wrap their inferer in :class:`AutocastInferer` instead, after MONAI's ``SliceInferer``, which
wraps the network rather than copying the inference loop.

Example::

    inferer = AutocastInferer(SlidingWindowInferer(roi_size=(96, 96, 96)), "bf16")
    check_precision("bf16", device)
    with torch.no_grad():
        logits = inferer(image.to(device), network)  # float32, computed in bfloat16
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from monai.inferers import Inferer, SliceInferer, SlidingWindowInferer

from pipeline.cpu import keep_freed_memory

__all__ = [
    "PRECISIONS",
    "check_precision",
    "AutocastInferer",
    "MirrorTTAInferer",
    "AirIsBackground",
    "BodySlidingWindowInferer",
    "BodySliceInferer",
]

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _check_name(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")


def check_precision(precision: str, device: torch.device | str) -> None:
    """Raise ``ValueError`` (one line, for a command line) unless ``precision`` can run on ``device``.

    float16 autocast is for CUDA; bfloat16 runs on any CPU (fast with native support such as AMX)
    but only on GPUs that support it (Ampere and later).
    """
    _check_name(precision)
    device = torch.device(device)
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device (on CPU use bf16 or fp32)")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--precision bf16 is not supported by this GPU (use fp16)")


def _to_float32(outputs: Any) -> Any:
    """Floating tensors in ``outputs`` (a tensor, or lists, tuples, dicts of them) as float32."""
    if torch.is_tensor(outputs):
        return outputs.float() if outputs.is_floating_point() else outputs
    if isinstance(outputs, (list, tuple)):
        return type(outputs)(_to_float32(o) for o in outputs)
    if isinstance(outputs, dict):
        return {k: _to_float32(v) for k, v in outputs.items()}
    return outputs


class AutocastInferer(Inferer):
    """Run ``inferer`` under ``torch.autocast`` on the inputs' device; outputs come back as float32.

    Args:
        inferer: any MONAI inferer (``SimpleInferer``, ``SlidingWindowInferer``, ``SliceInferer``...).
        precision: ``"bf16"`` or ``"fp16"``: the autocast dtype; ``"fp32"``: ``inferer`` runs as it would
            alone and its outputs are returned untouched, so an enclosing autocast (MONAI's ``amp``)
            still applies. Whether the device supports it is :func:`check_precision`'s job.

    ``inputs`` (B, C, *spatial) -> ``inferer``'s outputs, floating tensors as float32 so that
    post-processing, losses and metrics see the dtype they would without autocast.

    Inference on a CPU (no gradients) runs inside :func:`pipeline.cpu.keep_freed_memory`, so the
    sliding windows of one volume reuse each other's memory instead of faulting it in afresh.
    A training step is left as it was.
    """

    def __init__(self, inferer: Inferer, precision: str = "bf16"):
        super().__init__()
        _check_name(precision)
        self.inferer = inferer
        self.precision = precision

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> Any:
        inference_on_cpu = inputs.device.type == "cpu" and not torch.is_grad_enabled()
        with keep_freed_memory() if inference_on_cpu else contextlib.nullcontext():
            if self.precision == "fp32":
                return self.inferer(inputs, network, *args, **kwargs)
            with torch.autocast(device_type=inputs.device.type, dtype=_DTYPES[self.precision]):
                outputs = self.inferer(inputs, network, *args, **kwargs)
        return _to_float32(outputs)


class MirrorTTAInferer(Inferer):
    """Test-time augmentation by mirroring: average the *probabilities* of every flip combination.

    ``inputs`` (B, C, *spatial) -> logits (B, K, *spatial) whose activation is the mean of the
    flipped predictions' probabilities (nnU-Net's mirroring). The mean is returned as logits
    (``logit(p)`` for a sigmoid, ``log(p)`` for a softmax), so the unchanged post-processing
    (activation, then threshold/argmax) thresholds the averaged probabilities.

    Args:
        inferer: the inferer to run on each flipped input (e.g. ``SlidingWindowInferer``).
        activation: ``"sigmoid"`` (one channel per class) or ``"softmax"`` (classes as channels).
        axes: spatial axes to mirror (0-based); default all. 3D: 8 passes, 2D: 4.
    """

    def __init__(self, inferer: Inferer, activation: str = "sigmoid", axes: tuple[int, ...] | None = None):
        super().__init__()
        if activation not in ("sigmoid", "softmax"):
            raise ValueError(f"activation must be 'sigmoid' or 'softmax', got {activation!r}")
        self.inferer = inferer
        self.activation = activation
        self.axes = None if axes is None else tuple(int(a) for a in axes)

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        import itertools

        spatial = list(range(inputs.ndim - 2)) if self.axes is None else list(self.axes)
        total, count = None, 0
        for size in range(len(spatial) + 1):
            for flipped in itertools.combinations(spatial, size):
                dims = [axis + 2 for axis in flipped]
                x = torch.flip(inputs, dims) if dims else inputs
                logits = self.inferer(x, network, *args, **kwargs).float()
                logits = torch.flip(logits, dims) if dims else logits
                probabilities = torch.sigmoid(logits) if self.activation == "sigmoid" else torch.softmax(logits, dim=1)
                total = probabilities if total is None else total.add_(probabilities)
                count += 1
        mean = total.div_(count).clamp_(1e-7, 1 - 1e-7)
        return torch.logit(mean) if self.activation == "sigmoid" else torch.log(mean)


class AirIsBackground:
    """No foreground in air: background logits wherever the input is air far from the body.

    The body is where the input differs from ``background``: the intensity presets write that
    one value everywhere outside the body mask (:class:`~pipeline.transforms.NormalizeBodyd`),
    and sliding windows pad with it. Voxels farther than ``margin`` voxels from the body get
    background logits (sigmoid: -20; softmax: +20 for class 0, -20 for the others). Why: a
    network sees no contrast there, and a 2D network on a slice of air or at the edge of the
    body crop draws specks (measured on the main job: 190-350 voxels of grey matter per case).
    ``margin`` keeps thin dark structures at the body's edge that fall just outside the mask
    (CSF around a skull-stripped brain). Applied to the whole volume's logits after the sliding
    window, so window borders play no part.
    """

    LOGIT = 20.0

    def __init__(self, background: float, margin: int = 3):
        self.background, self.margin = float(background), int(margin)

    @classmethod
    def for_preset(cls, preset: str, intensity: dict | None = None, margin: int = 3) -> "AirIsBackground | None":
        """The rule for an intensity preset with a body mask; ``None`` (no rule) for one without."""
        from pipeline.transforms import PRESETS, background_value

        background = background_value(preset, intensity)  # also the clear error for an unknown preset
        return None if PRESETS[preset].body is None else cls(background, margin)

    def near_body(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, C_in, *S)`` -> ``(B, 1, *S)`` bool: within ``margin`` voxels (a box) of the body."""
        near = (image != self.background).any(dim=1, keepdim=True)
        for axis in range(2, near.dim()):  # a box dilation, one axis at a time
            size = near.shape[axis]
            edge = torch.zeros([self.margin if d == axis else s for d, s in enumerate(near.shape)], dtype=torch.bool, device=near.device)
            padded = torch.cat([edge, near, edge], dim=axis)
            for shift in range(2 * self.margin + 1):  # padded is a copy, so near can grow in place
                if shift != self.margin:
                    near |= padded.narrow(axis, shift, size)
        return near

    def __call__(self, logits: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """``(B, C, *S)`` logits of the ``(B, C_in, *S)`` image, air set to background in place."""
        air = ~self.near_body(image).to(logits.device)
        if bool(air.any()):
            for channel in range(logits.shape[1]):
                background = channel == 0 and logits.shape[1] > 1
                logits[:, channel : channel + 1].masked_fill_(air, self.LOGIT if background else -self.LOGIT)
        return logits


class _AirIsBackgroundMixin:
    """``air``: an :class:`AirIsBackground` rule applied to the stitched logits (``None``: none)."""

    def __init__(self, *args: Any, air: AirIsBackground | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.air = air

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> Any:
        logits = super().__call__(inputs, network, *args, **kwargs)
        return self.air(logits, inputs) if self.air is not None and torch.is_tensor(logits) else logits


class BodySlidingWindowInferer(_AirIsBackgroundMixin, SlidingWindowInferer):
    """MONAI's ``SlidingWindowInferer``, then :class:`AirIsBackground` on the volume (``air=``)."""


class BodySliceInferer(_AirIsBackgroundMixin, SliceInferer):
    """MONAI's ``SliceInferer`` (2D network over a 3D volume), then :class:`AirIsBackground` (``air=``)."""
