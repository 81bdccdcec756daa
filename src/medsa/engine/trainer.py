"""The training loop (:class:`Trainer`): data order, micro-batches, optimizer steps, logging.

Checkpointing lives in :mod:`medsa.engine.train_state`, validation in
:mod:`medsa.engine.train_validate`, the step's parts in :mod:`medsa.engine.train_step`.
"""

from __future__ import annotations

import contextlib
import csv
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsa.errors import ConfigError, DataError

from .config import TrainConfig, config_to_yaml
from .distributed import DistInfo, barrier
from .train_data import _collate
from .train_state import CheckpointMixin
from .train_step import (
    SegmentationStep,
    WarmupCosine,
    _multiclass,
    _resolve_precision,
    _seed_for,
    build_model,
    sample_prompts,
)
from .train_validate import ValidationMixin

if TYPE_CHECKING:
    from medsa.sam.prefix_cache import PrefixCache

__all__ = ["Trainer"]


class _CSVLog:
    COLUMNS = ("event", "epoch", "step", "loss", "lr", "val_dice", "seconds")

    def __init__(self, path: Path) -> None:
        self.path = path
        new = not path.exists()
        self.f = path.open("a", newline="")
        self.w = csv.DictWriter(self.f, fieldnames=self.COLUMNS)
        if new:
            self.w.writeheader()

    def write(self, **row: Any) -> None:
        self.w.writerow({k: row.get(k, "") for k in self.COLUMNS})
        self.f.flush()

    def close(self) -> None:
        self.f.close()


