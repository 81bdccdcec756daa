"""Dataset layouts and case records: detect a dataset folder's layout and index its cases.

Layouts recognised by :func:`load_dataset`:

``folder`` (as ``/work/shared/data/<2D dataset>``)::

    images/<id>.<png|jpg|...>     masks/<id>.png (binary, 0/255 or 0/1)   [masks_<name>/<id>.png ...]

  Images and masks are matched by file stem (a mask named ``<id>_mask`` / ``<id>_segmentation``
  also matches). ``masks/`` is class ``"foreground"`` (value 1); every extra ``masks_<name>/``
  folder is one more class ``<name>`` (value 2, 3, ... in sorted order), e.g. Drishti-GS
  ``masks_cup`` -> ``"cup"``. Folders whose name contains ``instance`` are not classes (instance
  ids). Images may also be volumes (``.nii.gz``), then ``dim == 3``.

``nnunet`` (nnU-Net v2 raw / MSD)::

    dataset.json  imagesTr/<case>_0000.nii.gz [_0001 ...]  labelsTr/<case>.nii.gz  [imagesTs/]

  ``dataset.json`` gives ``labels`` (v2 ``{"background": 0, "RV": 1}``, region tuples allowed; or MSD
  ``{"0": "background", "1": "RV"}``), ``channel_names`` (or MSD ``modality``), ``file_ending``;
  an MSD ``training`` list of ``{"image", "label"}`` pairs is used when present (4D images there
  hold all channels).

``imagesTr`` (no ``dataset.json``; e.g. ACDC here): ``imagesTr/<case>[_0000].nii.gz`` and
  ``labelsTr/<case>.nii.gz``. Class names ``class_<v>`` are inferred from the label values.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsa.data.io import IMAGE_SUFFIXES, Image, read_image
from medsa.errors import ConfigError, DataError

__all__ = ["Case", "Issue", "DatasetInfo", "load_dataset", "binarize_mask", "IMAGE_EXTS"]

#: file endings of images / volumes in dataset folders (longest first, so .nii.gz wins over .gz)
IMAGE_EXTS: tuple[str, ...] = tuple(sorted(IMAGE_SUFFIXES, key=len, reverse=True))
_VOLUME_EXTS = (".nii.gz", ".nii", ".mha", ".nrrd")
_MASK_SUFFIXES = ("", "_mask", "_segmentation", "_seg", "_label")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


def _split_ext(name: str) -> tuple[str, str]:
    low = name.lower()
    for ext in IMAGE_EXTS:
        if low.endswith(ext):
            return name[: -len(ext)], ext
    return Path(name).stem, Path(name).suffix.lower()


def _is_image_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and _split_ext(p.name)[1] in IMAGE_EXTS


@dataclass(frozen=True)
class Case:
    """One training/evaluation case.

    Attributes:
        id: case identifier (file stem without channel suffix).
        images: one path per input channel, in channel order.
        label: label map (nnU-Net) or binary mask of the first class (folder layout); ``None`` if
            unlabelled.
        extra_labels: folder layout only: binary masks of the extra classes (``masks_<name>``),
            aligned with ``DatasetInfo.class_names[1:]``; ``None`` where missing.
    """

    id: str
    images: tuple[Path, ...]
    label: Path | None
    extra_labels: tuple[Path | None, ...] = ()


@dataclass(frozen=True)
class Issue:
    """A problem found while indexing or checking a dataset."""

    path: str
    severity: str  # "error" | "warning"
    message: str


@dataclass
class DatasetInfo:
    """An indexed dataset.

    Attributes:
        root: dataset folder.
        layout: ``"folder"``, ``"nnunet"`` or ``"imagesTr"``.
        dim: 2 or 3.
        classes: foreground class name -> label value (or tuple of values, nnU-Net regions).
        cases: labelled cases, sorted by id.
        channel_names: input channel names.
        file_ending: image file ending (``".png"``, ``".nii.gz"``, ...), the most common one.
        unlabelled: cases without label (e.g. ``imagesTs``, or images without a mask).
        issues: problems found while indexing (labels without image, missing channels, ...).
        label_values_declared: whether ``classes`` came from ``dataset.json`` (vs inferred).
        ignore_value: nnU-Net ``"ignore"`` label value (unlabelled voxels), if declared.
    """

    root: Path
    layout: str
    dim: int
    classes: dict[str, int | tuple[int, ...]]
    cases: list[Case]
    channel_names: tuple[str, ...] = ("image",)
    file_ending: str = ""
    unlabelled: list[Case] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    label_values_declared: bool = False
    ignore_value: int | None = None

    @property
    def case_ids(self) -> list[str]:
        return [c.id for c in self.cases]

    @property
    def class_names(self) -> list[str]:
        return list(self.classes)

    def get(self, case_id: str) -> Case:
        for c in self.cases:
            if c.id == case_id:
                return c
        raise DataError(f"{self.root}: no case {case_id!r}")

    def read_image(self, case: Case) -> Image:
        """The case's input: ``(H, W[, C])`` / ``(D, H, W)`` / multi-channel ``(C, D, H, W)``."""
        imgs = [read_image(p) for p in case.images]
        if len(imgs) == 1:
            return imgs[0]
        shapes = {i.spatial_shape for i in imgs}
        if len(shapes) != 1:
            raise DataError(f"case {case.id}: channel files have different shapes {sorted(shapes)}")
        first = imgs[0]
        axis = 0 if first.is_3d else -1
        arr = np.stack([i.array for i in imgs], axis=axis)
        return Image(
            arr, first.spacing, first.origin, first.direction, first.affine, first.format,
            first.path, first.mode, first.header, dict(first.meta), first.spatial_ndim,
        )  # fmt: skip

    def load_targets(self, case: Case) -> dict[str, np.ndarray]:
        """Per-class binary targets, ``{class name: bool (H, W) | (D, H, W)}`` (the per-organ tasks)."""
        if case.label is None:
            raise DataError(f"case {case.id} has no label")
        if self.layout == "folder":
            out = {}
            paths = (case.label, *case.extra_labels)
            for name, p in zip(self.classes, paths, strict=False):
                if p is None:
                    raise DataError(f"case {case.id}: no mask for class {name!r}")
                out[name] = binarize_mask(read_image(p).array, p)
            return out
        lab = self._read_label_array(case.label)
        return {
            name: np.isin(lab, v) if isinstance(v, tuple) else lab == v
            for name, v in self.classes.items()
        }

    def load_label_map(self, case: Case) -> np.ndarray:
        """Multi-class label map ``(H, W)`` / ``(D, H, W)`` int64 (MA-SAM mode).

        Folder layout: class values 1, 2, ... painted in class order, so a later class wins where
        masks overlap (Drishti-GS: the cup lies inside the disc).
        """
        if case.label is None:
            raise DataError(f"case {case.id} has no label")
        if self.layout != "folder":
            return self._read_label_array(case.label).astype(np.int64)
        targets = self.load_targets(case)
        first = next(iter(targets.values()))
        lab = np.zeros(first.shape, np.int64)
        for name, m in targets.items():
            lab[m] = int(self.classes[name])  # type: ignore[arg-type]
        return lab

    def load_case(self, case: Case) -> tuple[Image, dict[str, np.ndarray]]:
        """``(image, per-class binary targets)``; shapes are checked."""
        img = self.read_image(case)
        targets = self.load_targets(case)
        for name, t in targets.items():
            if t.shape != img.spatial_shape:
                raise DataError(
                    f"case {case.id}: label {t.shape} and image {img.spatial_shape} shapes differ (class {name})"
                )
        return img, targets

    @staticmethod
    def _read_label_array(p: Path) -> np.ndarray:
        a = read_image(p).array
        if a.ndim == 3 and a.shape[-1] in (3, 4) and not p.name.lower().endswith(_VOLUME_EXTS):
            a = a[..., 0]
        if np.issubdtype(a.dtype, np.floating):
            if not np.isfinite(a).all():
                raise DataError(f"{p}: label contains NaN/inf")
            a = np.rint(a)
        return a.astype(np.int64)


