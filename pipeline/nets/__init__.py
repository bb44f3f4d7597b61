"""Networks: UNet++ and the U-Net / Wide U-Net baselines of the paper's comparison."""

from pipeline.nets.unet import WIDE_UNET_FEATURES, UNet, WideUNet
from pipeline.nets.unetplusplus import UNetPlusPlus, node_order

__all__ = ["UNetPlusPlus", "UNet", "WideUNet", "WIDE_UNET_FEATURES", "node_order"]
