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
``--overlay`` adds ``<name>_overlay.png``. A failing file is reported and skipped; the exit code
is 1 if any file failed.
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
from medsa.engine.inference import (
    Prompt,
    model_input,
    segment_everything,
    segment_image,
    segment_volume,
)
from medsa.errors import ConfigError, MedsaError, PromptError

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
            jobs.append(PredictJob(p, Path(_stem(p))))
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


def _label_map(masks: np.ndarray) -> np.ndarray:
    """``(K, ...)`` bool -> label map (later objects win where they overlap)."""
    dtype = np.uint8 if len(masks) < 256 else np.uint16
    out = np.zeros(masks.shape[1:], dtype=dtype)
    for k, m in enumerate(masks):
        out[m] = k + 1
    return out


def run_job(
    job: PredictJob, predictor: Any, args: argparse.Namespace, cli: Prompt | None
) -> list[Path]:
    """Segment one input and write its outputs; returns the written paths."""
    from medsa.data.io import read_image, write_image

    img = read_image(job.path)
    is_3d = bool(img.is_3d)
    # (H, W, 3) / (D, H, W, 3) float in [0, 255], scaled as the training datasets do
    x = model_input(img.array, is_3d, args.intensity)
    shape = x.shape[:-1]
    prompts_used: Any = None
    if args.auto:
        labels = _auto_labels(predictor, x, is_3d, args.depth)
    elif args.everything:
        pps = args.points_per_side
        if is_3d:
            labels = np.stack(
                [
                    _label_map(
                        segment_everything(predictor, xz, intensity="none", points_per_side=pps)
                    )
                    for xz in x
                ]
            )
        else:
            labels = _label_map(
                segment_everything(predictor, x, intensity="none", points_per_side=pps)
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
            masks = _propagate(predictor, img.array, prompts, args)
        elif is_3d:
            if not isinstance(prompts, Mapping):
                raise PromptError(f"{job.path} is a volume: prompts must be given per slice")
            masks, _ = segment_volume(
                predictor, img.array, prompts, intensity=args.intensity, depth=args.depth
            )
        else:
            if isinstance(prompts, Mapping):
                raise PromptError(f"{job.path} is a 2D image: per-slice prompts do not apply")
            masks, _ = segment_image(predictor, x, prompts, intensity="none")  # type: ignore[misc]
        labels = masks[0] if len(masks) == 1 else _label_map(masks)
        prompts_used = prompts
    fmt = img.format
    ext = OUT_EXT.get(fmt, ".nii.gz" if is_3d else ".png")
    out_path = args.out / job.rel.parent / f"{job.rel.name}{args.suffix}{ext}"
    if out_path.resolve() == job.path.resolve():
        raise MedsaError(
            f"{out_path}: refusing to overwrite the input; use another --out or --suffix"
        )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if labels.dtype == bool and is_3d:
        labels = labels.astype(np.uint8)
    written = [write_image(labels, out_path, like=img)]
    if args.overlay:
        ov = args.out / job.rel.parent / f"{job.rel.name}_overlay.png"
        display = np.clip(x, 0, 255).astype(np.uint8)
        written.append(write_overlay(display, labels, ov, prompts_used, is_3d))
    return written


def _propagate(
    predictor: Any, volume: np.ndarray, prompts: Mapping[int, Any], args: argparse.Namespace
) -> np.ndarray:
    """``--propagate``: the key slices of every object (prompts, ``--key-mask``) -> ``(K, D, H, W)``."""
    from medsa.data.io import read_image
    from medsa.engine.propagate import object_keys, propagate_objects

    labels = None
    if args.key_mask is not None:
        labels = np.asarray(read_image(args.key_mask).array)
        d, h, w = volume.shape[-3:]
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
    objects = object_keys(prompts, labels)
    kw = {"min_score": args.min_score} if args.min_score is not None else {}
    masks, _ = propagate_objects(
        predictor, volume, objects, intensity=args.intensity, depth=args.depth, **kw
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
    tmp = path.with_name(path.name + ".tmp.png")
    pil.save(tmp)
    tmp.replace(path)
    return path


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
    p.add_argument("--adapter", type=Path, help="adapter saved by 'medsa train'")
    p.add_argument(
        "--intensity",
        default="auto",
        help="intensity scaling as in training: auto, none, percentile, ct:<preset>, ct:<L>,<W>",
    )
    p.add_argument(
        "--depth",
        type=int,
        help="volumes: encode chunks of N slices together (models with SD-Trans / MA-SAM 3D "
        "adapters; use the training data.depth); default: every slice alone",
    )
    p.add_argument("--suffix", default="_mask", help="added to output names (default: _mask)")
    p.add_argument("--overlay", action="store_true", help="also write <name>_overlay.png")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")


def main(args: argparse.Namespace) -> int:
    from medsa.engine.evaluate import load_model
    from medsa.engine.inference import as_predictor
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

    jobs, errors = collect_inputs(args.inputs, args.out)
    for e in errors:
        print(f"medsa predict: error: {e}", file=sys.stderr)
    if not jobs:
        return 1
    model = load_model(args.backbone, args.checkpoint, args.adapter, resolve_device(args.device))
    predictor = as_predictor(model)
    failed = len(errors)
    base = args.prompts.parent if args.prompts is not None else Path.cwd()
    import torch

    for job in jobs:
        try:
            if table is not None:
                entry = _lookup(table, job, base)
                if entry is None:
                    raise PromptError(f"no entry for this file in {args.prompts}")
                job.entry = entry
            with torch.inference_mode():
                written = run_job(job, predictor, args, cli)
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
    n = len(jobs) + len(errors)
    print(f"{n - failed}/{n} inputs segmented" + (f", {failed} failed" if failed else ""))
    return 1 if failed else 0
