"""Building blocks shared by UNet++, U-Net and Wide U-Net, so comparisons between them are fair."""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution, UpSample
from monai.networks.layers.factories import Conv, Pool


def instance_norm_as_group_norm(norm, channels: int):
    """Express instance norm as ``GroupNorm`` with one group per channel.

    The maths are identical (each channel normalised over its own spatial extent, same affine
    parameters and state-dict keys), but PyTorch's group-norm kernel is about twice as fast on CPU
    as instance norm, which reshapes to a batch norm and repeats its weights on every call.
    Instance norm with running statistics has no group-norm equivalent and is left alone.
    """
    name, args = (norm, {}) if isinstance(norm, str) else (norm[0], dict(norm[1]) if len(norm) > 1 else {})
    if not isinstance(name, str) or name.lower() != "instance" or args.get("track_running_stats", False):
        return norm
    unknown = set(args) - {"affine", "eps"}
    if unknown:
        return norm
    return ("group", {"num_groups": channels, "affine": args.get("affine", False), "eps": args.get("eps", 1e-5)})


def _plain_cpu_inference(x: torch.Tensor) -> bool:
    """True for float32 CPU inference in eager mode: no gradients, autocast, tracing or compiling."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.jit.is_tracing()  # an ONNX export must see the standard operator
        and not torch.compiler.is_compiling()
        and not torch.is_autocast_enabled("cpu")
    )


class OneDNNConv3d(nn.Conv3d):
    """``nn.Conv3d`` that always takes oneDNN for float32 inference on a CPU.

    For a batch of one with few input channels (the image itself), PyTorch's heuristic picks its
    reference kernel: the first 1 -> 16 convolution at 96^3 takes 34 ms there against 8 ms in
    oneDNN (2 cores). Same parameters and values; training, autocast, other devices, tracing,
    ``torch.compile`` and TorchScript use ``nn.Conv3d``'s own path. (Code that swaps modules by
    exact type, such as eager-mode quantization, must list this class beside ``nn.Conv3d``.)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self._conv_forward(x, self.weight, self.bias)
        return self._eager_forward(x)

    @torch.jit.unused
    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            _plain_cpu_inference(x)
            and self.padding_mode == "zeros"
            and not isinstance(self.padding, str)
            and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled  # torch.backends.mkldnn.flags(enabled=False) is obeyed
        ):
            return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups)
        return self._conv_forward(x, self.weight, self.bias)


def blockwise_transposed_convolution(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A transposed convolution whose kernel equals its stride, as one matrix product and a shuffle.

    ``x`` (B, C, *S), ``weight`` (C, O, *k) -> (B, O, *(k * S)). Each input voxel writes its own
    disjoint k^n output block, so the output is ``weight^T @ x`` (one row per output channel and
    kernel offset) with the offsets moved beside their voxels. Why: PyTorch's CPU kernel for it
    (32 -> 16 channels, 48^3 -> 96^3, 2 cores) takes 37 ms, and 47 ms inside the network where its
    channels-last output is copied back; this takes 13 ms. The values are the same products.
    """
    batch, channels, *spatial = x.shape
    outputs, kernel = weight.shape[1], list(weight.shape[2:])
    offsets = math.prod(kernel)
    rows = weight.reshape(channels, outputs * offsets).t()  # row (o, *offset)
    if bias is None:
        columns = torch.matmul(rows, x.reshape(batch, channels, -1))
    else:  # the bias added by the product itself, one value per row
        column_bias = bias.repeat_interleave(offsets).unsqueeze(1)
        columns = torch.baddbmm(column_bias, rows.expand(batch, -1, -1), x.reshape(batch, channels, -1))
    blocks = columns.view([batch, outputs] + kernel + spatial)
    n = len(spatial)
    order = [0, 1]
    interleaved: List[int] = [batch, outputs]
    for axis in range(n):  # (S_axis, k_axis) pairs: voxel index outside, offset inside
        order += [2 + n + axis, 2 + axis]
        interleaved += [spatial[axis], kernel[axis]]
    out = torch.empty(interleaved, dtype=columns.dtype, device=columns.device)
    out.copy_(blocks.permute(order))
    return out.view([batch, outputs] + [size * k for size, k in zip(spatial, kernel)])


class _BlockwiseTransposedConvolution:
    """Mixin for ``nn.ConvTranspose2d/3d``: :func:`blockwise_transposed_convolution` for float32 CPU
    inference when kernel == stride (MONAI's ``UpSample(mode="deconv")``), otherwise PyTorch's own
    path. Same parameters and state-dict keys."""

    @torch.jit.unused
    def _eager_forward(self, x: torch.Tensor, output_size: Optional[List[int]]) -> torch.Tensor:
        if (
            output_size is None
            and _plain_cpu_inference(x)
            and tuple(self.kernel_size) == tuple(self.stride)
            and not any(self.padding)
            and not any(self.output_padding)
            and all(d == 1 for d in self.dilation)
            and self.groups == 1
            and self.padding_mode == "zeros"
        ):
            return blockwise_transposed_convolution(x, self.weight, self.bias)
        return super().forward(x, output_size)


class BlockwiseConvTranspose2d(_BlockwiseTransposedConvolution, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` computed blockwise for CPU inference (TorchScript takes PyTorch's path)."""

    def forward(self, x: torch.Tensor, output_size: Optional[List[int]] = None) -> torch.Tensor:
        if torch.jit.is_scripting():
            padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation)
            return F.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, padding, self.groups, self.dilation)
        return self._eager_forward(x, output_size)


