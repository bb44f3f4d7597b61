"""UNet++ (Zhou et al., 2018) in 2D and 3D with deep supervision, accurate mode and truly pruned fast mode."""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

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

__all__ = ["UNetPlusPlus", "node_order"]


def node_order(depth: int) -> List[tuple]:
    """The nodes X(i,j), i+j <= depth, in computation order: by level s = i+j, then by column j.

    Every node's inputs come earlier in this order and the first (k+1)(k+2)/2 nodes are exactly the
    nodes of the pruned network L_k, so fast mode is a prefix of the same loop.
    """
    return [(level - j, j) for level in range(depth + 1) for j in range(level + 1)]


class UNetPlusPlus(nn.Module):
    """UNet++ with nested dense skip pathways and deep supervision.

    Args:
        spatial_dims: 2 or 3.
        in_channels, out_channels: image channels in, classes out (logits; 1 for binary with sigmoid).
        features: one width per level, at least ``depth + 1`` values (extra values are ignored, so
            ``depth`` can be lowered from the command line without editing the widths).
        depth: number of downsamplings (the paper's L4 network has depth 4).
        deep_supervision: a 1x1 head on every X(0,j), j = 1..depth; otherwise only on X(0,depth).
        mode: eval-mode output. ``"accurate"``: weighted mean of the heads' logits. ``"fast"``: only the
            nodes X(i,j) with i+j <= ``prune_level`` are computed and head ``prune_level`` is returned.
        prune_level: the level k of fast mode, 1..depth (defaults to ``depth``).
        head_weights: accurate-mode weights of heads X(0,1)..X(0,depth), normalised (equal by default).
        norm, act, dropout: as in MONAI's ``Convolution``.
        upsample: ``"deconv"`` (paper), ``"nontrainable"`` or ``"pixelshuffle"``.

    Shapes: input ``(B, in_channels, *S)`` with any ``S`` >= 2**depth per axis (odd sizes are padded
    and cropped back). Training mode with deep supervision returns a list of ``depth`` tensors
    ``(B, out_channels, *S)`` ordered deepest head first (X(0,depth), ..., X(0,1)); otherwise, and always
    in eval mode, one tensor ``(B, out_channels, *S)``.

    Example::

        net = UNetPlusPlus(3, 1, 2, features=(16, 32, 64, 128), depth=3)
        heads = net(torch.rand(2, 1, 32, 32, 32))           # training: [X03, X02, X01] logits
        l2 = net.eval().prune(2)                             # standalone pruned L2 network
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 1,
        features: Sequence[int] = (32, 64, 128, 256, 512),
        depth: int = 4,
        deep_supervision: bool = True,
        mode: str = "accurate",
        prune_level: Optional[int] = None,
        head_weights: Optional[Sequence[float]] = None,
        norm: Union[str, tuple] = ("instance", {"affine": True}),
        act: Union[str, tuple] = ("leakyrelu", {"negative_slope": 0.1, "inplace": True}),
        dropout: float = 0.0,
        upsample: str = "deconv",
    ):
        super().__init__()
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}")
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if len(features) < depth + 1:
            raise ValueError(f"features needs depth + 1 = {depth + 1} widths (one per level), got {tuple(features)}")
        if mode not in ("accurate", "fast"):
            raise ValueError(f"mode must be 'accurate' or 'fast', got {mode!r}")
        prune_level = depth if prune_level is None else int(prune_level)
        if not 1 <= prune_level <= depth:
            raise ValueError(f"prune_level must be in 1..{depth}, got {prune_level}")
        if mode == "fast" and prune_level < depth and not deep_supervision:
            raise ValueError(
                f"fast mode at prune_level {prune_level} needs deep_supervision=True: "
                f"without it there is no head on X(0,{prune_level})"
            )
        head_columns = list(range(1, depth + 1)) if deep_supervision else [depth]
        if head_weights is None:
            head_weights = [1.0] * len(head_columns)
        if len(head_weights) != len(head_columns) or min(head_weights) < 0 or sum(head_weights) <= 0:
            raise ValueError(
                f"head_weights needs {len(head_columns)} non-negative weights (heads X(0,1)..X(0,{depth})), "
                f"got {head_weights}"
            )

        self.spatial_dims = int(spatial_dims)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.features = [int(f) for f in features[: depth + 1]]
        self.depth = depth
        self.deep_supervision = deep_supervision
        self.mode = mode
        self.prune_level = prune_level
        self.head_columns = head_columns
        self._config = dict(norm=norm, act=act, dropout=dropout, upsample=upsample)
        self.register_buffer(
            "head_weights", torch.tensor([w / sum(head_weights) for w in head_weights]), persistent=False
        )

        order = node_order(depth)
        state_index = {node: position + 1 for position, node in enumerate(order)}  # states[0] is the input
        nodes = nn.ModuleDict()
        for i, j in order:
            width = self.features[i]
            if j == 0:
                source = 0 if i == 0 else state_index[(i - 1, 0)]
                in_width = in_channels if i == 0 else self.features[i - 1]
                block = ConvBlock(spatial_dims, in_width, width, act, norm, dropout)
                nodes[f"x{i}_{j}"] = EncoderNode(spatial_dims, source, block, pool=i > 0)
            else:
                skips = [state_index[(i, column)] for column in range(j)]
                up = make_upsample(spatial_dims, self.features[i + 1], width, upsample)
                block = ConvBlock(spatial_dims, width * j + width, width, act, norm, dropout)
                nodes[f"x{i}_{j}"] = NestedNode(skips, state_index[(i + 1, j - 1)], up, block)
        self.nodes = nodes
        self.heads = nn.ModuleDict(
            {
                f"x0_{j}": PointwiseHead(spatial_dims, self.features[0], out_channels)
                for j in head_columns
            }
        )
        self.head_states = [state_index[(0, j)] for j in head_columns]
        # Number of leading nodes in `order` that make up the pruned network L_k, for k = 0..depth.
        self.nodes_up_to_level = [(k + 1) * (k + 2) // 2 for k in range(depth + 1)]
        # Inputs are padded to a multiple of this; `prune` keeps the parent's value so that a pruned
        # network sees exactly the padded input (and instance-norm statistics) of the full one.
        self.size_multiple = int(2**depth)

    def _states(self, x: torch.Tensor, level: int) -> List[torch.Tensor]:
        """Compute the nodes of L_level in order; returns [input, X nodes...]."""
        states: List[torch.Tensor] = [x]
        count = self.nodes_up_to_level[level]
        for position, node in enumerate(self.nodes.values()):
            if position < count:  # later nodes are never touched: a real sub-graph, not a mask
                states.append(node(states))
        return states

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, List[torch.Tensor]]:
        check_spatial_size(list(x.shape[2:]), self.depth)
        x, pads = pad_to_multiple(x, self.size_multiple)
        fast = (not self.training) and self.mode == "fast"
        states = self._states(x, self.prune_level if fast else self.depth)

        outputs: List[torch.Tensor] = []
        for position, head in enumerate(self.heads.values()):
            column = self.head_columns[position]
            if (not fast) or column == self.prune_level:
                outputs.append(crop_padding(head(states[self.head_states[position]]), pads))
        if self.training:
            if self.deep_supervision:
                outputs.reverse()  # deepest head first, as DeepSupervisionLoss expects
                return outputs
            return outputs[0]
        if fast:
            return outputs[0]
        # Accurate mode: weighted mean of all heads' logits.
        result = outputs[0] * self.head_weights[0]
        for position in range(1, len(outputs)):
            result = result + outputs[position] * self.head_weights[position]
        return result

    def prune(self, level: int) -> "UNetPlusPlus":
        """A standalone network holding only the parameters of L_level (nodes X(i,j), i+j <= level).

        The result is a UNet++ of depth ``level`` (a sub-graph of this one has exactly that shape) with
        the single head X(0,level); its output equals this network's fast-mode output at ``level``.
        """
        if not 1 <= level <= self.depth:
            raise ValueError(f"prune level must be in 1..{self.depth}, got {level}")
        if level < self.depth and not self.deep_supervision:
            raise ValueError(f"cannot prune to L{level}: the network has no head on X(0,{level})")
        pruned = UNetPlusPlus(
            self.spatial_dims,
            self.in_channels,
            self.out_channels,
            features=self.features[: level + 1],
            depth=level,
            deep_supervision=False,
            **self._config,
        )
        state = {key: value for key, value in self.state_dict().items() if key in pruned.state_dict()}
        missing = set(pruned.state_dict()) - set(state)
        assert not missing, f"pruned network has parameters the full one lacks: {sorted(missing)}"
        pruned.load_state_dict(state)
        pruned.size_multiple = self.size_multiple
        return pruned.train(self.training).to(next(self.parameters()).device)
