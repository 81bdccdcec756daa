"""napari reader and Labels writer built on :mod:`medsa.data.io` (no napari import here).

The reader returns one image layer per file / DICOM series with ``scale`` = the voxel spacing in
array order (``(sz, sy, sx)``; ``(sy, sx)`` in 2D), so distances measured in napari are in mm.
The source :class:`medsa.data.io.Image` (geometry: spacing, origin, direction, NIfTI affine and
header; its array is the layer's data, not a copy) is kept in ``layer.metadata["medsa_source"]``
and a plain summary in ``layer.metadata["medsa_geometry"]``. Saving a Labels layer made on that
image writes it ``like=`` the source, so the saved file has the input's exact geometry.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medsa.errors import DataError

__all__ = [
    "SOURCE_KEY",
    "GEOMETRY_KEY",
    "get_reader",
    "read",
    "layer_data",
    "save_labels",
    "write_labels",
]

SOURCE_KEY = "medsa_source"
GEOMETRY_KEY = "medsa_geometry"
LayerData = tuple[Any, dict[str, Any], str]


def _one_path(path: str | os.PathLike[str] | Sequence[Any]) -> Path | None:
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    return Path(path)


def get_reader(path: str | os.PathLike[str] | Sequence[Any]) -> Callable[..., Any] | None:
    """npe2 reader hook: :func:`read` if medsa can read ``path`` (file or DICOM folder), else None."""
    from medsa.data.io import image_format, looks_like_dicom

    p = _one_path(path)
    if p is None:
        return None
    if p.is_dir():
        # a folder is only ours if it holds DICOM files (napari also offers folders of PNGs)
        if not any(f.is_file() and looks_like_dicom(f) for f in p.iterdir()):
            return None
        return read
    try:
        image_format(p)
    except DataError:
        return None
    return read


def _stem(p: Path) -> str:
    name = p.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else p.stem


def geometry(img: Any) -> dict[str, Any]:
    """Plain (JSON-friendly) summary of an Image's geometry."""
    return {
        "path": str(img.path) if img.path is not None else None,
        "format": img.format,
        "spatial_shape": list(img.spatial_shape),
        "spacing": list(img.spacing),
        "origin": list(img.origin),
        "direction": np.asarray(img.direction).tolist(),
        "affine": np.asarray(img.affine).tolist(),
    }


def layer_data(img: Any, name: str | None = None) -> LayerData:
    """napari layer data ``(array, kwargs, "image")`` for a :class:`medsa.data.io.Image`."""
    kwargs: dict[str, Any] = {
        "name": name or (_stem(img.path) if img.path is not None else "image"),
        "metadata": {SOURCE_KEY: img, GEOMETRY_KEY: geometry(img)},
    }
    spacing = tuple(float(s) for s in img.spacing)
    if img.channel_axis == -1:  # 2D colour (H, W, 3)
        kwargs["rgb"] = True
        kwargs["scale"] = spacing
    elif img.channel_axis == 0:  # (C, D, H, W): one layer, the channel as a slider
        kwargs["scale"] = (1.0, *spacing)
    else:
        kwargs["scale"] = spacing
    return img.array, kwargs, "image"


def read(path: str | os.PathLike[str] | Sequence[Any]) -> list[LayerData]:
    """Read ``path`` with :func:`medsa.data.io.read_image` into one napari image layer."""
    from medsa.data.io import read_image

    p = _one_path(path)
    if p is None:
        raise DataError("medsa reads one file or DICOM folder at a time")
    return [layer_data(read_image(p))]


def save_labels(
    labels: np.ndarray,
    path: str | os.PathLike[str],
    source: Any = None,
    names: Mapping[int, str] | None = None,
    scale: Sequence[float] | None = None,
) -> list[Path]:
    """Save a label map ``(D, H, W)`` / ``(H, W)`` with the geometry of ``source``.

    Args:
        labels: integer label map, the spatial shape of ``source``.
        path: ``.nii.gz .nii .mha .nrrd .tif .png`` (written by :func:`medsa.data.io.write_image`
            ``like=source``) or ``.dcm``: a DICOM-SEG referencing the source series (DICOM sources
            only, :func:`medsa.data.dicom_seg.write_dicom_seg`, segments named from ``names``).
        source: the :class:`medsa.data.io.Image` the labels were drawn on (None: no geometry but
            ``scale`` as spacing).
        names: ``{label: name}`` for DICOM-SEG segments.
        scale: spacing to use without a source (napari layer scale).

    Raises:
        DataError: shape mismatch, ``.dcm`` without a DICOM source, unwritable path.
    """
    from medsa.data.io import write_image

    p = Path(path)
    lab = np.asarray(labels)
    if lab.dtype != bool and lab.size and lab.min() >= 0 and lab.max() <= 65535:
        lab = lab.astype(np.uint8 if lab.max() <= 255 else np.uint16)
    if p.name.lower().endswith(".dcm"):
        from medsa.data.dicom_seg import write_dicom_seg

        if source is None or source.format != "dicom" or source.path is None:
            raise DataError(
                f"{p}: a DICOM-SEG needs a DICOM source (this image is "
                f"{getattr(source, 'format', 'not from a file')}); save as .nii.gz instead"
            )
        return [write_dicom_seg(lab, source.path, names, p)]
    if source is not None:
        return [write_image(lab, p, like=source)]
    spacing = tuple(float(s) for s in scale[-lab.ndim :]) if scale is not None else None
    return [write_image(lab, p, spacing=spacing)]


def write_labels(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer for Labels: the source geometry comes from the layer metadata
    (:data:`SOURCE_KEY`, set by the medsa widget); names from ``metadata["medsa_names"]``."""
    meta = attributes.get("metadata") or {}
    written = save_labels(
        np.asarray(data),
        path,
        source=meta.get(SOURCE_KEY),
        names=meta.get("medsa_names"),
        scale=attributes.get("scale"),
    )
    return [str(w) for w in written]
