"""``medsa serve``: local web page to segment images interactively and save the masks."""

from __future__ import annotations

import argparse
from pathlib import Path

from medsa.engine.model_loading import RANDOM_WEIGHTS_HELP
from medsa.errors import ConfigError, MedsaError
from medsa.export.options import add_runtime_arguments

HELP = "local web page: click, box, see the mask, save"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone",
        help="model name: lite_medsam (ships its weights), vit_b, vit_l, vit_h, vit_tiny "
        "(default: the adapter's backbone, else lite_medsam)",
    )
    p.add_argument("--checkpoint", type=Path, help="backbone weights (.pth / .safetensors)")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help=RANDOM_WEIGHTS_HELP,
    )
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
    p.add_argument(
        "--max-upload-mb", type=float, default=512.0, help="largest upload accepted (file size)"
    )
    p.add_argument(
        "--max-uploads", type=int, default=8, help="uploads kept at most; the oldest is deleted"
    )
    p.add_argument(
        "--max-upload-total-mb", type=float, default=2048.0, help="total size of uploads kept"
    )
    p.add_argument(
        "--upload-dir",
        type=Path,
        help="where the private (0700) upload folder is made (default: the system temp folder)",
    )
    p.add_argument(
        "--max-image-mpix",
        type=float,
        default=40.0,
        help="largest 2D image opened, in millions of decoded pixels (default: 40)",
    )
    p.add_argument(
        "--max-volume-mvox",
        type=float,
        default=256.0,
        help="largest volume opened, in millions of decoded voxels (default: 256)",
    )
    p.add_argument(
        "--max-request-mb", type=float, default=8.0, help="largest JSON request body (default: 8)"
    )
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
    backbone: str | None,
    checkpoint: Path | None,
    adapter: Path | None,
    device: str,
    precision: str = "fp32",
    random_weights: bool = False,
):
    """Backbone (+ adapter) in eval mode on ``device``, weights in ``precision``.

    The adapter's recorded settings (:func:`medsa.engine.model_loading.resolve_inference`) must be
    ones the page reproduces: slices encoded one at a time on their own grid, ``auto`` intensity
    scaling; an adapter trained on depth chunks or a resized grid is refused (ConfigError) rather
    than run differently from training. A backbone without weights is refused unless
    ``random_weights``.
    """
    import torch

    from medsa.engine.model_loading import build_inference_model, resolve_inference
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
    settings = resolve_inference(adapter, backbone=backbone, checkpoint=checkpoint)
    unsupported = [
        what
        for what, bad in (
            (f"depth chunks of {settings.depth} slices", settings.depth),
            (f"resize_to {settings.resize_to}", settings.resize_to),
            (f"intensity {settings.intensity}", settings.intensity != "auto"),
        )
        if bad
    ]
    if unsupported:
        raise ConfigError(
            f"adapter {Path(adapter or '').name} was trained with {', '.join(unsupported)}; "
            "medsa serve encodes each slice alone on its own grid with auto intensity, so it "
            "cannot run it as trained: use medsa predict / medsa evaluate"
        )
    model = build_inference_model(settings, dev, random_weights=random_weights)
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
        upload_dir=args.upload_dir,
        max_upload_mb=args.max_upload_mb,
        max_uploads=args.max_uploads,
        max_upload_total_mb=args.max_upload_total_mb,
        max_image_mpix=args.max_image_mpix,
        max_volume_mvox=args.max_volume_mvox,
        max_request_mb=args.max_request_mb,
        embedding_cache=args.cache_size,
        runtime=args.runtime,
        onnx_dir=args.onnx_dir,
    )
    for r in roots:
        if not Path(r).is_dir():
            raise ConfigError(f"--root {r}: not a folder")
    what = args.backbone or (f"adapter {args.adapter}" if args.adapter else "lite_medsam")
    print(f"loading {what} on {args.device} ({args.precision}) ...", flush=True)
    if args.runtime == "onnx" and (args.device != "cpu" or args.precision != "fp32"):
        raise ConfigError("--runtime onnx runs fp32 on the CPU: use --device cpu --precision fp32")
    model = build_model(
        args.backbone,
        args.checkpoint,
        args.adapter,
        args.device,
        args.precision,
        random_weights=args.random_weights,
    )

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
