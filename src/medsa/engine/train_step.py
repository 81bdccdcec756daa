"""One training step's parts: LR schedule, prompt simulation, the differentiable step, model.

Used by :class:`medsa.engine.trainer.Trainer`; re-exported by :mod:`medsa.engine.train`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from medsa.errors import ConfigError, PromptError

from .config import TrainConfig

__all__ = [
    "PromptBatch",
    "SegmentationStep",
    "WarmupCosine",
    "build_model",
    "sample_prompts",
]


# ---------------------------------------------------------------------------------------------
# LR schedule


class WarmupCosine:
    """LR multiplier per optimizer step: linear warm-up ``(step + 1) / warmup`` for
    ``warmup_steps`` steps, then cosine from 1 to ``min_ratio`` at ``total_steps``
    (``schedule="constant"``: 1 after warm-up).

    A plain callable object (not a closure) so ``LambdaLR.state_dict()`` stays picklable and
    weights-only loadable.
    """

    def __init__(
        self,
        total_steps: int,
        warmup_steps: int = 0,
        min_ratio: float = 0.0,
        schedule: str = "cosine",
    ) -> None:
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, int(warmup_steps))
        self.min_ratio = float(min_ratio)
        self.schedule = schedule

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


# ---------------------------------------------------------------------------------------------
# prompts


@dataclass
class PromptBatch:
    """Prompts of ``N`` images in the model input frame.

    ``coords (N, P, 2)`` float ``(x, y)`` / ``labels (N, P)`` int (1 pos, 0 neg, -1 padding) or
    ``None``; ``boxes (N, 4)`` float ``(x0, y0, x1, y1)`` or ``None``.
    """

    coords: np.ndarray | None
    labels: np.ndarray | None
    boxes: np.ndarray | None

    @property
    def ambiguous(self) -> bool:
        """One (valid) point per image and no box: SAM's multi-mask case."""
        if self.boxes is not None or self.labels is None:
            return False
        return self.labels.shape[1] == 1 and bool((self.labels[:, 0] >= 0).all())

    def to_torch(self, device: torch.device):
        pts = None
        if self.coords is not None and self.coords.shape[1] > 0:
            pts = (
                torch.as_tensor(self.coords, dtype=torch.float32, device=device),
                torch.as_tensor(self.labels, dtype=torch.long, device=device),
            )
        boxes = (
            None
            if self.boxes is None
            else torch.as_tensor(self.boxes, dtype=torch.float32, device=device)
        )
        return pts, boxes

    def add_points(self, xy: np.ndarray, labels: np.ndarray) -> PromptBatch:
        """Append one point per image: ``xy (N, 2)``, ``labels (N,)`` (-1 = no click)."""
        n = len(xy)
        coords = self.coords if self.coords is not None else np.zeros((n, 0, 2), np.float32)
        labs = self.labels if self.labels is not None else np.zeros((n, 0), np.int64)
        return PromptBatch(
            np.concatenate([coords, xy[:, None].astype(np.float32)], 1),
            np.concatenate([labs, labels[:, None].astype(np.int64)], 1),
            self.boxes,
        )


