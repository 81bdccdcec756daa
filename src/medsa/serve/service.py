"""Everything the web app does that is not HTTP: images, embedding cache, inference, saving.

Thread model: FastAPI runs the (synchronous) endpoints in a thread pool, so every method here may be
called concurrently.

- Loaded images live in a small LRU (:class:`ImageStore`); loading one file twice at the same time
  is coalesced ("single flight") so it is read once.
- Image embeddings are cached per ``(image id, slice)`` in :class:`EmbeddingCache`, also single
  flight: concurrent requests for a slice that is not cached yet wait for the one encoder pass.
- All model calls (encoder and decoder) hold one lock: CPU inference gains nothing from running two
  forward passes at once, and it keeps peak memory at one pass.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from medsa.errors import DataError, MedsaError, PromptError

from .paths import IMAGE_SUFFIXES, AccessDenied, NotFound, RootSet, image_suffix, safe_output_name

if TYPE_CHECKING:
    import torch

    from medsa.data.io import Image
    from medsa.sam.sam import Sam

__all__ = [
    "EmbeddingCache",
    "ImageStore",
    "LoadedImage",
    "SegmentationService",
    "ServeConfig",
    "UploadError",
    "rle_decode",
    "rle_encode",
]

K = TypeVar("K")
V = TypeVar("V")


class UploadError(MedsaError):
    """An uploaded file is too large, of a refused type, or cannot be decoded (HTTP 400)."""


@dataclass
class ServeConfig:
    """Settings of one server.

    Args:
        roots: folders whose images may be browsed and opened (nothing else is readable).
        output_dir: where masks are saved (created if missing); nothing is written elsewhere.
        upload_dir: where uploads are kept; ``None``: a temporary folder removed on shutdown.
        max_upload_mb: largest accepted upload.
        embedding_cache: number of ``(image, slice)`` embeddings kept in memory.
        image_cache: number of decoded images / volumes kept in memory.
        max_points: most click prompts accepted in one request.
        runtime: ``"torch"`` or ``"onnx"`` (ONNX Runtime, :mod:`medsa.export.runtime`).
        onnx_dir: with ``runtime="onnx"``: a ``medsa export`` folder (``None``: export now).
    """

    roots: tuple[Path, ...]
    output_dir: Path
    upload_dir: Path | None = None
    max_upload_mb: float = 512.0
    embedding_cache: int = 64
    image_cache: int = 4
    max_points: int = 256
    runtime: str = "torch"
    onnx_dir: Path | None = None

    def __post_init__(self) -> None:
        self.roots = tuple(Path(r) for r in self.roots)
        self.output_dir = Path(self.output_dir)
        if self.max_upload_mb <= 0:
            raise MedsaError("max_upload_mb must be positive")
        if self.embedding_cache < 1 or self.image_cache < 1:
            raise MedsaError("embedding_cache and image_cache must be >= 1")


# --------------------------------------------------------------------------------------------
# Single-flight LRU
# --------------------------------------------------------------------------------------------


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
        with self._lock:
            self._data[key] = value
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)
            del self._inflight[key]
        fut.set_result(value)
        return value, False


# --------------------------------------------------------------------------------------------
# Images
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
    """

    id: str
    name: str
    image: Image
    slices: np.ndarray
    model_range: tuple[float, float] | None
    window: tuple[float, float]
    vmin: float
    vmax: float

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
        if not isinstance(z, int) or not 0 <= z < self.depth:
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


def _to_slices(img: Image) -> np.ndarray:
    """``(D, H, W)`` / ``(D, H, W, 3)`` view of a 2D image or 3D volume."""
    a = img.array
    if not img.is_3d:
        if a.ndim == 3:
            if a.shape[-1] == 4:
                a = a[..., :3]
            elif a.shape[-1] == 1:
                a = a[..., 0]
            elif a.shape[-1] != 3:
                raise DataError(f"{img.path}: unsupported 2D image with {a.shape[-1]} channels")
        return a[None]
    if a.ndim == 4:  # (C, D, H, W): multi-channel volumes are shown channel 0 (e.g. T1 of BraTS)
        a = a[0]
    return a


