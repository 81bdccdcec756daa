"""Training checkpoints: one self-contained file per checkpoint, written atomically.

A training checkpoint (``last.pt`` / ``best.pt``) is a ``torch.save`` of plain containers holding
only tensors and primitives, so it loads with ``torch.load(..., weights_only=True)`` (no pickled
code runs). It holds everything needed to continue *exactly*: the tunable weights (the method's
tensors, as :func:`medsa.adapters.io.adapter_state_dict`), the resolved config (YAML text),
optimizer / LR-schedule / grad-scaler state, the RNG states and the loop position
(epoch, batches done in that epoch, optimizer step) plus the best validation metric so far.

Atomicity: the file is written to a temporary name in the same folder, flushed and fsync'ed, then
moved over the target with :func:`os.replace`; a crash at any moment leaves either the previous
complete checkpoint or the new complete one, never a truncated file. The adapter files that
``medsa evaluate`` / ``load_adapter`` read (``last.safetensors`` + ``last.json``) are written
next to it by :func:`medsa.adapters.save_adapter` (also atomic); the ``.pt`` file is written last
and is the source of truth for resuming.
"""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsa._fs import atomic_write
from medsa.errors import CheckpointError

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "atomic_torch_save",
    "capture_rng_state",
    "load_train_state",
    "resolve_resume_path",
    "restore_rng_state",
    "save_train_state",
]

FORMAT = "medsa-train-state"
FORMAT_VERSION = 1

_REQUIRED = ("format", "format_version", "config", "model", "optimizer", "scheduler", "epoch",
             "batch_in_epoch", "step")  # fmt: skip


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to a temporary file in the same folder, fsync, then ``os.replace``
    (:func:`medsa._fs.atomic_write`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return atomic_write(path, write, fsync=True)


def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy (legacy global), torch CPU and CUDA RNG states as tensors / primitives."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only if the device count matches)."""
    py = state["python"]
    # weights_only loading turns the inner tuple into a list; random.setstate wants tuples
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            n["keys"].numpy().astype(np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_train_state(state: dict[str, Any], path: str | Path) -> Path:
    """Write a training state dict (see the module doc) atomically; adds the format tag."""
    state = {"format": FORMAT, "format_version": FORMAT_VERSION, **state}
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(f"training state lacks {missing}")
    return atomic_torch_save(state, path)


def load_train_state(path: str | Path) -> dict[str, Any]:
    """Read and check a training checkpoint written by :func:`save_train_state`.

    Raises:
        CheckpointError: missing, truncated/corrupt, not a medsa training checkpoint, or written
            by a newer medsa.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, disallowed pickle globals, ...
        if isinstance(e, pickle.UnpicklingError):
            # torch's own message suggests weights_only=False, which we never do
            detail = "not a weights-only PyTorch file, or damaged"
        else:
            detail = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
        raise CheckpointError(
            f"training checkpoint {path} is unreadable ({detail}); it may be truncated or "
            "corrupt. Resume from another checkpoint (e.g. best.pt) or start over."
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a medsa training checkpoint")
    if int(state.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer medsa; upgrade medsa to resume it")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"training checkpoint {path} is incomplete: missing {missing}")
    if not isinstance(state["model"], dict) or not all(
        isinstance(v, torch.Tensor) for v in state["model"].values()
    ):
        raise CheckpointError(f"training checkpoint {path} has no valid weights")
    return state


def resolve_resume_path(path: str | Path) -> Path:
    """``--resume`` argument -> checkpoint file: a ``.pt`` file, a run folder (its
    ``checkpoints/last.pt``) or a checkpoints folder (its ``last.pt``)."""
    p = Path(path)
    if p.is_dir():
        for cand in (p / "checkpoints" / "last.pt", p / "last.pt"):
            if cand.is_file():
                return cand
        raise CheckpointError(
            f"no training checkpoint in {p}: expected {p / 'checkpoints' / 'last.pt'}"
        )
    if not p.exists():
        raise CheckpointError(f"--resume {p}: no such file or folder")
    if p.suffix in (".safetensors", ".json"):
        raise CheckpointError(
            f"{p.name} holds adapter weights only; resume needs the training state "
            f"{p.with_suffix('.pt').name} next to it"
        )
    return p
