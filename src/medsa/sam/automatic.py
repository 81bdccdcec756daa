""" "Segment everything": prompt SAM with a regular point grid and keep the good, distinct masks.

Follows segment-anything's ``SamAutomaticMaskGenerator`` for a single crop (no multi-crop
zoom-in, no small-region clean-up, binary masks only): every grid point yields up to 3 masks;
masks are kept when the predicted IoU exceeds ``pred_iou_thresh`` and the stability score
(IoU of the mask thresholded at ``+offset`` and ``-offset``) reaches ``stability_score_thresh``;
duplicates are removed by box non-maximum suppression. Note that LiteMedSAM was trained with box
prompts only, so point-grid masks from it are of limited use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from medsa.errors import ConfigError

from .predictor import SamPredictor
from .sam import Sam

__all__ = [
    "AutomaticMaskConfig",
    "AutomaticMaskGenerator",
    "batched_nms",
    "build_point_grid",
    "masks_to_boxes",
    "stability_score",
]


@dataclass
class AutomaticMaskConfig:
    """Settings of :class:`AutomaticMaskGenerator` (defaults as segment-anything).

    A ``pred_iou_thresh`` or ``stability_score_thresh`` <= 0 disables that filter.
    """

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    multimask_output: bool = True

    def validate(self) -> None:
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise ConfigError("points_per_side and points_per_batch must be >= 1")
        if not 0.0 <= self.box_nms_thresh <= 1.0:
            raise ConfigError(f"box_nms_thresh must be in [0, 1], got {self.box_nms_thresh}")


def build_point_grid(n_per_side: int) -> np.ndarray:
    """``(n*n, 2)`` ``(x, y)`` points at the centres of an ``n x n`` grid over ``[0, 1]^2``."""
    offset = 1 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs = np.tile(side[None, :], (n_per_side, 1))
    ys = np.tile(side[:, None], (1, n_per_side))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def stability_score(logits: torch.Tensor, threshold: float, offset: float) -> torch.Tensor:
    """IoU of ``logits > threshold + offset`` and ``logits > threshold - offset``, ``(N, H, W) -> (N,)``.

    The first mask is contained in the second, so the IoU is a ratio of pixel counts.
    """
    inter = (logits > threshold + offset).flatten(1).sum(-1, dtype=torch.int32)
    union = (logits > threshold - offset).flatten(1).sum(-1, dtype=torch.int32)
    return inter / union


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight ``(x0, y0, x1, y1)`` boxes (inclusive pixel indices) of ``(N, H, W)`` bool masks.

    Empty masks get ``[0, 0, 0, 0]``.
    """
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros(0, 4, device=masks.device)
    rows = masks.any(dim=2)  # (N, H)
    cols = masks.any(dim=1)  # (N, W)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y1 = (rows * ar_h).amax(dim=1)
    y0 = torch.where(rows, ar_h, h).amin(dim=1)
    x1 = (cols * ar_w).amax(dim=1)
    x0 = torch.where(cols, ar_w, w).amin(dim=1)
    boxes = torch.stack([x0, y0, x1, y1], dim=1)
    empty = ~rows.any(dim=1)
    return boxes.masked_fill(empty[:, None], 0)


def _box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_a[:, None] + area_b[None, :] - inter)


