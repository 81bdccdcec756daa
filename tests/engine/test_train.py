"""medsa.engine.train: schedule, prompts, the loop (loss goes down, frozen weights stay frozen),
3D chunks, MA-SAM multi-class, exact resume, CLI error paths.

All on a random-initialised ``vit_tiny`` at 64 px with synthetic "bright rectangle" images.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from medsa.engine.checkpoint import load_train_state
from medsa.engine.config import config_from_dict
from medsa.engine.train import (
    PromptBatch,
    Trainer,
    WarmupCosine,
    build_model,
    sample_prompts,
)
from medsa.errors import CheckpointError, ConfigError, DataError

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see the fixture


class Rectangles(torch.utils.data.Dataset):
    """Bright noisy rectangles on a dark background; target = the rectangle.

    Items: ``image (3, S, S)`` in [0, 255], ``target (S, S)`` {0, 1}; with ``depth`` 3D chunks
    ``(D, 3, S, S)`` / ``(D, S, S)``; with ``labels`` a label map with two classes (1: left half
    of the rectangle, 2: right half) for MA-SAM's multi-class head.
    """

    def __init__(self, n: int, seed: int = 0, depth: int | None = None, labels: bool = False):
        rng = np.random.default_rng(seed)
        self.items = []
        for _ in range(n):
            d = depth or 1
            img = np.full((d, SIZE, SIZE), 30.0, np.float32)
            tgt = np.zeros((d, SIZE, SIZE), np.float32)
            x0, y0 = rng.integers(4, SIZE // 2, 2)
            w, h = rng.integers(12, SIZE // 3, 2)
            for z in range(d):
                img[z, y0 : y0 + h, x0 : x0 + w] = 210.0
                tgt[z, y0 : y0 + h, x0 : x0 + w] = 1
                if labels:
                    tgt[z, y0 : y0 + h, x0 + w // 2 : x0 + w] = 2
            img += rng.normal(0, 8, img.shape).astype(np.float32)
            img = np.repeat(img[:, None], 3, axis=1)
            if depth is None:
                img, tgt = img[0], tgt[0]
            self.items.append((torch.from_numpy(img), torch.from_numpy(tgt)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.items[i][0], "target": self.items[i][1]}


def make_cfg(tmp: Path, **sections) -> object:
    base = {
        "model": {"backbone": "vit_tiny", "options": {"img_size": SIZE}},
        "method": {"method": "medsa", "rank": 4},
        "prompts": {"protocols": {"1pt": 0.3, "3pt": 0.2, "bbox0.75": 0.5}, "clicks": 1},
        "optim": {"lr": 3e-3, "warmup_steps": 1},
        "train": {"epochs": 1, "batch_size": 2, "device": "cpu", "out_dir": str(tmp)},
        "logging": {"progress": False, "tensorboard": False, "log_every": 1},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) and k != "method" else v
    return config_from_dict(base)


def make_trainer(cfg, train, val=None, seed: int = 0) -> Trainer:
    torch.manual_seed(seed)  # the random-init backbone must be the same in every run
    return Trainer(cfg, train, val, model=build_model(cfg))


# ----------------------------------------------------------------------------------- schedule


def test_warmup_cosine_schedule() -> None:
    s = WarmupCosine(total_steps=10, warmup_steps=2, min_ratio=0.1)
    assert s(0) == pytest.approx(0.5) and s(1) == pytest.approx(1.0)  # linear warm-up
    assert s(2) == pytest.approx(1.0)  # cosine starts at the peak
    assert s(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert s(10) == pytest.approx(0.1) and s(50) == pytest.approx(0.1)  # floor
    vals = [s(i) for i in range(2, 11)]
    assert all(a >= b for a, b in zip(vals, vals[1:], strict=False))
    const = WarmupCosine(10, 0, schedule="constant")
    assert const(0) == const(9) == 1.0


def test_scheduler_drives_optimizer_lr(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, optim={"lr": 1e-2, "warmup_steps": 2}, train={"max_steps": 4})
    tr = make_trainer(cfg, Rectangles(4))
    tr.fit()
    lrs = [h["lr"] for h in tr.history]  # lr after each step
    expected = [1e-2 * WarmupCosine(4, 2)(i) for i in range(1, 5)]
    assert lrs == pytest.approx(expected)


# ------------------------------------------------------------------------------------ prompts


def test_sample_prompts_shapes_and_frames() -> None:
    rng = np.random.default_rng(0)
    t = np.zeros((3, 32, 32), bool)
    t[0, 5:10, 20:30] = True
    t[1, 0:32, 0:4] = True
    t[2, 16:17, 16:17] = True
    p = sample_prompts(t, "3pt", rng)
    assert p.coords.shape == (3, 3, 2) and p.boxes is None and (p.labels == 1).all()
    for i in range(3):  # positive points lie inside the target, (x, y) order
        xs, ys = p.coords[i, :, 0].astype(int), p.coords[i, :, 1].astype(int)
        assert t[i, ys, xs].all()
    b = sample_prompts(t, "box", rng)
    assert b.coords is None and b.boxes.shape == (3, 4)
    assert b.boxes[0].tolist() == [20, 5, 29, 9]  # tight box (x0, y0, x1, y1)
    assert sample_prompts(t[:1], "1pt", rng).ambiguous
    assert not p.ambiguous and not b.ambiguous


def test_sample_prompts_empty_targets_get_negative_point() -> None:
    rng = np.random.default_rng(0)
    t = np.zeros((2, 16, 16), bool)
    t[0, 2:6, 2:6] = True
    p = sample_prompts(t, "bbox0.75", rng)  # box protocol falls back to points for the batch
    assert p.boxes is None and p.labels.shape == (2, 1)
    assert p.labels[0, 0] == 1 and p.labels[1, 0] == 0
    q = sample_prompts(t, "3pt", rng)
    assert q.labels[1].tolist() == [0, -1, -1]  # padded with SAM's "not a point"


def test_prompt_batch_add_points() -> None:
    p = PromptBatch(None, None, np.zeros((2, 4), np.float32))
    q = p.add_points(np.array([[1, 2], [3, 4]], np.float32), np.array([1, -1]))
    assert q.coords.shape == (2, 1, 2) and q.labels.tolist() == [[1], [-1]]
    assert q.boxes is p.boxes


# ------------------------------------------------------------------------------- the training loop


def _fixed_loss(tr: Trainer, batch: dict) -> float:
    with torch.no_grad():
        return float(tr._forward_loss(batch, np.random.default_rng(123)))


def test_training_lowers_loss_and_only_tunables_change(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path,
        method={"method": "medsa", "rank": 8, "train_mask_decoder": True},
        prompts={"protocols": {"box": 1.0}, "clicks": 0},
        train={"epochs": 3},
    )
    data = Rectangles(8)
    tr = make_trainer(cfg, data)
    batch = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("image", "target")}
    before_params = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    before_bufs = {n: b.detach().clone() for n, b in tr.model.named_buffers()}
    before = _fixed_loss(tr, batch)
    tr.fit()
    after = _fixed_loss(tr, batch)
    assert after < before - 0.05, (before, after)
    changed = frozen_changed = 0
    for n, p in tr.model.named_parameters():
        same = torch.equal(p, before_params[n])
        if p.requires_grad:
            changed += not same
        else:
            frozen_changed += not same
            assert p.grad is None, n
    assert frozen_changed == 0  # frozen weights bitwise unchanged
    for n, b in tr.model.named_buffers():
        assert torch.equal(b, before_bufs[n]), n
    assert changed > 0
    # the optimizer holds exactly the tunable parameters
    opt_ids = {id(p) for g in tr.optimizer.param_groups for p in g["params"]}
    assert opt_ids == {id(p) for p in tr.model.parameters() if p.requires_grad}
    # outputs: checkpoints, adapter files, csv log
    ck = tmp_path / "checkpoints"
    for name in ("last.pt", "last.safetensors", "last.json", "best.pt"):
        assert (ck / name).is_file(), name
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0].startswith("event,epoch,step,loss") and len(rows) == 1 + tr.step


def test_adapter_checkpoint_loads_into_fresh_model(tmp_path: Path) -> None:
    from medsa.adapters.io import load_adapter
    from medsa.sam import build_sam

    cfg = make_cfg(tmp_path, train={"max_steps": 2})
    torch.manual_seed(0)
    tr = make_trainer(cfg, Rectangles(4))
    tr.fit()
    torch.manual_seed(0)
    fresh = load_adapter(build_sam("vit_tiny", img_size=SIZE), tmp_path / "checkpoints" / "last")
    want = dict(tr.model.named_parameters())
    for n, p in fresh.named_parameters():
        assert torch.equal(p, want[n]), n


def test_validation_and_best_checkpoint(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path,
        train={"epochs": 2, "val_every": 1, "val_at_start": True},
        prompts={"val_protocol": "box"},
    )
    tr = make_trainer(cfg, Rectangles(4), Rectangles(3, seed=5))
    v0 = tr.validate()
    assert 0.0 <= v0 <= 1.0
    assert tr.validate() == v0  # deterministic prompts
    s = tr.fit()
    assert s["best_val_dice"] is not None and s["best_step"] in (0, 2, 4)
    best = load_train_state(tmp_path / "checkpoints" / "best.pt")
    assert best["best_metric"] == pytest.approx(s["best_val_dice"])
    rows = [r.split(",") for r in (tmp_path / "log.csv").read_text().splitlines()[1:]]
    vals = [(int(r[2]), float(r[5])) for r in rows if r[0] == "val"]
    assert [st for st, _ in vals] == [0, 2, 4]  # baseline before the first step, then per epoch
    assert vals[0][1] == pytest.approx(v0, abs=1e-6)
    assert s["best_val_dice"] == pytest.approx(max(v for _, v in vals), abs=1e-6)


def test_grad_accumulation_equals_big_batch(tmp_path: Path) -> None:
    """accum=2 x batch 1 takes the same optimizer steps as batch 2 (up to float order)."""
    common = {"prompts": {"protocols": {"box": 1.0}, "clicks": 0}}
    a = make_trainer(
        make_cfg(tmp_path / "a", train={"max_steps": 2, "batch_size": 2}, **common), Rectangles(4)
    )
    b = make_trainer(
        make_cfg(
            tmp_path / "b", train={"max_steps": 2, "batch_size": 1, "grad_accum": 2}, **common
        ),
        Rectangles(4),
    )
    assert b.steps_per_epoch == a.steps_per_epoch == 2
    a.fit()
    b.fit()
    pa = dict(a.model.named_parameters())
    for n, p in b.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, pa[n], atol=2e-5, rtol=1e-4)


def test_resume_is_exact(tmp_path: Path) -> None:
    """N steps straight == k steps, stop, resume from last.pt, N - k steps (bitwise on CPU)."""
    data = Rectangles(6)
    n, k = 5, 2  # 3 steps per epoch: stops mid-epoch, continues into the next epoch

    def cfg(out: str):
        return make_cfg(tmp_path / out, train={"max_steps": n}, prompts={"clicks": 2})

    straight = make_trainer(cfg("straight"), data)
    straight.fit()

    first = make_trainer(cfg("resumed"), data)
    s = first.fit(stop_at_step=k)
    assert s["stopped_early"] and s["steps"] == k
    state = load_train_state(tmp_path / "resumed" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (0, k, k)

    torch.manual_seed(1234)  # the resumed process starts with unrelated RNG state
    np.random.seed(99)
    second = make_trainer(cfg("resumed"), data)
    second.load_state(state)
    second.fit()
    assert second.step == straight.step == n
    pa = dict(straight.model.named_parameters())
    n_cmp = 0
    for name, p in second.model.named_parameters():
        assert torch.equal(p, pa[name]), name
        n_cmp += p.requires_grad
    assert n_cmp > 0
    losses = [h["loss"] for h in straight.history]
    assert [h["loss"] for h in first.history + second.history] == losses


def test_resume_rejects_mismatched_weights(tmp_path: Path) -> None:
    data = Rectangles(2)
    tr = make_trainer(make_cfg(tmp_path, train={"max_steps": 1}), data)
    tr.fit()
    state = load_train_state(tmp_path / "checkpoints" / "last.pt")
    other = make_trainer(
        make_cfg(tmp_path / "o", method={"method": "lora", "rank": 2}, train={"max_steps": 1}), data
    )
    with pytest.raises(CheckpointError, match="do not match method 'lora'"):
        other.load_state(state)


def test_3d_chunks_with_sd_trans(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path,
        method={"method": "medsa", "rank": 4, "sd_trans": True},
        train={"max_steps": 1},
        prompts={"clicks": 1},
    )
    tr = make_trainer(cfg, Rectangles(2, depth=3))
    seen = []
    enc = tr.model.image_encoder
    hook = enc.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0].shape, kwargs.get("depth"))), with_kwargs=True
    )
    tr.fit()
    hook.remove()
    assert seen[0] == (torch.Size([2 * 3, 3, SIZE, SIZE]), 3)
    assert math.isfinite(tr.history[0]["loss"])
    sd = [n for n, p in tr.model.named_parameters() if "depth_branch" in n]
    assert sd and all(dict(tr.model.named_parameters())[n].requires_grad for n in sd)


def test_masam_multiclass_head_uses_dice_ce(tmp_path: Path) -> None:
    from medsa.engine.losses import DiceCELoss

    cfg = make_cfg(
        tmp_path,
        method={"method": "masam", "fact_rank": 4, "adapter_dim": 8, "num_classes": 3},
        train={"max_steps": 2},
    )
    tr = make_trainer(cfg, Rectangles(4, depth=2, labels=True), Rectangles(2, depth=2, labels=True))
    assert isinstance(tr.loss_fn, DiceCELoss)
    s = tr.fit()
    assert math.isfinite(s["final_loss"]) and s["best_val_dice"] is not None


def test_trainer_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trains no parameters"):
        make_trainer(make_cfg(tmp_path, method={"method": "zeroshot"}), Rectangles(2))
    with pytest.raises(DataError, match="training set is empty"):
        make_trainer(make_cfg(tmp_path), Rectangles(0))
    with pytest.raises(ConfigError, match="unknown prompt protocol 'bbox9'"):
        make_trainer(make_cfg(tmp_path, prompts={"protocols": {"bbox9": 1.0}}), Rectangles(2))
    with pytest.raises(ConfigError, match="dice_ce needs MA-SAM"):
        make_trainer(make_cfg(tmp_path, loss={"name": "dice_ce"}), Rectangles(2))


def test_mask_input_feeds_previous_logits(tmp_path: Path) -> None:
    cfg = make_cfg(
        tmp_path,
        prompts={"protocols": {"bbox0.75": 1.0}, "clicks": 2, "mask_input": True},
        train={"max_steps": 4},
    )
    tr = make_trainer(cfg, Rectangles(4))
    calls = []
    pe = tr.model.prompt_encoder
    hook = pe.register_forward_hook(
        lambda m, args, kwargs, out: calls.append(
            (
                kwargs.get("masks") is not None,
                kwargs["points"][0].shape[1] if kwargs.get("points") else 0,
            )
        ),
        with_kwargs=True,
    )
    tr.fit()
    hook.remove()
    # per step: k simulated passes (+1 click each), then the trained pass fed the last logits
    assert any(has_mask for has_mask, _ in calls)
    for has_mask, n_points in calls:
        assert has_mask == (n_points > 0)  # a mask prompt exactly when clicks were simulated
    assert max(n for _, n in calls) <= 2


def test_bf16_autocast_on_cpu(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, train={"max_steps": 1, "precision": "bf16"})
    tr = make_trainer(cfg, Rectangles(2))
    assert tr.dtype is torch.bfloat16
    tr.fit()
    assert math.isfinite(tr.history[0]["loss"])
    assert all(p.dtype == torch.float32 for p in tr.model.parameters())  # master weights stay fp32
    with pytest.raises(ConfigError, match="fp16 needs CUDA"):
        make_trainer(make_cfg(tmp_path, train={"precision": "fp16"}), Rectangles(2))


def test_resume_can_extend_a_finished_run(tmp_path: Path) -> None:
    data = Rectangles(4)  # 2 steps per epoch
    first = make_trainer(make_cfg(tmp_path, train={"max_steps": 2}), data)
    first.fit()
    state = load_train_state(tmp_path / "checkpoints" / "last.pt")
    longer = make_trainer(make_cfg(tmp_path, train={"max_steps": 5}), data)
    longer.load_state(state)
    longer.fit()
    assert longer.step == 5 and [h["step"] for h in longer.history] == [3, 4, 5]
    sched = WarmupCosine(5, 1)  # the new, longer schedule (lr 3e-3, warm-up 1)
    assert [h["lr"] for h in longer.history] == pytest.approx([3e-3 * sched(i) for i in (3, 4, 5)])


class _Killed(Exception):
    """Stands in for kill -9 right after a checkpoint write."""


def test_save_every_writes_mid_epoch_and_resumes_exactly(tmp_path: Path) -> None:
    """train.save_every: ``last`` is written mid-epoch; a run killed right after it resumes from
    that checkpoint to bitwise the same weights and losses as an uninterrupted run."""
    data = Rectangles(8)  # batch 2: 4 steps per epoch
    n = 6

    def cfg(out: str, **train):
        return make_cfg(
            tmp_path / out,
            train={"max_steps": n, "save_every": 3, "save_every_minutes": 0, **train},
            prompts={"clicks": 2},
        )

    straight = make_trainer(cfg("straight"), data)
    straight.fit()

    first = make_trainer(cfg("killed"), data)
    real_save = first.save

    def save_then_die(name: str):
        path = real_save(name)
        if first.step == 3:
            raise _Killed
        return path

    first.save = save_then_die  # type: ignore[method-assign]
    with pytest.raises(_Killed):
        first.fit()
    state = load_train_state(tmp_path / "killed" / "checkpoints" / "last.pt")
    assert (state["epoch"], state["batch_in_epoch"], state["step"]) == (0, 3, 3)  # mid-epoch

    torch.manual_seed(1234)  # the resumed process starts with unrelated RNG state
    np.random.seed(99)
    second = make_trainer(cfg("killed"), data)
    second.load_state(state)
    second.fit()
    assert second.step == straight.step == n
    pa = dict(straight.model.named_parameters())
    assert all(torch.equal(p, pa[k]) for k, p in second.model.named_parameters())
    losses = [h["loss"] for h in straight.history]
    assert [h["loss"] for h in first.history + second.history] == losses


def test_save_schedule_by_steps_and_minutes(tmp_path: Path) -> None:
    """Which steps write ``last``: every save_every steps mid-epoch plus each epoch end; with
    save_every_minutes after that much time (here: any time, so every step)."""
    data = Rectangles(8)  # 4 steps per epoch

    def saved_steps(**train) -> list[int]:
        tr = make_trainer(
            make_cfg(tmp_path / str(len(train)), train={"max_steps": 8, **train}), data
        )
        steps: list[int] = []
        real = tr.save
        tr.save = lambda name: (steps.append(tr.step), real(name))[1]  # type: ignore[method-assign]
        tr.fit()
        return steps

    assert saved_steps(save_every=0, save_every_minutes=0) == [4, 8, 8]  # epoch ends (+ best)
    assert saved_steps(save_every=3, save_every_minutes=0) == [3, 4, 6, 8, 8]
    assert saved_steps(save_every=0, save_every_minutes=1e-9) == [1, 2, 3, 4, 5, 6, 7, 8, 8]


def test_stale_tmp_files_are_removed_on_start(tmp_path: Path, capsys) -> None:
    """A kill during an atomic write leaves ``.<name>.<random>.tmp``; the next start removes it."""
    ck = tmp_path / "checkpoints"
    ck.mkdir(parents=True)
    stale = [ck / ".last.pt.k3j2.tmp", ck / ".last.safetensors.x9.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    keep = ck / "notes.tmp"  # not one of ours (no leading dot): left alone
    keep.write_text("x")
    make_trainer(make_cfg(tmp_path, train={"max_steps": 1}), Rectangles(2)).fit()
    assert not any(p.exists() for p in stale) and keep.exists()
    assert "removed 2 temporary file(s)" in capsys.readouterr().err
    assert load_train_state(ck / "last.pt")["step"] == 1


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (OSError(28, "No space left on device"), "no space left"),
        (OSError(13, "Permission denied"), "permission denied"),
        # what torch.save itself raises when the disk fills up mid-write
        (
            RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0"),
            "is the disk full",
        ),  # fmt: skip
    ],
)
def test_failed_checkpoint_write_keeps_last_good_one(tmp_path: Path, monkeypatch, error, message):
    """A checkpoint write that fails (full disk, permissions) is one clear OutputError naming
    the file and the last good checkpoint, which stays loadable; no .tmp is left behind."""
    from medsa.engine import checkpoint as ckpt_mod
    from medsa.engine.outputs import OutputError

    tr = make_trainer(
        make_cfg(tmp_path, train={"max_steps": 3, "save_every": 1, "save_every_minutes": 0}),
        Rectangles(8),
    )
    real = ckpt_mod.torch.save
    calls = []

    def failing_save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:  # the step-2 checkpoint
            f.write(b"half a checkpoint")
            raise error
        return real(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", failing_save)
    with pytest.raises(OutputError) as e:
        tr.fit()
    msg = str(e.value)
    assert message in msg and "last.pt" in msg and "(step 1) is kept" in msg, msg
    assert "\n" not in msg
    assert load_train_state(tmp_path / "checkpoints" / "last.pt")["step"] == 1
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
