"""Validation during training: mean Dice with a fixed prompt (a mixin of the trainer)."""

from __future__ import annotations

import time

import numpy as np
import torch

from .distributed import all_reduce_sum
from .train_step import SegmentationStep, _seed_for, sample_prompts

__all__ = ["ValidationMixin"]


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    s = p.sum() + g.sum()
    return 1.0 if s == 0 else float(2 * (p & g).sum() / s)


class ValidationMixin:
    """``validate`` of :class:`medsa.engine.trainer.Trainer` (uses its ``val_set``, ``model``,
    ``_flatten``, ``dist``, ``device``, ``dtype``) and keeping the best checkpoint."""

    @torch.no_grad()
    def validate(self) -> float | None:
        """Mean Dice on ``val_set`` (at the input resolution, one prompt of
        ``prompts.val_protocol`` per image, fixed seed); ``None`` without a validation set."""
        from .perf import autocast_context

        if self.val_set is None or len(self.val_set) == 0:
            return None
        self.model.eval()
        step = SegmentationStep(self.model)
        protocol = self.cfg.prompts.default_val_protocol()
        total = count = 0.0
        for i in range(self.dist.rank, len(self.val_set), self.dist.world_size):
            item = self.val_set[i]
            batch = {k: (v[None] if isinstance(v, torch.Tensor) else torch.as_tensor(np.asarray(v))[None])
                     for k, v in item.items() if k in ("image", "target", "label")}  # fmt: skip
            images, targets, depth = self._flatten(batch)
            tnp = np.asarray(targets)
            rng = np.random.default_rng(_seed_for(self.cfg.train.seed, 2, i))
            with autocast_context(self.device, self.dtype):
                if self.multiclass:
                    logits = step(images, depth=depth)[0].float()
                    pred = logits.argmax(1).cpu().numpy()
                    tl = tnp.astype(np.int64)
                    k = logits.shape[1]
                    scores = [_dice(pred == c, tl == c) for c in range(1, k) if (tl == c).any()]
                    if not scores:
                        continue
                    total += float(np.mean(scores))
                else:
                    tb = tnp > 0.5
                    if not tb.any():
                        continue
                    prompts = sample_prompts(tb, protocol, rng)
                    logits, iou = step(images, tb, prompts, 0, rng, depth)
                    if logits.shape[1] > 1:  # ambiguous prompt: keep the top-scored mask
                        logits = logits[torch.arange(len(iou)), iou.argmax(1)][:, None]
                    total += _dice(logits[:, 0].float().cpu().numpy() > 0, tb)
            count += 1
        total, count = all_reduce_sum([total, count], self.dist)
        self.model.train()
        return total / count if count else None

    def _validate_and_keep_best(self, log, tb, bar, t0: float, train_loss: float | None):
        val = self.validate()
        if val is None:
            return None
        if self.dist.is_main:
            if log:
                log.write(event="val", epoch=self.epoch, step=self.step,
                          loss="" if train_loss is None else f"{train_loss:.6f}",
                          val_dice=f"{val:.6f}", seconds=f"{time.time() - t0:.1f}")  # fmt: skip
            if tb:
                tb.add_scalar("val/dice", val, self.step)
            msg = f"epoch {self.epoch} step {self.step}: val Dice {val:.4f}"
            if bar is not None:
                bar.write(msg)
        if self.best_metric is None or val > self.best_metric:
            self.best_metric, self.best_step = float(val), self.step
            self.save("best")
        return val

    # -- the loop -----------------------------------------------------------------------------
