"""Training state: checkpoint contents, when to write them, writing and restoring (a mixin of
the trainer).

Besides the epoch ends, ``last`` is written every ``train.save_every`` optimizer steps and after
``train.save_every_minutes`` of training since the previous save, so that a kill loses at most
that much work; a mid-epoch checkpoint resumes exactly (the loop position includes the batches
done in the epoch). Temporary files of a write interrupted by a kill are removed when a run
starts; a write that fails (full disk, no permission) is one clear error and the previous
checkpoint stays intact (the writes are atomic). See :mod:`medsa.engine.checkpoint` for the file
format and the atomic write.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch

from medsa.errors import CheckpointError

from .config import config_to_yaml
from .outputs import OutputError, describe_os_error
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
        """Write ``<out_dir>/checkpoints/<name>.{safetensors,json,pt}`` (rank 0 only).

        Raises:
            OutputError: the write failed (disk full, permission); the previous files are kept.
        """
        self._last_save_time = time.monotonic()
        if not self.dist.is_main:
            return None
        from medsa.adapters.io import save_adapter

        from .checkpoint import save_train_state

        ckpt = self.out_dir / "checkpoints"
        target = ckpt / f"{name}.pt"
        try:
            ckpt.mkdir(parents=True, exist_ok=True)
            save_adapter(self.model, ckpt / name, inference=self.inference_meta)
            path = save_train_state(self._state(), target)
        except Exception as e:
            if not _is_write_error(e):
                raise
            raise OutputError(
                f"cannot write checkpoint {target}: {_write_error_reason(e)}; "
                + self._kept_checkpoint_note()
            ) from None
        if name == "last":
            self._last_saved_step = self.step
        return path

    def _kept_checkpoint_note(self) -> str:
        last = self.out_dir / "checkpoints" / "last.pt"
        if not last.is_file():
            return "no checkpoint of this run was written yet"
        step = getattr(self, "_last_saved_step", None)
        at = f" (step {step})" if step is not None else ""
        return f"the last good checkpoint {last}{at} is kept: continue with --resume {self.out_dir}"

    def _periodic_save_due(self) -> bool:
        """``last`` is due mid-epoch: every ``save_every`` steps or ``save_every_minutes``."""
        t = self.cfg.train
        if t.save_every and self.step % t.save_every == 0:
            return True
        since = time.monotonic() - getattr(self, "_last_save_time", time.monotonic())
        return bool(t.save_every_minutes) and since >= 60.0 * t.save_every_minutes

    def _remove_stale_tmp(self) -> int:
        """Delete temporary files left in ``checkpoints/`` by a write that was killed (rank 0,
        before training: nothing of this run is writing yet). Returns how many."""
        ckpt = self.out_dir / "checkpoints"
        if not self.dist.is_main or not ckpt.is_dir():
            return 0
        stale = [p for p in ckpt.glob(".*.tmp") if p.is_file()]
        for p in stale:
            p.unlink(missing_ok=True)
        if stale:
            print(
                f"note: removed {len(stale)} temporary file(s) of an interrupted checkpoint write "
                f"from {ckpt}",
                file=sys.stderr,
            )
        return len(stale)

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
        self._last_saved_step = self.step
        self.best_metric = state.get("best_metric")
        self.best_step = state.get("best_step")
        ws = int(state.get("world_size", 1))
        if ws != self.dist.world_size and self.dist.is_main:
            print(
                f"note: checkpoint was written by {ws} process(es), resuming with "
                f"{self.dist.world_size}; the sample order differs from an uninterrupted run",
                file=sys.stderr,
            )


def _is_write_error(e: BaseException) -> bool:
    """OS write failures, including how torch.save (``RuntimeError ... unexpected pos``) and
    safetensors (``SafetensorError ... IoError``) report them."""
    if isinstance(e, OSError):
        return True
    text = str(e)
    return type(e).__name__ == "SafetensorError" or (
        isinstance(e, RuntimeError)
        and any(k in text for k in ("unexpected pos", "PytorchStreamWriter", "file write failed"))
    )


def _write_error_reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        return describe_os_error(e)
    first = (str(e).splitlines() or [""])[0][:160]
    return f"the write failed ({first}); is the disk full?"