def _random_background_point(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = mask.shape
    return np.array([rng.integers(w), rng.integers(h)], dtype=np.float32)


def sample_prompts(targets: np.ndarray, protocol: str, rng: np.random.Generator) -> PromptBatch:
    """Simulate ``protocol`` on each binary target ``(N, S, S)``.

    Targets without foreground (empty slices of a 3D chunk) get one negative point at a random
    pixel; as SAM takes either boxes for all images of a batch or none, a box protocol falls back
    to ``1pt`` for the whole batch when any target is empty.
    """
    from medsa.data.prompts import get_protocol

    fn = get_protocol(protocol)
    empty = [not t.any() for t in targets]
    if any(empty) and protocol not in ("1pt", "3pt"):
        fn = get_protocol("1pt")
    prompts = []
    for t, e in zip(targets, empty, strict=True):
        if e:
            prompts.append((_random_background_point(t, rng)[None], np.zeros(1, np.int64), None))
        else:
            p = fn(t, rng)
            prompts.append((p.points, p.labels, p.box))
    n_pts = max(len(p[1]) for p in prompts)
    coords = labels = None
    if n_pts:
        coords = np.zeros((len(prompts), n_pts, 2), np.float32)
        labels = np.full((len(prompts), n_pts), -1, np.int64)  # -1: SAM's padding point
        for i, (pt, lb, _) in enumerate(prompts):
            coords[i, : len(lb)] = pt
            labels[i, : len(lb)] = lb
    boxes = None
    if prompts[0][2] is not None:
        boxes = np.stack([p[2] for p in prompts]).astype(np.float32)
    return PromptBatch(coords, labels, boxes)


def _next_clicks(pred: np.ndarray, targets: np.ndarray, rng: np.random.Generator):
    from medsa.data.prompts import next_click

    xy = np.zeros((len(pred), 2), np.float32)
    lab = np.full(len(pred), -1, np.int64)
    for i, (p, t) in enumerate(zip(pred, targets, strict=True)):
        click = next_click(p, t, rng)
        if click is not None:  # None: already perfect -> padding point
            xy[i], lab[i] = click[0], click[1]
    return xy, lab


# ---------------------------------------------------------------------------------------------
# model


def build_model(cfg: TrainConfig) -> nn.Module:
    """Backbone from ``cfg.model`` with ``cfg.method`` applied (on the CPU)."""
    from medsa.adapters.apply import apply_method
    from medsa.sam import build_sam

    from .perf import set_attention_impl, set_grad_checkpointing

    model = build_sam(cfg.model.backbone, checkpoint=cfg.model.checkpoint, **cfg.model.options)
    apply_method(model, cfg.method_config())
    if cfg.model.attention_impl:
        set_attention_impl(model, cfg.model.attention_impl)
    if cfg.train.grad_checkpointing:
        set_grad_checkpointing(model, True)
    return model


def _multiclass(model: nn.Module) -> bool:
    return getattr(model, "masam_decoder", None) is not None


class SegmentationStep(nn.Module):
    """The differentiable part of a training step, as one ``forward`` so DDP can wrap it.

    ``forward(images (N, 3, S, S) in [0, 255], targets (N, S, S) bool numpy, prompts, n_clicks,
    rng, depth)`` -> ``(logits, iou_pred)``: mask logits ``(N, M, S, S)`` and predicted IoU
    ``(N, M)``. ``M = 3`` for an ambiguous prompt (one point, no box, no clicks; as SAM, the best
    of the 3 candidates is supervised), else ``M = 1``. MA-SAM's multi-class head gives class
    logits ``(N, K, S, S)`` and ``iou_pred = None``.
    """

    def __init__(self, sam: nn.Module, mask_input: bool = False) -> None:
        super().__init__()
        self.sam = sam
        self.mask_input = mask_input

    def _to_input(self, low: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.sam.postprocess_masks(low, size, size)

    def forward(
        self,
        images: torch.Tensor,
        targets: np.ndarray | None = None,
        prompts: PromptBatch | None = None,
        n_clicks: int = 0,
        rng: np.random.Generator | None = None,
        depth: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        sam = self.sam
        size = (int(images.shape[-2]), int(images.shape[-1]))
        x = sam.preprocess(images)
        emb = sam.image_encoder(x, depth=depth) if depth else sam.image_encoder(x)
        if _multiclass(sam):
            return sam.masam_decoder(emb)[..., : size[0], : size[1]], None
        if prompts is None:
            raise PromptError("the promptable decoder needs prompts")
        mask_in = None
        if n_clicks:
            assert targets is not None and rng is not None
            with torch.no_grad():
                e = emb.detach()
                for _ in range(n_clicks):
                    pts, boxes = prompts.to_torch(images.device)
                    low, _ = sam.predict_masks(
                        e, points=pts, boxes=boxes, masks=mask_in, multimask_output=False
                    )
                    pred = (self._to_input(low.float(), size)[:, 0] > 0).cpu().numpy()
                    prompts = prompts.add_points(*_next_clicks(pred, targets, rng))
                    if self.mask_input:
                        mask_in = low
        pts, boxes = prompts.to_torch(images.device)
        low, iou = sam.predict_masks(
            emb, points=pts, boxes=boxes, masks=mask_in, multimask_output=prompts.ambiguous
        )
        return self._to_input(low, size), iou


def _resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if device.type != "cuda":
            raise ConfigError("fp16 needs CUDA; use precision bf16 or fp32 on the CPU")
        return torch.float16
    return torch.float32


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)
