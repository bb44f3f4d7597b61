"""Losses against values computed by hand on small tensors."""

import math

import pytest
import torch

from pipeline.losses import BCEDiceLoss, CEDiceLoss, DeepSupervisionLoss, LogCoshDiceLoss, deep_supervision_weights

LOGITS = [0.0, 2.0, -1.0, 1.0]
TARGET = [0.0, 1.0, 0.0, 1.0]


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def hand_bce_and_dice():
    p = [sigmoid(v) for v in LOGITS]
    bce = -sum(t * math.log(q) + (1 - t) * math.log(1 - q) for q, t in zip(p, TARGET)) / 4
    intersection = sum(q * t for q, t in zip(p, TARGET))
    dice_loss = 1 - (2 * intersection + 1e-5) / (sum(p) + sum(TARGET) + 1e-5)
    return bce, dice_loss


def as_image(values):
    return torch.tensor(values, dtype=torch.float64).reshape(1, 1, 2, 2)


def test_bce_dice_matches_paper_formula():
    bce, dice_loss = hand_bce_and_dice()
    got = BCEDiceLoss()(as_image(LOGITS), as_image(TARGET))
    assert got.item() == pytest.approx(0.5 * bce + 1.0 * dice_loss, rel=1e-6)
    got = BCEDiceLoss(bce_weight=2.0, dice_weight=0.0)(as_image(LOGITS), as_image(TARGET))
    assert got.item() == pytest.approx(2.0 * bce, rel=1e-6)


def test_bce_dice_is_per_channel_for_multi_label():
    # Two identical sigmoid channels give the single-channel loss: BCE is not turned into softmax CE.
    logits = torch.cat([as_image(LOGITS)] * 2, dim=1)
    target = torch.cat([as_image(TARGET)] * 2, dim=1)
    bce, dice_loss = hand_bce_and_dice()
    assert BCEDiceLoss()(logits, target).item() == pytest.approx(0.5 * bce + dice_loss, rel=1e-6)
    with pytest.raises(ValueError, match="same shape"):
        BCEDiceLoss()(logits, target[:, :1])


def test_ce_dice_matches_hand_computation():
    # Two voxels, two classes; class indices as target.
    logits = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)  # (B=1, C=2, N=2)
    target = torch.tensor([[[0.0, 1.0]]], dtype=torch.float64)  # voxel 0 -> class 0, voxel 1 -> class 1
    e = math.exp
    p0 = [e(1) / (e(1) + e(0)), e(0) / (e(0) + e(2))]  # P(class 0) per voxel
    p1 = [1 - p0[0], 1 - p0[1]]
    ce = -(math.log(p0[0]) + math.log(p1[1])) / 2
    dice0 = 1 - (2 * p0[0] + 1e-5) / (sum(p0) + 1 + 1e-5)
    dice1 = 1 - (2 * p1[1] + 1e-5) / (sum(p1) + 1 + 1e-5)
    got = CEDiceLoss()(logits, target)
    assert got.item() == pytest.approx(ce + (dice0 + dice1) / 2, rel=1e-6)


def test_log_cosh_dice():
    _, dice_loss = hand_bce_and_dice()
    got = LogCoshDiceLoss()(as_image(LOGITS), as_image(TARGET))
    assert got.item() == pytest.approx(math.log(math.cosh(dice_loss)), rel=1e-6)
    with pytest.raises(ValueError, match="activation"):
        LogCoshDiceLoss(activation="tanh")


def test_deep_supervision_weights():
    assert deep_supervision_weights(4) == pytest.approx([0.25] * 4)
    assert deep_supervision_weights(3, "halving") == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert deep_supervision_weights(2, [3, 1]) == pytest.approx([0.75, 0.25])
    with pytest.raises(ValueError):
        deep_supervision_weights(3, [1, 1])
    with pytest.raises(ValueError):
        deep_supervision_weights(3, "exp")


def test_deep_supervision_loss_is_weighted_sum_over_heads():
    target = as_image(TARGET)
    heads = [as_image(LOGITS), as_image([5.0, 5.0, -5.0, -5.0])]  # deepest first
    base = BCEDiceLoss()
    per_head = [base(h, target).item() for h in heads]
    assert DeepSupervisionLoss(base)(heads, target).item() == pytest.approx(sum(per_head) / 2, rel=1e-6)
    halving = DeepSupervisionLoss(base, weights="halving")(heads, target).item()
    assert halving == pytest.approx((2 * per_head[0] + per_head[1]) / 3, rel=1e-6)
    # One tensor (validation, or no deep supervision) is passed straight through.
    assert DeepSupervisionLoss(base)(heads[0], target).item() == pytest.approx(per_head[0], rel=1e-6)


def test_deep_supervision_loss_trains_unetplusplus():
    from pipeline.nets import UNetPlusPlus

    torch.manual_seed(0)
    net = UNetPlusPlus(2, 1, 1, features=(4, 8, 16), depth=2)
    image = torch.rand(2, 1, 16, 16)
    target = (image > 0.5).float()
    loss_fn = DeepSupervisionLoss(BCEDiceLoss())
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = loss_fn(net(image), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
