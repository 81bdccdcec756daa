"""``medsa train``: adapt SAM with a parameter-efficient method (Med-SA, MA-SAM, LoRA, full FT).

One optimizer step (per micro-batch of ``B`` images ``(B, 3, S, S)``, or 3D chunks
``(B, D, 3, S, S)`` fed as ``(B*D, 3, S, S)`` with ``depth=D``):

1. a prompt protocol is drawn from ``prompts.protocols`` (weights) and simulated on each target;
2. the image encoder runs once, with gradients (the adapters inside it train);
3. iterative clicks (``prompts.clicks``): ``k ~ U{0..clicks}`` decoder passes without gradients
   on the detached embeddings each add one click in the largest error region of the model's own
   prediction (SAM / RITM click simulation, :func:`medsa.data.prompts.next_click`);
4. the final decoder pass with all prompts is trained with Dice + BCE at the input resolution
   (Dice + CE on MA-SAM's prompt-free multi-class head).

Only the parameters the method marks trainable are in the AdamW optimizer (linear warm-up, then
cosine decay per optimizer step). Checkpoints (``<out_dir>/checkpoints/{last,best}.pt`` plus
adapter ``.safetensors``/``.json``) are written atomically by rank 0; ``--resume`` continues
bit-exactly because every random draw is derived from ``(seed, epoch, batch, rank)`` and the
loop position, optimizer and schedule are restored.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from medsa.errors import CheckpointError, ConfigError, DataError, PromptError

from .config import TrainConfig, config_from_dict, config_to_yaml, load_config
from .distributed import DistInfo, all_reduce_sum, barrier, cleanup_distributed, init_distributed

HELP = "adapt SAM on a dataset (Med-SA, MA-SAM, LoRA, full fine-tuning)"

__all__ = [
    "HELP",
    "ModelInputTransform",
    "PromptBatch",
    "SegmentationStep",
    "Trainer",
    "WarmupCosine",
    "add_arguments",
    "build_datasets",
    "build_model",
    "main",
    "make_split",
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


# ---------------------------------------------------------------------------------------------
# trainer


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


class Trainer:
    """Training loop over ready-made datasets.

    Args:
        cfg: the configuration (``data`` is not read here: pass the datasets).
        train_set: items ``{"image": (3, S, S) | (D, 3, S, S) float in [0, 255], "target":
            (S, S) | (D, S, S) {0, 1}}`` (``"label"`` int map instead of ``"target"`` for a
            multi-class MA-SAM head).
        val_set: same items, for validation Dice (optional).
        model: a pre-built model with the method applied (default: :func:`build_model`).
        dist: this process's place in a DDP job (default: single process).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        train_set: Any,
        val_set: Any | None = None,
        model: nn.Module | None = None,
        dist: DistInfo | None = None,
    ) -> None:
        from .losses import LossConfig, build_loss
        from .perf import resolve_device

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

    # -- checkpoints --------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        from medsa.adapters.io import adapter_state_dict

        from .checkpoint import capture_rng_state

        return {
            "config": config_to_yaml(self.cfg),
            "backbone": getattr(self.model, "name", "custom"),
            "method": dict(self.cfg.method),
            "model": {
                k: v.detach().cpu().clone() for k, v in adapter_state_dict(self.model).items()
            },
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng_state(),
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "step": self.step,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "world_size": self.dist.world_size,
        }

    def save(self, name: str) -> Path | None:
        """Write ``<out_dir>/checkpoints/<name>.{safetensors,json,pt}`` (rank 0 only)."""
        if not self.dist.is_main:
            return None
        from medsa.adapters.io import save_adapter

        from .checkpoint import save_train_state

        ckpt = self.out_dir / "checkpoints"
        ckpt.mkdir(parents=True, exist_ok=True)
        save_adapter(self.model, ckpt / name, inference=self.inference_meta)
        return save_train_state(self._state(), ckpt / f"{name}.pt")

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore weights, optimizer, schedule, RNG and loop position from a training state."""
        from medsa.adapters.io import adapter_state_dict

        from .checkpoint import restore_rng_state

        expected = adapter_state_dict(self.model)
        got = state["model"]
        if set(expected) != set(got):
            missing = sorted(set(expected) - set(got))[:5]
            extra = sorted(set(got) - set(expected))[:5]
            raise CheckpointError(
                f"checkpoint weights do not match method {self.cfg.method['method']!r}: "
                f"missing {missing}, unexpected {extra}"
            )
        for k, v in expected.items():
            if tuple(got[k].shape) != tuple(v.shape):
                raise CheckpointError(
                    f"checkpoint tensor {k} has shape {tuple(got[k].shape)}, model {tuple(v.shape)}"
                )
        with torch.no_grad():
            for k, v in expected.items():
                v.copy_(got[k].to(v.device, v.dtype))
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(
                f"optimizer/scheduler state does not match this run: {e}"
            ) from None
        # the schedule shape follows the current config (e.g. --set train.epochs=... stretches
        # the cosine); base LRs and AdamW moments come from the checkpoint
        opt = self.cfg.optim
        self.scheduler.lr_lambdas[0] = WarmupCosine(
            self.total_steps, opt.warmup_steps, opt.min_lr_ratio, opt.schedule
        )
        if state.get("rng") is not None:
            restore_rng_state(state["rng"])
        self.epoch = int(state["epoch"])
        self.batch_in_epoch = int(state["batch_in_epoch"])
        self.step = int(state["step"])
        self.best_metric = state.get("best_metric")
        self.best_step = state.get("best_step")
        ws = int(state.get("world_size", 1))
        if ws != self.dist.world_size and self.dist.is_main:
            print(
                f"note: checkpoint was written by {ws} process(es), resuming with "
                f"{self.dist.world_size}; the sample order differs from an uninterrupted run",
                file=sys.stderr,
            )

    # -- validation ---------------------------------------------------------------------------

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

    def fit(self, stop_at_step: int | None = None) -> dict[str, Any]:
        """Train until ``total_steps`` (or ``stop_at_step``, saving ``last`` there as an
        interruption would); returns a summary dict."""
        cfg = self.cfg
        t0 = time.time()
        is_main = self.dist.is_main
        log = tb = None
        if is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
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


def _collate(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack only what training uses (other fields, e.g. ids or None sizes, need not collate)."""
    from torch.utils.data import default_collate

    keys = [k for k in ("image", "target", "label") if k in items[0]]
    return {k: default_collate([it[k] for it in items]) for k in keys}


