#!/usr/bin/env python
"""Propagation cost: one box on the middle slice -> the whole volume, vs the encoder time alone.

A synthetic ``(D, S, S)`` volume holds a bright ellipsoid that spans every slice, so propagation
visits all ``D`` slices. Rows (all in one process, same model and volume):

- ``encoder only``: ``VolumePropagator.embed`` of all slices (``--batch`` slices per forward):
  the unavoidable cost of looking at every slice once;
- ``encoder only, batch 1``: the same one slice per forward (with ``--batch1``);
- ``propagate (cold)``: a fresh propagator, lazy batched encoding + one decoder pass per slice;
- ``propagate (cached)``: the same call again (a correction / another object): decoder only.

The ratio columns are each row's wall / CPU time over ``encoder only`` (issue #11 target: cold
<= 1.5x). CPU time (this process, all threads) is the robust one on a loaded machine.
Model: LiteMedSAM's real weights (``--model lite_medsam``, its 256 x 256 input) so that the
masks, and therefore the propagation, are real; any ``build_sam`` name works.

Example::

    python benchmarks/bench_propagate.py --slices 88 --size 256 --threads 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _common import args_json, emit, environment, fmt_ms, markdown_table, run_cli, setup


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="lite_medsam", help="build_sam name (default lite_medsam)")
    p.add_argument("--slices", type=int, default=88, help="volume depth D (default 88)")
    p.add_argument("--size", type=int, default=256, help="slice side S (default 256)")
    p.add_argument("--batch", type=int, default=8, help="slices per encoder forward (default 8)")
    p.add_argument("--batch1", action="store_true", help="also time one slice per forward")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, type=Path, help="also write results as JSON")
    p.add_argument("--markdown", default=None, type=Path, help="also write the table (md)")
    return p


def volume(d: int, s: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(D, S, S)`` float32 MR-like volume and its ellipsoid ``(D, S, S)`` bool."""
    z, y, x = np.mgrid[:d, :s, :s].astype(np.float32)
    r = (x - s / 2) ** 2 / (0.22 * s) ** 2 + (y - s / 2) ** 2 / (0.15 * s) ** 2
    r = r + (z - (d - 1) / 2) ** 2 / (0.6 * d) ** 2  # radius > D/2: on every slice
    obj = r <= 1.0
    rng = np.random.default_rng(seed)
    vol = np.where(obj, 800.0, 200.0) + rng.normal(0, 30, (d, s, s))
    return vol.astype(np.float32), obj


def main(argv: list[str] | None = None) -> dict:
    from medsa.data.prompts import Prompt, tight_box
    from medsa.engine.propagate import VolumePropagator
    from medsa.sam import build_sam

    args = build_parser().parse_args(argv)
    args.iters = 1
    device = setup(args)
    model = build_sam(args.model).to(device).eval()
    vol, obj = volume(args.slices, args.size, args.seed)
    mid = args.slices // 2
    keys = {mid: Prompt(box=tight_box(obj[mid]))}
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}  # process CPU time: robust to load from other processes
    extra: dict[str, object] = {}
    with torch.inference_mode():
        # warm-up: one forward and one decode (allocators, lazy inits)
        with VolumePropagator(model, vol[:2], batch_size=2) as p:
            p.embed([0, 1])
            p.segment_slice(0, keys[mid])
        variants = [("encoder only", args.batch)] + (
            [("encoder only, batch 1", 1)] if args.batch1 else []
        )
        for name, b in variants:
            with VolumePropagator(model, vol, batch_size=b) as p:
                t0, c0 = time.perf_counter(), time.process_time()
                p.embed(range(args.slices))
                times[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
        with VolumePropagator(model, vol, batch_size=args.batch) as p:
            for name in ("propagate (cold)", "propagate (cached)"):
                t0, c0 = time.perf_counter(), time.process_time()
                res = p.propagate(keys, min_score=0.0)
                times[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
                extra.setdefault("encoded_cold", p.n_encoded)
    visited = int(np.isfinite(res.scores).sum())
    dice = 2 * float((res.masks & obj).sum()) / max(float(res.masks.sum() + obj.sum()), 1.0)
    extra.update(visited=visited, dice=dice, z_range=res.z_range)
    base, base_cpu = times["encoder only"], cpu["encoder only"]
    headers = ["variant", "wall", "per slice (ms)", "x encoder (wall)", "CPU", "x encoder (CPU)"]
    rows = [
        [
            n,
            f"{t:.1f} s",
            fmt_ms(t / args.slices),
            f"{t / base:.2f}",
            f"{cpu[n]:.1f} s",
            f"{cpu[n] / base_cpu:.2f}",
        ]
        for n, t in times.items()
    ]
    title = (
        f"Propagation of one box through a {args.slices} x {args.size}^2 volume ({args.model}, "
        f"batch {args.batch}; {visited} slices visited, {extra['encoded_cold']} encoded, "
        f"Dice {dice:.3f})"
    )
    env = environment(device)
    payload = {"args": args_json(args), "seconds": times, "cpu_seconds": cpu, **extra}
    emit(title, markdown_table(headers, rows), env, args, payload)
    return payload


if __name__ == "__main__":
    run_cli(main)
