"""SAM ViT image encoder (ViTDet-style: windowed + global attention, decomposed relative positions).

Module and parameter names match Meta's ``segment_anything.modeling.image_encoder`` exactly, so the
official ``sam_vit_{b,l,h}`` checkpoints load with strict key checking.

Adapter hook points (see ``docs/architecture.md``) are plain attributes that default to ``None``.
A ``None`` hook is skipped (no compute, no state-dict keys); an assigned ``nn.Module`` hook is
registered as a sub-module, so its parameters appear under e.g. ``blocks.3.attn_adapter.*``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .common import LayerNorm2d, MLPBlock
from .fast_attention import (
    ATTENTION_IMPLS,
    get_rel_pos,
    rel_pos_attention,
)
from .prefix_cache import PrefixCache, prefix_is_frozen

__all__ = [
    "VIT_PRESETS",
    "Attention",
    "Block",
    "ImageEncoderViT",
    "PatchEmbed",
    "ViTConfig",
    "get_rel_pos",
    "window_partition",
    "window_unpartition",
]


@dataclass
class ViTConfig:
    """Hyper-parameters of :class:`ImageEncoderViT` (defaults: SAM ViT-B)."""

    img_size: int = 1024
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_chans: int = 256
    qkv_bias: bool = True
    use_abs_pos: bool = True
    use_rel_pos: bool = True
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    layer_norm_eps: float = 1e-6
    # "auto" (per call: see fast_attention.default_attention_impl), "sdpa_folded" (rel-pos bias
    # folded into q/k, fused SDPA kernels), "sdpa_bias" (bias as attn_mask, block-wise),
    # "explicit" (segment-anything's math) or "flex" (FlexAttention); see medsa.sam.fast_attention.
    attention_impl: str = "auto"

    @property
    def embedding_size(self) -> int:
        """Side length of the output embedding grid, ``img_size // patch_size``."""
        return self.img_size // self.patch_size


