"""A "Med-SA reference-style" model for the training-speed comparison.

This mimics the *structure* of the public Med-SA code (written from its description, nothing is
copied): Meta's ``segment_anything`` SAM, unchanged fp32 encoder with its explicit attention
(full ``(N, N)`` logits + decomposed rel-pos), and in every ViT block

* a "space" adapter applied to the attention output with a skip connection
  (``a + adapter(a)``, inside the attention windows), and
* an adapter parallel to the MLP, scaled (``x + mlp(xn) + s * adapter(xn)``),

where an adapter is ``fc2(GELU(fc1(x)))`` with a bottleneck of ``mlp_ratio * C``. The encoder is
frozen except the adapters; the prompt encoder and mask decoder train fully (as the public code
does). Stock ``segment_anything``'s mask decoder handles one image with many prompts, so the
batch is decoded image by image. Everything runs in fp32 without gradient checkpointing.

medsa implements the paper instead (see ``medsa.adapters``); the benchmark compares the speed of
the two training steps, not their accuracy.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn


class RefAdapter(nn.Module):
    """``fc2(act(fc1(x)))`` (+ ``x`` with ``skip_connect``) on ``(..., C)`` tokens."""

    def __init__(self, dim: int, mlp_ratio: float = 0.25, skip_connect: bool = True) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.skip_connect = skip_connect

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self.fc2(self.act(self.fc1(x)))
        return x + xs if self.skip_connect else xs


class RefAdapterBlock(nn.Module):
    """A segment-anything ViT ``Block`` re-wired with the two Med-SA adapters (same weights)."""

    def __init__(self, block: nn.Module, mlp_ratio: float, scale: float) -> None:
        super().__init__()
        from segment_anything.modeling.image_encoder import window_partition, window_unpartition

        self._partition = window_partition
        self._unpartition = window_unpartition
        self.norm1, self.attn, self.norm2, self.mlp = (
            block.norm1,
            block.attn,
            block.norm2,
            block.mlp,
        )
        self.window_size = block.window_size
        dim = block.norm1.normalized_shape[0]
        self.Space_Adapter = RefAdapter(dim, mlp_ratio, skip_connect=True)
        self.MLP_Adapter = RefAdapter(dim, mlp_ratio, skip_connect=False)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = self._partition(x, self.window_size)
        x = self.Space_Adapter(self.attn(x))
        if self.window_size > 0:
            x = self._unpartition(x, self.window_size, pad_hw, (h, w))
        x = shortcut + x
        xn = self.norm2(x)
        return x + self.mlp(xn) + self.scale * self.MLP_Adapter(xn)


def reference_encoder(cfg) -> nn.Module:
    """Meta's ``segment_anything`` ImageEncoderViT with the same hyper-parameters as
    ``cfg`` (a medsa ``ViTConfig``)."""
    from segment_anything.modeling.image_encoder import ImageEncoderViT as SAEncoder

    return SAEncoder(
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


def reference_sam(sam_config) -> nn.Module:
    """Meta's ``Sam`` with the hyper-parameters of a medsa :class:`~medsa.sam.build.SamConfig`."""
    from segment_anything.modeling import (
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    enc = sam_config.encoder
    emb = enc.img_size // enc.patch_size
    return Sam(
        image_encoder=reference_encoder(enc),
        prompt_encoder=PromptEncoder(
            embed_dim=sam_config.prompt_embed_dim,
            image_embedding_size=(emb, emb),
            input_image_size=(enc.img_size, enc.img_size),
            mask_in_chans=sam_config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=sam_config.num_multimask_outputs,
            transformer=TwoWayTransformer(
                depth=sam_config.decoder_depth,
                embedding_dim=sam_config.prompt_embed_dim,
                mlp_dim=sam_config.decoder_mlp_dim,
                num_heads=sam_config.decoder_num_heads,
            ),
            transformer_dim=sam_config.prompt_embed_dim,
            iou_head_depth=sam_config.iou_head_depth,
            iou_head_hidden_dim=sam_config.iou_head_hidden_dim,
        ),
        pixel_mean=list(sam_config.pixel_mean),
        pixel_std=list(sam_config.pixel_std),
    )


def add_reference_adapters(sam: nn.Module, mlp_ratio: float = 0.25, scale: float = 0.5) -> None:
    """Wrap every encoder block with Med-SA reference-style adapters and set ``requires_grad``:
    encoder frozen except adapters, prompt encoder and mask decoder trainable."""
    enc = sam.image_encoder
    enc.requires_grad_(False)
    enc.blocks = nn.ModuleList(RefAdapterBlock(b, mlp_ratio, scale) for b in enc.blocks)
    for name, p in enc.named_parameters():
        p.requires_grad_("Adapter" in name)
    sam.prompt_encoder.requires_grad_(True)
    sam.mask_decoder.requires_grad_(True)


def reference_forward(sam: nn.Module, images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Low-res mask logits ``(B, 1, 4h, 4w)`` for normalised ``images (B, 3, S, S)`` and
    ``boxes (B, 4)`` (input frame), one decoder call per image as stock segment-anything needs."""
    emb = sam.image_encoder(images)
    pe = sam.prompt_encoder.get_dense_pe()
    out = []
    for i in range(images.shape[0]):
        sparse, dense = sam.prompt_encoder(points=None, boxes=boxes[i : i + 1], masks=None)
        low_res, _ = sam.mask_decoder(
            image_embeddings=emb[i : i + 1],
            image_pe=pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        out.append(low_res)
    return torch.cat(out, dim=0)
