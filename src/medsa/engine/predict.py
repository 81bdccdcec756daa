"""``medsa predict``: segment images, volumes and folders with prompts, keeping their geometry.

Inputs: image files (PNG/JPEG/BMP/TIFF), volumes (NIfTI, MHA/MHD, NRRD, DICOM file or a folder
holding one DICOM series) and folders (searched recursively; a folder with DICOM files is one
series). Prompts come from the command line (``--point x,y[,label]`` repeatable, ``--box
x0,y0,x1,y1``, ``--slice`` for volumes), from a JSON file (``--prompts``, schema in
docs/evaluation.md and :func:`parse_prompt_entry`) or ``--everything`` (SAM automatic mode).

Outputs (in ``--out``, mirroring sub-folders of a folder input): ``<name>_mask.<ext>`` in the
input's format, written with ``write_image(like=input)`` so spacing / origin / direction (and the
NIfTI header) are preserved. JPEG/BMP inputs give PNG masks (lossless); DICOM inputs give
``.nii.gz``. One object: 0/255 for 2D rasters, 0/1 for volumes; several objects: labels 1..K.
``--overlay`` adds ``<name>_overlay.png``; ``--dicom-seg`` adds ``<name>_mask_seg.dcm`` for DICOM
inputs (a DICOM Segmentation referencing the source series, :mod:`medsa.data.dicom_seg`). Before
the model is loaded, ``--out`` is checked to be writable and no existing result is replaced
without ``--overwrite``. A failing file is reported and skipped; the exit code is 1 if any file
failed.

Modules: :mod:`medsa.engine.predict_inputs` (inputs, prompts), this one (running one job,
writing its outputs), :mod:`medsa.engine.predict_cli` (the command line),
:mod:`medsa.engine.predict_pipeline` (read-ahead, batching, sharding).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medsa.data.io import image_format
from medsa.data.preprocess import resize_spatial, resized_shape
from medsa.engine.inference import (
    Prompt,
    model_input,
    segment_everything,
    segment_image,
    segment_volume,
)
from medsa.errors import MedsaError, PromptError

from .predict_inputs import (  # noqa: F401 (re-exported: the public predict API)
    OUT_EXT,
    PredictJob,
    cli_prompt,
    collect_inputs,
    load_prompt_file,
    parse_prompt_entry,
    parse_slices,
)

HELP = "segment images, volumes and folders with point / box prompts, keeping their geometry"

__all__ = [
    "HELP",
    "PredictJob",
    "collect_inputs",
    "parse_prompt_entry",
    "run_job",
    "write_overlay",
]

# --------------------------------------------------------------------------- running


def _auto_labels(predictor: Any, x: np.ndarray, is_3d: bool, depth: int | None) -> np.ndarray:
    """MA-SAM's prompt-free multi-class prediction: label map ``(H, W)`` / ``(D, H, W)`` uint8."""
    from medsa.engine.inference import ChunkEncoder, segment_auto

    if getattr(predictor.model, "masam_decoder", None) is None:
        raise PromptError("--auto needs a model with MA-SAM's multi-class head (--adapter)")
    if not is_3d:
        predictor.set_image(x)
        return segment_auto(predictor).astype(np.uint8)
    enc = ChunkEncoder(predictor, x, depth) if depth else None
    out = np.zeros(x.shape[:3], np.uint8)
    for z in range(x.shape[0]):
        if enc is not None:
            enc.set_slice(z)
        else:
            predictor.set_image(x[z])
        out[z] = segment_auto(predictor)
    return out


def _model_grid(x: np.ndarray, resize_to: Any) -> tuple[np.ndarray, tuple[int, ...]]:
    """Model input ``(H, W, 3)`` / ``(D, H, W, 3)`` resized (linear) to ``resize_to`` and its
    spatial shape; unchanged without ``resize_to``."""
    if resize_to is None:
        return x, tuple(x.shape[:-1])
    grid = resized_shape(x.shape[:-1], resize_to)
    return resize_spatial(x, grid, kind="image", channels_last=True), grid