def _dice(pred: np.ndarray, gt: np.ndarray) -> float:
    p, g = np.asarray(pred, bool), np.asarray(gt, bool)
    s = p.sum() + g.sum()
    return 1.0 if s == 0 else float(2 * (p & g).sum() / s)


# ---------------------------------------------------------------------------------------------
# datasets from the config


class ModelInputTransform:
    """Dataset sample -> model input frame, exactly as :class:`medsa.sam.SamPredictor` resizes.

    Input: ``image`` ``(H, W[, C])`` on the ``[0, 255]`` scale and ``target`` ``(H, W)`` (binary
    or label map). Output: ``image`` float32 ``(3, S, S)`` still in ``[0, 255]`` (the model
    normalises it), ``target`` float32 ``(S, S)`` (nearest), ``original_size`` ``(H, W)``.
    ``longest_side`` models (SAM): long side resized to ``S`` and the rest filled with the pixel
    mean, so that it becomes exactly 0 after normalisation as SAM's zero padding;
    ``stretch`` (LiteMedSAM): both sides resized to ``S``.
    """

    def __init__(self, model: nn.Module, size: int | None = None) -> None:
        from medsa.sam.transforms import ResizeLongestSide, ResizeStretch

        self.size = int(size or model.img_size)
        stretch = getattr(model, "resize_mode", "longest_side") == "stretch"
        if self.size > model.img_size or (stretch and self.size != model.img_size):
            raise ConfigError(
                f"data.image_size={self.size} does not fit {getattr(model, 'name', 'the model')} "
                f"(input {model.img_size}"
                + (", stretched: must be equal)" if stretch else "; must not be larger)")
                + "; change model.options.img_size instead"
            )
        self.resize = (ResizeStretch if stretch else ResizeLongestSide)(self.size)
        self.fill = np.asarray(model.pixel_mean.detach().cpu().flatten().tolist(), np.float32)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        from medsa.data.preprocess import to_three_channels

        out = dict(sample)
        img = to_three_channels(np.asarray(sample["image"], dtype=np.float32)).astype(np.float32)
        h, w = img.shape[:2]
        r = self.resize.apply_image(img)
        nh, nw = r.shape[:2]
        canvas = np.empty((self.size, self.size, 3), np.float32)
        canvas[:] = self.fill
        canvas[:nh, :nw] = r
        out["image"] = torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1)))
        out["original_size"] = (h, w)
        if sample.get("target") is not None:
            t = torch.as_tensor(np.asarray(sample["target"]).astype(np.float32))[None, None]
            t = F.interpolate(t, (nh, nw), mode="nearest-exact")[0, 0]
            tgt = torch.zeros((self.size, self.size), dtype=torch.float32)
            tgt[:nh, :nw] = t
            out["target"] = tgt
        for k in ("points", "point_labels", "box"):
            out.pop(k, None)  # prompts are simulated in the input frame by the trainer
        return out


