"""medsa.engine.checkpoint: atomic writes, weights-only loading, corrupt files, RNG round trip."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from medsa.engine import checkpoint as C
from medsa.errors import CheckpointError


def _state(step: int) -> dict:
    return {
        "config": "train: {epochs: 1}\n",
        "model": {"a.weight": torch.full((3, 2), float(step))},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "scheduler": {"last_epoch": step},
        "epoch": 0,
        "batch_in_epoch": step,
        "step": step,
        "best_metric": None,
        "rng": C.capture_rng_state(),
    }


def test_save_load_round_trip_weights_only(tmp_path: Path) -> None:
    path = C.save_train_state(_state(3), tmp_path / "ck" / "last.pt")
    # the file is loadable by the strict weights-only unpickler (no code objects inside)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == C.FORMAT
    st = C.load_train_state(path)
    assert st["step"] == 3 and torch.equal(st["model"]["a.weight"], torch.full((3, 2), 3.0))
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp files left


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = C.save_train_state(_state(1), tmp_path / "last.pt")
    before = path.read_bytes()
    real_save = torch.save

    def crashing_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.truncate(10)  # half-written file ...
        raise KeyboardInterrupt  # ... then the process dies

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        C.save_train_state(_state(2), path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert C.load_train_state(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_raises_checkpoint_error(tmp_path: Path, damage: str) -> None:
    path = C.save_train_state(_state(1), tmp_path / "last.pt")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint" * 10)
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="unreadable.*truncated or corrupt"):
        C.load_train_state(path)


def test_not_a_training_checkpoint(tmp_path: Path) -> None:
    p = tmp_path / "w.pt"
    torch.save({"weight": torch.zeros(2)}, p)
    with pytest.raises(CheckpointError, match="not a medsa training checkpoint"):
        C.load_train_state(p)
    st = _state(1)
    del st["optimizer"]
    torch.save({"format": C.FORMAT, "format_version": 1, **st}, p)
    with pytest.raises(CheckpointError, match=r"incomplete: missing \['optimizer'\]"):
        C.load_train_state(p)
    torch.save({"format": C.FORMAT, "format_version": 99, **_state(1)}, p)
    with pytest.raises(CheckpointError, match="newer medsa"):
        C.load_train_state(p)
    with pytest.raises(CheckpointError, match="does not exist"):
        C.load_train_state(tmp_path / "nope.pt")


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "evil.pt"
    torch.save({**_state(1), "format": C.FORMAT, "format_version": 1, "x": Path("/")}, p)
    with pytest.raises(CheckpointError, match="unreadable"):
        C.load_train_state(p)


def test_rng_round_trip() -> None:
    state = C.capture_rng_state()
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    C.restore_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(1).item())
    assert a == b


def test_resolve_resume_path(tmp_path: Path) -> None:
    run = tmp_path / "run"
    ck = C.save_train_state(_state(1), run / "checkpoints" / "last.pt")
    assert C.resolve_resume_path(run) == ck
    assert C.resolve_resume_path(run / "checkpoints") == ck
    assert C.resolve_resume_path(ck) == ck
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        C.resolve_resume_path(tmp_path)
    with pytest.raises(CheckpointError, match="no such file"):
        C.resolve_resume_path(tmp_path / "x.pt")
    st = run / "checkpoints" / "last.safetensors"
    st.write_bytes(b"")
    with pytest.raises(CheckpointError, match="adapter weights only"):
        C.resolve_resume_path(st)
