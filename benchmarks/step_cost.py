#!/usr/bin/env python
"""Device-independent cost of a Med-SA training step: FLOPs and memory per image, medsa vs reference.

Timings depend on the machine, the work a step does does not. This script runs one step of each
``bench_train_step.py`` variant (same models, same inputs) at batch 1 and batch 2 on any device
and counts

* FLOPs of forward + backward (``torch.utils.flop_counter.FlopCounterMode``; the CPU flash-
  attention kernels are registered with the formulas PyTorch uses for the CUDA ones),
* bytes saved for backward (``torch.autograd.graph.saved_tensors_hooks``, unique storages, not
  counting parameters): the batch-2 minus batch-1 difference is the per-image part, the rest is
  fixed (bf16 copies of the frozen weights that autocast saves for the input gradients),
* parameter, gradient and AdamW-state bytes,

then projects the issue's GPU targets: the sustained TFLOP/s a throughput needs (and its share of
``--peak-tflops``, the issue's H100 bf16 figure by default) and the memory at ``--target-batch``.
The memory projection is a floor: backward temporaries, kernel workspaces and allocator
fragmentation come on top (typically 10-30 %); checkpointed rows include one recomputed block.

Example::

    python benchmarks/step_cost.py --backbone vit_b --target-batch 8 --target-img-s 120
"""

from __future__ import annotations

import argparse

import torch
from _common import (
    add_common_args,
    args_json,
    emit,
    environment,
    fmt_bytes,
    markdown_table,
    run_cli,
    setup,
)
from bench_train_step import DEFAULT_MEDSA, build_setup, step_functions
from torch.utils import flop_counter


def _register_cpu_sdpa_flops() -> None:
    """Count the CPU flash-attention kernels like the CUDA ones (PyTorch only registers those)."""
    aten = torch.ops.aten
    fwd = aten._scaled_dot_product_flash_attention_for_cpu
    bwd = aten._scaled_dot_product_flash_attention_for_cpu_backward
    if fwd in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(fwd)
    def _fwd(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query, key, value)

    @flop_counter.register_flop_formula(bwd)
    def _bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


class SavedBytes:
    """Sum of the unique storages autograd saves for backward (parameters excluded)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.exclude = {t.untyped_storage().data_ptr() for t in model.parameters()}
        self.exclude |= {t.untyped_storage().data_ptr() for t in model.buffers()}
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in self.exclude:
            self.seen.setdefault(st.data_ptr(), st.nbytes())
        return t

    @property
    def total(self) -> int:
        return sum(self.seen.values())


def measure(fn, model: torch.nn.Module) -> tuple[int, int]:
    """FLOPs and saved-for-backward bytes of one training step ``fn``."""
    counter = SavedBytes(model)
    with (
        flop_counter.FlopCounterMode(display=False) as flops,
        torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t),
    ):
        fn()
    return flops.get_total_flops(), counter.total


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_common_args(p, iters=1, batch=1)
    p.add_argument("--medsa", nargs="+", default=list(DEFAULT_MEDSA), metavar="IMPL:DTYPE[:ckpt]")
    p.add_argument("--adapter-ratio", type=float, default=0.25, help="bottleneck = ratio * C")
    p.add_argument("--no-reference", action="store_true", help="skip the reference row")
    p.add_argument("--target-batch", type=int, default=8, help="batch of the memory projection")
    p.add_argument("--target-img-s", type=float, default=120.0, help="throughput to project")
    p.add_argument(
        "--peak-tflops", type=float, default=790.0, help="accelerator peak (issue: H100 bf16)"
    )
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = setup(args)
    _register_cpu_sdpa_flops()

    per_batch: dict[int, dict[str, tuple[int, int]]] = {}
    models: dict[str, torch.nn.Module] = {}
    for batch in (1, 2):
        st = build_setup(args, device, batch)
        fns = step_functions(st, args.medsa, device)
        per_batch[batch] = {}
        for name, fn in fns.items():
            model = st.ref if name.startswith("reference") else st.ours
            assert model is not None
            fn()  # warm-up: optimizer states exist from here on, as in training
            per_batch[batch][name] = measure(fn, model)
            models[name] = model

    rows, payload_rows = [], []
    depth = len(models[next(iter(models))].image_encoder.blocks)
    no_ckpt_per_image: dict[str, int] = {}
    for name in per_batch[1]:
        (f1, s1), (f2, s2) = per_batch[1][name], per_batch[2][name]
        model = models[name]
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        per_image, fixed = max(s2 - s1, 0), max(2 * s1 - s2, 0)
        model_name, impl, dtype, ckpt = (c.strip() for c in name.split(" | "))
        if ckpt == "no":
            no_ckpt_per_image[f"{impl}:{dtype}"] = per_image
        recompute = no_ckpt_per_image.get(f"{impl}:{dtype}", 0) // depth if ckpt == "yes" else 0
        n = args.target_batch
        memory = params + 3 * trainable + fixed + n * (per_image + recompute)
        flops_per_image = f2 - f1
        needed = args.target_img_s * flops_per_image / 1e12
        rows.append(
            [
                model_name,
                impl,
                dtype,
                ckpt,
                f"{flops_per_image / 1e9:,.1f}",
                fmt_bytes(per_image),
                fmt_bytes(fixed),
                fmt_bytes(params + 3 * trainable),
                fmt_bytes(memory),
                f"{needed:.0f} ({100 * needed / args.peak_tflops:.0f} %)",
            ]
        )
        payload_rows.append(
            {
                "name": name,
                "flops_per_image": flops_per_image,
                "saved_bytes_per_image": per_image,
                "saved_bytes_fixed": fixed,
                "param_grad_optimizer_bytes": params + 3 * trainable,
                "projected_bytes": memory,
                "needed_tflops": needed,
            }
        )
    headers = ["model", "attention", "dtype", "checkpointing", "GFLOP/img (fwd+bwd)"]
    headers += ["saved/img", "saved fixed", "weights+grads+Adam", f"memory @ batch {n}"]
    headers += [f"TFLOP/s for {args.target_img_s:g} img/s (% of {args.peak_tflops:g})"]
    title = (
        f"Training-step cost per image, {args.backbone} @ {st.img_size}px "
        f"(device-independent counts; memory is a floor)"
    )
    payload = {"args": args_json(args), "rows": payload_rows}
    emit(title, markdown_table(headers, rows), environment(device), args, payload)
    return payload


if __name__ == "__main__":
    run_cli(main)