def _prompts_to_grid(prompts: Any, shape: tuple[int, ...], grid: tuple[int, ...]) -> Any:
    """Prompts in the input's pixels -> the model grid: ``(x, y)`` scaled by ``W'/W``, ``H'/H``
    (as SAM's own resize); volumes: slice ``z`` goes to the model slice that is resampled back
    onto ``z`` (nearest, ``floor((z + 0.5) * D'/D)``; when several input slices share one model
    slice, the last one's prompts are used). Prompts are validated on the input first."""
    sy, sx = grid[-2] / shape[-2], grid[-1] / shape[-1]

    def one(p: Prompt | None) -> Prompt | None:
        if p is None or p.empty:
            return p
        p.validate(shape[-2:])  # errors in the user's own coordinates
        pts = p.points * np.array([sx, sy], np.float32) if len(p.points) else None
        box = p.box * np.array([sx, sy, sx, sy], np.float32) if p.box is not None else None
        return Prompt(points=pts, labels=p.labels if len(p.points) else None, box=box)

    if not isinstance(prompts, Mapping):
        return [one(p) for p in prompts]
    d, dm = shape[0], grid[0]
    out: dict[int, list[Prompt | None]] = {}
    for z, ps in sorted(prompts.items()):
        if not 0 <= int(z) < d:
            raise PromptError(f"slice index {z} is outside the volume's {d} slices (0..{d - 1})")
        out[min(dm - 1, int((int(z) + 0.5) * dm / d))] = [one(p) for p in ps]
    return out


def _label_map(masks: np.ndarray) -> np.ndarray:
    """``(K, ...)`` bool -> label map (later objects win where they overlap)."""
    dtype = np.uint8 if len(masks) < 256 else np.uint16
    out = np.zeros(masks.shape[1:], dtype=dtype)
    for k, m in enumerate(masks):
        out[m] = k + 1
    return out


def output_paths(job: PredictJob, args: argparse.Namespace) -> list[Path]:
    """Files ``job`` writes: the mask (``<out>/<rel><suffix><ext>``, extension from the input
    format) and, with ``--overlay``, ``<out>/<rel>_overlay.png``."""
    fmt = "dicom" if job.path.is_dir() else image_format(job.path)
    mask = args.out / job.rel.parent / f"{job.rel.name}{args.suffix}{OUT_EXT.get(fmt, '.png')}"
    paths = [mask]
    if getattr(args, "dicom_seg", False) and fmt == "dicom":
        paths.append(mask.parent / f"{job.rel.name}{args.suffix}_seg.dcm")
    if args.overlay:
        paths.append(args.out / job.rel.parent / f"{job.rel.name}_overlay.png")
    return paths


