"""``medsa export``: write a backbone (+ adapter) as ONNX (image encoder + prompt -> mask decoder).

The folder it writes is what ``medsa predict --runtime onnx --onnx-dir DIR`` and
``medsa serve --runtime onnx --onnx-dir DIR`` load; the graph interfaces are documented in
:mod:`medsa.export.export` and docs/export.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "export the image encoder and the prompt -> mask decoder (adapters merged in) to ONNX"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    p.add_argument(
        "--backbone",
        default=None,
        help="vit_b | vit_l | vit_h | lite_medsam (default: the adapter's, else lite_medsam)",
    )
    p.add_argument("--checkpoint", type=Path, help="backbone weights (default: the backbone's own)")
    p.add_argument("--adapter", type=Path, help="adapter saved by 'medsa train' (merged in)")
    p.add_argument(
        "--only",
        choices=("encoder", "decoder"),
        default=None,
        help="export one graph only (default: both)",
    )
    p.add_argument(
        "--single-mask",
        action="store_true",
        help="decoder returns SAM's selected single mask instead of all 4 (not loadable by "
        "--runtime onnx, which needs all 4)",
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default: 17)")
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip the ONNX Runtime vs PyTorch comparison on a random input",
    )


def main(args: argparse.Namespace) -> int:
    import torch

    from medsa.engine.evaluate import load_model

    from .export import export_onnx
    from .verify import verify_export

    model = load_model(args.backbone, args.checkpoint, args.adapter, torch.device("cpu"))
    written = export_onnx(
        model,
        args.out,
        encoder=args.only != "decoder",
        decoder=args.only != "encoder",
        single_mask=args.single_mask,
        opset=args.opset,
        adapter=str(args.adapter) if args.adapter else None,
    )
    for kind, path in written.items():
        size = path.stat().st_size / 2**20
        print(f"{kind:8s} {path}  ({size:.1f} MiB)")
    if not args.no_check and args.only is None and not args.single_mask:
        for line in verify_export(model, args.out):
            print(line)
    return 0
