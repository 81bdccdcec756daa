"""Helpers for tests/sam: seeded random weights and Meta reference models (the oracle)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

DATA_ROOT = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def tiny_tinyvit_config(**changes):
    """A 32 px TinyViT with LiteMedSAM's layout in miniature: four stages, merge strides
    (2, 2, 1) and a window of 3 that does not divide the 8x8 grid (exercises window padding)."""
    from medsa.sam.tiny_vit import TinyViTConfig

    fields = dict(
        img_size=32,
        embed_dims=(8, 16, 24, 32),
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 2, 2),
        window_sizes=(4, 4, 3, 4),
        merge_strides=(2, 2, 1),
        out_chans=32,
    )
    return TinyViTConfig(**{**fields, **changes})


def randomise_bn_stats(module: nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm running statistics (a fresh BN has mean 0 / var 1, which hides
    folding bugs)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))


def randomise(module: nn.Module, seed: int = 0) -> None:
    """Seeded random values in every parameter, scaled so that activations stay O(1).

    Zero-initialised tensors (rel-pos tables, absolute positions, biases) become non-zero too, which
    would otherwise hide bugs in the code paths that use them.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            owner_name, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            noise = torch.randn(p.shape, generator=g)
            if (
                isinstance(owner, nn.LayerNorm)
                or type(owner).__name__ == "LayerNorm2d"
                or isinstance(owner, nn.BatchNorm2d)
            ):
                p.copy_(1.0 + 0.2 * noise if leaf == "weight" else 0.2 * noise)
            elif leaf == "weight" and isinstance(owner, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
                fan_in = p[0].numel() if not isinstance(owner, nn.ConvTranspose2d) else p.shape[0]
                p.copy_(noise / fan_in**0.5)
            elif leaf == "bias":
                p.copy_(0.1 * noise)
            else:  # embeddings, rel-pos tables, absolute positions, attention biases
                p.copy_(noise * 0.5)


def meta_encoder(cfg) -> nn.Module:
    """segment_anything's ImageEncoderViT with the architecture of a medsa ViTConfig."""
    sm = pytest.importorskip("segment_anything.modeling")
    return sm.ImageEncoderViT(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        out_chans=cfg.out_chans,
        qkv_bias=cfg.qkv_bias,
        norm_layer=partial(nn.LayerNorm, eps=cfg.layer_norm_eps),
        use_abs_pos=cfg.use_abs_pos,
        use_rel_pos=cfg.use_rel_pos,
        window_size=cfg.window_size,
        global_attn_indexes=cfg.global_attn_indexes,
    )


def meta_sam(config) -> nn.Module:
    """segment_anything.modeling.Sam with the architecture described by a medsa SamConfig."""
    sm = pytest.importorskip("segment_anything.modeling")
    enc = config.encoder
    emb = enc.img_size // enc.patch_size
    return sm.Sam(
        image_encoder=meta_encoder(enc),
        prompt_encoder=sm.PromptEncoder(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(emb, emb),
            input_image_size=(enc.img_size, enc.img_size),
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=sm.MaskDecoder(
            num_multimask_outputs=config.num_multimask_outputs,
            transformer=sm.TwoWayTransformer(
                depth=config.decoder_depth,
                embedding_dim=config.prompt_embed_dim,
                mlp_dim=config.decoder_mlp_dim,
                num_heads=config.decoder_num_heads,
            ),
            transformer_dim=config.prompt_embed_dim,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        ),
    ).eval()
