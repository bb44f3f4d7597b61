"""U-Net and Wide U-Net baselines built from the same blocks as UNet++ (the paper's comparison)."""

from __future__ import annotations

from typing import List, Sequence, Union

import torch
import torch.nn as nn

from pipeline.nets.blocks import (
    ConvBlock,
    EncoderNode,
    NestedNode,
    PointwiseHead,
    check_spatial_size,
    crop_padding,
    make_upsample,
    pad_to_multiple,
)

__all__ = ["UNet", "WideUNet", "WIDE_UNET_FEATURES"]

# The paper widens U-Net to 35..560 so it has about as many parameters as UNet++ (9.13M vs 9.04M in 2D).
WIDE_UNET_FEATURES = (35, 70, 140, 280, 560)


class UNet(nn.Module):
    """U-Net (Ronneberger et al., 2015): encoder X(i,0) and one decoder node per level with a plain skip.

    Same arguments, blocks and padding as :class:`~pipeline.nets.UNetPlusPlus` (without deep
    supervision), so the two differ only in their skip pathways.
    ``(B, in_channels, *S) -> (B, out_channels, *S)``.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        features: Sequence[int] = (32, 64, 128, 256, 512),
        depth: int = 4,
        norm: Union[str, tuple] = ("instance", {"affine": True}),
        act: Union[str, tuple] = ("leakyrelu", {"negative_slope": 0.1, "inplace": True}),
        dropout: float = 0.0,
        upsample: str = "deconv",
    ):
        super().__init__()
        if depth < 1 or len(features) < depth + 1:
            raise ValueError(f"need depth >= 1 and depth + 1 widths, got depth={depth}, features={tuple(features)}")
        # the network contract (pipeline/nets/__init__.py): readers of a loaded model need these
        self.spatial_dims = int(spatial_dims)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.depth = depth
        self.size_multiple = int(2**depth)
        self.features = [int(f) for f in features[: depth + 1]]
        nodes = nn.ModuleDict()
        # states: [input, X(0,0) .. X(depth,0), decoder X(depth-1,1) .. X(0,depth)]
        for i in range(depth + 1):
            block = ConvBlock(spatial_dims, in_channels if i == 0 else self.features[i - 1], self.features[i], act, norm, dropout)
            nodes[f"x{i}_0"] = EncoderNode(spatial_dims, i, block, pool=i > 0)
        below = depth + 1
        for i in range(depth - 1, -1, -1):
            width = self.features[i]
            up = make_upsample(spatial_dims, self.features[i + 1], width, upsample)
            nodes[f"x{i}_{depth - i}"] = NestedNode([i + 1], below, up, ConvBlock(spatial_dims, 2 * width, width, act, norm, dropout))
            below += 1
        self.nodes = nodes
        self.head = PointwiseHead(spatial_dims, self.features[0], out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_spatial_size(list(x.shape[2:]), self.depth)
        x, pads = pad_to_multiple(x, self.size_multiple)
        states: List[torch.Tensor] = [x]
        for node in self.nodes.values():
            states.append(node(states))
        return crop_padding(self.head(states[-1]), pads)


class WideUNet(UNet):
    """U-Net with the paper's wider features (35, 70, 140, 280, 560) by default."""

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 1, features: Sequence[int] = WIDE_UNET_FEATURES, **kwargs):
        super().__init__(spatial_dims, in_channels, out_channels, features=features, **kwargs)
