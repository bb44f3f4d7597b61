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

from typing import Any, Callable

import torch
from monai.inferers import Inferer

__all__ = ["PRECISIONS", "check_precision", "AutocastInferer", "MirrorTTAInferer"]

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
    """

    def __init__(self, inferer: Inferer, precision: str = "bf16"):
        super().__init__()
        _check_name(precision)
        self.inferer = inferer
        self.precision = precision

    def __call__(self, inputs: torch.Tensor, network: Callable, *args: Any, **kwargs: Any) -> Any:
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
