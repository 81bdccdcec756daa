#!/usr/bin/env python
"""Image-encoder inference throughput: medsa vs Meta's segment-anything, in one process.

Both encoders hold the same random weights (one state dict, loaded strictly into both) and see the
same input batch. Rows: segment-anything fp32 (its default) and bf16 autocast; medsa with each
requested attention implementation and dtype. ``x SA fp32`` is the speed-up over segment-anything's
default; ``rel err`` is ``||out - out_SA_fp32|| / ||out_SA_fp32||``.

Example (2 CPU cores)::

    python benchmarks/bench_encoder.py --device cpu --backbone vit_b --iters 3 --threads 2
"""

from __future__ import annotations

import argparse
import copy

import torch
from _common import (
    add_common_args,
    args_json,
    emit,
    encoder_pair,
    environment,
    fmt_bytes,
    fmt_ms,
    markdown_table,
    rel_error,
    round_robin,
    run_cli,
    setup,
    vit_config,
)

from medsa.engine.perf import autocast_context, maybe_compile, set_attention_impl

DEFAULT_MEDSA = ("sdpa_folded:fp32", "sdpa_folded:bf16", "sdpa_bias:bf16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, iters=3, batch=1)
    p.add_argument(
        "--medsa",
        nargs="+",
        default=list(DEFAULT_MEDSA),
        metavar="IMPL:DTYPE",
        help="medsa rows, e.g. sdpa_folded:bf16 explicit:fp32 (default: %(default)s)",
    )
    p.add_argument(
        "--reference-dtypes",
        nargs="+",
        default=["fp32", "bf16"],
        help="segment-anything rows (fp32 is always included as the baseline)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="shortcut: restrict all rows to this dtype (the SA fp32 baseline stays)",
    )
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd medsa rows")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = setup(args)
    cfg = vit_config(args.backbone, args.img_size)
    ours, ref = encoder_pair(cfg, args.seed)
    ours, ref = ours.to(device).eval(), ref.to(device).eval()
    x = torch.randn(args.batch, 3, cfg.img_size, cfg.img_size, device=device)

    medsa_rows = [tuple(v.split(":")) for v in args.medsa]
    ref_dtypes = list(dict.fromkeys(["fp32", *args.reference_dtypes]))
    if args.dtype:
        medsa_rows = [r for r in medsa_rows if r[1] == args.dtype] or [("sdpa_folded", args.dtype)]
        ref_dtypes = list(dict.fromkeys(["fp32", args.dtype]))

    def run_ref(dtype: str):
        def fn() -> torch.Tensor:
            with torch.inference_mode(), autocast_context(device, dtype):
                return ref(x)

        return fn

    def run_ours(model: torch.nn.Module, target: torch.nn.Module, impl: str, dtype: str):
        """``model`` is called; ``target`` is the eager module whose attention impl is set."""

        def fn() -> torch.Tensor:
            set_attention_impl(target, impl)
            with torch.inference_mode(), autocast_context(device, dtype):
                return model(x)

        return fn

    fns = {f"segment-anything | explicit | {d}": run_ref(d) for d in ref_dtypes}
    for impl, dtype in medsa_rows:
        fns[f"medsa | {impl} | {dtype}"] = run_ours(ours, ours, impl, dtype)
        if args.compile:
            # A private copy per row: switching attention_impl on a shared compiled module would
            # trigger a recompilation on every call.
            twin = copy.deepcopy(ours)
            set_attention_impl(twin, impl)
            fns[f"medsa | {impl} | {dtype} | compiled"] = run_ours(
                maybe_compile(twin, True), twin, impl, dtype
            )

    results = round_robin(fns, args.iters, args.warmup, device, items_per_call=args.batch)
    base = results["segment-anything | explicit | fp32"]
    rows = []
    for name, r in results.items():
        impl_name, dtype = name.split(" | ")[1:3]
        same = results.get(f"segment-anything | explicit | {dtype}")
        rows.append(
            [
                *[c.strip() for c in name.split(" | ")],
                *([""] if " | compiled" not in name and args.compile else []),
                fmt_ms(r.median_s),
                f"{r.median_cpu_s:.3g}",
                f"{r.throughput:.2f}",
                f"{base.median_s / r.median_s:.2f}x",
                f"{same.median_s / r.median_s:.2f}x" if same is not None else "-",
                fmt_bytes(r.peak_bytes),
                f"{rel_error(r.output, base.output):.1e}",
            ]
        )
        r.extra["rel_err_vs_sa_fp32"] = rel_error(r.output, base.output)
    headers = ["model", "attention", "dtype"] + (["compile"] if args.compile else [])
    headers += ["ms/batch", "CPU s", "img/s", "x SA fp32", "x SA same dtype", "peak mem", "rel err"]
    env = environment(device)
    title = (
        f"Image encoder inference, {args.backbone} @ {cfg.img_size}px, batch {args.batch}, "
        f"median of {args.iters}"
    )
    payload = {
        "args": args_json(args),
        "rows": [r.to_json() for r in results.values()],
    }
    emit(title, markdown_table(headers, rows), env, args, payload)
    return payload


if __name__ == "__main__":
    run_cli(main)
