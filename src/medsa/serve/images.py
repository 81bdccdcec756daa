"""Opened images for the web app: decoded-size limits, the image store and single-flight LRUs.

- :func:`check_decoded_size` reads only a file's header (PIL size, TIFF series shape, NIfTI header
  shape, MHA/NRRD image information, DICOM rows x columns x frames) and refuses images whose decoded
  pixel / voxel count exceeds the server's limits *before* the pixel data is decoded; a 0.1 MB PNG
  of 12000 x 12000 pixels never reaches the decoder. The decoded array is checked again afterwards
  for formats whose header could not be read.
- :class:`ImageStore` maps opaque ids to files and keeps the last few decoded images in memory.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from medsa.errors import DataError, PromptError

from .paths import NotFound, image_suffix

if TYPE_CHECKING:
    from medsa.data.io import Image

__all__ = [
    "ImageLimits",
    "ImageStore",
    "LoadedImage",
    "SingleFlightLRU",
    "check_decoded_size",
    "default_save_name",
    "load_image",
]

K = TypeVar("K")
V = TypeVar("V")


class SingleFlightLRU(Generic[K, V]):
    """LRU cache whose misses are computed once even when requested concurrently.

    ``get(key, compute)`` returns the cached value, waits for a computation already in flight for
    ``key``, or runs ``compute()`` itself (outside the cache lock). A failing ``compute`` raises in
    every waiter and caches nothing.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[K, V] = OrderedDict()
        self._inflight: dict[K, Future[V]] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __contains__(self, key: K) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def peek(self, key: K) -> V | None:
        """The cached value or ``None``, without computing or counting a hit."""
        with self._lock:
            return self._data.get(key)

    def discard(self, predicate: Callable[[K], bool]) -> int:
        """Drop the cached entries whose key matches; returns how many were dropped."""
        with self._lock:
            keys = [k for k in self._data if predicate(k)]
            for k in keys:
                del self._data[k]
        return len(keys)

    def get(self, key: K, compute: Callable[[], V]) -> tuple[V, bool]:
        """Return ``(value, was_cached)``."""
        with self._lock:
            if key in self._data:
                self._data.move_to_end(key)
                self.hits += 1
                return self._data[key], True
            fut = self._inflight.get(key)
            owner = fut is None
            if owner:
                fut = Future()
                self._inflight[key] = fut
                self.misses += 1
            else:
                self.hits += 1  # served by another request's computation
        assert fut is not None
        if not owner:
            return fut.result(), True
        try:
            value = compute()
        except BaseException as e:
            with self._lock:
                del self._inflight[key]
            fut.set_exception(e)
            raise
        self.put(key, value)
        with self._lock:
            del self._inflight[key]
        fut.set_result(value)
        return value, False

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)


# --------------------------------------------------------------------------------------------
# Decoded-size limits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageLimits:
    """Largest decoded images the server opens.

    Args:
        max_pixels: 2D images, ``H * W`` (colour channels not counted).
        max_voxels: volumes, ``D * H * W`` times the number of channels of a multi-channel volume.
    """

    max_pixels: int = 40_000_000
    max_voxels: int = 256_000_000

    def check(self, name: str, shape: tuple[int, ...], is_3d: bool) -> None:
        n = 1
        for s in shape:
            n *= int(s)  # Python ints: a forged header cannot wrap around
        limit = self.max_voxels if is_3d else self.max_pixels
        if n > limit:
            what, flag = (
                ("voxels", "--max-volume-mvox") if is_3d else ("pixels", "--max-image-mpix")
            )
            dims = " x ".join(str(int(s)) for s in shape)
            raise DataError(
                f"{name}: image is too large ({dims} = {n / 1e6:.1f} M {what}); this server opens "
                f"at most {limit / 1e6:g} M {what} (start it with {flag} to change that)"
            )


def _header_shape(path: Path) -> tuple[tuple[int, ...], bool] | None:
    """``(spatial shape incl. channels of volumes, is_3d)`` from the file header, or ``None``.

    Reads no pixel data. ``None`` when the format's header cannot be read cheaply (the decoded
    array is then checked after decoding).
    """
    from medsa.data.io import image_format

    fmt = image_format(path)
    if fmt in ("png", "jpeg", "bmp"):
        import warnings

        from PIL import Image as PILImage

        with warnings.catch_warnings():
            # PIL warns above ~89 M pixels (and refuses above ~179 M, see check_decoded_size);
            # the server's own limit decides
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            with PILImage.open(path) as im:  # lazy: only the header is parsed
                w, h = im.size
        return (h, w), False
    if fmt == "tiff":
        import tifffile

        with tifffile.TiffFile(path) as tf:
            series = tf.series[0]
            shape, axes = tuple(series.shape), series.axes
        if "S" in axes and shape[-1] in (3, 4):
            shape = shape[:-1]
        return shape, len(shape) >= 3
    if fmt == "nifti":
        import nibabel as nib

        shape = tuple(int(s) for s in nib.load(str(path)).shape)  # header only, data is lazy
        return shape, len(shape) >= 3
    if fmt in ("mha", "nrrd"):
        import SimpleITK as sitk

        r = sitk.ImageFileReader()
        r.SetFileName(str(path))
        r.ReadImageInformation()
        size = tuple(int(s) for s in r.GetSize())
        comps = int(r.GetNumberOfComponents())
        is_3d = len(size) >= 3
        return (size + ((comps,) if is_3d and comps > 1 else ())), is_3d
    if fmt == "dicom":
        import pydicom

        files = sorted(path.glob("*.dcm")) if path.is_dir() else [path]
        if not files:
            return None
        ds = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1) * len(files)
        rows, cols = int(getattr(ds, "Rows", 0)), int(getattr(ds, "Columns", 0))
        return ((frames, rows, cols), True) if frames > 1 else ((rows, cols), False)
    return None


