"""Tiny random models for the export tests (sam_helpers.randomise: non-trivial weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sam"))
from sam_helpers import randomise, randomise_bn_stats, tiny_tinyvit_config  # noqa: E402


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

    cfg = get_config("lite_medsam")
    cfg.encoder = tiny_tinyvit_config()
    cfg.prompt_embed_dim, cfg.mask_in_chans, cfg.decoder_mlp_dim = 32, 8, 64
    cfg.decoder_num_heads, cfg.iou_head_hidden_dim = 2, 32
    torch.manual_seed(0)
    model = build_sam_from_config(cfg, name="tiny_tinyvit")
    randomise(model, seed=2)
    randomise_bn_stats(model, seed=3)  # the folding must be exported right
    return model.eval()
