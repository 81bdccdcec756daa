"""Inputs of ``medsa predict``: the files / volumes / DICOM series to segment
(:func:`collect_inputs`) and their prompts, from the command line or a JSON prompt file
(:func:`parse_prompt_entry`, schema in docs/evaluation.md)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsa.data.io import image_format, image_suffix, looks_like_dicom
from medsa.engine.inference import (
    Prompt,
)
from medsa.errors import PromptError

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
