#!/usr/bin/env python
"""Med-SA adapter training step: medsa vs a segment-anything "reference-style" Med-SA, one process.

One step = image encoder (frozen, with adapters) + prompt encoder + mask decoder on box prompts,
BCE + soft-Dice loss on the low-res masks, backward, AdamW update of the trainable parameters.

* reference: ``benchmarks/reference_medsa.py`` (segment-anything encoder, explicit fp32 attention,
  adapters after attention and parallel to the MLP; prompt encoder + decoder train).
* medsa: ``build_sam`` + ``apply_method(MedSAConfig)`` (paper defaults: adapters in the encoder and
  HyP-Adpt/MLP/image adapters in the decoder, SAM frozen), rows by attention implementation, dtype
  (bf16 = autocast with fp32 master weights) and gradient checkpointing.

Both use the same base weights and adapter bottleneck ``--adapter-ratio * C``. Peak memory: CUDA
``max_memory_allocated``; CPU peak RSS growth during the first (warm-up) step.

Example::

    python benchmarks/bench_train_step.py --device cuda --backbone vit_b --batch 8 --iters 10
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from _common import (
    add_common_args,
    args_json,
    emit,
    environment,
    fmt_bytes,
    fmt_ms,
    markdown_table,
    randomize_,
    round_robin,
    run_cli,
    setup,
)
from reference_medsa import add_reference_adapters, reference_forward, reference_sam

from medsa.engine.perf import (
    autocast_context,
    frozen_with_grad,
    maybe_compile,
    set_attention_impl,
    set_grad_checkpointing,
    trainable_parameters,
)

DEFAULT_MEDSA = ("sdpa_folded:fp32", "sdpa_folded:bf16", "sdpa_folded:bf16:ckpt")
REFERENCE_ROW = "reference-style (segment-anything) | explicit | fp32 | no"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, iters=3, batch=2)
    p.add_argument(
        "--medsa",
        nargs="+",
        default=list(DEFAULT_MEDSA),
        metavar="IMPL:DTYPE[:ckpt]",
        help="medsa rows (default: %(default)s)",
    )
    p.add_argument("--dtype", default=None, help="shortcut: only medsa rows of this dtype")
    p.add_argument("--adapter-ratio", type=float, default=0.25, help="bottleneck = ratio * C")
    p.add_argument("--no-reference", action="store_true", help="skip the reference row")
    p.add_argument("--compile", action="store_true", help="torch.compile the medsa encoder")
    return p


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice on ``(B, 1, h, w)`` logits (fp32)."""
    logits = logits.float()
    prob = logits.sigmoid()
    inter = (prob * target).sum((1, 2, 3))
    dice = 1 - (2 * inter + 1) / (prob.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
    return F.binary_cross_entropy_with_logits(logits, target) + dice.mean()


@dataclass
class StepSetup:
    """Models, optimizers and one fixed batch for the step functions."""

    ours: torch.nn.Module
    ref: torch.nn.Module | None
    x: torch.Tensor
    boxes: torch.Tensor
    gt: torch.Tensor
    img_size: int


def build_setup(args: argparse.Namespace, device: torch.device, batch: int) -> StepSetup:
    """medsa (``apply_method(MedSAConfig)``) and, unless ``--no-reference``, the reference-style
    model on the same random base weights, plus a random batch of ``batch`` images and boxes."""
    from medsa.adapters import apply_method
    from medsa.adapters.config import MedSAConfig
    from medsa.sam.build import build_sam_from_config, get_config

    overrides = {"img_size": args.img_size} if args.img_size else {}
    cfg = get_config(args.backbone, **overrides)
    torch.manual_seed(args.seed)
    ours = build_sam_from_config(cfg, name=args.backbone)
    randomize_(ours, args.seed)
    ref = None
    if not args.no_reference:
        ref = reference_sam(cfg)
        ref.load_state_dict(ours.state_dict(), strict=True)
        add_reference_adapters(ref, mlp_ratio=args.adapter_ratio)
        ref.to(device).train()
    apply_method(ours, MedSAConfig(rank=None, ratio=args.adapter_ratio))
    ours.to(device).train()

    s = cfg.encoder.img_size
    low = 4 * (s // cfg.encoder.patch_size)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(batch, 3, s, s, generator=g).to(device)
    xy = torch.rand(batch, 2, generator=g) * s * 0.5
    boxes = torch.cat([xy, xy + s * 0.4], dim=1).to(device)
    gt = (torch.rand(batch, 1, low, low, generator=g) > 0.5).float().to(device)
    return StepSetup(ours, ref, x, boxes, gt, s)


def step_functions(
    st: StepSetup, specs: list[str], device: torch.device, *, compile_encoder: bool = False
) -> dict[str, Callable[[], float]]:
    """``{"model | attention | dtype | checkpointing": step}``; each step returns the loss.

    ``specs`` are ``IMPL:DTYPE[:ckpt]`` medsa rows; the reference row comes first if present.
    """
    ours = st.ours
    opt_ours = torch.optim.AdamW(trainable_parameters(ours), lr=1e-5)
    encoder = maybe_compile(ours.image_encoder, compile_encoder)

    def medsa_step(impl: str, dtype: str, ckpt: bool):
        def fn() -> float:
            set_attention_impl(ours, impl)
            set_grad_checkpointing(ours, ckpt)
            with autocast_context(device, dtype):
                emb = encoder(st.x)
                with torch.no_grad():  # frozen prompt encoder: no graph needed
                    sparse, dense = ours.prompt_encoder(points=None, boxes=st.boxes, masks=None)
                logits, _ = ours.mask_decoder(
                    emb, ours.prompt_encoder.get_dense_pe(), sparse, dense, False
                )
            loss = seg_loss(logits, st.gt)
            loss.backward()
            opt_ours.step()
            opt_ours.zero_grad(set_to_none=True)
            return float(loss.detach())

        return fn

    fns: dict[str, Callable[[], float]] = {}
    if st.ref is not None:
        ref = st.ref
        opt_ref = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-5)

        def ref_step() -> float:
            loss = seg_loss(reference_forward(ref, st.x, st.boxes), st.gt)
            loss.backward()
            opt_ref.step()
            opt_ref.zero_grad(set_to_none=True)
            return float(loss.detach())

        fns[REFERENCE_ROW] = ref_step
    for spec in specs:
        parts = spec.split(":")
        impl, dtype, ckpt = parts[0], parts[1], len(parts) > 2 and parts[2] == "ckpt"
        fns[f"medsa | {impl} | {dtype} | {'yes' if ckpt else 'no'}"] = medsa_step(impl, dtype, ckpt)
    return fns


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = setup(args)
    st = build_setup(args, device, args.batch)
    ours, ref, s = st.ours, st.ref, st.img_size
    specs = [m for m in args.medsa if not args.dtype or m.split(":")[1] == args.dtype]
    fns = step_functions(st, specs, device, compile_encoder=args.compile)

    results = round_robin(fns, args.iters, args.warmup, device, items_per_call=args.batch)
    leaked = frozen_with_grad(ours)
    if leaked:  # frozen weights must never get gradients (memory and time)
        raise RuntimeError(f"frozen parameters received gradients: {leaked[:5]}")

    base_name = next(iter(results))
    base = results[base_name]
    rows = []
    for name, r in results.items():
        rows.append(
            [
                *[c.strip() for c in name.split(" | ")],
                fmt_ms(r.median_s),
                f"{r.median_cpu_s:.3g}",
                f"{r.throughput:.3g}",
                f"{base.median_s / r.median_s:.2f}x",
                fmt_bytes(r.peak_bytes),
                f"{r.output:.3f}",
            ]
        )
    n_train = {
        "medsa": sum(p.numel() for p in trainable_parameters(ours)),
        "reference": sum(p.numel() for p in ref.parameters() if p.requires_grad) if ref else 0,
    }
    headers = ["model", "attention", "dtype", "checkpointing", "ms/step", "CPU s", "img/s"]
    headers += [f"x {base_name.split(' | ')[0].split(' ')[0]}", "peak mem", "loss (1st step)"]
    env = environment(device)
    title = (
        f"Adapter training step, {args.backbone} @ {s}px, batch {args.batch}, "
        f"median of {args.iters} (trainable params: medsa {n_train['medsa']:,}, "
        f"reference {n_train['reference']:,})"
    )
    payload = {
        "args": args_json(args),
        "trainable_params": n_train,
        "rows": [r.to_json() for r in results.values()],
    }
    emit(title, markdown_table(headers, rows), env, args, payload)
    return payload


if __name__ == "__main__":
    run_cli(main)
