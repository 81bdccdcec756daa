"""``medsa evaluate`` command line: arguments, model / dataset / split selection, output
files. The evaluation itself is :func:`medsa.engine.evaluate.evaluate_model`."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path
from typing import Any

from medsa.engine.evaluate import (
    DEFAULT_PROTOCOLS,
    HELP,
    OUTPUT_FILES,
    EvalConfig,
    EvalResults,
    evaluate_model,
)
from medsa.engine.metrics import MetricConfig
from medsa.engine.model_loading import RANDOM_WEIGHTS_HELP
from medsa.engine.outputs import OutputError, check_writable_dir, describe_os_error, refuse_existing
from medsa.errors import ConfigError, DataError
from medsa.export.options import add_runtime_arguments

__all__ = ["HELP", "add_arguments", "main", "write_outputs"]

# --------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", required=True, type=Path, help="dataset folder (any layout medsa.data supports)"
    )
    p.add_argument(
        "--split",
        type=Path,
        help="splits JSON (from training / make_splits) or a text file of case ids",
    )
    p.add_argument(
        "--fold", type=int, help="fold of --split whose --subset cases are evaluated (default 0)"
    )
    p.add_argument(
        "--subset",
        choices=("val", "test", "train"),
        help="which list of the --split fold to evaluate (default val; needs --split)",
    )
    p.add_argument(
        "--backbone",
        help="SAM backbone: lite_medsam, vit_b, vit_l, vit_h, vit_tiny "
        "(default: the adapter's backbone, else lite_medsam)",
    )
    p.add_argument("--checkpoint", type=Path, help="backbone weights (default: the backbone's own)")
    p.add_argument("--random-weights", action="store_true", help=RANDOM_WEIGHTS_HELP)
    p.add_argument(
        "--adapter", type=Path, help="adapter file saved by 'medsa train' (.safetensors)"
    )
    p.add_argument(
        "--protocols",
        default=",".join(DEFAULT_PROTOCOLS),
        help="comma-separated: 1pt,3pt,bbox0.5,bbox0.75,box,everything (every target slice "
        "prompted), keyslice-box,keyslice-3pt (3D: one key slice, propagated; docs/evaluation.md) "
        "(default: the first four)",
    )
    p.add_argument(
        "--seeds", default="0", help="comma-separated prompt seeds, e.g. 0,1,2,3,4 (mean ± std)"
    )
    p.add_argument("--classes", help="comma-separated class names (default: all)")
    p.add_argument("--max-cases", type=int, help="evaluate only the first N cases")
    p.add_argument(
        "--intensity",
        help="intensity scaling: auto (uint8 kept, else 0.5-99.5 percentiles), none, percentile, "
        "ct:<preset> (e.g. ct:abdomen), ct:<level>,<width> (default: the adapter's, else auto)",
    )
    p.add_argument(
        "--depth",
        type=int,
        help="3D: encode chunks of N slices together (SD-Trans / MA-SAM 3D adapters); default: "
        "the adapter's training depth, else every slice alone",
    )
    p.add_argument(
        "--resize-to",
        metavar="D,H,W|H,W",
        help="run the model on this grid (training's data.resize_to); metrics stay on each "
        "case's own grid; default: the adapter's setting, else no resize",
    )
    p.add_argument(
        "--nsd-tolerance", type=float, default=2.0, help="NSD tolerance in mm (default 2)"
    )
    p.add_argument(
        "--hd-empty",
        choices=("nan", "diagonal"),
        default="nan",
        help="HD95 when exactly one mask is empty (default nan = skipped in means)",
    )
    p.add_argument(
        "--noc-clicks", type=int, default=5, help="clicks of the Dice-vs-clicks curve (0: off)"
    )
    p.add_argument(
        "--worst", type=int, default=4, help="worst cases drawn in worst_cases.png (0: off)"
    )
    p.add_argument("--name", help="method name in the table (default: backbone [+ adapter])")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace results already in --out (without it the command refuses before any work)",
    )
    p.add_argument(
        "--device", default="auto", help="cpu, cuda, cuda:N or auto (default: CUDA if available)"
    )
    p.add_argument("--quiet", action="store_true", help="no per-case progress lines")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes that read the next cases and compute metrics while the model runs "
        "(default 0: all in this process; use it where cores are idle, e.g. with a GPU). "
        "Results do not depend on it",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="images / slices per image-encoder pass (default 4). Results do not depend on it. "
        "Under torchrun every process evaluates its share of the cases; rank 0 writes the report",
    )
    add_runtime_arguments(p)


def _csv_list(s: str | None, what: str) -> list[str]:
    if s is None:
        return []
    items = [x.strip() for x in s.split(",") if x.strip()]
    if not items:
        raise ConfigError(f"--{what} is empty")
    return items


def _case_ids_from_split(path: Path, fold: int | None, ds: Any, subset: str = "val") -> list[str]:
    if not path.exists():
        raise DataError(f"split file {path} does not exist")
    if path.suffix.lower() == ".json":
        from medsa.data.datasets import load_splits

        splits = load_splits(path, known_ids=ds.case_ids)  # list of folds
        f = 0 if fold is None else fold
        if not 0 <= f < len(splits):
            raise ConfigError(f"--fold {f} is out of range: {path} has {len(splits)} folds")
        if subset not in splits[f]:
            raise ConfigError(f"{path}: fold {f} has no {subset!r} list ({', '.join(splits[f])})")
        return list(splits[f][subset])
    if fold is not None:
        raise ConfigError("--fold needs a JSON splits file")
    ids = [
        ln.strip()
        for ln in path.read_text(encoding="utf-8").splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    unknown = [i for i in ids if i not in set(ds.case_ids)]
    if unknown:
        raise DataError(f"{path}: case {unknown[0]!r} is not in the dataset")
    return ids


def main(args: argparse.Namespace) -> int:
    from medsa.engine import report

    protocols = tuple(_csv_list(args.protocols, "protocols"))
    try:
        seeds = tuple(int(s) for s in _csv_list(args.seeds, "seeds"))
    except ValueError as e:
        raise ConfigError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from e
    classes = tuple(_csv_list(args.classes, "classes")) or None
    from medsa.engine.model_loading import build_inference_model, resolve_inference

    # the adapter's recorded depth / resize / intensity unless given (contradictions: error)
    settings = resolve_inference(
        args.adapter,
        backbone=args.backbone,
        checkpoint=args.checkpoint,
        depth=args.depth,
        resize_to=args.resize_to,
        intensity=args.intensity,
    )
    cfg = EvalConfig(
        protocols=protocols,
        seeds=seeds,
        classes=classes,
        max_cases=args.max_cases,
        metrics=MetricConfig(nsd_tolerance_mm=args.nsd_tolerance, hd_one_empty=args.hd_empty),
        noc_clicks=args.noc_clicks,
        worst_k=args.worst,
        intensity=settings.intensity,
        depth=settings.depth,
        resize_to=settings.resize_to,
    )
    if not args.data.exists():
        raise DataError(f"dataset folder {args.data} does not exist")
    out: Path = args.out
    from medsa.data.datasets import load_dataset

    ds = load_dataset(args.data)
    if settings.classes and ds.layout == "imagesTr" and not ds.label_values_declared:
        # no dataset.json: name the label values as training did (e.g. ACDC {RV: 1, MYO: 2, LV: 3})
        ds = load_dataset(args.data, classes=settings.classes)
    if args.fold is not None and args.split is None:
        raise ConfigError("--fold needs --split FILE")
    if args.subset is not None and args.split is None:
        # without a split there are no subsets: every case would be scored
        raise ConfigError(f"--subset {args.subset} needs --split FILE (the splits JSON)")
    subset = args.subset or "val"
    case_ids = _case_ids_from_split(args.split, args.fold, ds, subset) if args.split else None
    from medsa.engine.eval_pipeline import check_run_args, distributed_run
    from medsa.engine.perf import resolve_device

    check_run_args(args.workers, args.batch_size)
    # before the model is loaded and anything is computed
    check_writable_dir(out, "--out")
    refuse_existing([out / name for name in OUTPUT_FILES], "--out", args.overwrite)
    runtime = getattr(args, "runtime", "torch")
    device = resolve_device("cpu" if runtime == "onnx" else args.device)
    with distributed_run(device) as dist_info:  # torchrun: this rank's share
        model = build_inference_model(
            settings, dist_info.device, random_weights=args.random_weights
        )
        predictor: Any = model
        if runtime != "torch":  # ONNX Runtime behind the predictor interface (medsa.export)
            from medsa.export.runtime import make_predictor

            predictor = make_predictor(model, runtime, onnx_dir=args.onnx_dir)
        res = evaluate_model(
            predictor,
            ds,
            case_ids=case_ids,
            config=cfg,
            progress=not args.quiet,
            keep_worst=cfg.worst_k > 0,
            workers=args.workers,
            batch_size=args.batch_size,
            distributed=dist_info.distributed,
        )
    if not dist_info.is_main:  # every rank has all rows; rank 0 alone writes the report
        return 0
    backbone = getattr(model, "name", None) or settings.backbone
    method = args.name or (backbone + (f" + {args.adapter.stem}" if args.adapter else ""))
    print(report.markdown_table(res.summary, method, len(cfg.seeds)))  # also if writing fails
    try:
        written = write_outputs(res, out, method)
    except OSError as e:
        name = Path(e.filename).name if getattr(e, "filename", None) else "the results"
        raise OutputError(
            f"--out {out}: cannot write {name}: {describe_os_error(e)}; the table above is all "
            "that was kept"
        ) from None
    print(
        f"{len(res.rows)} rows in {res.seconds:.1f} s; wrote " + ", ".join(p.name for p in written)
    )
    if res.prompt_failures:
        import sys

        print(
            f"warning: {len(res.prompt_failures)} prompt(s) could not be simulated; those slices "
            f"got no prompt (listed in summary.json), e.g. {res.prompt_failures[0]}",
            file=sys.stderr,
        )
    return 0


def write_outputs(res: EvalResults, out: Path, method: str) -> list[Path]:
    """Write metrics.csv, summary.json, results.md and the PNG plots into ``out``."""
    from medsa.engine import report

    out.mkdir(parents=True, exist_ok=True)
    cfg = res.config
    written = [report.write_csv(res.rows, out / "metrics.csv")]
    written.append(
        report.write_json(
            {
                "method": method,
                "config": {**asdict(cfg)},
                "n_cases": len({r["case_id"] for r in res.rows}),
                "seconds": res.seconds,
                "summary": res.summary,
                "noc": res.noc,
                "prompt_failures": res.prompt_failures,
                "worst": [
                    dict(zip(("case_id", "class", "protocol", "seed", "dice"), w, strict=True))
                    for w in res.worst
                ],
            },
            out / "summary.json",
        )
    )
    md = out / "results.md"
    md.write_text(
        f"# {method}\n\nDice (%) per class, mean over cases"
        + (f"; mean ± std over {len(cfg.seeds)} seeds" if len(cfg.seeds) > 1 else "")
        + "; HD95 in mm.\n\n"
        + report.markdown_table(res.summary, method, len(cfg.seeds)),
        encoding="utf-8",
    )
    written.append(md)
    written.append(report.plot_class_dice(res.summary, out / "dice_per_class.png", method))
    if res.noc:
        written.append(report.plot_noc(res.noc, out / "noc.png", method))
    if res.worst_items:
        written.append(report.plot_overlays(res.worst_items, out / "worst_cases.png"))
    return written
