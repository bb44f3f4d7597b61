"""Networks: UNet++ and the U-Net / Wide U-Net baselines of the paper's comparison.

The network contract: every ``nn.Module`` class exported here is a segmentation network that
bundles, :mod:`pipeline.segment` and the benchmarks can use interchangeably, so each one

* is built as ``Net(spatial_dims, in_channels, out_channels, features=..., depth=..., ...)``;
* keeps those three as plain ``int`` attributes, ``net.spatial_dims``, ``net.in_channels`` and
  ``net.out_channels`` (readers of a loaded model need them without its config);
* in eval mode maps ``(B, in_channels, *S)`` to **one** tensor ``(B, out_channels, *S)`` of
  logits, for any ``S`` its ``depth`` allows (odd sizes included), so sliding-window inference,
  post-processing, metrics, TorchScript and ONNX see a single output;
* in training mode may return more (UNet++ with deep supervision: a list of heads, deepest
  first, see :class:`UNetPlusPlus`).

``tests/test_nets.py`` checks the contract for every class in ``__all__``, so a new network
is tested as soon as it is exported.
"""

from pipeline.nets.unet import WIDE_UNET_FEATURES, UNet, WideUNet
from pipeline.nets.unetplusplus import UNetPlusPlus, node_order

__all__ = ["UNetPlusPlus", "UNet", "WideUNet", "WIDE_UNET_FEATURES", "node_order"]
