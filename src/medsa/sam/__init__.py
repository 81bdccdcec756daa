"""medsa.sam: SAM backbones (ViT-B/L/H, TinyViT for LiteMedSAM), prompt encoder, mask decoder,
strict checkpoint loading (:func:`build_sam`), :class:`SamPredictor` and automatic mask generation.

Public names are resolved lazily so that ``import medsa.sam`` stays cheap until one is used.
"""

from __future__ import annotations

from medsa._lazy import lazy_exports

_EXPORTS = {
    "ViTConfig": "image_encoder",
    "ImageEncoderViT": "image_encoder",
    "TinyViT": "tiny_vit",
    "TinyViTConfig": "tiny_vit",
    "PromptEncoder": "prompt_encoder",
    "MaskDecoder": "mask_decoder",
    "TwoWayTransformer": "transformer",
    "Sam": "sam",
    "SamConfig": "build",
    "build_sam": "build",
    "build_sam_from_config": "build",
    "load_checkpoint": "build",
    "get_config": "build",
    "MODEL_NAMES": "build",
    "SamPredictor": "predictor",
    "ResizeLongestSide": "transforms",
    "ResizeStretch": "transforms",
    "AutomaticMaskGenerator": "automatic",
    "AutomaticMaskConfig": "automatic",
}

__all__ = sorted(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
