"""``medsa train`` end to end on a tiny synthetic folder dataset: outputs, --resume, error paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsa.cli import main as cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see the fixture


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory) -> Path:
    """10 RGB PNGs (80 x 96) with a bright rectangle, masks 0/255 (the 2D folder layout)."""
    root = tmp_path_factory.mktemp("rects")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        img = np.full((80, 96, 3), 40, np.uint8)
        m = np.zeros((80, 96), np.uint8)
        x0, y0 = rng.integers(5, 40, 2)
        img[y0 : y0 + 25, x0 : x0 + 30] = 200
        m[y0 : y0 + 25, x0 : x0 + 30] = 255
        Image.fromarray(img).save(root / "images" / f"case{i:02d}.png")
        Image.fromarray(m).save(root / "masks" / f"case{i:02d}.png")
    return root


def _config(tmp_path: Path, data_root: Path, out: str = "run") -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(
        f"""
model: {{backbone: vit_tiny, options: {{img_size: 64}}}}
method: {{method: medsa, rank: 4}}
data: {{root: {data_root}, n_folds: 2, test_fraction: 0.2}}
prompts: {{protocols: {{1pt: 0.5, bbox0.75: 0.5}}, clicks: 1}}
optim: {{lr: 1.0e-3}}
train: {{epochs: 2, batch_size: 2, device: cpu, out_dir: {tmp_path / out}}}
logging: {{progress: false, log_every: 1}}
"""
    )
    return p


def test_train_cli_writes_run_and_resumes(tmp_path: Path, folder_dataset: Path, capsys) -> None:
    cfg = _config(tmp_path, folder_dataset)
    run = tmp_path / "run"
    assert cli(["train", "-c", str(cfg), "--stop-after-steps", "1"]) == 0
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 1
    split = json.loads((run / "splits.json").read_text())
    assert len(split["test"]) == 2 and len(split["train"]) == 4 and len(split["val"]) == 4
    assert not set(split["test"]) & set(split["train"] + split["val"])
    assert (run / "config.yaml").is_file() and list((run / "tensorboard").iterdir())
    # continue: config comes from the checkpoint; 4 train images / batch 2 x 2 epochs = 4 steps
    assert cli(["train", "--resume", str(run)]) == 0
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["best_val_dice"] is not None
    steps = [int(r.split(",")[2]) for r in (run / "log.csv").read_text().splitlines()[1:]
             if r.startswith("train")]  # fmt: skip
    assert steps == [1, 2, 3, 4]  # one log, appended across the interruption
    out = capsys.readouterr().out
    assert "trained 4 steps" in out
    # the interrupted + resumed run ends with the same weights as an uninterrupted one
    assert cli(["train", "-c", str(cfg), "--out-dir", str(tmp_path / "straight")]) == 0
    a = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a finished run is not silently overwritten by a new one
    assert cli(["train", "-c", str(cfg)]) == 1
    assert "already holds a training run; continue it with --resume" in capsys.readouterr().err
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    assert cli(["train", "-c", str(cfg), "--overwrite", "--stop-after-steps", "1"]) == 0
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 1
    assert len((run / "log.csv").read_text().splitlines()) == 2  # header + step 1


def test_print_config_applies_overrides(tmp_path: Path, folder_dataset: Path, capsys) -> None:
    cfg = _config(tmp_path, folder_dataset)
    assert cli(["train", "-c", str(cfg), "--set", "optim.lr=5e-4", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lr: 0.0005" in out and "backbone: vit_tiny" in out
    assert (
        cli(["train", "-c", str(cfg), "--set", "method={method: lora, rank: 2}", "--print-config"])
        == 0
    )
    out = capsys.readouterr().out
    assert "method: lora" in out and "rank: 2" in out and "sd_trans" not in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "give --config cfg.yaml"),
        (["--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
        (["--set", "data.root=/nonexistent/data"], "not a folder"),
        (["--set", "model.backbone=vit_q"], "unknown model 'vit_q'"),
        (["--set", "data.classes=[tumour]"], "unknown class 'tumour'"),
        (["--set", "data.layout=nnunet"], "has the 'folder' layout"),
        (["--set", "data.image_size=128"], "data.image_size=128 does not fit vit_tiny"),
        (["--set", "method=lora"], "needs a mapping"),
        (["--resume", "/nonexistent/run"], "no such file or folder"),
        (["--stop-after-steps", "0"], "--stop-after-steps must be >= 1"),
        # non-finite / negative numbers are config errors, not NaN training or a traceback
        (["--set", "optim.lr=.nan"], "optim.lr must be a finite number"),
        (["--set", "optim.weight_decay=.inf"], "optim.weight_decay must be a finite number"),
        (["--set", "loss.lambda_dice=-1"], "loss weights must be >= 0"),
        (["--set", "train.seed=-1"], "train.seed must be >= 0"),
        (["--set", "train.save_every=-5"], "train.save_every must be >= 0"),
        (["--set", "logging.log_every=0"], "logging.log_every must be >= 1"),
        (["--set", "method.scale=.nan"], "scale must be a positive (finite) number"),
    ],
)
def test_cli_errors(tmp_path: Path, folder_dataset: Path, capsys, args, message) -> None:
    cfg = _config(tmp_path, folder_dataset)
    full = ["train"] + ([] if not args or args[0] == "--resume" else ["-c", str(cfg)]) + args
    assert cli(full) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_corrupt_resume_checkpoint(tmp_path: Path, folder_dataset: Path, capsys) -> None:
    ck = tmp_path / "run" / "checkpoints"
    ck.mkdir(parents=True)
    (ck / "last.pt").write_bytes(b"\x00" * 100)
    assert cli(["train", "--resume", str(tmp_path / "run")]) == 1
    assert "unreadable" in capsys.readouterr().err


def test_cli_unwritable_out_dir_is_one_line(tmp_path: Path, folder_dataset: Path, capsys) -> None:
    cfg = _config(tmp_path, folder_dataset)
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "run"  # below a file: cannot be created, even as root
    assert cli(["train", "-c", str(cfg), "--out-dir", str(out)]) == 1
    err = capsys.readouterr().err
    assert str(out) in err and "out_dir" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_cli_disk_full_keeps_last_checkpoint_and_resumes(
    tmp_path: Path, folder_dataset: Path, capsys, monkeypatch
) -> None:
    """ENOSPC while writing a checkpoint: exit 1 with one line naming it; the last good
    checkpoint is kept and the run continues from it with --resume."""
    import errno

    from medsa.engine import checkpoint as ckpt_mod

    cfg = _config(tmp_path, folder_dataset)
    run = tmp_path / "run"
    real = ckpt_mod.torch.save
    calls = []

    def full_disk(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", full_disk)
    argv = ["train", "-c", str(cfg), "--set", "train.save_every=1"]
    assert cli(argv) == 1
    err = capsys.readouterr().err
    assert "no space left" in err and "last.pt (step 1) is kept" in err and "--resume" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 1
    monkeypatch.setattr(ckpt_mod.torch, "save", real)
    assert cli(["train", "--resume", str(run)]) == 0
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