def batched_nms(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    """Indices kept by per-category NMS, sorted by decreasing score.

    Uses ``torchvision.ops.batched_nms`` when torchvision is installed, else an equivalent greedy
    implementation in plain torch (O(N^2) memory; fine for the few thousand boxes of one image).
    """
    try:
        from torchvision.ops import batched_nms as tv_batched_nms
    except ImportError:
        return _batched_nms_torch(boxes, scores, idxs, iou_threshold)
    return tv_batched_nms(boxes.float(), scores.float(), idxs, iou_threshold)


def _batched_nms_torch(
    boxes: torch.Tensor, scores: torch.Tensor, idxs: torch.Tensor, iou_threshold: float
) -> torch.Tensor:
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    boxes = boxes.float()
    # Offset boxes per category so that boxes of different categories never overlap.
    offsets = idxs.to(boxes) * (boxes.max() + 1)
    shifted = boxes + offsets[:, None]
    order = torch.argsort(scores.float(), descending=True, stable=True)
    iou = _box_iou(shifted[order], shifted[order])
    suppressed = torch.zeros(len(order), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in range(len(order)):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


class AutomaticMaskGenerator:
    """Generate masks for all objects in an image from a point grid.

    Args:
        model: a :class:`Sam` or an existing :class:`SamPredictor` (its embedding cache is reused).
        config: :class:`AutomaticMaskConfig`; keyword arguments override its fields.
    """

    def __init__(
        self,
        model: Sam | SamPredictor,
        config: AutomaticMaskConfig | None = None,
        **overrides: Any,
    ) -> None:
        self.predictor = model if isinstance(model, SamPredictor) else SamPredictor(model)
        cfg = config or AutomaticMaskConfig()
        if overrides:
            try:
                cfg = AutomaticMaskConfig(**{**cfg.__dict__, **overrides})
            except TypeError as exc:
                raise ConfigError(f"invalid AutomaticMaskConfig option: {exc}") from exc
        cfg.validate()
        self.config = cfg

    @torch.no_grad()
    def generate(self, image: np.ndarray) -> list[dict[str, Any]]:
        """Masks for ``image`` (``(H, W)`` or ``(H, W, 3)``), best first.

        Returns:
            one dict per mask with ``segmentation`` ``(H, W)`` bool, ``area`` (pixels),
            ``bbox`` ``[x, y, w, h]`` (as segment-anything: inclusive corners, ``w = x1 - x0``),
            ``predicted_iou``, ``stability_score`` and ``point_coords`` ``[[x, y]]``.
        """
        cfg = self.config
        pred = self.predictor
        pred.set_image(image)
        h, w = pred.original_size  # type: ignore[misc]
        points = build_point_grid(cfg.points_per_side) * np.array([[w, h]])
        model = pred.model
        masks_l, iou_l, stab_l, pts_l = [], [], [], []
        for start in range(0, len(points), cfg.points_per_batch):
            batch = points[start : start + cfg.points_per_batch]
            coords = torch.as_tensor(
                pred.transform.apply_coords(batch, (h, w)), dtype=torch.float, device=pred.device
            )
            labels = torch.ones(len(batch), 1, dtype=torch.int, device=pred.device)
            logits, iou, _ = pred.predict_torch(
                coords[:, None, :],
                labels,
                multimask_output=cfg.multimask_output,
                return_logits=True,
            )
            m = logits.shape[1]
            logits, iou = logits.flatten(0, 1), iou.flatten(0, 1)
            pts = np.repeat(batch, m, axis=0)
            # As segment-anything: a threshold <= 0 disables that filter.
            keep = torch.ones_like(iou, dtype=torch.bool)
            if cfg.pred_iou_thresh > 0.0:
                keep &= iou > cfg.pred_iou_thresh
            stab = stability_score(logits, model.mask_threshold, cfg.stability_score_offset)
            if cfg.stability_score_thresh > 0.0:
                keep &= stab >= cfg.stability_score_thresh
            keep_np = keep.cpu().numpy()
            masks_l.append((logits[keep] > model.mask_threshold).cpu())
            iou_l.append(iou[keep].float().cpu())
            stab_l.append(stab[keep].float().cpu())
            pts_l.append(pts[keep_np])
        masks = torch.cat(masks_l) if masks_l else torch.zeros(0, h, w, dtype=torch.bool)
        if len(masks) == 0:
            return []
        ious, stabs, pts_all = torch.cat(iou_l), torch.cat(stab_l), np.concatenate(pts_l)
        boxes = masks_to_boxes(masks)
        keep_idx = batched_nms(
            boxes.float(), ious, torch.zeros(len(boxes), dtype=torch.long), cfg.box_nms_thresh
        )
        results = []
        for i in keep_idx.tolist():
            x0, y0, x1, y1 = boxes[i].tolist()
            results.append(
                {
                    "segmentation": masks[i].numpy(),
                    "area": int(masks[i].sum()),
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "predicted_iou": float(ious[i]),
                    "stability_score": float(stabs[i]),
                    "point_coords": [pts_all[i].tolist()],
                }
            )
        return results
