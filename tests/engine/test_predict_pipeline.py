"""medsa predict with read-ahead workers, batched encoder passes and torchrun sharding: the same
masks as one input at a time (tiny random model saved to a checkpoint)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medsa.cli import main as cli_main
from medsa.data.io import read_image, write_image
from medsa.engine.inference import Prompt, segment_volume

torch = pytest.importorskip("torch")

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    d = tmp_path / "in"
    d.mkdir()
    for i in range(5):
        write_image((rng.random((40 + 2 * i, 50, 3)) * 255).astype(np.uint8), d / f"i{i}.png")
    (d / "broken.png").write_bytes(b"not a png")  # fails in the reader, reported, others go on
    return d


@pytest.fixture
def ckpt(tiny_model, tmp_path: Path) -> list[str]:
    p = tmp_path / "tiny.pt"
    torch.save(tiny_model.state_dict(), p)
    return ["--backbone", "vit_tiny", "--checkpoint", str(p), "--device", "cpu"]


def _masks(out: Path) -> dict[str, np.ndarray]:
    return {p.name: read_image(p).array for p in sorted(out.glob("*_mask.png"))}


def test_predict_workers_and_batches_write_the_same_masks(folder, ckpt, tmp_path, capsys):
    base = ["predict", str(folder), "--box", "5,5,30,30", *ckpt]
    rc = cli_main([*base, "--out", str(tmp_path / "seq"), "--workers", "0", "--batch-size", "1"])
    assert rc == 1  # broken.png
    rc = cli_main([*base, "--out", str(tmp_path / "par"), "--workers", "2", "--batch-size", "3"])
    assert rc == 1
    err = capsys.readouterr().err
    # reported once by each run, the other files written
    assert sum("broken.png" in ln for ln in err.splitlines()) == 2
    seq, par = _masks(tmp_path / "seq"), _masks(tmp_path / "par")
    assert len(seq) == 5 and seq.keys() == par.keys()
    for k in seq:
        assert np.array_equal(seq[k], par[k]), k


def test_predict_rejects_bad_run_options(folder, tmp_path, capsys):
    rc = cli_main(["predict", str(folder), "--box", "1,1,5,5", "--out", str(tmp_path / "o"),
                   "--workers", "-1", "--backbone", "vit_tiny"])  # fmt: skip
    assert rc == 1 and "--workers must be >= 0" in capsys.readouterr().err


def test_segment_volume_batches_prompted_slices(tiny_model):
    from medsa.sam import SamPredictor

    vol = np.random.default_rng(0).normal(size=(6, 40, 50)).astype(np.float32)
    box = Prompt(box=np.array([5, 5, 30, 25], np.float32))
    prompts = {0: [box], 2: [box], 3: [None], 4: [box], 5: [box]}
    calls: list[int] = []
    h = tiny_model.image_encoder.register_forward_hook(
        lambda m, i, o: calls.append(int(o.shape[0]))
    )
    try:
        m1, s1 = segment_volume(SamPredictor(tiny_model), vol, prompts)
        assert calls == [1, 1, 1, 1]  # slice 3 has no prompt: not encoded
        calls.clear()
        m3, s3 = segment_volume(SamPredictor(tiny_model), vol, prompts, batch_size=3)
        assert calls == [3, 1]
    finally:
        h.remove()
    assert np.array_equal(m1, m3)
    np.testing.assert_allclose(s1, s3, rtol=0, atol=1e-5)  # batched GEMMs: last-bit rounding


@pytest.mark.slow
def test_predict_under_torchrun_splits_the_inputs(folder, ckpt, tmp_path):
    (folder / "broken.png").unlink()
    one = tmp_path / "one"
    assert cli_main(["predict", str(folder), "--box", "5,5,30,30", *ckpt, "--out", str(one)]) == 0
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", "2", "-m", "medsa.cli", "predict", str(folder), "--box", "5,5,30,30",
           *ckpt, "--out", str(two)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("5/5 inputs segmented") == 1  # counts summed, printed by rank 0
    assert proc.stdout.count(" -> ") == 5  # every input segmented once, by one of the ranks
    a, b = _masks(one), _masks(two)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