def _intensity_stats(slices: np.ndarray) -> tuple[float, float, tuple[float, float]]:
    """``(min, max, (p0.5, p99.5))``, on a strided sample of large volumes."""
    flat = slices.reshape(-1)
    step = max(1, flat.size // 2_000_000)
    sample = flat[::step].astype(np.float64)
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        raise DataError("image has no finite values")
    lo, hi = np.percentile(finite, [0.5, 99.5])
    vmin, vmax = float(finite.min()), float(finite.max())
    if hi <= lo:
        lo, hi = vmin, max(vmax, vmin + 1.0)
    return vmin, vmax, (float(lo), float(hi))


def load_image(path: Path, image_id: str, name: str) -> LoadedImage:
    """Read ``path`` with :func:`medsa.data.io.read_image` and prepare it for the page."""
    from medsa.data.io import read_image

    img = read_image(path)
    slices = _to_slices(img)
    if slices.ndim not in (3, 4) or min(slices.shape[:3]) < 1:
        raise DataError(f"{name}: unsupported image shape {img.array.shape}")
    if slices.dtype == np.bool_:
        slices = slices.astype(np.uint8) * 255
    if not (np.issubdtype(slices.dtype, np.integer) or np.issubdtype(slices.dtype, np.floating)):
        raise DataError(f"{name}: unsupported pixel type {slices.dtype}")
    vmin, vmax, (plo, phi) = _intensity_stats(slices)
    if slices.dtype == np.uint8:
        model_range, window = None, (0.0, 255.0)
    else:
        if not np.isfinite(slices).all():
            raise DataError(f"{name}: image contains NaN or infinite values")
        model_range = window = (plo, phi)
    return LoadedImage(image_id, name, img, slices, model_range, window, vmin, vmax)


@dataclass
class _Source:
    path: Path
    name: str


class ImageStore:
    """Maps opaque image ids to files and keeps the last few decoded images in memory."""

    def __init__(self, capacity: int) -> None:
        self._sources: dict[str, _Source] = {}
        self._lock = threading.Lock()
        self._cache: SingleFlightLRU[str, LoadedImage] = SingleFlightLRU(capacity)

    def register(self, path: Path, name: str) -> str:
        """Id of ``path``; it depends on the file's identity and mtime, so edits give a new id."""
        st = path.stat()
        key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        image_id = hashlib.blake2b(key.encode(), digest_size=12).hexdigest()
        with self._lock:
            self._sources[image_id] = _Source(path, name)
        return image_id

    def get(self, image_id: str) -> LoadedImage:
        with self._lock:
            src = self._sources.get(image_id) if isinstance(image_id, str) else None
        if src is None:
            raise NotFound(f"unknown image id {image_id!r}: open the image first")
        img, _ = self._cache.get(image_id, lambda: load_image(src.path, image_id, src.name))
        return img


# --------------------------------------------------------------------------------------------
# Embeddings and inference
# --------------------------------------------------------------------------------------------


@dataclass
class Embedding:
    """Image embedding of one slice and the sizes needed to map prompts and masks."""

    features: torch.Tensor  # (1, C, h, w)
    original_size: tuple[int, int]
    input_size: tuple[int, int]


class EmbeddingCache(SingleFlightLRU[tuple[str, int], Embedding]):
    """LRU of :class:`Embedding` keyed by ``(image id, slice)``; see :class:`SingleFlightLRU`."""


@dataclass
class Prediction:
    masks: np.ndarray  # (M, H, W) bool
    scores: np.ndarray  # (M,)
    cached: bool
    seconds: float


@dataclass
class SegmentationService:
    """The model plus images, caches and the output folder, shared by all requests."""

    model: Sam
    config: ServeConfig
    roots: RootSet = field(init=False)
    images: ImageStore = field(init=False)
    embeddings: EmbeddingCache = field(init=False)
    encoder_calls: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.roots = RootSet.from_paths(list(self.config.roots))
        self.images = ImageStore(self.config.image_cache)
        self.embeddings = EmbeddingCache(self.config.embedding_cache)
        self._model_lock = threading.Lock()
        self.output_dir = self.config.output_dir.expanduser().resolve()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        # Uploads go to a private temporary folder removed by close(), so uploaded scans do not
        # linger on disk, unless an upload folder was configured explicitly.
        self._own_upload_dir = self.config.upload_dir is None
        up = self.config.upload_dir or tempfile.mkdtemp(prefix="medsa-uploads-")
        self.upload_dir = Path(up).expanduser().resolve()
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        self._onnx = None
        if self.config.runtime != "torch":  # load (or export) the ONNX graphs once, up front
            from medsa.export.runtime import make_predictor

            self._onnx = make_predictor(
                self.model, self.config.runtime, onnx_dir=self.config.onnx_dir
            ).sessions

    def _predictor(self) -> Any:
        """A cache-less predictor on the configured runtime (sessions shared)."""
        if self._onnx is None:
            from medsa.sam.predictor import SamPredictor

            return SamPredictor(self.model, cache_size=0)
        from medsa.export.runtime import OnnxPredictor

        return OnnxPredictor(self.model, self._onnx, cache_size=0)

    def close(self) -> None:
        """Remove the temporary upload folder (if this service created it)."""
        if self._own_upload_dir:
            shutil.rmtree(self.upload_dir, ignore_errors=True)

    # ------------------------------------------------------------------ browsing

    def list_dir(self, root: int, rel: str) -> dict[str, Any]:
        """Sub-folders and image files of a folder inside a root (hidden and escaping entries skipped)."""
        folder = self.roots.resolve(root, rel)
        if not folder.is_dir():
            raise NotFound(f"not a folder: {rel!r}")
        dirs, files = [], []
        try:
            entries = sorted(folder.iterdir(), key=lambda p: p.name.lower())
        except PermissionError:
            raise AccessDenied(f"cannot list {rel!r}: permission denied") from None
        for p in entries:
            if p.name.startswith(".") or not self.roots.inside(root, p):
                continue
            if p.is_dir():
                dirs.append(p.name)
            elif p.is_file() and image_suffix(p.name):
                files.append({"name": p.name, "size": p.stat().st_size})
        return {
            "root": root,
            "path": self.roots.relative(root, folder),
            "dirs": dirs[:5000],
            "files": files[:5000],
            # the page offers to open the folder itself as one volume
            "dicom_series": any(f["name"].lower().endswith(".dcm") for f in files),
        }

    def open(self, root: int, rel: str) -> LoadedImage:
        """Open an image file, or a folder holding one DICOM series, inside a root."""
        path = self.roots.resolve(root, rel)
        if path.is_dir():
            if not any(p.name.lower().endswith(".dcm") for p in path.iterdir()):
                raise NotFound(f"{rel!r} is a folder without DICOM (.dcm) files")
            # read_image reads every file of the series: each must be inside the root as well
            if any(p.is_symlink() and not self.roots.inside(root, p) for p in path.iterdir()):
                raise AccessDenied(f"{rel!r} contains links that point outside the allowed folders")
        elif not path.is_file():
            raise NotFound(f"not a file: {rel!r}")
        elif image_suffix(path.name) is None:
            raise AccessDenied(f"{path.name}: not an image file type this server opens")
        image_id = self.images.register(path, path.name)
        return self.images.get(image_id)

    def open_upload(self, filename: str, data_path: Path) -> LoadedImage:
        """Register an uploaded file already written to ``data_path`` (in the upload folder)."""
        image_id = self.images.register(data_path, filename)
        try:
            return self.images.get(image_id)
        except DataError as e:
            data_path.unlink(missing_ok=True)
            raise UploadError(
                f"{filename}: not a readable image ({_strip_path(str(e), data_path)})"
            ) from None

    def new_upload_path(self, filename: str) -> Path:
        """A fresh file path in the upload folder for ``filename`` (validated extension)."""
        suf = image_suffix(filename or "")
        if suf is None:
            raise UploadError(
                f"{filename!r}: unsupported file type; accepted: " + " ".join(IMAGE_SUFFIXES)
            )
        self.upload_dir.mkdir(parents=True, exist_ok=True)
        return self.upload_dir / f"{uuid.uuid4().hex}{suf}"

    # ------------------------------------------------------------------ inference

    def embedding(self, img: LoadedImage, z: int) -> tuple[Embedding, bool]:
        img.check_slice(z)
        return self.embeddings.get((img.id, z), lambda: self._embed(img.model_input(z)))

    def _embed(self, array: np.ndarray) -> Embedding:
        pred = self._predictor()
        with self._model_lock:
            pred.set_image(array)
            self.encoder_calls += 1
        assert pred.features is not None
        return Embedding(pred.features, pred.original_size, pred.input_size)  # type: ignore[arg-type]

    def validate_prompts(
        self,
        img: LoadedImage,
        points: list[tuple[float, float, int]],
        box: list[float] | None,
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        """Check prompts against the image before any model work; returns numpy prompts."""
        w, h = img.width, img.height
        if not points and box is None:
            raise PromptError("give at least one click or a box")
        if len(points) > self.config.max_points:
            raise PromptError(f"too many clicks ({len(points)}); at most {self.config.max_points}")
        coords = labels = b = None
        if points:
            arr = np.asarray([p[:2] for p in points], dtype=np.float64)
            lab = np.asarray([p[2] for p in points])
            if not np.isfinite(arr).all():
                raise PromptError("click coordinates must be finite numbers")
            if not np.isin(lab, (0, 1)).all():
                raise PromptError("click labels must be 1 (positive) or 0 (negative)")
            bad = (arr[:, 0] < 0) | (arr[:, 0] > w) | (arr[:, 1] < 0) | (arr[:, 1] > h)
            if bad.any():
                raise PromptError(
                    f"click {arr[bad][0].tolist()} is outside the image: x must be in [0, {w}], "
                    f"y in [0, {h}]"
                )
            coords, labels = arr, lab.astype(np.int64)
        if box is not None:
            b = np.asarray(box, dtype=np.float64)
            if b.shape != (4,) or not np.isfinite(b).all():
                raise PromptError("box must be 4 finite numbers (x0, y0, x1, y1)")
            x0, y0, x1, y1 = b
            if x1 < x0 or y1 < y0:
                raise PromptError(f"box must have x0 <= x1 and y0 <= y1, got {b.tolist()}")
            if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
                raise PromptError(
                    f"box {b.tolist()} is outside the image ({w} x {h}); clip it to the image"
                )
        return coords, labels, b

    def predict(
        self,
        img: LoadedImage,
        z: int,
        points: list[tuple[float, float, int]],
        box: list[float] | None,
        multimask: bool,
    ) -> Prediction:
        """Masks ``(M, H, W)`` for the prompts on slice ``z`` (M = 3 with ``multimask``, else 1)."""
        t0 = time.perf_counter()
        img.check_slice(z)
        coords, labels, b = self.validate_prompts(img, points, box)
        emb, cached = self.embedding(img, z)
        pred = self._predictor()
        pred.features, pred.original_size, pred.input_size = (
            emb.features,
            emb.original_size,
            emb.input_size,
        )
        pred.is_image_set = True
        with self._model_lock:
            masks, scores, _ = pred.predict(
                point_coords=coords, point_labels=labels, box=b, multimask_output=multimask
            )
        return Prediction(masks.astype(bool), scores, cached, time.perf_counter() - t0)

    # ------------------------------------------------------------------ saving

    def output_path(self, name: str, img: LoadedImage) -> Path:
        """Validated destination directly inside the output folder."""
        name = safe_output_name(name)
        suf = image_suffix(name)
        allowed = (".png",) if not img.is_3d else (".nii.gz", ".nii", ".mha", ".nrrd")
        if suf not in allowed:
            raise UploadError(
                f"{name}: a {'3D' if img.is_3d else '2D'} mask is saved as " + " / ".join(allowed)
            )
        dest = self.output_dir / name
        if dest.is_symlink() or (dest.exists() and not dest.is_file()):
            raise AccessDenied(f"{name}: exists and is not a regular file; choose another name")
        if dest.resolve().parent != self.output_dir:
            raise AccessDenied(f"{name}: would be written outside the output folder")
        return dest

    def save(self, img: LoadedImage, masks: dict[int, np.ndarray], name: str | None) -> Path:
        """Write the mask with the input's geometry (PNG for 2D; volume format for 3D), atomically.

        Args:
            masks: slice index -> bool ``(H, W)``; slices not given are background.
        """
        from medsa.data.io import write_image

        dest = self.output_path(name or img.info()["save_name"], img)
        if img.is_3d:
            vol = np.zeros((img.depth, img.height, img.width), dtype=bool)
            for z, m in masks.items():
                vol[img.check_slice(z)] = m
            out = vol
        else:
            out = masks.get(0, np.zeros((img.height, img.width), dtype=bool))
        like = img.image
        if img.is_3d and like.array.ndim == 4:
            # The 4D header/affine of a multi-channel volume would describe 4 axes; keep the 3D
            # geometry only.
            from dataclasses import replace

            like = replace(like, array=like.array[0], header=None)
        write_image(out, dest, like=like)
        return dest

    def stats(self) -> dict[str, Any]:
        return {
            "encoder_calls": self.encoder_calls,
            "embedding_cache": len(self.embeddings),
            "embedding_hits": self.embeddings.hits,
            "embedding_misses": self.embeddings.misses,
        }


def _strip_path(message: str, path: Path) -> str:
    """Do not show server-side upload paths in messages sent to the browser."""
    return message.replace(str(path), "file").replace(path.name, "file")


# --------------------------------------------------------------------------------------------
# Mask transport: run-length encoding
# --------------------------------------------------------------------------------------------


def rle_encode(mask: np.ndarray) -> list[int]:
    """Row-major run lengths of a binary mask, starting with a (possibly empty) background run."""
    flat = np.asarray(mask, dtype=bool).ravel()
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0, *runs]
    return [int(r) for r in runs]


def rle_decode(runs: list[int], shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`rle_encode`; validates that the runs cover exactly ``shape``."""
    n = int(np.prod(shape))
    r = np.asarray(runs, dtype=np.int64)
    if r.ndim != 1 or (r < 0).any() or int(r.sum()) != n:
        raise PromptError(
            f"mask encoding does not match the image: run lengths must be >= 0 and sum to {n}"
        )
    values = np.zeros(r.size, dtype=bool)
    values[1::2] = True
    return np.repeat(values, r).reshape(shape)