class BlockwiseConvTranspose3d(_BlockwiseTransposedConvolution, nn.ConvTranspose3d):
    """``nn.ConvTranspose3d`` computed blockwise for CPU inference (TorchScript takes PyTorch's path)."""

    def forward(self, x: torch.Tensor, output_size: Optional[List[int]] = None) -> torch.Tensor:
        if torch.jit.is_scripting():
            padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 3, self.dilation)
            return F.conv_transpose3d(x, self.weight, self.bias, self.stride, self.padding, padding, self.groups, self.dilation)
        return self._eager_forward(x, output_size)


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by norm, dropout and activation (the paper's node).

    ``(B, in_channels, *S) -> (B, out_channels, *S)``. In 3D the convolutions are
    :class:`OneDNNConv3d` (same parameters as MONAI's ``Convolution`` builds, faster on a CPU).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, act, norm, dropout: float):
        super().__init__()
        norm = instance_norm_as_group_norm(norm, out_channels)
        for index, channels_in in enumerate((in_channels, out_channels)):
            self.add_module(
                f"conv{index}",
                Convolution(spatial_dims, channels_in, out_channels, kernel_size=3, act=act, norm=norm, dropout=dropout),
            )
        for module in self.modules():
            if type(module) is nn.Conv3d:  # noqa: E721 - exactly PyTorch's class, as MONAI built it
                module.__class__ = OneDNNConv3d  # keeps the initialised parameters and their keys


class PointwiseHead(nn.Module):
    """A 1x1 convolution computed as one matrix product: ``(B, C, *S) -> (B, K, *S)``.

    The parameters (``conv.weight``, ``conv.bias``) and state-dict keys of MONAI's
    ``Convolution(..., kernel_size=1, conv_only=True)``; on a CPU oneDNN runs such a convolution
    with few outputs about 8x slower than the product (16 -> 1 channels at 96^3: 14 ms against
    1.7 ms on 2 cores).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.conv.weight.reshape(self.conv.weight.shape[0], -1)
        y = torch.matmul(weight, x.reshape(x.shape[0], x.shape[1], -1))
        bias = self.conv.bias
        if bias is not None:
            y = y + bias.reshape(1, -1, 1)
        return y.reshape([x.shape[0], weight.shape[0]] + list(x.shape[2:]))


class MaxPool2x(nn.Module):
    """2x max pooling: ``(B, C, *S) -> (B, C, *S/2)`` (``S`` even, as the networks pad it).

    Inference takes the maximum of neighbouring pairs one axis at a time, outermost first (the
    first steps compare contiguous blocks); PyTorch's 3D max pooling also records where each
    maximum was, which only training uses: 16 channels at 96^3, 8.5 ms against 29.6 ms on 2 cores.
    Training, tracing (exports) and odd sizes use PyTorch's pooling. The values are identical.
    """

    def __init__(self, spatial_dims: int):
        super().__init__()
        self.pool = Pool[Pool.MAX, spatial_dims](kernel_size=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = list(x.shape[2:])
        if torch.is_grad_enabled() or torch.jit.is_tracing() or any(size % 2 == 1 for size in spatial):
            return self.pool(x)  # an export traces PyTorch's pooling, valid for any size
        lead = list(x.shape[:2])
        halved: List[int] = []
        for axis in range(len(spatial)):
            rest = 1
            for size in spatial[axis + 1 :]:
                rest *= size
            pairs = x.reshape(lead + halved + [spatial[axis] // 2, 2, rest])
            x = torch.maximum(pairs.select(-2, 0), pairs.select(-2, 1))
            halved.append(spatial[axis] // 2)
        return x.reshape(lead + halved)


class EncoderNode(nn.Module):
    """X(i,0): pool the node above (unless i == 0, which reads the input), then a ConvBlock.

    Nodes read their inputs from a shared list of computed states (index 0 is the input image), which
    keeps the whole graph a flat, TorchScript-friendly loop.
    """

    def __init__(self, spatial_dims: int, source: int, block: ConvBlock, pool: bool):
        super().__init__()
        self.source = source
        self.pool = MaxPool2x(spatial_dims) if pool else nn.Identity()
        self.block = block

    def forward(self, states: List[torch.Tensor]) -> torch.Tensor:
        return self.block(self.pool(states[self.source]))


class NestedNode(nn.Module):
    """X(i,j), j >= 1: ConvBlock(cat[X(i,0..j-1) (the dense skips), Up(X(i+1,j-1))]).

    ``skips`` are state indices of same-resolution nodes; ``below`` is the index of the coarser node.
    """

    def __init__(self, skips: List[int], below: int, up: nn.Module, block: ConvBlock):
        super().__init__()
        self.skips = skips
        self.below = below
        self.up = up
        self.block = block

    def forward(self, states: List[torch.Tensor]) -> torch.Tensor:
        inputs = [states[index] for index in self.skips]
        inputs.append(self.up(states[self.below]))
        return self.block(torch.cat(inputs, dim=1))


def make_upsample(spatial_dims: int, in_channels: int, out_channels: int, upsample: str) -> nn.Module:
    """x2 upsampling from a coarser level: ``(B, in, *S) -> (B, out, *2S)``.

    ``deconv`` is the paper's transposed convolution (computed blockwise for CPU inference:
    :class:`BlockwiseConvTranspose3d`); ``nontrainable`` (interpolation + 1x1 conv) and
    ``pixelshuffle`` are MONAI's alternatives.
    """
    if upsample not in ("deconv", "nontrainable", "pixelshuffle"):
        raise ValueError(f"upsample must be 'deconv', 'nontrainable' or 'pixelshuffle', got {upsample!r}")
    up = UpSample(
        spatial_dims,
        in_channels,
        out_channels,
        scale_factor=2,
        mode=upsample,
        interp_mode="linear" if spatial_dims == 1 else ("bilinear" if spatial_dims == 2 else "trilinear"),
    )
    blockwise = {nn.ConvTranspose2d: BlockwiseConvTranspose2d, nn.ConvTranspose3d: BlockwiseConvTranspose3d}
    for module in up.modules():
        if type(module) in blockwise:
            module.__class__ = blockwise[type(module)]  # keeps the initialised parameters and their keys
    return up


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, List[int]]:
    """Zero-pad every spatial axis of ``x`` (B, C, *S) symmetrically up to a multiple of ``multiple``.

    Returns the padded tensor and the F.pad argument (last axis first) so ``crop_padding`` can undo it.
    """
    pads: List[int] = []
    for size in x.shape[2:][::-1]:
        extra = (multiple - size % multiple) % multiple
        pads += [extra // 2, extra - extra // 2]
    if sum(pads) == 0:
        return x, pads
    return F.pad(x, pads), pads


def crop_padding(x: torch.Tensor, pads: List[int]) -> torch.Tensor:
    """Undo ``pad_to_multiple`` on ``x`` (B, C, *S_padded) -> (B, C, *S)."""
    if sum(pads) == 0:
        return x
    spatial_dims = len(pads) // 2
    for axis in range(spatial_dims):
        before, after = pads[2 * axis], pads[2 * axis + 1]
        dim = x.dim() - 1 - axis
        x = x.narrow(dim, before, x.shape[dim] - before - after)
    return x


def check_spatial_size(shape: List[int], depth: int) -> None:
    """Raise a clear error when a spatial size is too small for ``depth`` downsamplings.

    Every axis needs at least 2**depth voxels, and the deepest level more than one voxel in all
    (instance and batch norm cannot normalise a single value).
    """
    minimum = int(2**depth)
    bottom = 1
    for size in shape:
        bottom *= (size + minimum - 1) // minimum
    if min(shape) < minimum or bottom < 2:
        raise ValueError(
            f"input spatial size {shape} is too small for depth {depth}: every spatial size must be at "
            f"least {minimum} (2**depth) and at least one larger than that; use a larger patch or a smaller depth"
        )