def binarize_mask(mask: np.ndarray, path: Path | str | None = None) -> np.ndarray:
    """2D mask file -> bool. Values ``{0, 1}``: ``== 1``; other 8-bit: ``> 127`` (0/255 masks and
    near-binary JPEG masks); wider types: ``> 0``. RGB masks use their first channel."""
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] in (3, 4):
        m = m[..., 0]
    if m.size and m.max() <= 1:
        return m > 0
    if m.dtype == np.uint8:
        return m > 127
    return m > 0


# --------------------------------------------------------------------------- layout detection


def load_dataset(
    root: str | os.PathLike[str], classes: dict[str, int | tuple[int, ...]] | None = None
) -> DatasetInfo:
    """Detect the layout of ``root`` and index its cases.

    Args:
        classes: override the class names/values (e.g. ``{"RV": 1, "MYO": 2, "LV": 3}`` for ACDC,
            which has no ``dataset.json``; also skips inferring them from every label file).

    Raises:
        DataError: not a recognised layout, or no labelled case.
    """
    r = Path(root)
    if not r.is_dir():
        raise DataError(f"{r}: not a folder")
    if (r / "imagesTr").is_dir():
        if (r / "dataset.json").is_file():
            try:
                info = _load_nnunet(r)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
                raise DataError(
                    f"{r / 'dataset.json'}: malformed ({type(e).__name__}: {e}); see the nnU-Net "
                    "dataset.json format (labels, channel_names, file_ending)"
                ) from None
        else:
            info = _load_imagestr(r, classes)
    elif (r / "images").is_dir():
        info = _load_folder(r)
    else:
        raise DataError(
            f"{r}: unknown dataset layout; expected images/ + masks/ (2D folders) or "
            "imagesTr/ + labelsTr/ (nnU-Net / MSD)"
        )
    if not info.cases:
        raise DataError(f"{r}: no labelled case found ({info.layout} layout)")
    if classes is not None:
        if not classes or any(v == 0 for v in classes.values()):
            raise ConfigError(
                f"classes must map foreground names to non-zero values, got {classes}"
            )
        if info.layout == "folder" and len(classes) != len(info.classes):
            raise ConfigError(
                f"{r}: {len(info.classes)} mask folder(s) but {len(classes)} class names given"
            )
        if info.layout == "folder":  # rename only; values follow the mask folders
            classes = dict(zip(classes, info.classes.values(), strict=True))
        info.classes = dict(classes)
    return info


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image_file(p)) if folder.is_dir() else []


