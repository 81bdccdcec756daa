"""Dataset layouts, case records, torch datasets (2D slices, 3D chunks) and leakage-free splits.

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

Splits are by CASE (optionally by a group of cases, e.g. all frames of one patient, via a regex),
so slices of one volume never end up in both train and validation.
"""

from __future__ import annotations

import json
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medsa.data.io import IMAGE_SUFFIXES, Image, read_image
from medsa.errors import ConfigError, DataError

__all__ = [
    "Case",
    "Issue",
    "DatasetInfo",
    "load_dataset",
    "binarize_mask",
    "SliceDataset2D",
    "ChunkDataset3D",
    "make_splits",
    "train_val_test_split",
    "save_splits",
    "load_splits",
]

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


# --------------------------------------------------------------------------- torch datasets


class _CaseCache:
    """Small per-dataset LRU of loaded cases (no global state; each worker has its own)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._d: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def get(self, key: tuple[str, str], load: Callable[[], Any]) -> Any:
        if key in self._d:
            self._d.move_to_end(key)
            return self._d[key]
        val = load()
        if self.size > 0:
            self._d[key] = val
            while len(self._d) > self.size:
                self._d.popitem(last=False)
        return val


def _check_mode(mode: str) -> None:
    if mode not in ("binary", "multiclass"):
        raise ConfigError(f"mode must be 'binary' or 'multiclass', got {mode!r}")


class _Base:
    def __init__(
        self,
        info: DatasetInfo,
        case_ids: Sequence[str] | None,
        class_name: str | None,
        mode: str,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None,
        intensity: str,
        prompt: str | None,
        seed: int,
        cache_size: int,
    ) -> None:
        from medsa.data.preprocess import SamTransform

        _check_mode(mode)
        self.info = info
        ids = info.case_ids if case_ids is None else list(case_ids)
        unknown = sorted(set(ids) - set(info.case_ids))
        if unknown:
            raise DataError(f"{info.root}: unknown case id(s) {unknown[:5]}")
        by_id = {c.id: c for c in info.cases}
        self.cases = [by_id[i] for i in ids]
        if class_name is not None and class_name not in info.classes:
            raise ConfigError(
                f"unknown class {class_name!r}; dataset classes: {', '.join(info.classes)}"
            )
        self.classes = [class_name] if class_name is not None else list(info.classes)
        self.mode = mode
        self.transform = transform if transform is not None else SamTransform()
        self.intensity = intensity
        self.prompt = prompt
        self.seed = seed
        self.epoch = 0
        self._cache = _CaseCache(cache_size)
        if prompt is not None:
            from medsa.data.prompts import get_protocol

            get_protocol(prompt)  # fail early on a typo

    def set_epoch(self, epoch: int) -> None:
        """New random prompts each epoch, reproducible for a given (seed, epoch, index)."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])

    def _load(self, case: Case) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
        """Image scaled to [0, 255] with a leading slice axis ``(Z, H, W[, C])``, targets ``(Z, H, W)``."""
        from medsa.data.preprocess import scale_intensity

        def load() -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
            img, targets = self.info.load_case(case)
            if not np.isfinite(img.array).all():
                raise DataError(f"case {case.id}: image contains NaN/inf ({case.images[0]})")
            # per case (consistent across slices); per channel for volumes, whose channels are
            # modalities with different ranges (2D channels are colours: scaled jointly)
            if img.channel_axis != 0 or img.array.dtype == np.uint8:
                arr = scale_intensity(img.array, self.intensity)
            else:
                ax = img.channel_axis
                chans = [scale_intensity(c, self.intensity) for c in np.moveaxis(img.array, ax, 0)]
                arr = np.stack(chans, axis=ax)
            if img.is_3d:
                if img.channel_axis == 0:
                    arr = np.moveaxis(arr, 0, -1)  # (D, H, W, C)
            else:
                arr = arr[None]
                targets = {k: v[None] for k, v in targets.items()}
            labmap = self.info.load_label_map(case) if self.mode == "multiclass" else None
            if labmap is not None and not img.is_3d:
                labmap = labmap[None]
            return arr, targets, labmap

        return self._cache.get(("case", case.id), load)

    def _index_targets(
        self, case: Case, resize_to: tuple[int, int, int] | None = None
    ) -> dict[str, np.ndarray]:
        """Targets ``(Z, H, W)`` only (no image read): used to build the sample index cheaply."""
        from medsa.data.preprocess import resize_volume

        targets = self.info.load_targets(case)
        out = {}
        for k, v in targets.items():
            v = v[None] if v.ndim == 2 else v
            if resize_to is not None:
                v = resize_volume(v.astype(np.uint8), resize_to, kind="label") > 0
            out[k] = v
        return out

    def _add_prompt(
        self, sample: dict[str, Any], mask: np.ndarray, rng: np.random.Generator
    ) -> None:
        from medsa.data.prompts import get_protocol

        if self.prompt is None:
            return
        p = get_protocol(self.prompt)(mask, rng)
        sample["points"], sample["point_labels"] = p.points, p.labels
        if p.box is not None:
            sample["box"] = p.box