def check_decoded_size(path: Path, name: str, limits: ImageLimits) -> None:
    """Refuse ``path`` before decoding when its header announces more pixels than ``limits``.

    Raises:
        DataError: the image would be too large. Unreadable headers are left to the decoder, whose
            error names the problem, and to the check of the decoded array.
    """
    from PIL import Image as PILImage

    try:
        found = _header_shape(path)
    except PILImage.DecompressionBombError:
        limit = limits.max_pixels / 1e6
        raise DataError(
            f"{name}: image is too large (over {PILImage.MAX_IMAGE_PIXELS * 2 / 1e6:.0f} M "
            f"pixels); this server opens at most {limit:g} M pixels"
        ) from None
    except Exception:  # corrupt header: read_image reports it properly
        return
    if found is not None:
        limits.check(name, *found)


# --------------------------------------------------------------------------------------------
# Loaded images
# --------------------------------------------------------------------------------------------


@dataclass
class LoadedImage:
    """An opened image or volume, seen as a stack of 2D slices.

    Attributes:
        id: opaque id used by the browser (changes when the file changes).
        name: file name shown in the page.
        image: the :class:`medsa.data.io.Image` (array + geometry).
        slices: ``(D, H, W)`` or ``(D, H, W, 3)``; ``D = 1`` for 2D images.
        model_range: intensity range mapped to ``[0, 255]`` for the model (``None``: uint8 as is).
        window: default display window ``(low, high)``.
        path: the file (or DICOM folder) it was read from.
    """

    id: str
    name: str
    image: Image
    slices: np.ndarray
    model_range: tuple[float, float] | None
    window: tuple[float, float]
    vmin: float
    vmax: float
    path: Path | None = None

    @property
    def is_3d(self) -> bool:
        return bool(self.image.is_3d)

    @property
    def depth(self) -> int:
        return int(self.slices.shape[0])

    @property
    def height(self) -> int:
        return int(self.slices.shape[1])

    @property
    def width(self) -> int:
        return int(self.slices.shape[2])

    @property
    def channels(self) -> int:
        return 3 if self.slices.ndim == 4 else 1

    def check_slice(self, z: int) -> int:
        if not isinstance(z, int) or isinstance(z, bool) or not 0 <= z < self.depth:
            raise PromptError(
                f"slice {z} is out of range: this image has slices 0..{self.depth - 1}"
            )
        return z

    def model_input(self, z: int) -> np.ndarray:
        """Slice ``z`` as ``(H, W)`` / ``(H, W, 3)`` uint8 for the model.

        Non-uint8 data (CT, MRI, 16-bit) is clipped to the volume's 0.5-99.5 percentile range and
        scaled to ``[0, 255]`` (MedSAM's preprocessing). This is independent of the display window,
        so changing window/level never invalidates an embedding.
        """
        s = self.slices[self.check_slice(z)]
        if self.model_range is None:
            return np.ascontiguousarray(s)
        lo, hi = self.model_range
        out = (np.clip(s.astype(np.float32), lo, hi) - lo) * (255.0 / max(hi - lo, 1e-6))
        return np.ascontiguousarray(np.round(out).astype(np.uint8))

    def display_slice(self, z: int) -> tuple[bytes, str]:
        """Raw little-endian bytes of slice ``z`` for the canvas: uint8 RGB or float32 gray."""
        s = self.slices[self.check_slice(z)]
        if self.channels == 3:
            return np.ascontiguousarray(s, dtype=np.uint8).tobytes(), "uint8"
        return np.ascontiguousarray(s, dtype="<f4").tobytes(), "float32"

    def info(self) -> dict[str, Any]:
        sp = self.image.spacing or ()
        return {
            "id": self.id,
            "name": self.name,
            "ndim": 3 if self.is_3d else 2,
            "width": self.width,
            "height": self.height,
            "slices": self.depth,
            "channels": self.channels,
            "dtype": str(self.image.array.dtype),
            "format": self.image.format,
            "min": self.vmin,
            "max": self.vmax,
            "window": list(self.window),
            "spacing": [float(x) for x in sp[-2:]],  # in-plane (sy, sx), for the aspect ratio
            "save_name": default_save_name(self.name, self.is_3d, self.image.format),
        }


