"""The output folder: where label maps and their JSON sidecars are written, and what may be replaced.

Rules (docs/serve.md, SECURITY.md):

- names are plain file names checked by :func:`medsa.serve.paths.safe_output_name`;
- the open image itself is never a destination;
- an existing file that this server did not write in this session is replaced only when the user
  confirmed it (``overwrite=True``, the page asks first; :class:`OverwriteNeeded` = HTTP 409),
  and never when it lies under one of the root folders (a source image or other input data);
- files this server wrote in this session are replaced without asking (saving again);
- writes are atomic (temporary file + ``os.replace``).
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsa._fs import atomic_write_text
from medsa.errors import MedsaError, PromptError

from .paths import AccessDenied, RootSet, image_suffix, safe_output_name

if TYPE_CHECKING:
    from .images import LoadedImage

__all__ = [
    "MAX_OBJECTS",
    "LabelledObject",
    "OutputFolder",
    "OverwriteNeeded",
    "label_map",
    "dicom_seg_name",
    "sidecar_name",
]

#: objects per saved label map (labels 1..255 fit in uint8 in every format)
MAX_OBJECTS = 255


class OverwriteNeeded(MedsaError):
    """The destination exists and was not written by this server in this session (HTTP 409)."""


@dataclass
class LabelledObject:
    """One object of a saved label map: its name, label value and masks per slice.

    ``masks`` values are ``(H, W)`` bool arrays or run lengths (:mod:`medsa.serve.rle`); run
    lengths are decoded one slice at a time while painting, so a request naming many slices of
    many objects never holds more than the label map and one slice in memory.
    ``foreground`` is set by :func:`label_map` (pixels of the object's own masks).
    """

    name: str
    label: int
    masks: dict[int, Any] = field(default_factory=dict)
    foreground: int = 0


def label_map(img: LoadedImage, objects: list[LabelledObject]) -> np.ndarray:
    """``(D, H, W)`` (3D) or ``(H, W)`` (2D) uint8 label map of ``objects`` on ``img``'s grid.

    Objects are painted in list order, so where two overlap the later one's label wins.

    Raises:
        PromptError: duplicate / empty names, labels outside 1..255, too many objects, a slice
            out of range or a bad mask encoding.
    """
    from .rle import rle_decode

    if len(objects) > MAX_OBJECTS:
        raise PromptError(f"too many objects ({len(objects)}); at most {MAX_OBJECTS} per file")
    names, labels = set(), set()
    for o in objects:
        if not o.name.strip():
            raise PromptError("every object needs a name")
        if o.name in names:
            raise PromptError(f"two objects are named {o.name!r}; names must be unique")
        if not 1 <= o.label <= MAX_OBJECTS:
            raise PromptError(f"object {o.name!r}: label {o.label} is not in 1..{MAX_OBJECTS}")
        if o.label in labels:
            raise PromptError(f"label {o.label} is used by two objects")
        names.add(o.name)
        labels.add(o.label)
    out = np.zeros((img.depth, img.height, img.width), dtype=np.uint8)
    for o in objects:
        o.foreground = 0
        for z, m in o.masks.items():
            if not isinstance(m, np.ndarray):
                m = rle_decode(m, (img.height, img.width))
            out[img.check_slice(z)][m] = o.label
            o.foreground += int(m.sum())
    return out if img.is_3d else out[0]


def sidecar_name(mask_name: str) -> str:
    """``case_mask.nii.gz -> case_mask.labels.json``."""
    suf = image_suffix(mask_name) or ""
    return f"{mask_name[: len(mask_name) - len(suf)]}.labels.json"


def dicom_seg_name(mask_name: str) -> str:
    """``series_mask.nii.gz -> series_mask_seg.dcm`` (the DICOM-SEG saved next to a label map)."""
    suf = image_suffix(mask_name) or ""
    return f"{mask_name[: len(mask_name) - len(suf)]}_seg.dcm"


class OutputFolder:
    """The one folder the server writes to, with the overwrite rules of the module docstring."""

    def __init__(self, folder: Path, roots: RootSet) -> None:
        self.folder = Path(folder).expanduser().resolve()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.roots = roots
        self._written: set[str] = set()  # names written by this server in this session
        self._lock = threading.Lock()

    def destination(self, name: str, img: LoadedImage, overwrite: bool) -> Path:
        """Validated path directly inside the folder for a mask of ``img``.

        Raises:
            AccessDenied: bad name, symlink / non-file, the open image, a file under a root.
            OverwriteNeeded: an existing file not written in this session, without ``overwrite``.
            UploadError-like MedsaError: wrong extension for the image's dimension.
        """
        name = safe_output_name(name)
        suf = image_suffix(name)
        allowed = (".png",) if not img.is_3d else (".nii.gz", ".nii", ".mha", ".nrrd")
        if suf not in allowed:
            raise MedsaError(
                f"{name}: a {'3D' if img.is_3d else '2D'} mask is saved as " + " / ".join(allowed)
            )
        return self.check(name, img, overwrite)

    def check(self, name: str, img: LoadedImage | None, overwrite: bool) -> Path:
        """``folder / name`` if the overwrite rules allow writing it (see the module docstring)."""
        dest = self.folder / name
        if dest.is_symlink() or (dest.exists() and not dest.is_file()):
            raise AccessDenied(f"{name}: exists and is not a regular file; choose another name")
        if dest.resolve().parent != self.folder:
            raise AccessDenied(f"{name}: would be written outside the output folder")
        if img is not None and (
            name.lower() == img.name.lower()
            or (img.path is not None and _same_file(dest, img.path))
        ):
            raise AccessDenied(f"{name}: is the open image itself; choose another name")
        if dest.exists():
            with self._lock:
                ours = name in self._written
            if not ours:
                if any(dest.resolve().is_relative_to(r) for r in self.roots.roots):
                    raise AccessDenied(
                        f"{name}: a file of that name already exists in a root folder (input "
                        "data); the server never replaces it, choose another name"
                    )
                if not overwrite:
                    raise OverwriteNeeded(
                        f"{name}: a file of that name already exists in the output folder and was "
                        "not written by this session; confirm to replace it, or choose another name"
                    )
        return dest

    def written(self, dest: Path) -> None:
        with self._lock:
            self._written.add(dest.name)

    def write_sidecar(self, mask_dest: Path, img: LoadedImage, objects: list[LabelledObject],
                      overwrite: bool) -> Path:  # fmt: skip
        """``<mask stem>.labels.json``: ``{"labels": {name: label}, "image": ..., "mask": ...}``."""
        dest = self.check(sidecar_name(mask_dest.name), img, overwrite)
        doc: dict[str, Any] = {
            "image": img.name,
            "mask": mask_dest.name,
            "labels": {o.name: o.label for o in objects},
            "background": 0,
        }
        atomic_write_text(dest, json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        self.written(dest)
        return dest


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == Path(b).resolve() or (a.exists() and os.path.samefile(a, b))
    except OSError:
        return False