class SliceDataset2D(_Base):
    """2D training samples: each 2D image, or each slice of a volume, per class ("task").

    Items (after the default :class:`~medsa.data.preprocess.SamTransform`): ``image`` float32
    ``(3, S, S)``, ``target`` float32 ``(S, S)`` (binary for ``class_name``; label map in
    ``"multiclass"`` mode), ``case_id``, ``slice`` (int, 0 for 2D), ``class_name``,
    ``original_size``; with ``prompt=`` also ``points`` ``(N, 2)``, ``point_labels`` ``(N,)``,
    ``box`` ``(4,)`` in resized-image ``(x, y)`` coordinates.

    Args:
        info: from :func:`load_dataset`.
        case_ids: subset (e.g. a split); default all.
        class_name: one class; ``None`` = every class is a separate binary task (binary mode).
        mode: ``"binary"`` (per-class target) or ``"multiclass"`` (label map, MA-SAM).
        transform: sample dict -> sample dict; default ``SamTransform()``.
        intensity: see :func:`~medsa.data.preprocess.scale_intensity` (applied per case).
        include_empty: also keep slices whose target is empty (no prompt then).
        prompt: protocol name from :data:`~medsa.data.prompts.PROMPT_PROTOCOLS` or ``None``.
        seed: prompt randomness (with :meth:`set_epoch`).
        cache_size: number of loaded cases kept in memory.
    """

    def __init__(
        self,
        info: DatasetInfo,
        case_ids: Sequence[str] | None = None,
        class_name: str | None = None,
        mode: str = "binary",
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        intensity: str = "auto",
        include_empty: bool = False,
        prompt: str | None = None,
        seed: int = 0,
        cache_size: int = 4,
    ) -> None:
        super().__init__(
            info, case_ids, class_name, mode, transform, intensity, prompt, seed, cache_size
        )
        if prompt is not None and include_empty:
            raise ConfigError(
                "include_empty=True cannot be combined with prompts (empty slices have none)"
            )
        self.index: list[tuple[int, int, str | None]] = []
        for ci, case in enumerate(self.cases):
            targets = self._index_targets(case)
            if mode == "multiclass":
                any_fg = np.any(np.stack([targets[c] for c in self.classes]), axis=0)
                zs = (
                    range(any_fg.shape[0])
                    if include_empty
                    else np.nonzero(any_fg.any(axis=(1, 2)))[0]
                )
                self.index += [(ci, int(z), None) for z in zs]
                continue
            for cname in self.classes:
                t = targets[cname]
                zs = range(t.shape[0]) if include_empty else np.nonzero(t.any(axis=(1, 2)))[0]
                self.index += [(ci, int(z), cname) for z in zs]
        if not self.index:
            raise DataError(
                f"{info.root}: no slice with a non-empty target for class(es) {self.classes} in the "
                f"{len(self.cases)} selected case(s)"
            )

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ci, z, cname = self.index[i]
        case = self.cases[ci]
        arr, targets, labmap = self._load(case)
        if self.mode == "multiclass":
            target = labmap[z].astype(np.uint8)  # type: ignore[index]
            mask = target > 0
        else:
            mask = targets[cname][z]
            target = mask.astype(np.uint8)
        sample: dict[str, Any] = {"image": arr[z], "target": target, "case_id": case.id, "slice": z,
                                  "class_name": cname or "all"}  # fmt: skip
        if mask.any():
            self._add_prompt(sample, mask, self._rng(i))
        return self.transform(sample)


