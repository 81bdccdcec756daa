"""The paper's training recipe: SAM's focal + Dice loss against a hand-computed value, the
packaged ``medsa_paper_2d`` config, prompt protocols refused for training, evaluation grid."""

from __future__ import annotations

import math

import pytest
import torch

from medsa.engine.config import load_config
from medsa.engine.losses import FocalDiceLoss, LossConfig, build_loss
from medsa.errors import ConfigError, DataError

LN2, LN4 = math.log(2.0), math.log(4.0)


def _hand_values() -> tuple[float, float, float, float]:
    """Focal (alpha 0.25, gamma 2) and Dice (smooth 1) of two 2-pixel masks, worked by hand.

    Mask 1: logits (0, ln 3) -> p = (0.5, 0.75), target (1, 0).
      px 1: BCE = ln 2, p_t = 0.5, (1-p_t)^2 = 0.25, a_t = 0.25  -> 0.0625 ln 2
      px 2: BCE = ln 4, p_t = 0.25, (1-p_t)^2 = 0.5625, a_t = 0.75 -> 0.421875 ln 4
      Dice: 1 - (2*0.5 + 1) / (1.25 + 1 + 1) = 1 - 2/3.25
    Mask 2: logits (0, 0) -> p = (0.5, 0.5), target (0, 0).
      each px: BCE = ln 2, (1-p_t)^2 = 0.25, a_t = 0.75 -> 0.1875 ln 2
      Dice: 1 - (0 + 1) / (1 + 0 + 1) = 0.5
    """
    f1 = (0.0625 * LN2 + 0.421875 * LN4) / 2
    f2 = 0.1875 * LN2
    return f1, f2, 1 - 2 / 3.25, 0.5


def test_focal_dice_matches_hand_computed_sam_loss():
    f1, f2, d1, d2 = _hand_values()
    logits = torch.tensor([[[[0.0, math.log(3.0)]]], [[[0.0, 0.0]]]])  # (2, 1, 1, 2)
    target = torch.tensor([[[[1.0, 0.0]]], [[[0.0, 0.0]]]])
    loss = build_loss(LossConfig("focal_dice", lambda_dice=1.0, lambda_ce=20.0))
    assert isinstance(loss, FocalDiceLoss)
    expected = 20 * (f1 + f2) / 2 + (d1 + d2) / 2
    assert float(loss(logits, target)) == pytest.approx(expected, rel=1e-6)
    # one mask alone, and the weights really are focal 20 : dice 1
    assert float(loss(logits[:1], target[:1])) == pytest.approx(20 * f1 + d1, rel=1e-6)
    only_focal = FocalDiceLoss(lambda_dice=0.0, lambda_focal=1.0)
    assert float(only_focal(logits, target)) == pytest.approx((f1 + f2) / 2, rel=1e-6)


def test_focal_dice_gradients_and_errors():
    logits = torch.zeros(2, 1, 4, 4, requires_grad=True)
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2] = 1
    FocalDiceLoss()(logits, target).backward()
    assert logits.grad[0, 0, 0, 0] < 0 < logits.grad[0, 0, 3, 3]  # up on fg, down on bg
    with pytest.raises(DataError):
        FocalDiceLoss()(logits, target[:, :, :2])
    with pytest.raises(ConfigError):
        LossConfig("focal", 1.0, 20.0)
    with pytest.raises(ConfigError):
        LossConfig("focal_dice", 1.0, 20.0, focal_gamma=-1.0)


def test_paper_2d_config_is_the_papers_recipe():
    cfg = load_config("medsa_paper_2d")
    assert cfg.model.backbone == "vit_h"
    assert cfg.train.epochs == 40
    m = cfg.method_config()
    assert (m.rank, m.scale, m.positions, m.blocks) == (64, 0.05, "both", "all")
    assert (m.prompt_conditioning, m.hyper_layers, m.hyper_shapes) == ("hyper", 3, "paper")
    assert not m.train_mask_decoder  # the paper keeps SAM frozen
    assert cfg.loss.name == "focal_dice"
    assert (cfg.loss.lambda_ce, cfg.loss.lambda_dice, cfg.loss.iou_weight) == (20.0, 1.0, 1.0)
    assert cfg.prompts.clicks > 0 and cfg.prompts.mask_input
    assert set(cfg.prompts.protocols) == {"1pt", "3pt", "bbox0.5", "bbox0.75"}
    assert cfg.optim.lr == 8e-4 and cfg.optim.weight_decay == 0.1  # SAM's AdamW settings


def test_lite_medsam_cpu_defaults_stay_separate():
    cfg = load_config("lite_medsam_medsa_2d")
    assert cfg.model.backbone == "lite_medsam" and cfg.loss.name in ("auto", "dice_bce")


@pytest.mark.parametrize(
    "override",
    [
        "prompts.protocols={everything: 1.0}",
        "prompts.protocols={1pt: 0.5, everything: 0.5}",
        "prompts.val_protocol=everything",
    ],
)
def test_everything_is_refused_for_training(override):
    with pytest.raises(ConfigError, match="evaluation mode"):
        load_config(None, [override])


def test_evaluation_everything_grid_is_sams_default_32():
    from medsa.engine.evaluate import EvalConfig
    from medsa.sam.automatic import AutomaticMaskConfig

    assert EvalConfig().everything["points_per_side"] == 32
    assert AutomaticMaskConfig().points_per_side == 32


def test_trainer_uses_focal_dice_with_the_iou_head(tmp_path):
    """``loss.name: focal_dice`` reaches the trainer: the loss of a fixed batch equals
    20 * focal + dice of the supervised mask + the IoU-head MSE (iou_weight 1)."""
    import numpy as np

    from medsa.engine.config import config_from_dict
    from medsa.engine.train import Trainer, build_model

    size = 64
    img = torch.full((2, 3, size, size), 30.0)
    tgt = torch.zeros(2, size, size)
    img[:, :, 10:40, 12:44] = 210.0
    tgt[:, 10:40, 12:44] = 1
    data = [{"image": img[i], "target": tgt[i]} for i in range(2)]
    cfg = config_from_dict(
        {
            "model": {"backbone": "vit_tiny", "options": {"img_size": size}},
            "method": {"method": "medsa", "rank": 4},
            "prompts": {"protocols": {"box": 1.0}},
            "loss": {"name": "focal_dice", "lambda_ce": 20.0, "lambda_dice": 1.0},
            "train": {"device": "cpu", "out_dir": str(tmp_path)},
            "logging": {"progress": False, "tensorboard": False},
        }
    )
    torch.manual_seed(0)
    tr = Trainer(cfg, data, None, model=build_model(cfg))
    assert isinstance(tr.loss_fn, FocalDiceLoss)
    batch = {"image": img, "target": tgt}
    with torch.no_grad():
        total = float(tr._forward_loss(batch, np.random.default_rng(0)))
        from medsa.engine.train import sample_prompts

        prompts = sample_prompts(tgt.numpy() > 0.5, "box", np.random.default_rng(0))
        logits, iou = tr.step_module(img, tgt.numpy() > 0.5, prompts, 0, None, None)
    mask = FocalDiceLoss()(logits, tgt[:, None])
    p = logits > 0
    t = tgt[:, None] > 0.5
    true_iou = (p & t).flatten(1).sum(1).float() / (p | t).flatten(1).sum(1).clamp_min(1)
    expected = float(mask) + float(((iou[:, 0] - true_iou) ** 2).mean())
    assert total == pytest.approx(expected, rel=1e-4)