def make_split(cfg: TrainConfig, case_ids: list[str]) -> dict[str, list[str]]:
    """``{"train", "val", "test"}`` case ids: ``data.splits_file`` (fold ``data.fold``), else a
    seeded hold-out test part (``data.test_fraction``) and fold ``data.fold`` of a
    ``data.n_folds``-fold split of the rest (cases grouped by ``data.group_pattern``)."""
    from medsa.data.datasets import load_splits, make_splits, train_val_test_split

    d = cfg.data
    if d.splits_file:
        folds = load_splits(d.splits_file, known_ids=case_ids)
        if d.fold >= len(folds):
            raise ConfigError(f"data.fold={d.fold} but {d.splits_file} has {len(folds)} fold(s)")
        f = folds[d.fold]
        return {"train": list(f["train"]), "val": list(f["val"]), "test": list(f.get("test", []))}
    outer = train_val_test_split(
        case_ids, val=0.0, test=d.test_fraction, seed=d.split_seed, group_pattern=d.group_pattern
    )
    inner = make_splits(outer["train"], d.n_folds, d.split_seed, d.group_pattern)[d.fold]
    return {"train": inner["train"], "val": inner["val"], "test": outer["test"]}


def build_datasets(
    cfg: TrainConfig, model: nn.Module
) -> tuple[Any, Any | None, dict[str, list[str]]]:
    """Train / validation datasets described by ``cfg.data`` and the split used.

    2D images and slices of volumes become :class:`medsa.data.datasets.SliceDataset2D` samples
    (one binary task per class, or label maps for MA-SAM's multi-class head); with
    ``data.depth`` volumes become :class:`~medsa.data.datasets.ChunkDataset3D` chunks.
    """
    from torch.utils.data import Subset

    from medsa.data.datasets import ChunkDataset3D, SliceDataset2D, load_dataset

    d = cfg.data
    if not d.root:
        raise ConfigError("data.root is not set (the dataset folder)")
    mapping = d.classes if isinstance(d.classes, dict) else None
    info = load_dataset(d.root, classes=mapping)
    if d.layout is not None and info.layout != d.layout:
        raise ConfigError(
            f"data.layout is {d.layout!r} but {d.root} has the {info.layout!r} layout"
        )
    selected = list(d.classes) if isinstance(d.classes, list) else []
    for c in selected:
        if c not in info.classes:
            raise ConfigError(f"unknown class {c!r}; dataset classes: {', '.join(info.classes)}")
    classes: list[str | None] = list(selected) or [None]
    split = make_split(cfg, list(info.case_ids))
    mode = "multiclass" if _multiclass(model) else "binary"
    if mode == "multiclass":
        classes = [None]
    transform = ModelInputTransform(model, d.image_size)

    def make(ids: list[str]) -> Any:
        parts = []
        kw = dict(case_ids=ids, mode=mode, transform=transform, seed=cfg.train.seed,
                  resize_to=d.resize_to, intensity=d.intensity)  # fmt: skip
        for c in classes:
            if d.depth:
                parts.append(ChunkDataset3D(info, d.depth, class_name=c, **kw))
            else:
                parts.append(SliceDataset2D(info, class_name=c, **kw))
        if len(parts) == 1:
            return parts[0]
        from torch.utils.data import ConcatDataset

        return ConcatDataset(parts)

    train = make(split["train"])
    val = make(split["val"]) if split["val"] else None
    if d.max_train_items is not None and len(train) > d.max_train_items:
        train = Subset(train, range(d.max_train_items))
    if val is not None and d.max_val_items is not None and len(val) > d.max_val_items:
        val = Subset(val, range(d.max_val_items))
    return train, val, split