VIT_PRESETS: dict[str, ViTConfig] = {
    "vit_b": ViTConfig(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "vit_l": ViTConfig(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "vit_h": ViTConfig(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    # Test-sized encoder: 128 px input -> 8x8 tokens, two windowed (4x4, padded at the edge when the
    # grid is not a multiple) and one global block, so every code path of the big models is exercised.
    "vit_tiny": ViTConfig(
        img_size=128,
        patch_size=16,
        embed_dim=32,
        depth=3,
        num_heads=2,
        out_chans=32,
        window_size=3,
        global_attn_indexes=(1,),
    ),
}


# --------------------------------------------------------------------------------------------
# Window partition and relative positions
# --------------------------------------------------------------------------------------------


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Split ``(B, H, W, C)`` tokens into non-overlapping windows, zero-padding the bottom/right.

    Returns windows ``(B * nW, window_size, window_size, C)`` and the padded size ``(Hp, Wp)``.
    """
    b, h, w, c = x.shape
    pad_h = (window_size - h % window_size) % window_size
    pad_w = (window_size - w % window_size) % window_size
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window_size, window_size, wp // window_size, window_size, c)
    windows = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, c)
    return windows, (hp, wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, pad_hw: tuple[int, int], hw: tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nW, ws, ws, C) -> (B, H, W, C)``, padding removed."""
    hp, wp = pad_hw
    h, w = hw
    b = windows.shape[0] // (hp * wp // window_size // window_size)
    x = windows.view(b, hp // window_size, wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(b, hp, wp, -1)
    if hp > h or wp > w:
        x = x[:, :h, :w, :].contiguous()
    return x


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection ``(B, C_in, H, W) -> (B, H/p, W/p, C)``."""

    def __init__(
        self,
        kernel_size: tuple[int, int] = (16, 16),
        stride: tuple[int, int] = (16, 16),
        padding: tuple[int, int] = (0, 0),
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.proj = nn.Conv2d(
            in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=padding
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class Attention(nn.Module):
    """Multi-head self-attention over a ``(B, H, W, C)`` token grid with decomposed rel-pos bias.

    Hooks (``None`` by default; both receive and return ``(B, H, W, ·)`` tensors):

    - ``qkv_delta(x) -> (B, H, W, 3C)``: added to ``qkv(x)`` (LoRA / FacT on the qkv projection).
    - ``proj_delta(o) -> (B, H, W, C)``: added to ``proj(o)`` where ``o`` is the attention output
      *before* the output projection, i.e. the same input the frozen ``proj`` sees.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        input_size: tuple[int, int] | None = None,
        attention_impl: str = "auto",
    ) -> None:
        super().__init__()
        if attention_impl not in ATTENTION_IMPLS:
            raise ConfigError(
                f"attention_impl must be one of {ATTENTION_IMPLS}, got {attention_impl!r}"
            )
        # Plain attribute so it can be switched on a built model (medsa.engine.perf.set_attention_impl).
        self.attention_impl = attention_impl
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required when use_rel_pos=True")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, self.head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, self.head_dim))
        self.qkv_delta: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.proj_delta: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, use_rel_pos: bool = True) -> torch.Tensor:
        """``(B, H, W, C) -> (B, H, W, C)``.

        ``use_rel_pos=False`` skips the 2D relative-position bias, so the same weights can attend
        along other axes (the SD-Trans depth branch feeds a ``(B*H*W, 1, D, C)`` grid of slices).
        """
        b, h, w, c = x.shape
        qkv = self.qkv(x)
        if self.qkv_delta is not None:
            qkv = qkv + self.qkv_delta(x)
        # (3, B, nH, HW, hd)
        q, k, v = qkv.reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if use_rel_pos and self.use_rel_pos:
            out = rel_pos_attention(
                q,
                k,
                v,
                self.scale,
                self.rel_pos_h,
                self.rel_pos_w,
                (h, w),
                (h, w),
                impl=self.attention_impl,
            )
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, h, w, c)
        y = self.proj(out)
        if self.proj_delta is not None:
            y = y + self.proj_delta(out)
        return y


class Block(nn.Module):
    """ViT block with optional window attention, ``(B, H, W, C) -> (B, H, W, C)``.

    Hooks (all ``None`` by default; ``x``/``a``/``xn`` are ``(B, H, W, C)``)::

        x = x + pre_attn_adapter(x, depth)        # MA-SAM 3D adapter #1
        shortcut = x
        xn = norm1(x)
        a = attn(window_partition(xn)) -> window_unpartition
        a = a + attn_adapter(a)                   # Med-SA adapter after MHSA
        a = depth_branch(a, xn, block, depth)     # SD-Trans: returns the FUSED attention output
        x = shortcut + a
        x = x + pre_mlp_adapter(x, depth)         # MA-SAM 3D adapter #2
        xn = norm2(x)
        x = x + mlp(xn) + mlp_adapter(xn)         # Med-SA adapter parallel to the MLP

    ``depth`` is the number of slices per volume when the batch holds ``B = n_volumes * depth``
    contiguous slices, else ``None``. ``depth_branch`` gets the block itself so it can re-use
    ``block.attn`` (with ``use_rel_pos=False``) over the depth axis.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: type[nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
        attention_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            input_size=input_size if window_size == 0 else (window_size, window_size),
            attention_impl=attention_impl,
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size

        self.pre_attn_adapter: Callable[[torch.Tensor, int | None], torch.Tensor] | None = None
        self.attn_adapter: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.depth_branch: (
            Callable[[torch.Tensor, torch.Tensor, Block, int | None], torch.Tensor] | None
        ) = None
        self.pre_mlp_adapter: Callable[[torch.Tensor, int | None], torch.Tensor] | None = None
        self.mlp_adapter: Callable[[torch.Tensor], torch.Tensor] | None = None

    def attend(self, xn: torch.Tensor) -> torch.Tensor:
        """Windowed (or global) attention of normalised tokens ``(B, H, W, C) -> (B, H, W, C)``."""
        if self.window_size > 0:
            h, w = xn.shape[1], xn.shape[2]
            windows, pad_hw = window_partition(xn, self.window_size)
            return window_unpartition(self.attn(windows), self.window_size, pad_hw, (h, w))
        return self.attn(xn)

    def forward(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        if self.pre_attn_adapter is not None:
            x = x + self.pre_attn_adapter(x, depth)
        shortcut = x
        xn = self.norm1(x)
        a = self.attend(xn)
        if self.attn_adapter is not None:
            a = a + self.attn_adapter(a)
        if self.depth_branch is not None:
            a = self.depth_branch(a, xn, self, depth)
        x = shortcut + a
        if self.pre_mlp_adapter is not None:
            x = x + self.pre_mlp_adapter(x, depth)
        xn = self.norm2(x)
        m = self.mlp(xn)
        if self.mlp_adapter is not None:
            m = m + self.mlp_adapter(xn)
        return x + m


class ImageEncoderViT(nn.Module):
    """SAM image encoder: ``(B, 3, S, S)`` normalised, padded images -> ``(B, out_chans, S/p, S/p)``.

    Inputs of another size than ``config.img_size`` are accepted (absolute positions are resized
    bicubically, relative-position tables linearly); official weights are only trained at 1024.
    Set ``grad_checkpointing = True`` to recompute block activations in the backward pass, and
    ``prefix_cache`` to a :class:`~medsa.sam.prefix_cache.PrefixCache` to reuse the frozen
    blocks' output per image.
    """

    def __init__(self, config: ViTConfig | None = None) -> None:
        super().__init__()
        cfg = config or ViTConfig()
        self.config = cfg
        self.img_size = cfg.img_size
        self.patch_size = cfg.patch_size
        self.grad_checkpointing = False
        self.prefix_cache: PrefixCache | None = None
        grid = cfg.img_size // cfg.patch_size

        self.patch_embed = PatchEmbed(
            kernel_size=(cfg.patch_size, cfg.patch_size),
            stride=(cfg.patch_size, cfg.patch_size),
            in_chans=cfg.in_chans,
            embed_dim=cfg.embed_dim,
        )
        self.pos_embed: nn.Parameter | None = None
        if cfg.use_abs_pos:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, cfg.embed_dim))

        def norm_layer(d: int) -> nn.Module:
            return nn.LayerNorm(d, eps=cfg.layer_norm_eps)

        self.blocks = nn.ModuleList(
            Block(
                dim=cfg.embed_dim,
                num_heads=cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                norm_layer=norm_layer,
                use_rel_pos=cfg.use_rel_pos,
                window_size=0 if i in cfg.global_attn_indexes else cfg.window_size,
                input_size=(grid, grid),
                attention_impl=cfg.attention_impl,
            )
            for i in range(cfg.depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.embed_dim, cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )

    @property
    def embedding_size(self) -> int:
        """Side length of the output embedding for ``img_size`` inputs."""
        return self.img_size // self.patch_size

    @property
    def out_chans(self) -> int:
        return self.config.out_chans

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        assert self.pos_embed is not None
        if self.pos_embed.shape[1:3] == (h, w):
            return self.pos_embed
        pe = F.interpolate(
            self.pos_embed.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False
        )
        return pe.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Encode ``x: (B, 3, S, S)``; ``depth`` (slices per volume) is passed to every block."""
        cache = self.prefix_cache
        k = cache.start_block if cache is not None else 0
        if cache is not None and 0 < k <= len(self.blocks) and not x.requires_grad:
            mods = [self.patch_embed, *self.blocks[:k]]
            extra = [self.pos_embed] if self.pos_embed is not None else []
            if prefix_is_frozen(mods, extra):
                h = cache.features(x, mods, lambda im: self._blocks(self._embed(im), 0, k), extra)
                return self.neck(self._blocks(h, k, len(self.blocks), depth).permute(0, 3, 1, 2))
        x = self._blocks(self._embed(x), 0, len(self.blocks), depth)
        return self.neck(x.permute(0, 3, 1, 2))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, S, S)`` -> ``(B, S/p, S/p, C)`` tokens with absolute positions."""
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self._pos_embed(x.shape[1], x.shape[2])
        return x

    def _blocks(
        self, x: torch.Tensor, start: int, stop: int, depth: int | None = None
    ) -> torch.Tensor:
        """Blocks ``start .. stop-1`` on ``(B, H, W, C)`` tokens."""
        for blk in self.blocks[start:stop]:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, depth, use_reentrant=False)
            else:
                x = blk(x, depth)
        return x
