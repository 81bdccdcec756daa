"""``medsa predict`` command line: arguments, model loading, the job loop (one job per input,
read ahead and batched by :mod:`medsa.engine.predict_pipeline`), the summary."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from medsa.engine.inference import (
    Prompt,
)
from medsa.engine.model_loading import RANDOM_WEIGHTS_HELP
from medsa.engine.outputs import check_writable_dir, refuse_existing
from medsa.engine.predict import HELP, output_paths, run_job
from medsa.engine.predict_inputs import (
    PredictJob,
    _lookup,
    cli_prompt,
    collect_inputs,
    load_prompt_file,
)
from medsa.errors import ConfigError, MedsaError, PromptError
from medsa.export.options import add_runtime_arguments

__all__ = ["HELP", "add_arguments", "main"]

# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="INPUT",
        help="image files, volumes (NIfTI/MHA/NRRD/DICOM folder) or folders (recursive)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")
    g = p.add_argument_group("prompts (one of)")
    g.add_argument(
        "--point",
        action="append",
        metavar="X,Y[,LABEL]",
        help="point in pixels (x = column, y = row), label 1 positive (default) / 0 negative; repeatable",
    )
    g.add_argument("--box", metavar="X0,Y0,X1,Y1", help="box in pixels")
    g.add_argument(
        "--slice", metavar="Z|Z0:Z1", help="volumes: slice(s) the --point/--box apply to"
    )
    g.add_argument(
        "--prompts",
        type=Path,
        metavar="JSON",
        help="per-file prompts (see docs/evaluation.md); keys are file paths or names",
    )
    g.add_argument(
        "--propagate",
        action="store_true",
        help="volumes: propagate the prompts of the key slice(s) (--slice, --prompts) to every "
        "slice the object reaches (docs/propagation.md); one label per object",
    )
    g.add_argument(
        "--key-mask",
        type=Path,
        metavar="FILE",
        help="a mask as key, propagated (implies --propagate): 2D (H, W) for --slice Z or a "
        "(D, H, W) label map (label k = object k; every non-empty slice is a key)",
    )
    g.add_argument(
        "--min-score",
        type=float,
        help="--propagate: predicted IoU below which the object ends (default 0.5)",
    )
    g.add_argument(
        "--everything", action="store_true", help="SAM automatic mode: label every object"
    )
    g.add_argument(
        "--auto",
        action="store_true",
        help="no prompt: MA-SAM's multi-class head (adapter trained with num_classes)",
    )
    g.add_argument(
        "--points-per-side",
        type=int,
        default=32,
        help="--everything: point grid density (default 32, as SAM)",
    )
    p.add_argument(
        "--backbone", help="SAM backbone (default: the adapter's backbone, else lite_medsam)"
    )
    p.add_argument("--checkpoint", type=Path, help="backbone weights (default: the backbone's own)")
    p.add_argument("--random-weights", action="store_true", help=RANDOM_WEIGHTS_HELP)
    p.add_argument("--adapter", type=Path, help="adapter saved by 'medsa train'")
    p.add_argument(
        "--intensity",
        help="intensity scaling: auto, none, percentile, ct:<preset>, ct:<L>,<W> "
        "(default: the adapter's, else auto)",
    )
    p.add_argument(
        "--depth",
        type=int,
        help="volumes: encode chunks of N slices together (SD-Trans / MA-SAM 3D adapters); "
        "default: the adapter's training depth, else every slice alone",
    )
    p.add_argument(
        "--resize-to",
        metavar="D,H,W|H,W",
        help="run the model on this grid (training's data.resize_to); the mask is resampled "
        "back to the input's grid and geometry; default: the adapter's setting, else no resize",
    )
    p.add_argument("--suffix", default="_mask", help="added to output names (default: _mask)")
    p.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace results already in --out (without it the command refuses before any work)",
    )
    p.add_argument(
        "--dicom-seg",
        action="store_true",
        help="DICOM inputs: also write <name>_mask_seg.dcm, a DICOM-SEG referencing the source "
        "series (needs highdicom)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes that read the next inputs while the model runs (default 0: none)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="images / slices per image-encoder pass (default 4). Under torchrun every "
        "process segments its share of the inputs",
    )
    add_runtime_arguments(p)


def main(args: argparse.Namespace) -> int:
    from medsa.engine.inference import as_predictor
    from medsa.engine.model_loading import build_inference_model, resolve_inference
    from medsa.engine.perf import resolve_device

    n_modes = sum(
        [
            bool(args.point or args.box),
            args.prompts is not None,
            bool(args.everything),
            bool(args.auto),
            args.key_mask is not None,
        ]
    )
    if n_modes == 0:
        raise PromptError("no prompt: give --point/--box, --prompts FILE, --everything or --auto")
    if n_modes > 1:
        raise PromptError(
            "use only one of --point/--box, --prompts, --key-mask, --everything and --auto"
        )
    if args.depth is not None and args.depth < 1:
        raise ConfigError(f"--depth must be >= 1, got {args.depth}")
    if args.points_per_side < 1:
        raise ConfigError(f"--points-per-side must be >= 1, got {args.points_per_side}")
    if args.propagate and (args.everything or args.auto):
        raise PromptError("--propagate needs prompts (--point/--box with --slice, or --prompts)")
    if args.slice and not (args.point or args.box or args.key_mask):
        raise PromptError("--slice applies to --point/--box/--key-mask")
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {args.out} exists and is not a folder")
    cli = cli_prompt(args.point, args.box)
    table = load_prompt_file(args.prompts) if args.prompts is not None else None

    from medsa.engine.eval_pipeline import check_run_args, distributed_run
    from medsa.engine.predict_pipeline import iter_loaded, reduce_counts

    check_run_args(args.workers, args.batch_size)
    jobs, errors = collect_inputs(args.inputs, args.out)
    if not jobs:
        for e in errors:
            print(f"medsa predict: error: {e}", file=sys.stderr)
        return 1
    # the adapter's recorded depth / resize / intensity unless given (contradictions: error)
    settings = resolve_inference(
        args.adapter,
        backbone=args.backbone,
        checkpoint=args.checkpoint,
        depth=args.depth,
        resize_to=getattr(args, "resize_to", None),
        intensity=args.intensity,
    )
    args.depth, args.intensity = settings.depth, settings.intensity
    args.resize_to = settings.resize_to
    # before loading the model: a folder we cannot write to, or results we would replace
    check_writable_dir(args.out, "--out")
    refuse_existing(
        [q for j in jobs for q in output_paths(j, args) if q.resolve() != j.path.resolve()],
        "--out",
        args.overwrite,
    )
    runtime = getattr(args, "runtime", "torch")
    with distributed_run(resolve_device("cpu" if runtime == "onnx" else args.device)) as dist_info:
        if dist_info.is_main:  # torchrun: each process segments its share
            for e in errors:
                print(f"medsa predict: error: {e}", file=sys.stderr)
        mine = jobs[dist_info.rank :: dist_info.world_size]
        model = build_inference_model(
            settings, dist_info.device, random_weights=args.random_weights
        )
        if runtime == "torch":
            predictor = as_predictor(model)
        else:  # ONNX Runtime behind the same predictor interface (medsa.export.runtime)
            from medsa.export.runtime import make_predictor

            predictor = make_predictor(model, runtime, onnx_dir=args.onnx_dir)
        failed = _run_jobs(mine, predictor, args, cli, table, iter_loaded)
        failed, n = reduce_counts([failed, len(mine)], dist_info.distributed)
    failed += len(errors)
    n += len(errors)
    if dist_info.is_main:
        print(f"{n - failed}/{n} inputs segmented" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0


def _run_jobs(
    jobs: list[PredictJob],
    predictor: Any,
    args: argparse.Namespace,
    cli: Prompt | None,
    table: dict[str, Any] | None,
    iter_loaded: Any,
) -> int:
    """Segment ``jobs`` (read ahead, batched, ``medsa.engine.predict_pipeline``); returns the
    number of failed inputs (each reported on stderr)."""
    import torch

    failed = 0
    base = args.prompts.parent if args.prompts is not None else Path.cwd()
    for job, loaded in iter_loaded(jobs, predictor, args.intensity, args.workers, args.batch_size):
        try:
            if table is not None:
                entry = _lookup(table, job, base)
                if entry is None:
                    raise PromptError(f"no entry for this file in {args.prompts}")
                job.entry = entry
            if loaded.error is not None:  # reading failed in the prefetch worker
                raise loaded.error
            with torch.inference_mode():
                written = run_job(job, predictor, args, cli, loaded=loaded)
            print(f"{job.path} -> " + ", ".join(str(w) for w in written))
        except MedsaError as e:
            failed += 1
            msg = str(e) if str(job.path) in str(e) else f"{job.path}: {e}"
            print(f"medsa predict: error: {msg}", file=sys.stderr)
        except Exception as e:  # keep going on the other files, but say what broke
            failed += 1
            print(
                f"medsa predict: error: {job.path}: unexpected {type(e).__name__}: {e}",
                file=sys.stderr,
            )
    return failed
