"""Training losses: Dice + BCE (binary, prompt-driven Med-SA) and Dice + CE (multi-class, MA-SAM).

Both are thin, shape-checking wrappers around :class:`monai.losses.DiceCELoss`, the standard
implementation (soft Dice on sigmoid / softmax probabilities, smoothing ``1e-5`` in numerator and
denominator, plus ``BCEWithLogitsLoss`` / ``CrossEntropyLoss`` on the logits).

Empty targets: the soft Dice of an empty target with smoothing is ``1 - 1e-5 / (sum(p) + 1e-5)``,
i.e. about 1 with a vanishing gradient, so on slices without foreground the (B)CE term does the
work of pushing probabilities to 0; the loss stays finite. ``batch_dice=True`` pools the Dice
over the batch (nnU-Net style) which avoids the constant-1 term on empty slices.

Neither paper specifies weights; the defaults are ``lambda_dice = lambda_ce = 1``. MA-SAM's
released code weights Dice 0.8 / CE 0.2 (pass ``lambda_dice=0.8, lambda_ce=0.2``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from medsa.errors import ConfigError, DataError

__all__ = ["LossConfig", "DiceBCELoss", "DiceCELoss", "build_loss"]


@dataclass(frozen=True)
class LossConfig:
    """Loss selection.

    Attributes:
        name: ``"dice_bce"`` (binary masks from logits) or ``"dice_ce"`` (multi-class).
        lambda_dice: weight of the Dice term (>= 0).
        lambda_ce: weight of the (B)CE term (>= 0).
        batch_dice: pool Dice numerator / denominator over the batch before dividing.
        include_background: ``dice_ce`` only: include class 0 in the Dice term.
    """

    name: Literal["dice_bce", "dice_ce"] = "dice_bce"
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    batch_dice: bool = False
    include_background: bool = True

    def __post_init__(self) -> None:
        if self.name not in ("dice_bce", "dice_ce"):
            raise ConfigError(f"unknown loss {self.name!r}; choose 'dice_bce' or 'dice_ce'")
        if self.lambda_dice < 0 or self.lambda_ce < 0 or self.lambda_dice + self.lambda_ce == 0:
            raise ConfigError(
                f"loss weights must be >= 0 and not both 0, got dice={self.lambda_dice}, "
                f"ce={self.lambda_ce}"
            )


class DiceBCELoss(nn.Module):
    """``lambda_dice * SoftDice(sigmoid(logits), t) + lambda_ce * BCEWithLogits(logits, t)``.

    Args of ``forward``: ``logits`` ``(B, 1, H, W)`` / ``(B, H, W)`` (or with an extra depth
    axis), ``target`` of the same shape with values in ``{0, 1}`` (any dtype). Returns a scalar;
    the Dice term is computed per sample (or pooled, ``batch_dice``) and averaged.
    """

    def __init__(
        self, lambda_dice: float = 1.0, lambda_ce: float = 1.0, batch_dice: bool = False
    ) -> None:
        super().__init__()
        from monai.losses import DiceCELoss as _MonaiDiceCE

        LossConfig("dice_bce", lambda_dice, lambda_ce)  # validates the weights
        self.loss = _MonaiDiceCE(
            sigmoid=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce, batch=batch_dice
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise DataError(
                f"logits shape {tuple(logits.shape)} != target shape {tuple(target.shape)}"
            )
        if logits.ndim < 3:
            raise DataError(f"expected (B, H, W) or (B, 1, H, W) logits, got {tuple(logits.shape)}")
        if logits.ndim == 3 or logits.shape[1] != 1:
            # (B, H, W) or (B, D, H, W): add the channel axis MONAI expects
            logits, target = logits.unsqueeze(1), target.unsqueeze(1)
        return self.loss(logits, target.to(logits.dtype))


class DiceCELoss(nn.Module):
    """Multi-class ``lambda_dice * SoftDice(softmax) + lambda_ce * CrossEntropy``.

    Args of ``forward``: ``logits`` ``(B, C, H, W[, D])`` with ``C = num_classes`` (class 0 =
    background), ``target`` integer labels ``(B, H, W[, D])`` or ``(B, 1, H, W[, D])``.
    """

    def __init__(
        self,
        num_classes: int,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        batch_dice: bool = False,
        include_background: bool = True,
    ) -> None:
        super().__init__()
        from monai.losses import DiceCELoss as _MonaiDiceCE

        if num_classes < 2:
            raise ConfigError(
                f"dice_ce needs num_classes >= 2 (with background), got {num_classes}"
            )
        LossConfig("dice_ce", lambda_dice, lambda_ce)
        self.num_classes = num_classes
        self.loss = _MonaiDiceCE(
            softmax=True,
            to_onehot_y=True,
            include_background=include_background,
            lambda_dice=lambda_dice,
            lambda_ce=lambda_ce,
            batch=batch_dice,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.ndim < 4 or logits.shape[1] != self.num_classes:
            raise DataError(
                f"expected logits (B, {self.num_classes}, H, W[, D]), got {tuple(logits.shape)}"
            )
        if target.ndim == logits.ndim - 1:
            target = target.unsqueeze(1)
        if target.shape[0] != logits.shape[0] or target.shape[2:] != logits.shape[2:]:
            raise DataError(
                f"target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)}"
            )
        if target.is_floating_point() and not torch.equal(target, target.round()):
            raise DataError("multi-class targets must be integer labels")
        t = target.long()
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.num_classes):
            raise DataError(
                f"target labels must be in [0, {self.num_classes - 1}], "
                f"got [{int(t.min())}, {int(t.max())}]"
            )
        return self.loss(logits, t)


def build_loss(config: LossConfig | None = None, num_classes: int = 2) -> nn.Module:
    """Build the loss described by ``config`` (``num_classes`` is used by ``dice_ce``)."""
    cfg = config or LossConfig()
    if cfg.name == "dice_bce":
        return DiceBCELoss(cfg.lambda_dice, cfg.lambda_ce, cfg.batch_dice)
    return DiceCELoss(
        num_classes, cfg.lambda_dice, cfg.lambda_ce, cfg.batch_dice, cfg.include_background
    )