class ChunkDataset3D(_Base):
    """3D samples: chunks of ``depth`` consecutive slices (MA-SAM / SD-Trans input).

    Items: ``image`` float32 ``(D, 3, S, S)``, ``target`` float32 ``(D, S, S)``, ``valid`` bool
    ``(D,)`` (False for zero-padded slices past the end), ``slices`` int64 ``(D,)``, ``case_id``,
    ``class_name``; with ``prompt=``: ``points`` ``(D, N, 2)``, ``point_labels`` ``(D, N)`` (-1 on
    slices without target), ``box`` ``(D, 4)`` (zeros there), ``has_prompt`` bool ``(D,)`` (the
    paper prompts every slice separately).

    Args:
        depth, stride, pad: see :func:`~medsa.data.preprocess.chunk_indices`.
        resize_to: resize each volume to ``(D, H, W)`` first (the paper uses 128^3), trilinear for
            images / nearest for labels.
        only_nonempty: skip chunks whose target is empty.
        Other arguments as :class:`SliceDataset2D`.
    """

    def __init__(
        self,
        info: DatasetInfo,
        depth: int,
        case_ids: Sequence[str] | None = None,
        class_name: str | None = None,
        mode: str = "binary",
        stride: int | None = None,
        pad: str = "replicate",
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        intensity: str = "auto",
        resize_to: tuple[int, int, int] | None = None,
        only_nonempty: bool = True,
        prompt: str | None = None,
        seed: int = 0,
        cache_size: int = 4,
    ) -> None:
        from medsa.data.preprocess import chunk_indices

        super().__init__(
            info, case_ids, class_name, mode, transform, intensity, prompt, seed, cache_size
        )
        if info.dim != 3:
            raise ConfigError(f"{info.root} is a 2D dataset; use SliceDataset2D")
        self.depth, self.resize_to = depth, resize_to
        self.index: list[tuple[int, np.ndarray, str | None]] = []
        for ci, case in enumerate(self.cases):
            targets = self._index_targets(case, self.resize_to)
            names: list[str | None] = [None] if mode == "multiclass" else list(self.classes)
            for cname in names:
                t = (
                    np.any(np.stack([targets[c] for c in self.classes]), axis=0)
                    if cname is None
                    else targets[cname]
                )
                for idx in chunk_indices(t.shape[0], depth, stride, pad):
                    if only_nonempty and not t[idx[idx >= 0]].any():
                        continue
                    self.index.append((ci, idx, cname))
        if not self.index:
            raise DataError(
                f"{info.root}: no chunk with a non-empty target for class(es) {self.classes} in the "
                f"{len(self.cases)} selected case(s)"
            )

    def _load_resized(
        self, case: Case
    ) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
        from medsa.data.preprocess import resize_volume

        arr, targets, labmap = self._load(case)
        if self.resize_to is None:
            return arr, targets, labmap

        def load() -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None]:
            a = arr if arr.ndim == 3 else np.moveaxis(arr, -1, 0)
            a = resize_volume(a, self.resize_to, kind="image")
            a = a if arr.ndim == 3 else np.moveaxis(a, 0, -1)
            t = {
                k: resize_volume(v.astype(np.uint8), self.resize_to, kind="label") > 0
                for k, v in targets.items()
            }
            lm = None if labmap is None else resize_volume(labmap, self.resize_to, kind="label")
            return a, t, lm

        return self._cache.get(("resized", case.id), load)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        from medsa.data.preprocess import take_slices

        ci, idx, cname = self.index[i]
        case = self.cases[ci]
        arr, targets, labmap = self._load_resized(case)
        tvol = (labmap if cname is None else targets[cname]).astype(np.uint8)  # type: ignore[union-attr]
        imgs, tgts = take_slices(arr, idx), take_slices(tvol, idx)
        rng = self._rng(i)
        items = []
        for z in range(len(idx)):
            s: dict[str, Any] = {"image": imgs[z], "target": tgts[z]}
            if self.prompt is not None and tgts[z].any():
                self._add_prompt(s, tgts[z] > 0, rng)
            items.append(self.transform(s))
        out: dict[str, Any] = {
            "image": torch.stack([torch.as_tensor(it["image"]) for it in items]),
            "target": torch.stack([torch.as_tensor(it["target"]) for it in items]),
            "valid": torch.as_tensor(idx >= 0),
            "slices": torch.as_tensor(idx),
            "case_id": case.id,
            "class_name": cname or "all",
            "original_size": items[0].get("original_size"),
        }
        if self.prompt is not None:
            n = max((len(it["points"]) for it in items if "points" in it), default=0)
            pts = np.zeros((len(idx), n, 2), np.float32)
            labs = np.full((len(idx), n), -1, np.int64)
            box = np.zeros((len(idx), 4), np.float32)
            has = np.zeros(len(idx), bool)
            for z, it in enumerate(items):
                if "points" in it:
                    k = len(it["points"])
                    pts[z, :k], labs[z, :k], has[z] = it["points"], it["point_labels"], True
                if "box" in it:
                    box[z], has[z] = it["box"], True
            out.update(points=torch.from_numpy(pts), point_labels=torch.from_numpy(labs),
                       box=torch.from_numpy(box), has_prompt=torch.from_numpy(has))  # fmt: skip
        return out


