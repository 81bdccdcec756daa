"""Tiny random models for the export tests (sam_helpers.randomise: non-trivial weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sam"))
from sam_helpers import randomise  # noqa: E402


def vit_tiny_sam():
    """``vit_tiny`` (128 px, longest-side resize) with seeded random weights."""
    from medsa.sam import build_sam

    torch.manual_seed(0)
    model = build_sam("vit_tiny")
    randomise(model, seed=1)
    return model.eval()


def tinyvit_sam():
    """A tiny LiteMedSAM-like model: TinyViT encoder (32 px), stretch resize, /255 scaling."""
    from medsa.sam.build import build_sam_from_config, get_config
    from medsa.sam.tiny_vit import TinyViTConfig

    cfg = get_config("lite_medsam")
    cfg.encoder = TinyViTConfig(
        img_size=32,
        embed_dims=(8, 16, 24, 32),
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 2, 2),
        window_sizes=(4, 4, 3, 4),
        merge_strides=(2, 2, 1),
        out_chans=32,
    )
    cfg.prompt_embed_dim, cfg.mask_in_chans, cfg.decoder_mlp_dim = 32, 8, 64
    cfg.decoder_num_heads, cfg.iou_head_hidden_dim = 2, 32
    torch.manual_seed(0)
    model = build_sam_from_config(cfg, name="tiny_tinyvit")
    randomise(model, seed=2)
    g = torch.Generator().manual_seed(3)
    for m in model.modules():  # non-trivial BN statistics: the folding must be exported right
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()
