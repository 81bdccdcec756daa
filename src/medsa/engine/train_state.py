"""Training state: checkpoint contents, writing and restoring (a mixin of the trainer).

See :mod:`medsa.engine.checkpoint` for the file format and the atomic write.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from medsa.errors import CheckpointError

from .config import config_to_yaml
from .train_step import WarmupCosine

__all__ = ["CheckpointMixin"]


class CheckpointMixin:
    """``save`` / ``load_state`` of :class:`medsa.engine.trainer.Trainer` (uses its ``cfg``,
    ``model``, ``optimizer``, ``scheduler``, ``scaler``, ``dist``, loop position, ``out_dir``)."""

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
        save_adapter(self.model, ckpt / name)
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
