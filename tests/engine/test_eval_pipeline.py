"""Batched / prefetched / sharded evaluation gives exactly the sequential results.

Tiny random ``vit_tiny`` model; a PNG dataset folder on disk (so that worker processes can read
it) and the synthetic 3D dataset of test_evaluate (batched slices, inline reading).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medsa.data.io import write_image
from medsa.engine.evaluate import EvalConfig, evaluate_model
from medsa.engine.prefetch import OrderedPool, make_executor, prefetch

torch = pytest.importorskip("torch")

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"


def _write_dataset(root: Path, n: int) -> Path:
    """``n`` PNG cases of different sizes, two classes (disc, cup)."""
    rng = np.random.default_rng(1)
    for d in ("images", "masks_disc", "masks_cup"):
        (root / d).mkdir(parents=True)
    for i in range(n):
        h, w = 48 + 4 * (i % 3), 56 - 2 * (i % 2)
        img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        disc, cup = np.zeros((h, w), np.uint8), np.zeros((h, w), np.uint8)
        disc[6 + i : 30, 8 : 40 - i] = 255
        cup[32:44, 20 + i : 44] = 255
        write_image(img, root / "images" / f"c{i}.png")
        write_image(disc, root / "masks_disc" / f"c{i}.png")
        write_image(cup, root / "masks_cup" / f"c{i}.png")
    return root


def _same(a, b) -> bool:
    """Equal, with NaN == NaN (undefined HD95)."""
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.fixture
def passes(tiny_model):
    """Batch size of every image-encoder forward pass of ``tiny_model``."""
    calls: list[int] = []
    h = tiny_model.image_encoder.register_forward_hook(
        lambda m, i, o: calls.append(int(o.shape[0]))
    )
    yield calls
    h.remove()


CFG = EvalConfig(protocols=("1pt", "3pt", "bbox0.5", "bbox0.75"), seeds=(0, 1), noc_clicks=3)


def _run(model, ds, cfg=CFG, **kw):
    from medsa.sam import SamPredictor

    return evaluate_model(SamPredictor(model), ds, config=cfg, keep_worst=True, **kw)


def test_batched_prefetched_evaluation_equals_sequential(tiny_model, passes, tmp_path):
    from medsa.data.datasets import load_dataset

    ds = load_dataset(_write_dataset(tmp_path / "ds", 5))
    calls = passes
    seq = _run(tiny_model, ds)
    assert calls == [1] * 5  # today's path: one image per encoder pass
    calls.clear()
    fast = _run(tiny_model, ds, workers=2, batch_size=3)
    assert calls == [3, 2]  # 5 images in two passes, each image encoded once
    assert len(seq.rows) == 5 * 2 * 4 * 2
    assert _same(seq.rows, fast.rows)  # same rows in the same order, bit for bit
    assert _same(seq.summary, fast.summary) and _same(seq.noc, fast.noc)
    assert seq.worst == fast.worst
    assert [w["title"] for w in seq.worst_items] == [w["title"] for w in fast.worst_items]
    for a, b in zip(seq.worst_items, fast.worst_items, strict=True):
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["pred"], b["pred"])


def test_batched_3d_slices_equal_sequential(tiny_model, passes):
    sys.path.insert(0, str(HERE))
    from test_evaluate import SyntheticDataset

    ds = SyntheticDataset(3, n=2)  # 5 slices each, 4 of them with a target
    cfg = EvalConfig(protocols=("1pt", "bbox0.5"), noc_clicks=2)
    calls = passes
    seq = _run(tiny_model, ds, cfg)
    n_seq = list(calls)
    calls.clear()
    fast = _run(tiny_model, ds, cfg, batch_size=3)
    assert sum(n_seq) == sum(calls) and len(calls) < len(n_seq)  # same slices, fewer passes
    assert max(calls) == 3
    assert _same(seq.rows, fast.rows) and _same(seq.noc, fast.noc)


def test_embed_batch_matches_set_image(tiny_model, passes):
    from medsa.sam import SamPredictor

    rng = np.random.default_rng(0)
    imgs = [(rng.random((40 + 8 * i, 50, 3)) * 255).astype(np.uint8) for i in range(3)]
    ref = SamPredictor(tiny_model, cache_size=0)
    singles = []
    for im in imgs:
        ref.set_image(im)
        singles.append((ref.features.clone(), ref.input_size, ref.original_size))
    p = SamPredictor(tiny_model, cache_size=1)  # the batch is kept although the cache is small
    assert p.embed_batch(imgs) == 3 and p.embed_batch(imgs[:1]) == 0
    for im, (f, inp, orig) in zip(imgs, singles, strict=True):
        p.set_image(im)
        # a batched GEMM may round differently in the last bits (~2e-6 here), nothing more
        assert torch.allclose(p.features, f, rtol=0, atol=1e-5)
        assert (p.input_size, p.original_size) == (inp, orig)
    assert p.cache_misses == 3 and p.cache_hits == 3
    # expect(): the first miss encodes the next announced images with it
    calls = passes
    calls.clear()
    q = SamPredictor(tiny_model)
    q.expect(imgs, batch_size=2)
    for im, (f, _, _) in zip(imgs, singles, strict=True):
        q.set_image(im)
        assert torch.allclose(q.features, f, rtol=0, atol=1e-5)
    assert calls == [2, 1]


def test_prefetch_keeps_order_and_raises_in_place():
    ex = make_executor(2)
    try:
        assert list(prefetch(abs, [-3, 1, -2, 5], ex, ahead=2)) == [3, 1, 2, 5]
        it = prefetch(int, ["1", "x", "2"], ex)
        assert next(it) == 1
        with pytest.raises(ValueError):
            next(it)
        pool = OrderedPool(ex, limit=1)
        for k in range(4):
            pool.submit(pow, k, 2, tag=k)
        got = list(pool.ready()) + list(pool.drain())
        assert got == [(k, k * k) for k in range(4)]
    finally:
        ex.shutdown()
    assert list(prefetch(abs, [-1, -2])) == [1, 2]  # inline


@pytest.mark.slow
def test_torchrun_two_processes_write_the_single_process_report(tiny_model, tmp_path):
    """``torchrun --nproc_per_node 2 medsa evaluate``: each rank a disjoint half of the cases,
    rank 0 writes one report identical to the one-process report."""
    from medsa.cli import main as cli_main

    data = _write_dataset(tmp_path / "ds", 5)
    ckpt = tmp_path / "tiny.pt"
    torch.save(tiny_model.state_dict(), ckpt)
    common = ["evaluate", "--data", str(data), "--backbone", "vit_tiny", "--checkpoint",
              str(ckpt), "--device", "cpu", "--seeds", "0,1", "--noc-clicks", "2"]  # fmt: skip
    one = tmp_path / "one"
    assert cli_main([*common, "--out", str(one), "--workers", "0", "--batch-size", "1"]) == 0
    two = tmp_path / "two"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
           "--nproc_per_node", "2", "-m", "medsa.cli", *common, "--out", str(two),
           "--workers", "1", "--batch-size", "2"]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 1: [2/5] c1" in proc.stdout  # rank 1 evaluated cases 1 and 3
    assert "rank 0: [1/5] c0" in proc.stdout and "rank 0: [2/5]" not in proc.stdout
    assert (two / "metrics.csv").read_text() == (one / "metrics.csv").read_text()
    import json

    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (one, two))
    s1.pop("seconds"), s2.pop("seconds")
    assert s1 == s2
    assert (two / "worst_cases.png").stat().st_size > 0
