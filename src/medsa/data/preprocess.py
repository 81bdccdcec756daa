"""Preprocessing: SAM resize/pad and its inverse, intensity normalisation, CT windows, 3D chunks.

Array conventions as in :mod:`medsa.data.io`: 2D ``(H, W)`` / ``(H, W, C)``, 3D ``(D, H, W)``.
Functions take numpy arrays and return numpy ``float32`` unless noted; the inverse resize also
accepts torch tensors (model outputs) and returns the same type.

Intensity pipeline used by the datasets (see :func:`scale_intensity`): raw values -> ``[0, 255]``
float (uint8 images unchanged; CT via a window; MRI / other via 0.5-99.5 percentiles), then
:func:`normalize` with SAM's pixel mean/std (``"sam"``) or LiteMedSAM's min-max to ``[0, 1]``
(``"minmax"``), then :func:`sam_resize` (long side -> 1024, zero pad bottom/right; padding after
normalisation, as SAM does, so the pad equals the mean pixel).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medsa.errors import ConfigError, DataError
from medsa.sam.constants import SAM_PIXEL_MEAN, SAM_PIXEL_STD

if TYPE_CHECKING:
    import torch

__all__ = [
    "SAM_PIXEL_MEAN",
    "SAM_PIXEL_STD",
    "CT_WINDOWS",
    "ResizeInfo",
    "get_preprocess_shape",
    "sam_resize",
    "sam_resize_mask",
    "undo_sam_resize",
    "resize_coords",
    "resize_boxes",
    "normalize",
    "window",
    "percentile_normalize",
    "scale_intensity",
    "to_three_channels",
    "chunk_indices",
    "take_slices",
    "slice_stack",
    "resize_volume",
    "check_resize_to",
    "resized_shape",
    "resize_spatial",
    "resized_spacing",
    "SamTransform",
]


#: CT window presets, name -> (level, width) in HU (standard radiology values, Radiopaedia)
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "liver": (30.0, 150.0),
    "mediastinum": (50.0, 350.0),
}


@dataclass(frozen=True)
class ResizeInfo:
    """What :func:`sam_resize` did, to undo it: sizes are ``(H, W)``."""

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    size: int


def get_preprocess_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """``(new_h, new_w)`` with the longer side = ``long_side`` (SAM's rounding: ``int(x + 0.5)``)."""
    scale = long_side / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def _torch():
    import torch

    return torch


def _resize_hw(x: torch.Tensor, hw: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize the last two dims of a float tensor ``(..., H, W)``."""
    F = _torch().nn.functional
    lead = x.shape[:-2]
    x4 = x.reshape(-1, 1, *x.shape[-2:])
    if mode == "nearest":
        out = F.interpolate(x4, size=hw, mode="nearest-exact")
    else:
        # antialias when shrinking, as SAM's ResizeLongestSide.apply_image_torch
        out = F.interpolate(x4, size=hw, mode="bilinear", align_corners=False, antialias=True)
    return out.reshape(*lead, *hw)


def sam_resize(
    image: np.ndarray, size: int = 1024, *, pad: bool = True, pad_value: float = 0.0
) -> tuple[np.ndarray, ResizeInfo]:
    """Resize the long side to ``size`` (bilinear, antialiased) and pad bottom/right to a square.

    Args:
        image: ``(H, W)`` or ``(H, W, C)``.

    Returns:
        ``(size, size[, C])`` float32 (or ``(h', w'[, C])`` if ``pad=False``), and :class:`ResizeInfo`.
    """
    torch = _torch()
    a = np.asarray(image, dtype=np.float32)
    if a.ndim not in (2, 3):
        raise DataError(f"sam_resize expects (H, W) or (H, W, C), got {a.shape}")
    h, w = a.shape[:2]
    nh, nw = get_preprocess_shape(h, w, size)
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 0) if a.ndim == 3 else a))
    r = _resize_hw(t, (nh, nw), "bilinear")
    if pad:
        r = torch.nn.functional.pad(r, (0, size - nw, 0, size - nh), value=pad_value)
    out = r.numpy()
    if a.ndim == 3:
        out = np.moveaxis(out, 0, -1)
    return np.ascontiguousarray(out), ResizeInfo((h, w), (nh, nw), size)


def sam_resize_mask(mask: np.ndarray, size: int = 1024, *, pad: bool = True) -> np.ndarray:
    """Nearest-neighbour version of :func:`sam_resize` for label maps: ``(H, W)`` -> ``(size, size)``.

    Keeps the dtype (labels stay integers).
    """
    torch = _torch()
    m = np.asarray(mask)
    if m.ndim != 2:
        raise DataError(f"sam_resize_mask expects (H, W), got {m.shape}")
    nh, nw = get_preprocess_shape(*m.shape, size)
    r = _resize_hw(torch.from_numpy(m.astype(np.float32)), (nh, nw), "nearest")
    if pad:
        r = torch.nn.functional.pad(r, (0, size - nw, 0, size - nh), value=0.0)
    return r.numpy().astype(m.dtype if m.dtype != bool else np.uint8)


def undo_sam_resize(x: Any, info: ResizeInfo, *, mode: str = "bilinear") -> Any:
    """Crop the padding and resize back to the original ``(H, W)``.

    Args:
        x: ``(..., S, S)`` numpy array or torch tensor, ``S`` = ``info.size`` or any square size
            (e.g. SAM's 256 low-res logits: scaled to ``info.size`` first, as SAM's postprocess).
        mode: ``"bilinear"`` for logits/probabilities, ``"nearest"`` for masks/labels.

    Returns:
        ``(..., H, W)``, same type as ``x`` (numpy float32 / torch float).
    """
    torch = _torch()
    is_np = not isinstance(x, torch.Tensor)
    t = torch.from_numpy(np.asarray(x, dtype=np.float32)) if is_np else x.float()
    if t.shape[-1] != t.shape[-2]:
        raise DataError(f"undo_sam_resize expects a square (..., S, S) input, got {tuple(t.shape)}")
    F = torch.nn.functional
    if t.shape[-1] != info.size:
        lead = t.shape[:-2]
        t4 = t.reshape(-1, 1, *t.shape[-2:])
        interp = (
            {"mode": "nearest-exact"}
            if mode == "nearest"
            else {"mode": "bilinear", "align_corners": False}
        )
        t = F.interpolate(t4, size=(info.size, info.size), **interp).reshape(
            *lead, info.size, info.size
        )
    nh, nw = info.resized_size
    t = t[..., :nh, :nw]
    lead = t.shape[:-2]
    t4 = t.reshape(-1, 1, nh, nw)
    if mode == "nearest":
        out = F.interpolate(t4, size=info.original_size, mode="nearest-exact")
    else:
        out = F.interpolate(t4, size=info.original_size, mode="bilinear", align_corners=False)
    out = out.reshape(*lead, *info.original_size)
    return out.numpy() if is_np else out


def resize_coords(
    coords: np.ndarray, original_size: tuple[int, int], size: int = 1024
) -> np.ndarray:
    """Scale ``(N, 2)`` ``(x, y)`` points from the original image to the resized one (SAM's apply_coords)."""
    h, w = original_size
    nh, nw = get_preprocess_shape(h, w, size)
    c = np.asarray(coords, dtype=np.float32).copy()
    c[..., 0] *= nw / w
    c[..., 1] *= nh / h
    return c


def resize_boxes(boxes: np.ndarray, original_size: tuple[int, int], size: int = 1024) -> np.ndarray:
    """Scale ``(..., 4)`` ``(x0, y0, x1, y1)`` boxes like :func:`resize_coords`."""
    b = np.asarray(boxes, dtype=np.float32)
    return resize_coords(b.reshape(-1, 2, 2), original_size, size).reshape(b.shape)


def normalize(image: np.ndarray, method: str = "sam") -> np.ndarray:
    """Pixel normalisation of a ``[0, 255]`` image ``(H, W, 3)`` (or ``(H, W)``).

    Methods:
        ``"sam"``: ``(x - SAM_PIXEL_MEAN) / SAM_PIXEL_STD`` per channel (SAM / Med-SA).
        ``"minmax"``: ``(x - min) / max(max - min, 1e-8)`` to ``[0, 1]`` (LiteMedSAM / MedSAM).
        ``"none"``: unchanged (float32).
    """
    a = np.asarray(image, dtype=np.float32)
    if method == "sam":
        if a.ndim == 3 and a.shape[-1] == 3:
            return (a - np.array(SAM_PIXEL_MEAN, np.float32)) / np.array(SAM_PIXEL_STD, np.float32)
        return (a - np.float32(np.mean(SAM_PIXEL_MEAN))) / np.float32(np.mean(SAM_PIXEL_STD))
    if method == "minmax":
        lo, hi = float(a.min()), float(a.max())
        return (a - lo) / max(hi - lo, 1e-8)
    if method == "none":
        return a
    raise ConfigError(f"unknown normalisation {method!r}; choose 'sam', 'minmax' or 'none'")


def window(image: np.ndarray, preset: str | tuple[float, float]) -> np.ndarray:
    """CT windowing: clip HU to ``[level - width/2, level + width/2]`` and scale to ``[0, 1]``.

    Args:
        preset: a name from :data:`CT_WINDOWS` or ``(level, width)``.
    """
    if isinstance(preset, str):
        if preset not in CT_WINDOWS:
            raise ConfigError(f"unknown CT window {preset!r}; choose from {', '.join(CT_WINDOWS)}")
        level, width = CT_WINDOWS[preset]
    else:
        level, width = (float(v) for v in preset)
    if width <= 0:
        raise ConfigError(f"window width must be positive, got {width}")
    lo = level - width / 2
    return np.clip((np.asarray(image, np.float32) - lo) / width, 0.0, 1.0)


def percentile_normalize(
    image: np.ndarray, lower: float = 0.5, upper: float = 99.5, *, nonzero: bool = False
) -> np.ndarray:
    """Clip to the ``[lower, upper]`` percentiles and scale to ``[0, 1]`` (MRI and unknown modalities).

    Args:
        nonzero: compute the percentiles over non-zero voxels only (skull-stripped / masked MRI).
    """
    a = np.asarray(image, np.float32)
    vals = a[a != 0] if nonzero and (a != 0).any() else a
    lo, hi = np.percentile(vals, [lower, upper])
    if hi <= lo:
        return np.zeros_like(a)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0)


def scale_intensity(image: np.ndarray, mode: str = "auto") -> np.ndarray:
    """Map raw intensities to a ``[0, 255]`` float32 image (the input range SAM expects).

    Modes:
        ``"auto"``: uint8 data unchanged; anything else via ``"percentile"``.
        ``"none"``: unchanged (already ``[0, 255]``).
        ``"percentile"``: :func:`percentile_normalize` (0.5-99.5) times 255.
        ``"ct:<preset>"`` (e.g. ``"ct:abdomen"``) or ``"ct:<level>,<width>"``: :func:`window` times 255.
    """
    a = np.asarray(image)
    if mode == "auto":
        mode = "none" if a.dtype == np.uint8 else "percentile"
    if mode == "none":
        return a.astype(np.float32)
    if mode == "percentile":
        return percentile_normalize(a) * 255.0
    if mode.startswith("ct:"):
        spec = mode[3:]
        preset: str | tuple[float, float]
        if "," in spec:
            try:
                level, width = (float(v) for v in spec.split(","))
            except ValueError:
                raise ConfigError(
                    f"bad CT window {mode!r}; expected 'ct:<level>,<width>'"
                ) from None
            preset = (level, width)
        else:
            preset = spec
        return window(a, preset) * 255.0
    raise ConfigError(f"unknown intensity mode {mode!r}; use auto, none, percentile, ct:<preset>")


def to_three_channels(image: np.ndarray) -> np.ndarray:
    """Make SAM's 3 input channels from ``(H, W)`` / ``(H, W, C)``.

    ``(H, W)`` / ``(H, W, 1)``: repeated; ``(H, W, 4)``: alpha dropped; ``(H, W, 2)`` (two MRI
    sequences): ``(c0, c1, c1)``; ``C > 4``: the first three channels.
    """
    a = np.asarray(image)
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=-1)
    if a.ndim == 3 and a.shape[-1] == 1:
        return np.repeat(a, 3, axis=-1)
    if a.ndim == 3 and a.shape[-1] == 3:
        return a
    if a.ndim == 3 and a.shape[-1] == 4:
        return a[..., :3]
    if a.ndim == 3 and a.shape[-1] == 2:  # two modalities: repeat the last one
        return a[..., [0, 1, 1]]
    if a.ndim == 3 and a.shape[-1] > 4:  # more modalities than SAM has channels: first three
        return a[..., :3]
    raise DataError(f"cannot make a 3-channel image from shape {a.shape}")


def chunk_indices(
    n_slices: int, depth: int, stride: int | None = None, pad: str = "replicate"
) -> list[np.ndarray]:
    """Slice indices of consecutive chunks of ``depth`` slices covering ``n_slices``.

    Args:
        stride: step between chunk starts (default ``depth``: non-overlapping).
        pad: what the last chunk (and volumes shorter than ``depth``) hold past the end:
            ``"replicate"`` repeats the last slice; ``"zero"`` marks the position with ``-1``
            (:func:`take_slices` fills it with zeros; losses should ignore it);
            ``"shift"`` moves the last chunk back so it ends at the last slice (no padding unless
            the volume is shorter than ``depth``, then replicate).

    Returns:
        list of ``(depth,)`` int64 arrays; every slice is covered at least once.
    """
    if depth < 1:
        raise ConfigError(f"depth must be >= 1, got {depth}")
    if n_slices < 1:
        raise DataError("volume has no slices")
    stride = depth if stride is None else stride
    if stride < 1:
        raise ConfigError(f"stride must be >= 1, got {stride}")
    if pad not in ("replicate", "zero", "shift"):
        raise ConfigError(f"unknown chunk padding {pad!r}; use replicate, zero or shift")
    starts = list(range(0, max(n_slices - depth, 0) + 1, stride))
    if starts[-1] + depth < n_slices:
        starts.append(n_slices - depth if pad == "shift" else starts[-1] + stride)
    out = []
    for s in starts:
        idx = np.arange(s, s + depth, dtype=np.int64)
        over = idx >= n_slices
        idx[over] = -1 if pad == "zero" else n_slices - 1
        out.append(idx)
    return out


def take_slices(volume: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``volume[idx]`` along the first axis, with ``-1`` entries filled by zeros."""
    v = np.asarray(volume)
    idx = np.asarray(idx)
    out = v[np.clip(idx, 0, None)].copy()
    out[idx < 0] = 0
    return out


def slice_stack(volume: np.ndarray, z: int, n: int = 3) -> np.ndarray:
    """Slice ``z`` with its neighbours as channels: ``(D, H, W)`` -> ``(H, W, n)`` (edges replicate).

    MA-SAM feeds three adjacent slices as the RGB channels of SAM's input.
    """
    v = np.asarray(volume)
    half = n // 2
    idx = np.clip(np.arange(z - half, z - half + n), 0, v.shape[0] - 1)
    return np.moveaxis(v[idx], 0, -1)


def resize_volume(
    volume: np.ndarray, shape: Sequence[int] = (128, 128, 128), *, kind: str = "image"
) -> np.ndarray:
    """Resize ``(D, H, W)`` (or ``(C, D, H, W)``) to ``shape`` (the paper's 3D setting: 128^3).

    Args:
        kind: ``"image"``: trilinear, float32; ``"label"``: nearest, dtype kept.
    """
    torch = _torch()
    v = np.asarray(volume)
    if v.ndim not in (3, 4):
        raise DataError(f"resize_volume expects (D, H, W) or (C, D, H, W), got {v.shape}")
    t = torch.from_numpy(v.astype(np.float32))
    t5 = t[None, None] if v.ndim == 3 else t[None]
    F = torch.nn.functional
    if kind == "image":
        out = F.interpolate(t5, size=tuple(shape), mode="trilinear", align_corners=False)
    elif kind == "label":
        out = F.interpolate(t5, size=tuple(shape), mode="nearest-exact")
    else:
        raise ConfigError(f"kind must be 'image' or 'label', got {kind!r}")
    out = out[0, 0] if v.ndim == 3 else out[0]
    r = out.numpy()
    return r if kind == "image" else r.astype(v.dtype)


def check_resize_to(
    resize_to: Sequence[int] | None, dim: int | None = None
) -> tuple[int, ...] | None:
    """Validate a ``resize_to`` setting: ``(H, W)`` (2D images, and every slice of a volume
    in-plane, the slice count kept) or ``(D, H, W)`` (volumes only). ``dim``: 2 or 3 when the
    data is known. Returns it as a tuple (``None`` stays ``None``).

    Raises:
        ConfigError: not 2 or 3 positive integers, or ``(D, H, W)`` for 2D data.
    """
    if resize_to is None:
        return None
    try:
        t = tuple(int(v) for v in resize_to)
    except (TypeError, ValueError):
        raise ConfigError(
            f"resize_to must be [H, W] or [D, H, W] integers, got {resize_to!r}"
        ) from None
    if len(t) not in (2, 3) or min(t) < 1 or any(int(v) != v for v in resize_to):
        raise ConfigError(
            f"resize_to must be [H, W] or [D, H, W] positive integers, got {list(resize_to)}"
        )
    if len(t) == 3 and dim == 2:
        raise ConfigError(
            f"resize_to {list(t)} is (D, H, W) for volumes, but the data is 2D; give [H, W]"
        )
    return t


def resized_shape(shape: Sequence[int], resize_to: Sequence[int] | None) -> tuple[int, ...]:
    """Spatial shape ``(H, W)`` / ``(D, H, W)`` after ``resize_to`` (see :func:`check_resize_to`)."""
    shape = tuple(int(v) for v in shape)
    r = check_resize_to(resize_to, len(shape))
    if r is None:
        return shape
    return (*shape[:-2], *r) if len(r) == 2 else r


def resize_spatial(
    array: np.ndarray, shape: Sequence[int], *, kind: str = "image", channels_last: bool = False
) -> np.ndarray:
    """Resample an image / volume / mask to the spatial ``shape`` (``(H, W)`` or ``(D, H, W)``,
    as many dims as the array has spatial dims).

    ``kind="image"``: (tri)linear, float32 (``align_corners=False``: the physical extent is kept,
    so the spacing becomes ``spacing * old / new``); ``"label"``: nearest, dtype kept (bool masks
    stay bool). ``channels_last``: the last axis holds channels (``(H, W, C)``, ``(D, H, W, C)``).
    Resampling a prediction back with ``kind="label"`` and the original shape inverts the grid.
    """
    a = np.asarray(array)
    ch = a.shape[-1] if channels_last else None
    spatial = a.shape[:-1] if channels_last else a.shape
    shape = tuple(int(v) for v in shape)
    if len(shape) != len(spatial) or len(shape) not in (2, 3):
        raise DataError(f"cannot resize spatial shape {spatial} to {shape}")
    if tuple(spatial) == shape:
        return a.astype(np.float32) if kind == "image" else a
    v = np.moveaxis(a, -1, 0) if channels_last else a  # (C, ...) or (...)
    if len(shape) == 2:  # a 2D image is a one-slice volume resized in-plane
        v = v[..., None, :, :]
        shape3 = (1, *shape)
    else:
        shape3 = shape
    lab_bool = kind == "label" and v.dtype == bool
    out = resize_volume(v.astype(np.uint8) if lab_bool else v, shape3, kind=kind)
    out = out > 0 if lab_bool else out
    if len(shape) == 2:
        out = out[..., 0, :, :]
    if ch is not None:
        out = np.moveaxis(out, 0, -1)
    return np.ascontiguousarray(out)


def resized_spacing(
    spacing: Sequence[float], old_shape: Sequence[int], new_shape: Sequence[int]
) -> tuple[float, ...]:
    """Voxel spacing after :func:`resize_spatial` (same physical extent): ``s * old / new`` per
    axis; ``spacing`` and the shapes in the same axis order."""
    return tuple(float(s) * o / n for s, o, n in zip(spacing, old_shape, new_shape, strict=True))


@dataclass
class SamTransform:
    """2D sample -> SAM input: 3 channels, normalise, resize long side + pad.

    Input dict: ``image`` ``(H, W)`` / ``(H, W, C)`` on the ``[0, 255]`` scale (see
    :func:`scale_intensity`), optional ``target`` ``(H, W)``. Output (torch): ``image`` float32
    ``(3, S, S)``, ``target`` float32 ``(S, S)`` (nearest), ``original_size`` / ``resized_size``
    ``(H, W)`` tuples; ``points`` ``(N, 2)`` / ``box`` ``(4,)`` (original ``(x, y)`` pixels) are
    rescaled to the resized image (torch float32, ``point_labels`` int64). Other keys pass through.

    Attributes:
        size: long side / square size ``S`` (SAM 1024; configurable for tiny test models).
        norm: ``"sam"`` (mean/std) or ``"minmax"`` (LiteMedSAM).
    """

    size: int = 1024
    norm: str = "sam"

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        torch = _torch()
        out = dict(sample)
        img = normalize(to_three_channels(sample["image"]), self.norm)
        img, info = sam_resize(img, self.size)
        out["image"] = torch.from_numpy(np.ascontiguousarray(np.moveaxis(img, -1, 0)))
        out["original_size"] = info.original_size
        out["resized_size"] = info.resized_size
        if sample.get("points") is not None:
            pts = resize_coords(np.asarray(sample["points"]), info.original_size, self.size)
            out["points"] = torch.from_numpy(pts)
            out["point_labels"] = torch.as_tensor(
                np.asarray(sample["point_labels"]), dtype=torch.int64
            )
        if sample.get("box") is not None:
            out["box"] = torch.from_numpy(
                resize_boxes(np.asarray(sample["box"]), info.original_size, self.size)
            )
        if sample.get("target") is not None:
            tgt = sam_resize_mask(np.asarray(sample["target"]).astype(np.uint8), self.size)
            out["target"] = torch.from_numpy(tgt.astype(np.float32))
        return out
