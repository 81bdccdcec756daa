"""``medsa serve``: local web page to segment images interactively and save the masks."""

from __future__ import annotations

import argparse
from pathlib import Path

from medsa.errors import ConfigError, MedsaError
from medsa.export.options import add_runtime_arguments

HELP = "local web page: click, box, see the mask, save"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone",
        default="lite_medsam",
        help="model name: lite_medsam (default, ships its weights), vit_b, vit_l, vit_h, vit_tiny",
    )
    p.add_argument("--checkpoint", type=Path, help="backbone weights (.pth / .safetensors)")
    p.add_argument(
        "--adapter", type=Path, help="adapter saved by `medsa train` (path with or without suffix)"
    )
    p.add_argument(
        "--root",
        type=Path,
        nargs="+",
        action="extend",
        metavar="DIR",
        help="folder(s) whose images the page may open (default: the current folder); "
        "nothing outside them is readable",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=Path("medsa_masks"),
        help="folder where saved masks go (default: ./medsa_masks)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 = any free port)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1, mps")
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="model weights: fp32 (default) or bf16 (faster image embedding and clicks on GPUs "
        "and CPUs with AVX512-BF16/AMX; masks agree with fp32 on ~99.7%% of pixels)",
    )
    p.add_argument("--max-upload-mb", type=float, default=512.0, help="largest upload accepted")
    p.add_argument(
        "--cache-size", type=int, default=64, help="image embeddings kept in memory (per slice)"
    )
    add_runtime_arguments(p)
    p.add_argument(
        "--allow-remote",
        action="store_true",
        help="needed to listen on a non-loopback --host: anyone who can reach the port can then "
        "read images under the roots and write masks",
    )


def build_model(
    backbone: str,
    checkpoint: Path | None,
    adapter: Path | None,
    device: str,
    precision: str = "fp32",
):
    """Backbone (+ adapter) in eval mode on ``device``, weights in ``precision``."""
    import torch

    from medsa.engine.evaluate import load_model
    from medsa.engine.perf import supports_bf16

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA GPU is available; use --device cpu")
    if precision not in ("fp32", "bf16"):
        raise ConfigError(f"--precision must be fp32 or bf16, got {precision!r}")
    if precision == "bf16" and not supports_bf16(dev):
        # emulated bf16 would be slower than fp32, not faster
        raise ConfigError(
            f"--precision bf16: {dev} has no native bfloat16 matmuls (needs a GPU with bf16 or a "
            "CPU with AVX512-BF16 / AMX); use --precision fp32"
        )
    model = load_model(backbone, checkpoint, adapter, dev)
    return model.to(torch.bfloat16) if precision == "bf16" else model


def main(args: argparse.Namespace) -> int:
    from .app import LOOPBACK_HOSTS, create_app, is_loopback
    from .server import bind_socket
    from .service import ServeConfig

    roots = args.root or [Path.cwd()]
    loopback = is_loopback(args.host)
    if not loopback and not args.allow_remote:
        raise ConfigError(
            f"--host {args.host} is reachable from other machines; the page has no login. "
            "Use the default 127.0.0.1 (and an SSH tunnel), or add --allow-remote if you mean it."
        )
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    config = ServeConfig(
        roots=tuple(roots),
        output_dir=args.output,
        max_upload_mb=args.max_upload_mb,
        embedding_cache=args.cache_size,
        runtime=args.runtime,
        onnx_dir=args.onnx_dir,
    )
    for r in roots:
        if not Path(r).is_dir():
            raise ConfigError(f"--root {r}: not a folder")
    print(f"loading {args.backbone} on {args.device} ({args.precision}) ...", flush=True)
    if args.runtime == "onnx" and (args.device != "cpu" or args.precision != "fp32"):
        raise ConfigError("--runtime onnx runs fp32 on the CPU: use --device cpu --precision fp32")
    model = build_model(args.backbone, args.checkpoint, args.adapter, args.device, args.precision)

    import uvicorn

    # With --allow-remote the Host header cannot be checked against a fixed list of names.
    app = create_app(model, config, allowed_hosts=LOOPBACK_HOSTS if loopback else None)
    try:
        sock = bind_socket(args.host, args.port)
    except OSError as e:
        raise MedsaError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"medsa serve: http://{shown}:{port}/  (roots: {', '.join(map(str, roots))}; "
          f"masks -> {Path(args.output).resolve()})  Ctrl+C to stop", flush=True)  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])
    return 0
