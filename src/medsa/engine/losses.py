"""Training losses: Dice + BCE, SAM's focal + Dice (binary, prompt-driven Med-SA) and Dice + CE
(multi-class, MA-SAM).

``dice_bce`` / ``dice_ce`` are thin, shape-checking wrappers around
:class:`monai.losses.DiceCELoss` (soft Dice on sigmoid / softmax probabilities, smoothing ``1e-5``
in numerator and denominator, plus ``BCEWithLogitsLoss`` / ``CrossEntropyLoss`` on the logits).

``focal_dice`` is SAM's mask loss, which the Med-SA paper adopts ("for 2D medical image
training, we adhere to the SAM's default training settings", Sec. 4.2): a linear combination of
focal loss and Dice loss in a **20 : 1** ratio (SAM, Kirillov et al. 2023, Sec. 3 / App. A; the
losses as in DETR). SAM does not state the focal ``alpha`` / ``gamma``; medsa uses DETR's and
torchvision's ``sigmoid_focal_loss`` defaults ``alpha = 0.25``, ``gamma = 2`` and DETR's Dice
smoothing of 1. Per mask ``i`` of ``P`` pixels, ``p = sigmoid(logit)``::

    focal_i = mean_px[ a_t * (1 - p_t)^gamma * BCE(logit, t) ],  p_t = p t + (1-p)(1-t),
              a_t = alpha t + (1 - alpha)(1 - t)
    dice_i  = 1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)
    loss    = lambda_ce * mean_i(focal_i) + lambda_dice * mean_i(dice_i)   (SAM: 20, 1)

SAM's third term, the MSE between the IoU head's prediction and each mask's actual IoU (weight
1), needs the decoder's IoU output and is added by the trainer (``loss.iou_weight``,
:meth:`medsa.engine.train.Trainer._forward_loss`).

Empty targets: the soft Dice of an empty target with smoothing is ``1 - s / (sum(p) + s)``,
about 1 with a vanishing gradient for ``s = 1e-5``, so on slices without foreground the
(B)CE / focal term does the work of pushing probabilities to 0; the loss stays finite.
``batch_dice=True`` pools the Dice over the batch (nnU-Net style) which avoids the constant-1
term on empty slices.

Weights: the Med-SA paper fixes the loss only through "SAM's default training settings"
(``focal_dice``, 20 : 1, plus the IoU MSE); ``packaged config medsa_paper_2d`` uses that. The
other packaged configs default to ``dice_bce`` 1 : 1 (a choice for short CPU runs, see
docs/paper-vs-reference.md). MA-SAM's released code weights Dice 0.8 / CE 0.2 (pass
``lambda_dice=0.8, lambda_ce=0.2``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from medsa.errors import ConfigError, DataError

__all__ = ["LossConfig", "DiceBCELoss", "DiceCELoss", "FocalDiceLoss", "build_loss"]


@dataclass(frozen=True)
class LossConfig:
    """Loss selection.

    Attributes:
        name: ``"dice_bce"`` (binary masks from logits), ``"focal_dice"`` (SAM's binary mask
            loss) or ``"dice_ce"`` (multi-class).
        lambda_dice: weight of the Dice term (>= 0).
        lambda_ce: weight of the (B)CE term, or of the focal term for ``focal_dice`` (>= 0).
        batch_dice: pool Dice numerator / denominator over the batch before dividing.
        include_background: ``dice_ce`` only: include class 0 in the Dice term.
        focal_alpha: ``focal_dice`` only: positive-class weight (< 0: no weighting).
        focal_gamma: ``focal_dice`` only: focusing exponent (>= 0).
    """

    name: Literal["dice_bce", "dice_ce", "focal_dice"] = "dice_bce"
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    batch_dice: bool = False
    include_background: bool = True
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0

    def __post_init__(self) -> None:
        if self.name not in ("dice_bce", "dice_ce", "focal_dice"):
            raise ConfigError(
                f"unknown loss {self.name!r}; choose 'dice_bce', 'focal_dice' or 'dice_ce'"
            )
        if self.focal_alpha > 1 or self.focal_gamma < 0:
            raise ConfigError(
                f"focal_alpha must be <= 1 (< 0: off) and focal_gamma >= 0; got "
                f"{self.focal_alpha}, {self.focal_gamma}"
            )
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
        _binary_shapes(logits, target)
        if logits.ndim == 3 or logits.shape[1] != 1:
            # (B, H, W) or (B, D, H, W): add the channel axis MONAI expects
            logits, target = logits.unsqueeze(1), target.unsqueeze(1)
        return self.loss(logits, target.to(logits.dtype))


def _binary_shapes(logits: torch.Tensor, target: torch.Tensor) -> None:
    if logits.shape != target.shape:
        raise DataError(f"logits shape {tuple(logits.shape)} != target shape {tuple(target.shape)}")
    if logits.ndim < 3:
        raise DataError(f"expected (B, H, W) or (B, 1, H, W) logits, got {tuple(logits.shape)}")


class FocalDiceLoss(nn.Module):
    """SAM's mask loss ``lambda_focal * focal + lambda_dice * dice`` (SAM: 20 : 1), see the
    module docstring for the formulas.

    Args of ``forward``: ``logits`` ``(B, 1, H, W)`` / ``(B, H, W)`` (or with a depth axis) and a
    ``target`` of the same shape in ``{0, 1}``. Each sample is one mask: both terms are computed
    per sample and averaged over the batch (``batch_dice`` pools the Dice over the batch).
    """

    def __init__(
        self,
        lambda_dice: float = 1.0,
        lambda_focal: float = 20.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
        batch_dice: bool = False,
        smooth: float = 1.0,
    ) -> None:
        super().__init__()
        LossConfig("focal_dice", lambda_dice, lambda_focal, focal_alpha=alpha, focal_gamma=gamma)
        self.lambda_dice, self.lambda_focal = float(lambda_dice), float(lambda_focal)
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.batch_dice, self.smooth = bool(batch_dice), float(smooth)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        _binary_shapes(logits, target)
        x = logits.flatten(1).float()  # (B, P)
        t = target.flatten(1).to(x.dtype)
        p = torch.sigmoid(x)
        ce = F.binary_cross_entropy_with_logits(x, t, reduction="none")
        p_t = p * t + (1 - p) * (1 - t)
        focal = ce * (1 - p_t) ** self.gamma
        if self.alpha >= 0:
            focal = (self.alpha * t + (1 - self.alpha) * (1 - t)) * focal
        focal = focal.mean(1).mean()
        if self.batch_dice:
            inter, total = (p * t).sum(), p.sum() + t.sum()
        else:
            inter, total = (p * t).sum(1), p.sum(1) + t.sum(1)
        dice = (1 - (2 * inter + self.smooth) / (total + self.smooth)).mean()
        return self.lambda_focal * focal + self.lambda_dice * dice


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
    if cfg.name == "focal_dice":
        return FocalDiceLoss(
            cfg.lambda_dice, cfg.lambda_ce, cfg.focal_alpha, cfg.focal_gamma, cfg.batch_dice
        )
    return DiceCELoss(
        num_classes, cfg.lambda_dice, cfg.lambda_ce, cfg.batch_dice, cfg.include_background
    )
