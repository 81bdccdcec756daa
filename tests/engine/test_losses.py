"""Losses: values against a from-scratch formula, empty targets, gradients, shape errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medsa.engine.losses import DiceBCELoss, DiceCELoss, LossConfig, build_loss
from medsa.errors import ConfigError, DataError

EPS = 1e-5


def _soft_dice_loss(prob: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-channel soft Dice loss averaged: prob/onehot (B, C, ...)."""
    dims = tuple(range(2, prob.ndim))
    inter = (prob * onehot).sum(dims)
    denom = prob.sum(dims) + onehot.sum(dims)
    return (1 - (2 * inter + EPS) / (denom + EPS)).mean()


def test_dice_bce_matches_formula_and_accepts_both_layouts():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 16, 16, generator=g)
    target = (torch.rand(3, 1, 16, 16, generator=g) > 0.6).float()
    expected = 0.7 * _soft_dice_loss(torch.sigmoid(logits), target) + 0.3 * (
        F.binary_cross_entropy_with_logits(logits, target)
    )
    loss = DiceBCELoss(lambda_dice=0.7, lambda_ce=0.3)
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)
    # (B, H, W) layout and bool targets give the same value
    assert loss(logits[:, 0], target[:, 0].bool()).item() == pytest.approx(
        expected.item(), rel=1e-5
    )


def test_dice_bce_empty_target_is_finite_and_pushes_logits_down():
    logits = torch.zeros(2, 1, 8, 8, requires_grad=True)
    target = torch.zeros(2, 1, 8, 8)
    value = DiceBCELoss()(logits, target)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    assert (logits.grad > 0).all()  # gradient descent lowers the logits of an empty target
    # a confident correct prediction of an empty target costs less than an uncertain one
    assert DiceBCELoss(batch_dice=True)(torch.full((2, 8, 8), -30.0), target[:, 0]) < 1e-3


def test_dice_ce_matches_formula_and_handles_absent_classes():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 12, 12, generator=g, requires_grad=True)
    target = torch.randint(0, 3, (2, 12, 12), generator=g)  # class 3 absent everywhere
    onehot = F.one_hot(target, 4).permute(0, 3, 1, 2).float()
    expected = _soft_dice_loss(torch.softmax(logits, 1), onehot) + F.cross_entropy(logits, target)
    value = DiceCELoss(num_classes=4)(logits, target)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    value.backward()
    assert torch.isfinite(logits.grad).all()
    # (B, 1, H, W) targets and 3D volumes (B, C, H, W, D) work too
    assert DiceCELoss(4)(logits, target[:, None]).item() == pytest.approx(value.item(), rel=1e-6)
    vol = DiceCELoss(3)(torch.randn(1, 3, 6, 6, 4), torch.randint(0, 3, (1, 6, 6, 4)))
    assert torch.isfinite(vol)


def test_build_loss_and_errors():
    assert isinstance(build_loss(), DiceBCELoss)
    assert isinstance(build_loss(LossConfig("dice_ce"), num_classes=3), DiceCELoss)
    with pytest.raises(ConfigError):
        LossConfig("focal")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        LossConfig(lambda_dice=0, lambda_ce=0)
    with pytest.raises(ConfigError):
        DiceCELoss(num_classes=1)
    with pytest.raises(DataError, match="shape"):
        DiceBCELoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(DataError, match=r"\[0, 2\]"):
        DiceCELoss(3)(torch.zeros(1, 3, 4, 4), torch.full((1, 4, 4), 3))
    with pytest.raises(DataError, match="logits"):
        DiceCELoss(3)(torch.zeros(1, 2, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
