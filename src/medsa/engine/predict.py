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
``--overlay`` adds ``<name>_overlay.png``. Before the model is loaded, ``--out`` is checked to
be writable and no existing result is replaced without ``--overwrite``. A failing file is
reported and skipped; the exit code is 1 if any file failed.
    )
    p.add_argument(
``--overlay`` adds ``<name>_overlay.png``; ``--dicom-seg`` adds ``<name>_mask_seg.dcm`` for DICOM
inputs (a DICOM Segmentation referencing the source series, :mod:`medsa.data.dicom_seg`). A
failing file is reported and skipped; the exit code is 1 if any file failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsa.data.io import image_format, image_suffix, looks_like_dicom
from medsa.data.preprocess import resize_spatial, resized_shape
from medsa.engine.inference import (
    Prompt,
    model_input,
    segment_everything,
    segment_image,
    segment_volume,
)
from medsa.engine.model_loading import RANDOM_WEIGHTS_HELP
from medsa.engine.outputs import check_writable_dir, refuse_existing
from medsa.errors import ConfigError, MedsaError, PromptError
from medsa.export.options import add_runtime_arguments

HELP = "segment images, volumes and folders with point / box prompts, keeping their geometry"

__all__ = ["HELP", "add_arguments", "main", "collect_inputs", "parse_prompt_entry", "PredictJob"]

#: input format -> output extension
OUT_EXT = {
    "png": ".png",
    "jpeg": ".png",
    "bmp": ".png",
    "tiff": ".tif",
    "nifti": ".nii.gz",
    "mha": ".mha",
    "nrrd": ".nrrd",
    "dicom": ".nii.gz",
}


@dataclass
class PredictJob:
    """One input to segment: ``path`` (file or DICOM folder), ``rel`` = output name stem
    relative to ``--out`` (without extension)."""

    path: Path
    rel: Path
    entry: Any = None  # this file's raw entry of the --prompts JSON (None -> CLI prompts)
    explicit: bool = False  # named on the command line (not found in a folder)
    errors: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- inputs


def _stem(p: Path) -> str:
    name = p.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else p.stem


def _is_image_file(p: Path) -> bool:
    """A single-file image or volume (DICOM slices are grouped into series separately)."""
    suffix = image_suffix(p.name)
    return suffix is not None and image_format(p) != "dicom"


def _is_dicom_file(p: Path) -> bool:
    if image_suffix(p.name) is not None:
        return image_format(p) == "dicom"
    return not p.suffix and looks_like_dicom(p)  # only extension-less files are sniffed


def collect_inputs(
    inputs: Sequence[Path], out_dir: Path | None = None
) -> tuple[list[PredictJob], list[str]]:
    """Expand files / folders into jobs. Returns ``(jobs, errors)`` (errors: missing inputs).

    A folder is searched recursively; every directory that holds DICOM files is one series;
    hidden files, non-image files and anything inside ``out_dir`` are skipped.
    """
    jobs: list[PredictJob] = []
    errors: list[str] = []
    out_res = out_dir.resolve() if out_dir is not None else None
    for inp in inputs:
        p = Path(inp)
        if not p.exists():
            errors.append(f"{p}: no such file or folder")
            continue
        if p.is_file():
            jobs.append(PredictJob(p, Path(_stem(p)), explicit=True))
            continue
        found = 0
        for d in sorted([p, *[q for q in p.rglob("*") if q.is_dir()]]):
            if out_res is not None and (d.resolve() == out_res or out_res in d.resolve().parents):
                continue
            if any(part.startswith(".") for part in d.relative_to(p).parts):
                continue
            files = sorted(f for f in d.iterdir() if f.is_file() and not f.name.startswith("."))
            rel_dir = d.relative_to(p)
            if any(_is_dicom_file(f) for f in files):
                name = d.name if d != p else p.name
                jobs.append(PredictJob(d, (rel_dir.parent if d != p else Path()) / name))
                found += 1
                files = [f for f in files if not _is_dicom_file(f)]
            for f in files:
                if _is_image_file(f):
                    jobs.append(PredictJob(f, rel_dir / _stem(f)))
                    found += 1
        if not found:
            errors.append(f"{p}: folder contains no images")
    # two inputs mapping to the same output name (a.png + a.jpg): keep both, disambiguate
    seen: dict[Path, int] = {}
    for j in jobs:
        seen[j.rel] = seen.get(j.rel, 0) + 1
    for j in jobs:
        if seen[j.rel] > 1:
            ext = "".join(j.path.suffixes).lstrip(".").replace(".", "_") or "dir"
            j.rel = j.rel.with_name(f"{j.rel.name}_{ext}")
    return jobs, errors


# --------------------------------------------------------------------------- prompts


def _numbers(text: str, n: tuple[int, ...], what: str) -> list[float]:
    try:
        vals = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise PromptError(f"{what} {text!r}: expected comma-separated numbers") from None
    if len(vals) not in n:
        shape = " or ".join({2: "x,y", 3: "x,y,label", 4: "x0,y0,x1,y1"}[k] for k in n)
        raise PromptError(f"{what} {text!r}: expected {shape}")
    return vals


def cli_prompt(points: Sequence[str] | None, box: str | None) -> Prompt | None:
    """Build the single prompt given with ``--point`` / ``--box`` (None if neither)."""
    pts, labs = [], []
    for s in points or []:
        v = _numbers(s, (2, 3), "--point")
        if len(v) == 3 and v[2] not in (0.0, 1.0):
            raise PromptError(f"--point {s!r}: label must be 1 (positive) or 0 (negative)")
        pts.append(v[:2])
        labs.append(int(v[2]) if len(v) == 3 else 1)
    b = np.array(_numbers(box, (4,), "--box"), np.float32) if box else None
    if not pts and b is None:
        return None
    return Prompt(
        points=np.array(pts, np.float32) if pts else None,
        labels=np.array(labs) if pts else None,
        box=b,
    )


def parse_slices(text: str, depth: int) -> list[int]:
    """``"12"`` or ``"10:14"`` (inclusive) -> slice indices, checked against ``depth``."""
    try:
        if ":" in text:
            a, b = (int(v) for v in text.split(":"))
            zs = list(range(a, b + 1))
        else:
            zs = [int(text)]
    except ValueError:
        raise PromptError(f"--slice {text!r}: expected Z or Z0:Z1") from None
    if not zs or min(zs) < 0 or max(zs) >= depth:
        raise PromptError(
            f"--slice {text!r} is outside the volume's {depth} slices (0..{depth - 1})"
        )
    return zs


def _objects(entry: Any, where: str) -> list[Prompt]:
    """A 2D entry: one prompt object, ``{"objects": [...]}`` or a list of prompt objects."""
    if isinstance(entry, Mapping) and "objects" in entry:
        entry = entry["objects"]
    items = entry if isinstance(entry, list) else [entry]
    if not items:
        raise PromptError(f"{where}: empty prompt list")
    out = []
    for k, it in enumerate(items):
        try:
            p = Prompt.from_json(it)
        except PromptError as e:
            raise PromptError(f"{where}, object {k + 1}: {e}") from None
        if p.empty:
            raise PromptError(f"{where}, object {k + 1}: needs 'points' and/or 'box'")
        out.append(p)
    return out


def parse_prompt_entry(
    entry: Any, is_3d: bool, where: str
) -> list[Prompt] | dict[int, list[Prompt]]:
    """Parse one file's entry of the ``--prompts`` JSON.

    2D: ``{"points": [[x, y, label], ...], "box": [x0, y0, x1, y1]}`` (one object), or a list
    of such objects / ``{"objects": [...]}`` (object k -> label k+1).
    3D: ``{"slices": {"<z>": <2D entry>, ...}}``; object k of every slice is label k+1.
    """
    if is_3d:
        if not isinstance(entry, Mapping) or "slices" not in entry:
            raise PromptError(f'{where}: a volume needs {{"slices": {{"<z>": ...}}}} prompts')
        sl = entry["slices"]
        if not isinstance(sl, Mapping) or not sl:
            raise PromptError(f"{where}: 'slices' must map slice numbers to prompts")
        out: dict[int, list[Prompt]] = {}
        for z, e in sl.items():
            try:
                zi = int(z)
            except ValueError:
                raise PromptError(f"{where}: slice key {z!r} is not an integer") from None
            out[zi] = _objects(e, f"{where}, slice {zi}")
        return out
    if isinstance(entry, Mapping) and "slices" in entry:
        raise PromptError(f"{where}: 'slices' given for a 2D image")
    return _objects(entry, where)


def load_prompt_file(path: Path) -> dict[str, Any]:
    """Read the ``--prompts`` JSON: ``{"<file>": <entry>, ...}`` (optionally under ``"files"``)."""
    if not path.exists():
        raise PromptError(f"prompt file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PromptError(f"prompt file {path} is not valid JSON ({e})") from None
    if isinstance(data, Mapping) and isinstance(data.get("files"), Mapping):
        data = data["files"]
    if not isinstance(data, Mapping):
        raise PromptError(f"prompt file {path}: expected an object mapping file names to prompts")
    return dict(data)


def _lookup(table: Mapping[str, Any], job: PredictJob, base: Path) -> Any:
    """Find a job's entry: by path as given, path relative to the JSON's folder, output-relative
    name, or file name."""
    p = job.path
    candidates = [str(p), p.as_posix()]
    for root in (base, Path.cwd()):
        with contextlib.suppress(ValueError):
            candidates.append(p.resolve().relative_to(root.resolve()).as_posix())
    candidates += [job.rel.as_posix(), p.name]
    for c in candidates:
        if c in table:
            return table[c]
    resolved = {str((base / k).resolve()): v for k, v in table.items()}
    if str(p.resolve()) in resolved:
        return resolved[str(p.resolve())]
    # a key that is a trailing part of the path ("sub/b.jpg" for /data/sub/b.jpg), if unique
    full = "/" + p.resolve().as_posix().lstrip("/")
    hits = [k for k in table if full.endswith("/" + k.strip("/"))]
    if len(hits) > 1:
        raise PromptError(f"{p}: ambiguous prompt entries {hits}; use a longer path as key")
    return table[hits[0]] if hits else None


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