def _load_folder(root: Path) -> DatasetInfo:
    issues: list[Issue] = []
    images = _files(root / "images")
    mask_dirs = [root / "masks"] if (root / "masks").is_dir() else []
    extra = sorted(
        d
        for d in root.iterdir()
        if d.is_dir() and d.name.startswith("masks_") and "instance" not in d.name
    )
    mask_dirs += extra
    if not mask_dirs:
        raise DataError(f"{root}: images/ has no matching masks/ folder")
    classes: dict[str, int | tuple[int, ...]] = {}
    for i, d in enumerate(mask_dirs):
        classes["foreground" if d.name == "masks" else d.name[len("masks_") :]] = i + 1
    by_dir = [{_split_ext(p.name)[0]: p for p in _files(d)} for d in mask_dirs]
    cases, unlabelled, used = [], [], [set() for _ in mask_dirs]
    for img in images:
        stem = _split_ext(img.name)[0]
        found: list[Path | None] = []
        for k, masks in enumerate(by_dir):
            hit = next((masks[stem + s] for s in _MASK_SUFFIXES if stem + s in masks), None)
            if hit is not None:
                used[k].add(hit)
            found.append(hit)
        if all(f is None for f in found):
            unlabelled.append(Case(stem, (img,), None))
            issues.append(Issue(str(img), "warning", "image has no mask"))
            continue
        missing = [mask_dirs[k].name for k, f in enumerate(found) if f is None]
        if missing:  # a partly labelled case would give wrong (empty) targets: leave it out
            for d in missing:
                issues.append(Issue(str(img), "error", f"no mask in {d}/ for this image"))
            continue
        cases.append(Case(stem, (img,), found[0], tuple(found[1:])))
    for k, masks in enumerate(by_dir):
        for p in masks.values():
            if p not in used[k]:
                issues.append(Issue(str(p), "error", "mask has no matching image"))
    exts = [_split_ext(p.name)[1] for p in images]
    ending = max(set(exts), key=exts.count) if exts else ""
    dim = 3 if ending in _VOLUME_EXTS else 2
    return DatasetInfo(
        root, "folder", dim, classes, cases, ("image",), ending, unlabelled, issues, False
    )


