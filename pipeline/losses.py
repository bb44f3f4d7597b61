"""Segmentation losses: the UNet++ paper's BCE + Dice, CE + Dice, log-cosh Dice, and deep supervision.

All losses take logits ``(B, C, *S)`` and targets ``(B, C, *S)`` (binary / multi-label masks) or
``(B, 1, *S)`` (class indices, for the softmax losses), and return a scalar.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
import torch.nn as nn
from monai.losses import DeepSupervisionLoss as MonaiDeepSupervisionLoss
from monai.losses import DiceCELoss, DiceLoss

__all__ = ["BCEDiceLoss", "CEDiceLoss", "LogCoshDiceLoss", "DeepSupervisionLoss", "deep_supervision_weights"]


class BCEDiceLoss(nn.Module):
    """The UNet++ paper's loss: ``bce_weight * BCE + dice_weight * Dice loss`` on sigmoid outputs.

    Each channel is an independent binary (or multi-label) mask, so BCE is applied per voxel and
    channel (MONAI's ``DiceCELoss`` switches to softmax cross-entropy as soon as there are several
    channels, which is wrong for multi-label sigmoid outputs). The Dice loss is computed per image and
    channel and averaged, as in the paper's per-image sum. Paper weights: 0.5 and 1.0.
    """

    def __init__(self, bce_weight: float = 0.5, dice_weight: float = 1.0, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5):
        super().__init__()
        self.bce_weight = bce_weight
        self.dice_weight = dice_weight
        self.bce = nn.BCEWithLogitsLoss()
        self.dice = DiceLoss(sigmoid=True, smooth_nr=smooth_nr, smooth_dr=smooth_dr)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"BCEDiceLoss needs logits and target of the same shape, got {tuple(logits.shape)} and {tuple(target.shape)}")
        target = target.to(logits.dtype)
        return self.bce_weight * self.bce(logits, target) + self.dice_weight * self.dice(logits, target)


class CEDiceLoss(DiceCELoss):
    """Multi-class ``ce_weight * cross-entropy + dice_weight * Dice loss`` on softmax outputs.

    ``target`` holds class indices ``(B, 1, *S)``; it is one-hot encoded for the Dice part.
    ``include_background=False`` leaves class 0 out of the Dice term (common for small structures).
    """

    def __init__(
        self,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        include_background: bool = True,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
    ):
        super().__init__(
            include_background=include_background,
            to_onehot_y=True,
            softmax=True,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            lambda_dice=dice_weight,
            lambda_ce=ce_weight,
        )


class LogCoshDiceLoss(nn.Module):
    """Log-cosh Dice loss (Jadon, 2020): ``log(cosh(dice_loss))``, a smoothed Dice loss.

    ``activation`` is ``"sigmoid"`` (binary / multi-label masks as target) or ``"softmax"`` (class
    indices as target).
    """

    def __init__(self, activation: str = "sigmoid", include_background: bool = True, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5):
        super().__init__()
        if activation not in ("sigmoid", "softmax"):
            raise ValueError(f"activation must be 'sigmoid' or 'softmax', got {activation!r}")
        softmax = activation == "softmax"
        self.dice = DiceLoss(
            sigmoid=not softmax,
            softmax=softmax,
            to_onehot_y=softmax,
            include_background=include_background,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.log(torch.cosh(self.dice(logits, target)))


def deep_supervision_weights(num_heads: int, weights: Union[str, Sequence[float]] = "equal") -> list:
    """Normalised weights for heads ordered deepest first.

    ``"equal"``: the paper's plain average. ``"halving"``: 1, 1/2, 1/4, ... from the deepest head, as in
    nnU-Net. Or an explicit sequence (normalised to sum to 1).
    """
    if isinstance(weights, str):
        if weights == "equal":
            raw = [1.0] * num_heads
        elif weights == "halving":
            raw = [0.5**index for index in range(num_heads)]
        else:
            raise ValueError(f"weights must be 'equal', 'halving' or a sequence, got {weights!r}")
    else:
        raw = [float(w) for w in weights]
        if len(raw) != num_heads:
            raise ValueError(f"got {len(raw)} deep-supervision weights for {num_heads} heads")
    if min(raw) < 0 or sum(raw) <= 0:
        raise ValueError(f"deep-supervision weights must be non-negative with a positive sum, got {raw}")
    total = sum(raw)
    return [w / total for w in raw]


class DeepSupervisionLoss(MonaiDeepSupervisionLoss):
    """MONAI's ``DeepSupervisionLoss`` with normalised head weights: equal (paper) by default.

    ``outputs`` is one tensor (no deep supervision, e.g. in validation) or a list of heads ordered
    deepest first, each ``(B, C, *S)``, as ``UNetPlusPlus`` returns in training. ``weights`` is
    ``"equal"``, ``"halving"`` or a sequence (see :func:`deep_supervision_weights`).
    """

    def __init__(self, loss: nn.Module, weights: Union[str, Sequence[float]] = "equal"):
        super().__init__(loss)
        deep_supervision_weights(len(weights) if not isinstance(weights, str) else 1, weights)  # fail early
        self.head_weights = weights

    def get_weights(self, levels: int = 1) -> list:
        return deep_supervision_weights(levels, self.head_weights)