# ---------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        "-c",
        help="YAML config (sections: model, method, data, prompts, loss, optim, train, logging), "
        "or the name of a packaged one: lite_medsam_medsa_2d, medsa_vit_b_2d, medsa_sdtrans_3d, medsa_paper_3d, "
        "masam_3d, lora_vit_b_2d",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=3e-4 --set method.rank=16 (repeatable)",
    )
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR|CKPT",
        help="continue a run: its folder (uses checkpoints/last.pt) or a .pt checkpoint; the "
        "config comes from the checkpoint unless --config is given (--set still applies)",
    )
    parser.add_argument("--out-dir", help="shortcut for --set train.out_dir=...")
    parser.add_argument("--device", help="shortcut for --set train.device=... (cpu, cuda, cuda:1)")
    parser.add_argument(
        "--stop-after-steps",
        type=int,
        metavar="N",
        help="stop (and save last) after optimizer step N, as an interruption would",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config and exit"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start a new run even if train.out_dir already holds one (its checkpoints and log "
        "are replaced); without it such a run must be continued with --resume",
    )


def _resolve_config(args: argparse.Namespace) -> tuple[TrainConfig, dict[str, Any] | None]:
    import yaml

    overrides = list(args.overrides or [])
    if args.out_dir:
        overrides.append(f"train.out_dir={args.out_dir}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    state = None
    if args.resume:
        from .checkpoint import load_train_state, resolve_resume_path

        state = load_train_state(resolve_resume_path(args.resume))
        if not args.config:
            from .config import apply_overrides

            try:
                raw = yaml.safe_load(state["config"])
            except yaml.YAMLError as e:
                raise CheckpointError(
                    f"the config stored in the checkpoint is unreadable: {e}"
                ) from None
            return config_from_dict(apply_overrides(raw, overrides)), state
    elif not args.config:
        raise ConfigError("give --config cfg.yaml (or --resume RUN_DIR)")
    return load_config(args.config, overrides), state


def main(args: argparse.Namespace) -> int:
    cfg, state = _resolve_config(args)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return 0
    if args.stop_after_steps is not None and args.stop_after_steps < 1:
        raise ConfigError("--stop-after-steps must be >= 1")
    out = Path(cfg.train.out_dir)
    if state is None and (out / "checkpoints" / "last.pt").exists():
        if not args.overwrite:
            raise ConfigError(
                f"{out} already holds a training run; continue it with --resume {out}, "
                "choose another train.out_dir, or pass --overwrite to start over"
            )
        (out / "log.csv").unlink(missing_ok=True)  # a new run gets a new log
    from .perf import resolve_device

    info = init_distributed(resolve_device(cfg.train.device))
    try:
        torch.manual_seed(cfg.train.seed)  # random-init parts (adapters; tiny test backbones)
        model = build_model(cfg)
        train_set, val_set, split = build_datasets(cfg, model)
        if info.is_main:
            from medsa.data.datasets import save_splits

            save_splits(split, Path(cfg.train.out_dir) / "splits.json")
        trainer = Trainer(cfg, train_set, val_set, model=model, dist=info)
        if state is not None:
            trainer.load_state(state)
        summary = trainer.fit(stop_at_step=args.stop_after_steps)
    finally:
        cleanup_distributed()
    if info.is_main:
        best = summary["best_val_dice"]
        print(
            f"trained {summary['steps']} steps in {summary['seconds']:.0f} s; "
            + (
                f"best val Dice {best:.4f} (step {summary['best_step']}); "
                if best is not None
                else ""
            )
            + f"checkpoints in {Path(cfg.train.out_dir) / 'checkpoints'}"
        )
    return 0