def default_save_name(name: str, is_3d: bool, fmt: str) -> str:
    """``<stem>_mask.png`` for 2D; for 3D the input's format (NIfTI for DICOM/TIFF)."""
    suf = image_suffix(name) or ""
    stem = name[: len(name) - len(suf)] if suf else name
    stem = "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "_" for c in stem)
    stem = stem.lstrip("._-").replace("..", "_")[:150] or "image"
    ext = ".png" if not is_3d else {"mha": ".mha", "nrrd": ".nrrd"}.get(fmt, ".nii.gz")
    return f"{stem}_mask{ext}"


def _to_slices(img: Image, name: str) -> np.ndarray:
    """``(D, H, W)`` / ``(D, H, W, 3)`` view of a 2D image or 3D volume."""
    a = img.array
    if not img.is_3d:
        if a.ndim == 3:
            if a.shape[-1] == 4:
                a = a[..., :3]
            elif a.shape[-1] == 1:
                a = a[..., 0]
            elif a.shape[-1] != 3:
                raise DataError(f"{name}: unsupported 2D image with {a.shape[-1]} channels")
        return a[None]
    if a.ndim == 4:  # (C, D, H, W): multi-channel volumes are shown channel 0 (e.g. T1 of BraTS)
        a = a[0]
    return a


def _intensity_stats(slices: np.ndarray, name: str) -> tuple[float, float, tuple[float, float]]:
    """``(min, max, (p0.5, p99.5))``, on a strided sample of large volumes."""
    flat = slices.reshape(-1)
    step = max(1, flat.size // 2_000_000)
    sample = flat[::step].astype(np.float64)
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        raise DataError(f"{name}: image has no finite values")
    lo, hi = np.percentile(finite, [0.5, 99.5])
    vmin, vmax = float(finite.min()), float(finite.max())
    if hi <= lo:
        lo, hi = vmin, max(vmax, vmin + 1.0)
    return vmin, vmax, (float(lo), float(hi))


def load_image(
    path: Path, image_id: str, name: str, limits: ImageLimits | None = None
) -> LoadedImage:
    """Read ``path`` with :func:`medsa.data.io.read_image` and prepare it for the page.

    Raises:
        DataError: unreadable, unsupported, or larger than ``limits`` (checked from the header
            before decoding where the format allows it).
    """
    from medsa.data.io import read_image

    limits = limits or ImageLimits()
    check_decoded_size(path, name, limits)
    img = read_image(path)
    shape = img.array.shape
    if img.is_3d:
        limits.check(name, shape, True)
    else:
        limits.check(name, shape[:2], False)
    slices = _to_slices(img, name)
    if slices.ndim not in (3, 4) or min(slices.shape[:3]) < 1:
        raise DataError(f"{name}: unsupported image shape {img.array.shape}")
    if slices.dtype == np.bool_:
        slices = slices.astype(np.uint8) * 255
    if not (np.issubdtype(slices.dtype, np.integer) or np.issubdtype(slices.dtype, np.floating)):
        raise DataError(f"{name}: unsupported pixel type {slices.dtype}")
    vmin, vmax, (plo, phi) = _intensity_stats(slices, name)
    if slices.dtype == np.uint8:
        model_range, window = None, (0.0, 255.0)
    else:
        if not np.isfinite(slices).all():
            raise DataError(f"{name}: image contains NaN or infinite values")
        model_range = window = (plo, phi)
    return LoadedImage(image_id, name, img, slices, model_range, window, vmin, vmax, path)


@dataclass
class _Source:
    path: Path
    name: str


class ImageStore:
    """Maps opaque image ids to files and keeps the last few decoded images in memory."""

    def __init__(self, capacity: int, limits: ImageLimits | None = None) -> None:
        self._sources: dict[str, _Source] = {}
        self._lock = threading.Lock()
        self._cache: SingleFlightLRU[str, LoadedImage] = SingleFlightLRU(capacity)
        self.limits = limits or ImageLimits()

    def register(self, path: Path, name: str) -> str:
        """Id of ``path``; it depends on the file's identity and mtime, so edits give a new id."""
        st = path.stat()
        key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        image_id = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
        with self._lock:
            self._sources[image_id] = _Source(path, name)
        return image_id

    def forget(self, path: Path) -> list[str]:
        """Unregister every id of ``path`` (an evicted upload) and drop its decoded image."""
        with self._lock:
            ids = [i for i, s in self._sources.items() if s.path == path]
            for i in ids:
                del self._sources[i]
        self._cache.discard(lambda k: k in ids)
        return ids

    def get(self, image_id: str) -> LoadedImage:
        with self._lock:
            src = self._sources.get(image_id) if isinstance(image_id, str) else None
        if src is None:
            raise NotFound(f"unknown image id {image_id!r}: open the image first")
        img, _ = self._cache.get(
            image_id, lambda: load_image(src.path, image_id, src.name, self.limits)
        )
        return img