def run_job(
    job: PredictJob,
    predictor: Any,
    args: argparse.Namespace,
    cli: Prompt | None,
    loaded: Any = None,
) -> list[Path]:
    """Segment one input and write its outputs; returns the written paths.

    ``loaded``: the input already read (``medsa.engine.predict_pipeline.Loaded``), else read here.
    """
    from medsa.data.io import read_image, write_image

    paths = output_paths(job, args)
    out_path = paths[0]
    if any(q.resolve() == job.path.resolve() for q in paths):
        raise MedsaError(
            f"{out_path}: refusing to overwrite the input; use another --out or --suffix"
        )
    if loaded is not None:
        img, x = loaded.img, loaded.x
    else:
        img = read_image(job.path)
        # (H, W, 3) / (D, H, W, 3) float in [0, 255], scaled as the training datasets do
        x = model_input(img.array, bool(img.is_3d), args.intensity)
    is_3d = bool(img.is_3d)
    if args.slice and not is_3d and job.explicit:
        # in a folder --slice is meant for its volumes; a 2D image named with it is a mistake
        raise PromptError(f"{job.path} is a 2D image: --slice applies to volumes only")
    shape = x.shape[:-1]
    # the model's grid (training's data.resize_to); the result is resampled back to `shape`
    xm, grid = _model_grid(x, getattr(args, "resize_to", None))
    prompts_used: Any = None
    propagated = False  # every slice predicted: none is cleared after resampling back
    if args.auto:
        labels = _auto_labels(predictor, xm, is_3d, args.depth)
    elif args.everything:
        pps = args.points_per_side
        if is_3d:
            labels = np.stack(
                [
                    _label_map(
                        segment_everything(predictor, xz, intensity="none", points_per_side=pps)
                    )
                    for xz in xm
                ]
            )
        else:
            labels = _label_map(
                segment_everything(predictor, xm, intensity="none", points_per_side=pps)
            )
    else:
        if job.entry is not None:
            prompts = parse_prompt_entry(job.entry, is_3d, job.path.name)
        elif args.key_mask is not None:
            prompts = {}  # the mask file holds the keys (below)
        elif cli is not None:
            if is_3d:
                if not args.slice:
                    raise PromptError(
                        f"{job.path} is a volume with {shape[0]} slices: give --slice Z (or Z0:Z1) "
                        "for --point/--box, or per-slice prompts with --prompts"
                    )
                prompts = {z: [cli] for z in parse_slices(args.slice, shape[0])}
            else:
                prompts = [cli]
        else:
            raise PromptError(
                "no prompt: give --point/--box, --prompts FILE, --everything or --auto"
            )
        if args.propagate or args.key_mask is not None:
            if not is_3d or not isinstance(prompts, Mapping):
                raise PromptError(f"{job.path}: --propagate / --key-mask apply to volumes")
            if grid == shape:
                masks = _propagate(predictor, img.array, prompts, args, args.intensity)
            else:  # on the model grid, like the per-slice path below
                mp = _prompts_to_grid(prompts, shape, grid)
                masks = _propagate(predictor, np.moveaxis(xm, -1, 0), mp, args, "none", shape)
            propagated = True
        elif is_3d:
            if not isinstance(prompts, Mapping):
                raise PromptError(f"{job.path} is a volume: prompts must be given per slice")
            if grid == shape:
                masks, _ = segment_volume(
                    predictor, img.array, prompts, intensity=args.intensity, depth=args.depth,
                    batch_size=getattr(args, "batch_size", 1),
                )  # fmt: skip
            else:  # xm is already scaled: (D', H', W', 3) -> (3, D', H', W') channels
                mp = _prompts_to_grid(prompts, shape, grid)
                masks, _ = segment_volume(
                    predictor, np.moveaxis(xm, -1, 0), mp, intensity="none", depth=args.depth,
                    batch_size=getattr(args, "batch_size", 1),
                )  # fmt: skip
        else:
            if isinstance(prompts, Mapping):
                raise PromptError(f"{job.path} is a 2D image: per-slice prompts do not apply")
            mp = prompts if grid == shape else _prompts_to_grid(prompts, shape, grid)
            masks, _ = segment_image(predictor, xm, mp, intensity="none")  # type: ignore[misc]
        labels = masks[0] if len(masks) == 1 else _label_map(masks)
        prompts_used = prompts
    if grid != shape:  # back to the input's grid (nearest), so its geometry applies
        labels = resize_spatial(labels, shape, kind="label")
        if is_3d and isinstance(prompts_used, Mapping) and not propagated:
            # unprompted slices stay empty
            keep = np.zeros(shape[0], bool)
            keep[[int(z) for z in prompts_used]] = True
            labels[~keep] = 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if labels.dtype == bool and is_3d:
        labels = labels.astype(np.uint8)
    written = [write_image(labels, out_path, like=img)]
    if getattr(args, "dicom_seg", False):
        seg_path = out_path.parent / f"{job.rel.name}{args.suffix}_seg.dcm"
        written += _dicom_seg(job, labels, seg_path, automatic=bool(args.auto or args.everything))
    if args.overlay:
        ov = paths[-1]  # the overlay is the last path
        display = np.clip(x, 0, 255).astype(np.uint8)
        written.append(write_overlay(display, labels, ov, prompts_used, is_3d))
    return written