class Trainer(CheckpointMixin, ValidationMixin):
    """Training loop over ready-made datasets.

    Args:
        cfg: the configuration (``data`` is not read here: pass the datasets).
        train_set: items ``{"image": (3, S, S) | (D, 3, S, S) float in [0, 255], "target":
            (S, S) | (D, S, S) {0, 1}}`` (``"label"`` int map instead of ``"target"`` for a
            multi-class MA-SAM head).
        val_set: same items, for validation Dice (optional).
        model: a pre-built model with the method applied (default: :func:`build_model`).
        dist: this process's place in a DDP job (default: single process).
        prefix_cache: a :class:`~medsa.sam.prefix_cache.PrefixCache` to share with other runs
            on the same images (``medsa reproduce``); default: one of ``train.prefix_cache_mb``.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        train_set: Any,
        val_set: Any | None = None,
        model: nn.Module | None = None,
        dist: DistInfo | None = None,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        from .losses import LossConfig, build_loss
        from .perf import attach_prefix_cache, resolve_device

        self.cfg = cfg
        self.dist = dist or DistInfo(0, 1, 0, resolve_device(cfg.train.device))
        self.device = self.dist.device
        self.dtype = _resolve_precision(cfg.train.precision, self.device)
        self.train_set, self.val_set = train_set, val_set
        from .model_loading import dataset_classes, inference_meta

        # what evaluate / predict / serve need to see data as training did (adapter JSON)
        self.inference_meta = inference_meta(cfg, dataset_classes(train_set))
        if len(train_set) == 0:
            raise DataError("the training set is empty")
        self.model = (model if model is not None else build_model(cfg)).to(self.device)
        self.multiclass = _multiclass(self.model)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        mb = cfg.train.prefix_cache_mb
        if mb is None:
            mb = 2048.0 if self.device.type == "cpu" else 0.0
        self.prefix_cache = attach_prefix_cache(self.model, mb, prefix_cache)
        if not self.params:
            raise ConfigError(
                f"method {cfg.method['method']!r} trains no parameters; nothing to do "
                "(use `medsa evaluate` for zero-shot)"
            )
        for name in cfg.prompts.protocols:
            from medsa.data.prompts import get_protocol

            get_protocol(name)  # fail early on typos
        num_classes = int(self.model.masam_decoder.num_classes) if self.multiclass else 2
        loss_name = cfg.loss.name
        if loss_name == "auto":
            loss_name = "dice_ce" if self.multiclass else "dice_bce"
        if (loss_name == "dice_ce") != self.multiclass:
            raise ConfigError(
                f"loss {loss_name!r} does not fit the model: dice_ce needs MA-SAM's multi-class "
                "head (method.num_classes), dice_bce the promptable decoder"
            )
        self.loss_fn = build_loss(
            LossConfig(loss_name, cfg.loss.lambda_dice, cfg.loss.lambda_ce, cfg.loss.batch_dice),
            num_classes,
        )
        self.step_module: nn.Module = SegmentationStep(self.model, cfg.prompts.mask_input)
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # find_unused_parameters: e.g. the mask-prompt branch of a trained prompt encoder
            # is only used when mask prompts are given
            self.step_module = DistributedDataParallel(
                self.step_module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,
            )
        opt = cfg.optim
        self.optimizer = torch.optim.AdamW(
            self.params, lr=opt.lr, weight_decay=opt.weight_decay, betas=tuple(opt.betas)
        )
        t = cfg.train
        n_batches = math.ceil(self._n_per_rank() / t.batch_size)
        self.steps_per_epoch = math.ceil(n_batches / t.grad_accum)
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            WarmupCosine(self.total_steps, opt.warmup_steps, opt.min_lr_ratio, opt.schedule),
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.names = list(cfg.prompts.protocols)
        w = np.array([cfg.prompts.protocols[n] for n in self.names], dtype=np.float64)
        self.weights = w / w.sum()
        # loop position
        self.epoch = 0
        self.batch_in_epoch = 0
        self.step = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.out_dir = Path(t.out_dir)
        self.history: list[dict[str, Any]] = []

    # -- data ---------------------------------------------------------------------------------

    def _n_per_rank(self) -> int:
        return math.ceil(len(self.train_set) / self.dist.world_size)

    def _epoch_indices(self, epoch: int) -> list[int]:
        """This rank's sample order in ``epoch`` (as DistributedSampler: shuffle, pad, stride)."""
        n = len(self.train_set)
        g = torch.Generator().manual_seed(_seed_for(self.cfg.train.seed, 1, epoch))
        order = torch.randperm(n, generator=g).tolist()
        per = self._n_per_rank()
        total = per * self.dist.world_size
        order = (order * math.ceil(total / n))[:total]
        return order[self.dist.rank :: self.dist.world_size]

    def _loader(self, epoch: int, skip_batches: int):
        from torch.utils.data import DataLoader

        bs = self.cfg.train.batch_size
        indices = self._epoch_indices(epoch)[skip_batches * bs :]
        return DataLoader(
            self.train_set,
            batch_size=bs,
            sampler=indices,
            num_workers=self.cfg.train.num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    # -- one micro-batch ----------------------------------------------------------------------

    def _flatten(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int | None]:
        """Batch -> images ``(N, 3, S, S)``, targets ``(N, S, S)`` and ``depth``."""
        images = batch["image"]
        key = "label" if self.multiclass and "label" in batch else "target"
        if key not in batch:
            raise DataError(f"training items need an {key!r} entry")
        targets = batch[key]
        depth = None
        if images.ndim == 5:  # (B, D, 3, S, S): 3D chunks
            b, depth = images.shape[:2]
            images = images.reshape(b * depth, *images.shape[2:])
            targets = targets.reshape(b * depth, *targets.shape[2:])
        if images.ndim != 4 or images.shape[1] != 3:
            raise DataError(
                f"expected images (B, 3, S, S) or (B, D, 3, S, S); got {tuple(images.shape)}"
            )
        if targets.shape[-2:] != images.shape[-2:]:
            raise DataError(
                f"targets {tuple(targets.shape)} do not match images {tuple(images.shape)}"
            )
        return images.to(self.device, torch.float32), targets, depth

    def _forward_loss(self, batch: dict[str, Any], rng: np.random.Generator) -> torch.Tensor:
        from .perf import autocast_context

        images, targets, depth = self._flatten(batch)
        tnp = targets.numpy() if isinstance(targets, torch.Tensor) else np.asarray(targets)
        prompts = None
        n_clicks = 0
        if not self.multiclass:
            tnp = tnp > 0.5
            protocol = self.names[int(rng.choice(len(self.names), p=self.weights))]
            prompts = sample_prompts(tnp, protocol, rng)
            n_clicks = (
                int(rng.integers(self.cfg.prompts.clicks + 1)) if self.cfg.prompts.clicks else 0
            )
        with autocast_context(self.device, self.dtype):
            logits, iou_pred = self.step_module(images, tnp, prompts, n_clicks, rng, depth)
        logits = logits.float()
        if self.multiclass:
            return self.loss_fn(logits, torch.as_tensor(tnp, device=self.device).long())
        target = torch.as_tensor(tnp, device=self.device, dtype=torch.float32)[:, None]
        if logits.shape[1] == 1:
            loss = self.loss_fn(logits, target)
        else:
            # SAM: of the candidate masks of an ambiguous prompt only the best one is trained
            per = torch.stack(
                [
                    torch.stack(
                        [
                            self.loss_fn(logits[i, m][None, None], target[i][None])
                            for m in range(logits.shape[1])
                        ]
                    )  # fmt: skip
                    for i in range(logits.shape[0])
                ]
            )  # (N, M)
            loss = per.min(1).values.mean()
        w = self.cfg.loss.iou_weight
        if w > 0 and iou_pred is not None:
            # SAM's IoU head: MSE towards the actual IoU of *every* output mask, so that at
            # inference the top-scored of the 3 candidates is the best one
            with torch.no_grad():
                p, t = logits > 0, target > 0.5  # (N, M, S, S), (N, 1, S, S)
                inter = (p & t).flatten(2).sum(2).float()
                union = (p | t).flatten(2).sum(2).float()
                iou_true = torch.where(
                    union > 0, inter / union.clamp_min(1), torch.ones_like(union)
                )  # (N, M)
            loss = loss + w * F.mse_loss(iou_pred.float(), iou_true)
        return loss

    # -- the loop -----------------------------------------------------------------------------

    def fit(self, stop_at_step: int | None = None) -> dict[str, Any]:
        """Train until ``total_steps`` (or ``stop_at_step``, saving ``last`` there as an
        interruption would); returns a summary dict."""
        cfg = self.cfg
        t0 = time.time()
        is_main = self.dist.is_main
        log = tb = None
        self._last_save_time = time.monotonic()
        if is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._remove_stale_tmp()
            (self.out_dir / "config.yaml").write_text(config_to_yaml(cfg))
            if cfg.logging.csv:
                log = _CSVLog(self.out_dir / "log.csv")
            if cfg.logging.tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                tb = SummaryWriter(str(self.out_dir / "tensorboard"))
        bar = None
        if is_main and cfg.logging.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True)
        accum = cfg.train.grad_accum
        self.model.train()
        last_val: float | None = None
        stopped = False
        try:
            if self.step == 0 and cfg.train.val_at_start and cfg.train.val_every and self.val_set:
                # the baseline (adapters start as identity: the pre-trained model) is also a
                # candidate for "best"
                last_val = self._validate_and_keep_best(log, tb, bar, t0, None)
            while self.step < self.total_steps and self.epoch < self.epochs:
                n_batches = math.ceil(self._n_per_rank() / cfg.train.batch_size)
                b = self.batch_in_epoch
                it = iter(self._loader(self.epoch, b))
                window_loss: float | None = None  # last train loss of this epoch
                while b < n_batches and self.step < self.total_steps:
                    group = min(accum, n_batches - b)
                    group_loss = 0.0
                    for j in range(group):
                        batch = next(it)
                        torch.manual_seed(
                            _seed_for(cfg.train.seed, 3, self.epoch, b + j, self.dist.rank)
                        )
                        rng = np.random.default_rng(
                            _seed_for(cfg.train.seed, 4, self.epoch, b + j, self.dist.rank)
                        )
                        sync = j == group - 1 or not self.dist.distributed
                        ctx = self.step_module.no_sync() if not sync else contextlib.nullcontext()
                        with ctx:
                            loss = self._forward_loss(batch, rng)
                            if not torch.isfinite(loss):
                                raise DataError(
                                    f"non-finite loss at epoch {self.epoch}, step {self.step}; "
                                    "lower optim.lr or check the data"
                                )
                            self.scaler.scale(loss / group).backward()
                        group_loss += float(loss.detach()) / group
                    if cfg.optim.grad_clip is not None:
                        self.scaler.unscale_(self.optimizer)
                        torch.nn.utils.clip_grad_norm_(self.params, cfg.optim.grad_clip)
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.scheduler.step()
                    b += group
                    self.batch_in_epoch = b
                    self.step += 1
                    window_loss = group_loss
                    lr = self.optimizer.param_groups[0]["lr"]
                    self.history.append({"step": self.step, "loss": group_loss, "lr": lr})
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(epoch=self.epoch, loss=f"{group_loss:.4f}")
                    if is_main and (self.step % cfg.logging.log_every == 0):
                        if log:
                            log.write(event="train", epoch=self.epoch, step=self.step,
                                      loss=f"{group_loss:.6f}", lr=f"{lr:.3e}",
                                      seconds=f"{time.time() - t0:.1f}")  # fmt: skip
                        if tb:
                            tb.add_scalar("train/loss", group_loss, self.step)
                            tb.add_scalar("train/lr", lr, self.step)
                    if stop_at_step is not None and self.step >= stop_at_step:
                        stopped = True
                        break
                    if b < n_batches and self.step < self.total_steps and self._periodic_save_due():
                        self.save("last")  # mid-epoch (epoch ends and stops save below anyway)
                if stopped:
                    break
                # end of epoch
                self.epoch += 1
                self.batch_in_epoch = 0
                final = self.step >= self.total_steps or self.epoch >= self.epochs
                ve = cfg.train.val_every
                if self.val_set is not None and ve and (self.epoch % ve == 0 or final):
                    last_val = self._validate_and_keep_best(log, tb, bar, t0, window_loss)
                self.save("last")
            if stopped:
                self.save("last")
            elif self.best_metric is None:
                self.save("best")  # no validation: best = last
            barrier(self.dist)
        finally:
            if bar is not None:
                bar.close()
            if log:
                log.close()
            if tb:
                tb.close()
        summary = {
            "steps": self.step,
            "epochs": self.epoch,
            "total_steps": self.total_steps,
            "stopped_early": stopped,
            "best_val_dice": self.best_metric,
            "best_step": self.best_step,
            "last_val_dice": last_val,
            "final_loss": self.history[-1]["loss"] if self.history else None,
            "seconds": time.time() - t0,
            "out_dir": str(self.out_dir),
        }
        if is_main:
            import json

            (self.out_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        return summary
