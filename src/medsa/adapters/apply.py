"""Install a method on a SAM model (:func:`apply_method`) and decide what trains
(:func:`configure_trainable`, the only place in medsa that sets ``requires_grad``)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from medsa.errors import ConfigError

from .config import (
    FullFTConfig,
    LoRAConfig,
    MASAMConfig,
    MedSAConfig,
    MethodConfig,
    ZeroShotConfig,
    parse_blocks,
)
from .masam import MASAMDecoder
from .modules import (
    Adapter,
    Adapter3D,
    AdapterModule,
    FacTQKV,
    FacTShared,
    HyPAdapter,
    LoRAQKV,
    SDTrans,
)

__all__ = [
    "METHOD_ATTR",
    "apply_method",
    "configure_trainable",
    "encoder_blocks",
    "get_method",
]

#: attribute of the model that records the applied method config
METHOD_ATTR = "medsa_method"

_HOOKS = ("pre_attn_adapter", "attn_adapter", "depth_branch", "pre_mlp_adapter", "mlp_adapter")


def get_method(model: nn.Module) -> MethodConfig | None:
    """The method config applied to ``model`` by :func:`apply_method`, or ``None``."""
    return getattr(model, METHOD_ATTR, None)


def encoder_blocks(model: nn.Module) -> list[nn.Module]:
    """Transformer blocks of the image encoder that expose adapter hooks, in forward order
    (all ViT blocks; TinyViT's attention blocks, its first convolutional stage has none)."""
    enc = getattr(model, "image_encoder", None)
    if enc is None:
        raise ConfigError("the model has no image_encoder: is it a medsa.sam.Sam?")
    return [m for m in enc.modules() if all(hasattr(m, h) for h in _HOOKS) and hasattr(m, "attn")]


def _decoder_blocks(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.mask_decoder.transformer.layers if hasattr(m, "token_adapter")]


def _block_dim(block: nn.Module) -> int:
    return int(block.attn.qkv.in_features)


def _qkv_heads(block: nn.Module) -> int | None:
    # TinyViT's attention packs qkv per head; SAM's ViT packs [q | k | v].
    attn = block.attn
    return int(attn.num_heads) if hasattr(attn, "key_dim") else None


def _selected(model: nn.Module, spec) -> list[nn.Module]:
    blocks = encoder_blocks(model)
    if not blocks:
        raise ConfigError("this image encoder has no transformer blocks with adapter hooks")
    return [blocks[i] for i in parse_blocks(spec, len(blocks))]


def _reference(model: nn.Module) -> torch.Tensor:
    for p in model.parameters():
        return p
    raise ConfigError("the model has no parameters")


def apply_method(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """Install ``cfg``'s modules on ``model``'s hooks (in place) and freeze the rest.

    New modules are created on the model's device and in its floating dtype (the meta device
    included, for instant parameter counting). Returns ``model``.
    """
    if get_method(model) is not None:
        raise ConfigError(
            f"a method ({get_method(model).method}) is already applied to this model; "
            "build a fresh backbone to apply another one"
        )
    ref = _reference(model)
    with torch.device(ref.device):
        if isinstance(cfg, MedSAConfig):
            _apply_medsa(model, cfg)
        elif isinstance(cfg, MASAMConfig):
            _apply_masam(model, cfg)
        elif isinstance(cfg, LoRAConfig):
            _apply_lora(model, cfg)
        elif not isinstance(cfg, (FullFTConfig, ZeroShotConfig)):
            raise ConfigError(f"not a method config: {cfg!r}")
    if ref.is_floating_point():
        for m in _adapter_modules(model):
            m.to(dtype=ref.dtype)
    setattr(model, METHOD_ATTR, cfg)  # plain attribute: not part of the state dict
    configure_trainable(model, cfg)
    return model


def _apply_medsa(model: nn.Module, cfg: MedSAConfig) -> None:
    for blk in _selected(model, cfg.blocks):
        c = _block_dim(blk)
        mid = cfg.mid_dim(c)
        if cfg.positions in ("main", "both"):
            blk.attn_adapter = Adapter(c, mid, cfg.activation, scale=1.0)
        if cfg.positions in ("mlp", "both"):
            blk.mlp_adapter = Adapter(c, mid, cfg.activation, scale=cfg.scale)
        if cfg.sd_trans:
            blk.depth_branch = SDTrans(
                c, cfg.sd_rank or mid, cfg.sd_fusion, cfg.activation, cfg.depth_residual
            )
    if not cfg.decoder_adapters:
        return
    dec = model.mask_decoder
    n_out = int(dec.num_mask_tokens) + 1  # IoU token + mask tokens precede the prompt tokens
    for blk in _decoder_blocks(model):
        c = int(blk.mlp.lin1.in_features)
        # >= 2: HyP-Adpt's LayerNorm over a width-1 embedding would always output 0
        mid = cfg.decoder_rank or max(2, min(cfg.mid_dim(c), c // 4))
        blk.token_adapter = HyPAdapter(
            c,
            mid,
            cfg.prompt_dim,
            cfg.prompt_conditioning,
            cfg.hyper_layers,
            n_out,
            cfg.activation,
            cfg.hyper_shapes,
        )
        blk.mlp_adapter = Adapter(c, mid, cfg.activation, scale=cfg.scale)
        blk.image_adapter = Adapter(c, mid, cfg.activation, scale=1.0)


def _apply_masam(model: nn.Module, cfg: MASAMConfig) -> None:
    shared: dict[int, FacTShared] = {}  # one U/V pair per token width (TinyViT has several)
    for blk in _selected(model, cfg.blocks):
        c = _block_dim(blk)
        if c not in shared:
            shared[c] = FacTShared(c, cfg.fact_rank)
        blk.attn.qkv_delta = FacTQKV(
            shared[c], cfg.fact_rank, cfg.fact_scale, cfg.fact_dropout, heads=_qkv_heads(blk)
        )
        if cfg.adapters_3d:
            blk.pre_attn_adapter = Adapter3D(c, cfg.adapter_dim, cfg.kernel_depth)
            blk.pre_mlp_adapter = Adapter3D(c, cfg.adapter_dim, cfg.kernel_depth)
    if cfg.num_classes is not None:
        model.masam_decoder = MASAMDecoder(
            model.mask_decoder, model.prompt_encoder, cfg.num_classes, cfg.decoder_channels
        )


def _apply_lora(model: nn.Module, cfg: LoRAConfig) -> None:
    for blk in _selected(model, cfg.blocks):
        blk.attn.qkv_delta = LoRAQKV(
            _block_dim(blk), cfg.rank, cfg.alpha, cfg.targets, heads=_qkv_heads(blk)
        )


def _adapter_modules(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if isinstance(m, AdapterModule))


def configure_trainable(model: nn.Module, cfg: MethodConfig) -> None:
    """Set ``requires_grad`` for the whole model according to ``cfg``; everything else is frozen.

    - Med-SA / MA-SAM / LoRA: every adapter module (and MA-SAM's multi-class head, including
      the SAM decoder parts it shares), plus ``mask_decoder`` / ``prompt_encoder`` when the
      config's ``train_mask_decoder`` / ``train_prompt_encoder`` say so.
    - Full fine-tuning: the components selected by its flags.
    - Zero-shot: nothing.
    """
    model.requires_grad_(False)
    if isinstance(cfg, ZeroShotConfig):
        return
    if isinstance(cfg, FullFTConfig):
        for name, flag in (
            ("image_encoder", cfg.train_image_encoder),
            ("prompt_encoder", cfg.train_prompt_encoder),
            ("mask_decoder", cfg.train_mask_decoder),
        ):
            if flag:
                getattr(model, name).requires_grad_(True)
        return
    # every adapting method's config (Med-SA, MA-SAM, LoRA) defines both flags
    if cfg.train_mask_decoder:
        model.mask_decoder.requires_grad_(True)
    if cfg.train_prompt_encoder:
        model.prompt_encoder.requires_grad_(True)
    for m in _adapter_modules(model):
        m.requires_grad_(True)