def _dicom_seg(job: PredictJob, labels: np.ndarray, path: Path, automatic: bool) -> list[Path]:
    """``--dicom-seg``: ``<name>_seg.dcm`` referencing the source series (DICOM inputs only)."""
    from medsa.data.dicom_seg import write_dicom_seg

    if image_format(job.path) != "dicom":
        print(f"medsa predict: note: {job.path} is not DICOM, no DICOM-SEG", file=sys.stderr)
        return []
    names = {k: f"object {k}" for k in range(1, max(1, int(labels.max())) + 1)}
    kind = "AUTOMATIC" if automatic else "SEMIAUTOMATIC"
    return [write_dicom_seg(labels, job.path, names, path, algorithm_type=kind)]


def _propagate(
    predictor: Any,
    volume: np.ndarray,
    prompts: Mapping[int, Any],
    args: argparse.Namespace,
    intensity: str,
    shape: tuple[int, ...] | None = None,
) -> np.ndarray:
    """``--propagate``: the key slices of every object (prompts, ``--key-mask``) -> ``(K, D, H, W)``
    on the grid of ``volume``; ``shape``: the input's own ``(D, H, W)`` when ``volume`` is on a
    resized model grid (the key mask is given on the input's grid and resampled, nearest)."""
    from medsa.data.io import read_image
    from medsa.engine.propagate import object_keys, propagate_objects

    labels = None
    grid = tuple(volume.shape[-3:])
    if args.key_mask is not None:
        labels = np.asarray(read_image(args.key_mask).array)
        d, h, w = shape if shape is not None else grid
        if labels.shape == (h, w):  # one 2D key mask: it belongs to --slice Z
            if not args.slice or ":" in args.slice:
                raise PromptError("a 2D --key-mask needs --slice Z (one slice)")
            z = parse_slices(args.slice, d)[0]
            labels = np.zeros((d, h, w), np.int64) + (np.arange(d) == z)[:, None, None] * labels
        if labels.shape != (d, h, w) or not np.array_equal(labels, np.round(labels)):
            raise PromptError(
                f"--key-mask {args.key_mask}: expected integer labels of shape {(d, h, w)} "
                f"or {(h, w)}, got {labels.dtype} {labels.shape}"
            )
        labels = labels.astype(np.int64)
        if labels.shape != grid:
            labels = resize_spatial(labels, grid, kind="label")
    objects = object_keys(prompts, labels)
    kw = {"min_score": args.min_score} if args.min_score is not None else {}
    masks, _ = propagate_objects(
        predictor, volume, objects, intensity=intensity, depth=args.depth, **kw
    )
    return masks


_COLORS = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 212],
        [0, 128, 128],
    ],
    dtype=np.float32,
)


def write_overlay(
    image: np.ndarray, labels: np.ndarray, path: Path, prompts: Any = None, is_3d: bool = False
) -> Path:
    """PNG of the image with the mask blended in (for a volume: the slice with most foreground)
    and the prompts drawn (green = positive point, red = negative, yellow = box)."""
    from PIL import Image as PILImage
    from PIL import ImageDraw

    from medsa.engine.inference import to_uint8
    from medsa.sam.predictor import image_to_rgb

    img8 = to_uint8(image)
    lab = np.asarray(labels)
    z = None
    if is_3d:
        z = int(np.argmax((lab.reshape(lab.shape[0], -1) > 0).sum(1)))
        img8, lab = img8[z], lab[z]
    rgb = image_to_rgb(img8).astype(np.float32)
    if lab.dtype == bool:
        lab = lab.astype(np.uint8)
    for k in np.unique(lab[lab > 0]):
        m = lab == k
        rgb[m] = 0.55 * rgb[m] + 0.45 * _COLORS[(int(k) - 1) % len(_COLORS)]
    pil = PILImage.fromarray(rgb.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    plist = prompts.get(z, []) if isinstance(prompts, Mapping) else (prompts or [])
    r = max(2, min(pil.size) // 100)
    for p in plist:
        if p is None:
            continue
        if p.box is not None:
            draw.rectangle([float(v) for v in p.box], outline=(255, 255, 0), width=max(1, r // 2))
        for (x, y), lb in zip(p.points, p.labels, strict=True):
            c = (0, 255, 0) if lb == 1 else (255, 0, 0)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=c, outline=(255, 255, 255))
    from medsa._fs import atomic_write

    return atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))