# --------------------------------------------------------------------------- splits


def _groups(case_ids: Sequence[str], group_pattern: str | None) -> dict[str, list[str]]:
    rx = re.compile(group_pattern) if group_pattern else None
    groups: dict[str, list[str]] = {}
    for cid in sorted(set(case_ids)):
        key = cid
        if rx is not None:
            m = rx.search(cid)
            key = (m.group(1) if m.groups() else m.group(0)) if m else cid
        groups.setdefault(key, []).append(cid)
    return groups


def make_splits(
    case_ids: Sequence[str], n_folds: int = 5, seed: int = 0, group_pattern: str | None = None
) -> list[dict[str, list[str]]]:
    """Seeded K-fold splits by case (nnU-Net ``splits_final.json`` format: ``[{"train", "val"}]``).

    Args:
        group_pattern: regex whose first group (or match) names a group of cases kept together,
            e.g. ``r"^(patient\\d+)"`` so both ACDC frames of a patient land in the same fold.
    """
    groups = _groups(case_ids, group_pattern)
    if n_folds < 2 or n_folds > len(groups):
        raise ConfigError(
            f"n_folds must be in [2, {len(groups)}] (number of case groups), got {n_folds}"
        )
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    folds = np.array_split(order, n_folds)
    out = []
    for f in folds:
        val_keys = {keys[i] for i in f}
        val = sorted(c for k in val_keys for c in groups[k])
        train = sorted(c for k in keys if k not in val_keys for c in groups[k])
        out.append({"train": train, "val": val})
    return out


def train_val_test_split(
    case_ids: Sequence[str],
    val: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
    group_pattern: str | None = None,
) -> dict[str, list[str]]:
    """Seeded ``{"train", "val", "test"}`` split by case group (each part non-empty when possible)."""
    if val < 0 or test < 0 or val + test >= 1:
        raise ConfigError(f"need 0 <= val, test and val + test < 1, got val={val}, test={test}")
    groups = _groups(case_ids, group_pattern)
    keys = sorted(groups)
    order = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    n = len(order)
    n_test = max(1, round(test * n)) if test > 0 and n >= 3 else 0
    n_val = max(1, round(val * n)) if val > 0 and n - n_test >= 2 else 0
    parts = {
        "test": order[:n_test],
        "val": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
    }
    return {k: sorted(c for g in v for c in groups[g]) for k, v in parts.items()}


def save_splits(
    splits: list[dict[str, list[str]]] | dict[str, list[str]], path: str | os.PathLike[str]
) -> Path:
    """Write splits as JSON (atomically)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(splits, indent=2))
    os.replace(tmp, p)
    return p


def load_splits(
    path: str | os.PathLike[str], known_ids: Sequence[str] | None = None
) -> list[dict[str, list[str]]]:
    """Read ``splits_final.json`` (list of folds) or a single ``{"train", "val"[, "test"]}`` dict.

    Raises:
        DataError: unreadable/malformed file, a case in two parts of one fold (leakage), or (with
            ``known_ids``) ids that are not in the dataset.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: cannot read splits ({e})") from None
    folds = [data] if isinstance(data, dict) else data
    if not isinstance(folds, list) or not folds:
        raise DataError(f"{p}: expected a list of {{'train': [...], 'val': [...]}} folds")
    known = set(known_ids) if known_ids is not None else None
    for k, fold in enumerate(folds):
        if not isinstance(fold, dict) or "train" not in fold or "val" not in fold:
            raise DataError(f"{p}: fold {k} needs 'train' and 'val' lists")
        parts = {name: set(map(str, ids)) for name, ids in fold.items()}
        names = sorted(parts)
        for a_i, a in enumerate(names):
            for b in names[a_i + 1 :]:
                both = parts[a] & parts[b]
                if both:
                    raise DataError(
                        f"{p}: fold {k}: case(s) {sorted(both)[:5]} in both {a!r} and {b!r}"
                    )
        if known is not None:
            unknown = set().union(*parts.values()) - known
            if unknown:
                raise DataError(f"{p}: fold {k}: unknown case id(s) {sorted(unknown)[:5]}")
    return [{name: list(map(str, ids)) for name, ids in fold.items()} for fold in folds]