def _group_channels(files: Iterable[Path], issues: list[Issue]) -> dict[str, list[Path]]:
    by_case: dict[str, dict[int, Path]] = {}
    for p in files:
        stem = _split_ext(p.name)[0]
        m = _CHANNEL_RE.match(stem)
        case, ch = (m["case"], int(m["ch"])) if m else (stem, 0)
        by_case.setdefault(case, {})[ch] = p
    out = {}
    for case, chans in by_case.items():
        n = max(chans) + 1
        missing = [c for c in range(n) if c not in chans]
        if missing:
            issues.append(
                Issue(case, "error", f"missing channel file(s) {missing} (_{missing[0]:04d})")
            )
            continue
        out[case] = [chans[c] for c in range(n)]
    return out


def _load_nnunet(root: Path) -> DatasetInfo:
    try:
        meta = json.loads((root / "dataset.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{root / 'dataset.json'}: unreadable ({e})") from None
    if not isinstance(meta, dict) or "labels" not in meta:
        raise DataError(f"{root / 'dataset.json'}: needs a 'labels' entry")
    classes = _parse_labels(meta["labels"], root / "dataset.json")
    ign = meta["labels"].get("ignore") if isinstance(meta["labels"], dict) else None
    ignore = (
        int(ign) if isinstance(ign, int | float | str) and str(ign).lstrip("-").isdigit() else None
    )
    ch = meta.get("channel_names", meta.get("modality", {"0": "image"}))
    channel_names = tuple(str(ch[k]) for k in sorted(ch, key=lambda k: int(k)))
    issues: list[Issue] = []
    if "training" in meta and isinstance(meta["training"], list) and "file_ending" not in meta:
        # MSD: explicit list; one (possibly 4D) image per case
        cases = []
        for entry in meta["training"]:
            img = (root / entry["image"]).resolve()
            lab = (root / entry["label"]).resolve()
            cid = _split_ext(img.name)[0]
            if not img.is_file():
                issues.append(Issue(str(img), "error", "listed in dataset.json but missing"))
                continue
            cases.append(Case(cid, (img,), lab if lab.is_file() else None))
        ending = _split_ext(cases[0].images[0].name)[1] if cases else ".nii.gz"
        labelled = [c for c in cases if c.label is not None]
        unl = [c for c in cases if c.label is None]
        for c in unl:
            issues.append(
                Issue(str(c.images[0]), "error", "label listed in dataset.json is missing")
            )
        return DatasetInfo(
            root, "nnunet", 3, classes, labelled, channel_names, ending, unl, issues, True, ignore
        )
    ending = str(meta.get("file_ending", ".nii.gz"))
    info = _pair_images_labels(root, ending, issues)
    expected = len(channel_names)
    good = []
    for c in info[0]:
        if len(c.images) != expected:
            issues.append(
                Issue(
                    str(c.images[0]),
                    "error",
                    f"missing channel file(s): case has {len(c.images)} channel(s), dataset.json declares {expected} "
                    f"(_0000 .. _{expected - 1:04d})",
                )
            )
        else:
            good.append(c)
    dim = 3 if ending in _VOLUME_EXTS else 2
    return DatasetInfo(
        root, "nnunet", dim, classes, good, channel_names, ending, info[1], issues, True, ignore
    )


def _parse_labels(labels: Any, where: Path) -> dict[str, int | tuple[int, ...]]:
    out: dict[str, int | tuple[int, ...]] = {}
    if not isinstance(labels, dict):
        raise DataError(f"{where}: 'labels' must be a mapping")
    try:
        if all(str(k).lstrip("-").isdigit() for k in labels):  # MSD: {"0": "background", ...}
            for k, v in sorted(labels.items(), key=lambda kv: int(kv[0])):
                if int(k) != 0:
                    out[str(v)] = int(k)
        else:  # nnU-Net v2: {"background": 0, "RV": 1, "region": [1, 2]}
            for k, v in labels.items():
                if k in ("background", "ignore") or v == 0:  # nnU-Net "ignore": not a class
                    continue
                out[str(k)] = tuple(int(x) for x in v) if isinstance(v, list | tuple) else int(v)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: bad 'labels' entry ({e})") from None
    if not out:
        raise DataError(f"{where}: 'labels' declares no foreground class")
    return out


def _pair_images_labels(
    root: Path, ending: str, issues: list[Issue]
) -> tuple[list[Case], list[Case]]:
    imgs = [p for p in _files(root / "imagesTr") if p.name.lower().endswith(ending.lower())]
    labs = {_split_ext(p.name)[0]: p for p in _files(root / "labelsTr")}
    grouped = _group_channels(imgs, issues)
    # ACDC-like: image and label share the name exactly (no _0000); prefer the exact match
    for p in imgs:
        stem = _split_ext(p.name)[0]
        if stem in labs and stem not in grouped and _CHANNEL_RE.match(stem):
            grouped = {k: v for k, v in grouped.items() if k != _CHANNEL_RE.match(stem)["case"]}
            grouped[stem] = [p]
    cases, used = [], set()
    for cid in sorted(grouped):
        lab = labs.get(cid)
        if lab is None:
            issues.append(Issue(str(grouped[cid][0]), "error", "image has no label in labelsTr/"))
            continue
        used.add(cid)
        cases.append(Case(cid, tuple(grouped[cid]), lab))
    for cid, p in labs.items():
        if cid not in used:
            issues.append(Issue(str(p), "error", "label has no matching image in imagesTr/"))
    unlabelled = [
        Case(cid, tuple(ps), None)
        for cid, ps in sorted(_group_channels(_files(root / "imagesTs"), []).items())
    ]
    return cases, unlabelled


def _load_imagestr(root: Path, classes_given: dict[str, Any] | None = None) -> DatasetInfo:
    issues: list[Issue] = []
    files = _files(root / "imagesTr")
    exts = [_split_ext(p.name)[1] for p in files]
    ending = max(set(exts), key=exts.count) if exts else ".nii.gz"
    cases, unl = _pair_images_labels(root, ending, issues)
    values: set[int] = set()
    for c in cases if classes_given is None else ():
        try:
            values |= {int(v) for v in np.unique(DatasetInfo._read_label_array(c.label))}  # type: ignore[arg-type]
        except DataError as e:
            issues.append(Issue(str(c.label), "error", str(e)))
    classes: dict[str, int | tuple[int, ...]] = {f"class_{v}": v for v in sorted(values) if v != 0}
    if not classes:
        classes = {"class_1": 1}
    n_ch = max((len(c.images) for c in cases), default=1)
    names = tuple(f"channel_{i}" for i in range(n_ch))
    dim = 3 if ending in _VOLUME_EXTS else 2
    return DatasetInfo(root, "imagesTr", dim, classes, cases, names, ending, unl, issues, False)
