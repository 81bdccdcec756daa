#!/usr/bin/env python
"""Prompt-to-mask latency on a cached image embedding: medsa vs segment-anything, one process.

Both ``SamPredictor``s wrap models with the same random weights and have ``set_image`` called on
the same image once; then each prompt kind is timed end to end (numpy prompt in, full-resolution
masks out: prompt encoder + mask decoder + upsampling). Batched rows decode ``--prompts`` boxes in
one ``predict_torch`` call. The last row times ``set_image`` on an image seen before: medsa's
embedding cache returns the stored embedding, segment-anything re-runs the encoder.

Example::

    python benchmarks/bench_prompt.py --device cpu --backbone vit_b --iters 20
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _common import (
    Result,
    add_common_args,
    args_json,
    emit,
    environment,
    fmt_ms,
    markdown_table,
    randomize_,
    rel_error,
    round_robin,
    run_cli,
    setup,
)
from reference_medsa import reference_sam

from medsa.engine.perf import autocast_context, synchronize


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, iters=20, batch=1)
    p.add_argument("--image-size", type=int, default=512, help="side of the (square) test image")
    p.add_argument("--prompts", type=int, default=16, help="boxes in the batched rows")
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=("fp32", "bf16", "bf16-weights"),
        help="medsa precision: fp32; bf16 = autocast (fp32 weights); bf16-weights = the model "
        "cast to bfloat16 (model.to(torch.bfloat16): no per-call weight casts, AMX/tensor cores)",
    )
    p.add_argument(
        "--cache-iters",
        type=int,
        default=1,
        help="timed set_image calls on a seen image (0: skip; SA re-encodes every time)",
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = setup(args)
    from segment_anything import SamPredictor as SAPredictor

    from medsa.sam.build import build_sam_from_config, get_config
    from medsa.sam.predictor import SamPredictor

    overrides = {"img_size": args.img_size} if args.img_size else {}
    cfg = get_config(args.backbone, **overrides)
    torch.manual_seed(args.seed)
    ours = build_sam_from_config(cfg, name=args.backbone)
    randomize_(ours, args.seed)
    ref = reference_sam(cfg)
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours.to(device).eval()
    ref.to(device).eval()
    if args.dtype == "bf16-weights":
        ours.to(torch.bfloat16)
    amp = "fp32" if args.dtype == "bf16-weights" else args.dtype  # autocast mode for medsa

    rng = np.random.default_rng(args.seed)
    n = args.image_size
    image = rng.integers(0, 256, (n, n, 3), dtype=np.uint8)
    p_ours, p_ref = SamPredictor(ours), SAPredictor(ref)
    with torch.inference_mode(), autocast_context(device, amp):
        p_ours.set_image(image)
    with torch.inference_mode():
        p_ref.set_image(image)

    box = np.array([n * 0.2, n * 0.3, n * 0.7, n * 0.8], dtype=np.float32)
    point, label = np.array([[n * 0.5, n * 0.4]], dtype=np.float32), np.array([1])
    xy = rng.uniform(0, n * 0.5, (args.prompts, 2))
    boxes = np.concatenate([xy, xy + n * 0.4], axis=1).astype(np.float32)

    def medsa(**kw):
        def fn():
            with torch.inference_mode(), autocast_context(device, amp):
                return p_ours.predict(**kw)[2]

        return fn

    def sa(**kw):
        def fn():
            with torch.inference_mode():
                return p_ref.predict(**kw)[2]

        return fn

    def batched(pred, extra_ctx):
        bt = pred.transform.apply_boxes_torch(torch.as_tensor(boxes, device=device), (n, n))

        def fn():
            with torch.inference_mode(), extra_ctx():
                return pred.predict_torch(None, None, boxes=bt, multimask_output=False)[2]

        return fn

    cases = {
        "1 box, 1 mask": dict(box=box, multimask_output=False),
        "1 point, 3 masks": dict(point_coords=point, point_labels=label, multimask_output=True),
    }
    fns = {}
    for case, kw in cases.items():
        fns[f"medsa | {case}"] = medsa(**kw)
        fns[f"segment-anything | {case}"] = sa(**kw)
    batch_case = f"{args.prompts} boxes batched"
    fns[f"medsa | {batch_case}"] = batched(p_ours, lambda: autocast_context(device, amp))
    fns[f"segment-anything | {batch_case}"] = batched(
        p_ref, lambda: autocast_context(device, "fp32")
    )
    results = round_robin(fns, args.iters, args.warmup, device, measure_memory=False)
    for name in fns:  # outputs for the accuracy column
        results[name].output = fns[name]()

    if args.cache_iters > 0:
        cache_case = "set_image, seen image"
        for who, pred in (("medsa", p_ours), ("segment-anything", p_ref)):
            r = Result(f"{who} | {cache_case}")
            for _ in range(args.cache_iters):
                synchronize(device)
                t0 = time.perf_counter()
                with torch.inference_mode():
                    pred.set_image(image)
                synchronize(device)
                r.seconds.append(time.perf_counter() - t0)
            results[r.name] = r

    rows = []
    case_names = [*cases, batch_case] + (["set_image, seen image"] if args.cache_iters else [])
    for case in case_names:
        a, b = results[f"medsa | {case}"], results[f"segment-anything | {case}"]
        per = args.prompts if case == batch_case else 1
        err = "-"
        if a.output is not None and b.output is not None:
            out_a, out_b = (
                o.float() if torch.is_tensor(o) else torch.as_tensor(np.asarray(o)).float()
                for o in (a.output, b.output)
            )
            err = f"{rel_error(out_a, out_b):.1e}"
        rows.append(
            [
                case,
                fmt_ms(a.median_s),
                fmt_ms(b.median_s),
                f"{b.median_s / a.median_s:.2f}x",
                fmt_ms(a.median_s / per),
                err,
            ]
        )
    headers = ["prompt", "medsa ms", "segment-anything ms", "speed-up", "medsa ms/prompt"]
    headers.append("rel err (low-res logits)")
    env = environment(device)
    title = (
        f"Prompt-to-mask latency on a cached embedding, {args.backbone} @ "
        f"{cfg.encoder.img_size}px, {n}x{n} image, medsa {args.dtype}, median of {args.iters}"
    )
    payload = {
        "args": args_json(args),
        "rows": [{"name": k, "seconds": r.seconds} for k, r in results.items()],
        "cache": {"hits": p_ours.cache_hits, "misses": p_ours.cache_misses},
    }
    emit(title, markdown_table(headers, rows), env, args, payload)
    return payload


if __name__ == "__main__":
    run_cli(main)
