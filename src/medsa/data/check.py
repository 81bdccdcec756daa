"""``medsa check-data PATH``: dataset integrity check in the spirit of nnU-Net's.

Checks, each reported with the file name and a severity (an *error* makes training or evaluation
wrong or impossible; a *warning* is suspicious but usable):

==========================================================  ========
problem                                                     severity
==========================================================  ========
unknown layout / no labelled case / bad ``dataset.json``    error
unreadable, corrupt, truncated or empty file                error
NaN / inf in an image or label                              error
image / label shape mismatch                                error
spacing mismatch between image and label                    error
origin / direction (affine) mismatch between image, label   warning
label values not declared in ``dataset.json``               error
non-integer label values                                    error
2D mask values other than {0, 255} / {0, 1}                 warning
empty label (no foreground at all)                          warning
label without image                                         error
image without label (folder layout; imagesTs is fine)       warning
missing channel file / channels with different geometry     error
==========================================================  ========

Every file is checked inside its own ``try``: a bad file becomes a report line, never a traceback.
Exit code 1 if there is any error, else 0. ``--json`` writes the report as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsa._fs import atomic_write_text
from medsa.errors import DataError, MedsaError

if TYPE_CHECKING:
    from medsa.data.io import Image

HELP = "integrity check of a dataset folder (nnU-Net style report)"

__all__ = [
    "HELP",
    "add_arguments",
    "main",
    "CheckReport",
    "check_dataset",
    "label_geometry_errors",
    "label_geometry_issues",
]

#: 2D formats without geometry: their spacing / affine are not compared
RASTER_FORMATS = ("png", "jpeg", "bmp", "tiff")


@dataclass
class CheckReport:
    """Result of :func:`check_dataset`. ``issues`` are ``{"path", "severity", "message"}`` dicts."""

    root: str
    layout: str | None = None
    dim: int | None = None
    classes: dict[str, object] = field(default_factory=dict)
    n_cases: int = 0
    n_checked: int = 0
    issues: list[dict[str, str]] = field(default_factory=list)

    def add(self, path: object, severity: str, message: str) -> None:
        self.issues.append({"path": str(path), "severity": severity, "message": message})

    @property
    def n_errors(self) -> int:
        return sum(i["severity"] == "error" for i in self.issues)

    @property
    def n_warnings(self) -> int:
        return sum(i["severity"] == "warning" for i in self.issues)

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["classes"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.classes.items()}
        d.update(n_errors=self.n_errors, n_warnings=self.n_warnings)
        return d

    def format_table(self, max_rows: int | None = None) -> str:
        """Human-readable report: one line per problem, then a summary."""
        root = Path(self.root)
        lines = [f"dataset: {self.root}", f"layout:  {self.layout or '?'} ({self.dim or '?'}D)"]
        if self.classes:
            lines.append("classes: " + ", ".join(f"{k}={v}" for k, v in self.classes.items()))
        rows = sorted(self.issues, key=lambda i: (i["severity"] != "error", i["path"]))
        if rows:
            shown = rows if max_rows is None else rows[:max_rows]
            names = [_rel(i["path"], root) for i in shown]
            w = max(4, min(max(len(n) for n in names), 60))
            lines.append("")
            lines.append(f"{'severity':<8}  {'file':<{w}}  problem")
            lines.append(f"{'-' * 8}  {'-' * w}  {'-' * 7}")
            for i, n in zip(shown, names, strict=True):
                lines.append(f"{i['severity']:<8}  {n:<{w}}  {i['message']}")
            if len(shown) < len(rows):
                lines.append(f"... {len(rows) - len(shown)} more (see --json)")
        lines.append("")
        lines.append(
            f"checked {self.n_checked}/{self.n_cases} case(s): {self.n_errors} error(s), {self.n_warnings} warning(s)"
            + (" -> OK" if self.n_errors == 0 else " -> FAILED")
        )
        return "\n".join(lines)


def _rel(path: str, root: Path) -> str:
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return path


def check_dataset(root: str | os.PathLike[str], max_cases: int | None = None) -> CheckReport:
    """Check the dataset at ``root``; never raises for problems in the data."""
    from medsa.data.datasets import load_dataset

    report = CheckReport(str(root))
    try:
        info = load_dataset(root)
    except MedsaError as e:
        report.add(root, "error", str(e))
        return report
    except Exception as e:  # e.g. permission problems while listing
        report.add(root, "error", f"cannot index dataset ({type(e).__name__}: {e})")
        return report
    report.layout, report.dim, report.classes = info.layout, info.dim, dict(info.classes)
    report.n_cases = len(info.cases)
    for issue in info.issues:
        report.add(issue.path, issue.severity, issue.message)
    cases = info.cases if max_cases is None else info.cases[:max_cases]
    for case in cases:
        try:
            _check_case(info, case, report)
        except Exception as e:  # a checker bug must not hide the rest of the report
            report.add(
                case.images[0],
                "error",
                f"unexpected failure while checking ({type(e).__name__}: {e})",
            )
        report.n_checked += 1
    return report


def _read(path: Path, report: CheckReport):
    from medsa.data.io import read_image

    try:
        return read_image(path)
    except DataError as e:
        msg = str(e)
        prefix = f"{path}: "
        report.add(path, "error", msg[len(prefix) :] if msg.startswith(prefix) else msg)
    except Exception as e:
        report.add(path, "error", f"unreadable ({type(e).__name__}: {e})")
    return None


def _finite(arr: np.ndarray) -> bool:
    return not np.issubdtype(arr.dtype, np.floating) or bool(np.isfinite(arr).all())


def _check_case(info, case, report: CheckReport) -> None:
    imgs = [_read(p, report) for p in case.images]
    for p, im in zip(case.images, imgs, strict=True):
        if im is not None and not _finite(im.array):
            n = int((~np.isfinite(im.array)).sum())
            report.add(p, "error", f"image contains {n} NaN/inf value(s)")
    good = [(p, im) for p, im in zip(case.images, imgs, strict=True) if im is not None]
    ref_path, ref = good[0] if good else (None, None)
    for p, im in good[1:]:
        if im.spatial_shape != ref.spatial_shape:
            report.add(
                p,
                "error",
                f"channel shape {im.spatial_shape} differs from {ref_path.name} {ref.spatial_shape}",
            )
        elif not np.allclose(im.spacing, ref.spacing, rtol=1e-3):
            report.add(
                p,
                "error",
                f"channel spacing {im.spacing} differs from {ref_path.name} {ref.spacing}",
            )
        elif not np.allclose(im.affine, ref.affine, atol=1e-3):
            report.add(p, "warning", f"channel affine differs from {ref_path.name}")
    label_paths = [case.label, *case.extra_labels] if info.layout == "folder" else [case.label]
    for lp in label_paths:
        if lp is None:
            continue
        lab = _read(lp, report)
        if lab is None:
            continue
        _check_label(info, lp, lab, ref, report)


def label_geometry_issues(lab: Image, ref: Image, folder_layout: bool) -> list[tuple[str, str]]:
    """``(severity, message)`` of a label against its image, as ``check-data`` reports them:
    shape mismatch (error), spacing mismatch (error), origin / direction mismatch (warning).

    Spacing and affine are compared for volumes and for 2D formats that carry geometry (not for
    PNG / JPEG / BMP / TIFF rasters). ``folder_layout``: 2D masks may be colour ``(H, W, C)``.
    ``medsa evaluate`` refuses a case with an error here (one comparison for both commands).
    """
    a = lab.array
    if folder_layout and not lab.is_3d:
        lshape = tuple(a.shape[:2]) if a.ndim == 3 else tuple(a.shape)
    else:
        lshape = lab.spatial_shape
    if lshape != ref.spatial_shape:
        return [("error", f"label shape {lshape} differs from image shape {ref.spatial_shape}")]
    if not (ref.is_3d or ref.format not in RASTER_FORMATS):
        return []
    if not np.allclose(lab.spacing, ref.spacing, rtol=1e-3):
        return [("error", f"label spacing {lab.spacing} differs from image spacing {ref.spacing}")]
    if not (
        np.allclose(lab.origin, ref.origin, atol=1e-3)
        and np.allclose(lab.direction, ref.direction, atol=1e-3)
    ):
        return [("warning", "label origin/direction (affine) differs from the image's")]
    return []


def label_geometry_errors(info: Any, case: Any, image: Image) -> list[str]:
    """Messages ``"<label path>: <problem>"`` of the *errors* :func:`label_geometry_issues` finds
    for ``case``'s labels against its (already read) ``image``; ``[]`` for plain 2D rasters,
    whose shapes ``DatasetInfo.load_case`` checks (nothing else to compare)."""
    from medsa.data.io import read_image

    if not (image.is_3d or image.format not in RASTER_FORMATS):
        return []
    folder = info.layout == "folder"
    paths = [case.label, *case.extra_labels] if folder else [case.label]
    out = []
    for lp in paths:
        if lp is None:
            continue
        for severity, message in label_geometry_issues(read_image(lp), image, folder):
            if severity == "error":
                out.append(f"{lp}: {message}")
    return out


def _check_label(info, lp: Path, lab, ref, report: CheckReport) -> None:
    arr = lab.array
    if not _finite(arr):
        report.add(lp, "error", "label contains NaN/inf")
        return
    if info.layout == "folder" and arr.ndim == 3 and not lab.is_3d:
        if arr.shape[-1] in (3, 4) and not (arr == arr[..., :1]).all():
            report.add(lp, "warning", f"mask is colour {arr.shape}; its first channel is used")
        arr = arr[..., 0]
    if ref is not None:
        for severity, message in label_geometry_issues(lab, ref, info.layout == "folder"):
            report.add(lp, severity, message)
    if np.issubdtype(arr.dtype, np.floating) and not np.array_equal(arr, np.rint(arr)):
        report.add(lp, "error", "label has non-integer values")
        return
    values = {int(v) for v in np.unique(arr)}
    if info.layout == "folder":
        if not (values <= {0, 255} or values <= {0, 1}):
            shown = sorted(values)[:8]
            report.add(
                lp,
                "warning",
                f"mask values {shown}{'...' if len(values) > 8 else ''} are not binary 0/255 or 0/1",
            )
    elif info.label_values_declared:
        allowed = {0} if info.ignore_value is None else {0, info.ignore_value}
        for v in info.classes.values():
            allowed |= set(v) if isinstance(v, tuple) else {int(v)}
        extra = sorted(values - allowed)
        if extra:
            report.add(
                lp,
                "error",
                f"label values {extra[:8]} are not declared in dataset.json (allowed {sorted(allowed)})",
            )
    if values <= {0}:
        report.add(lp, "warning", "label is empty (no foreground)")


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "path", help="dataset folder (images/ + masks/, or nnU-Net imagesTr/ + labelsTr/)"
    )
    parser.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT")
    parser.add_argument("--max-cases", type=int, default=None, help="check only the first N cases")
    parser.add_argument(
        "--max-rows", type=int, default=200, help="problems listed in the table (default 200)"
    )


def main(args: argparse.Namespace) -> int:
    if args.max_cases is not None and args.max_cases < 1:
        raise DataError("--max-cases must be >= 1")
    report = check_dataset(args.path, max_cases=args.max_cases)
    print(report.format_table(max_rows=args.max_rows))
    if args.json:
        out = Path(args.json)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, json.dumps(report.to_dict(), indent=2))
        except OSError as e:
            raise DataError(f"{out}: cannot write the JSON report ({e})") from None
        print(f"report written to {out}", file=sys.stderr)
    return 1 if report.n_errors else 0
