"""Everything the web app does that is not HTTP: images, embedding cache, inference, saving.

Thread model: FastAPI runs the (synchronous) endpoints in a thread pool, so every method here may be
called concurrently.

- Loaded images live in a small LRU (:class:`medsa.serve.images.ImageStore`); loading one file twice
  at the same time is coalesced ("single flight") so it is read once.
- Image embeddings are cached per ``(image id, slice)`` in :class:`EmbeddingCache`, also single
  flight: concurrent requests for a slice that is not cached yet wait for the one encoder pass.
- All model calls (encoder and decoder) hold one lock: CPU inference gains nothing from running two
  forward passes at once, and it keeps peak memory at one pass.

Other concerns live in their own modules: uploads and their caps (:mod:`.uploads`), decoded-size
limits and images (:mod:`.images`), the output folder and label maps (:mod:`.outputs`), mask
feedback tokens (:mod:`.feedback`), the mask codec (:mod:`.rle`).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsa.errors import DataError, MedsaError, PromptError

from .feedback import LogitStore
from .images import ImageLimits, ImageStore, LoadedImage, SingleFlightLRU
from .jobs import Job, JobManager
from .outputs import LabelledObject, OutputFolder, dicom_seg_name, label_map, sidecar_name
from .paths import AccessDenied, NotFound, RootSet, image_suffix
from .propagation import (
    PropagationOutput,
    PropagatorCache,
    cached_features,
    check_keys,
    run_propagation,
)
from .uploads import UploadError, UploadStore

if TYPE_CHECKING:
    import torch

    from medsa.sam.sam import Sam

__all__ = ["EmbeddingCache", "SegmentationService", "ServeConfig"]


@dataclass
class ServeConfig:
    """Settings of one server.

    Args:
        roots: folders whose images may be browsed and opened (nothing else is readable).
        output_dir: where masks are saved (created if missing); nothing is written elsewhere.
        upload_dir: where the private upload folder is created; ``None``: the system temp folder.
        max_upload_mb: largest accepted upload (file bytes).
        max_uploads: uploads kept at most; the oldest is deleted to make room.
        max_upload_total_mb: total size of the uploads kept at most.
        max_image_mpix: largest 2D image opened, in millions of pixels (decoded ``H * W``).
        max_volume_mvox: largest volume opened, in millions of voxels (decoded ``D * H * W``).
        max_request_mb: largest JSON request body.
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
    max_uploads: int = 8
    max_upload_total_mb: float = 2048.0
    max_image_mpix: float = 40.0
    max_volume_mvox: float = 256.0
    max_request_mb: float = 8.0
    embedding_cache: int = 64
    image_cache: int = 4
    max_points: int = 256
    runtime: str = "torch"
    onnx_dir: Path | None = None

    def __post_init__(self) -> None:
        self.roots = tuple(Path(r) for r in self.roots)
        self.output_dir = Path(self.output_dir)
        for key in ("max_upload_mb", "max_upload_total_mb", "max_image_mpix", "max_volume_mvox",
                    "max_request_mb"):  # fmt: skip
            v = getattr(self, key)
            if not (isinstance(v, int | float) and np.isfinite(v) and v > 0):
                raise MedsaError(f"{key} must be a positive number, got {v!r}")
        if self.max_uploads < 1:
            raise MedsaError("max_uploads must be >= 1")
        if self.embedding_cache < 1 or self.image_cache < 1:
            raise MedsaError("embedding_cache and image_cache must be >= 1")

    @property
    def image_limits(self) -> ImageLimits:
        return ImageLimits(int(self.max_image_mpix * 1e6), int(self.max_volume_mvox * 1e6))


@dataclass
class Embedding:
    """Image embedding of one slice and the sizes needed to map prompts and masks."""

    features: torch.Tensor  # (1, C, h, w)
    original_size: tuple[int, int]
    input_size: tuple[int, int]


class EmbeddingCache(SingleFlightLRU[tuple[str, int], Embedding]):
    """LRU of :class:`Embedding` keyed by ``(image id, slice)``; see ``SingleFlightLRU``."""


@dataclass
class Prediction:
    masks: np.ndarray  # (M, H, W) bool
    scores: np.ndarray  # (M,)
    logits: np.ndarray  # (M, h, w) low-res logits
    cached: bool
    seconds: float
    used_mask_input: bool = False


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
        cfg = self.config
        self.roots = RootSet.from_paths(list(cfg.roots))
        self.images = ImageStore(cfg.image_cache, cfg.image_limits)
        self.embeddings = EmbeddingCache(cfg.embedding_cache)
        self.logits = LogitStore()
        self.model_lock = threading.Lock()
        self.outputs = OutputFolder(cfg.output_dir, self.roots)
        self.output_dir = self.outputs.folder
        self.uploads = UploadStore(
            cfg.upload_dir, cfg.max_uploads, int(cfg.max_upload_total_mb * 2**20)
        )
        self.upload_dir = self.uploads.folder
        self.jobs = JobManager()
        self.propagators = PropagatorCache(self.model)
        self._onnx = None
        if cfg.runtime != "torch":  # load (or export) the ONNX graphs once, up front
            from medsa.export.runtime import make_predictor

            self._onnx = make_predictor(self.model, cfg.runtime, onnx_dir=cfg.onnx_dir).sessions

    def _predictor(self) -> Any:
        """A cache-less predictor on the configured runtime (sessions shared)."""
        if self._onnx is None:
            from medsa.sam.predictor import SamPredictor

            return SamPredictor(self.model, cache_size=0)
        from medsa.export.runtime import OnnxPredictor

        return OnnxPredictor(self.model, self._onnx, cache_size=0)

    def close(self) -> None:
        """Stop background jobs, free propagators, remove the private upload folder."""
        self.jobs.close()
        self.propagators.close()
        self.uploads.close()

    def public_message(self, message: str) -> str:
        """``message`` without absolute server paths (roots, output and upload folders)."""
        subs = [(str(r), r.name or "root") for r in self.roots.roots]
        subs += [(str(self.output_dir), "<output>"), (str(self.upload_dir), "<upload>")]
        for path, shown in sorted(subs, key=lambda s: -len(s[0])):
            message = message.replace(path, shown)
        return message

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
            img = self.images.get(image_id)
        except DataError as e:
            self.images.forget(data_path)
            self.uploads.discard(data_path)
            raise UploadError(
                f"{filename}: not a readable image ({_strip_path(str(e), data_path, filename)})"
            ) from None
        for old in self.uploads.keep(data_path):
            self.images.forget(old)
        return img

    def new_upload_path(self, filename: str) -> Path:
        """A fresh file path in the upload folder for ``filename`` (validated extension)."""
        return self.uploads.new_path(filename)

    # ------------------------------------------------------------------ inference

    def embedding(self, img: LoadedImage, z: int) -> tuple[Embedding, bool]:
        img.check_slice(z)
        return self.embeddings.get((img.id, z), lambda: self._embed(img.model_input(z)))

    def _embed(self, array: np.ndarray) -> Embedding:
        pred = self._predictor()
        with self.model_lock:
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

    def predictor_for(self, emb: Embedding) -> Any:
        """A predictor (configured runtime) whose image is ``emb`` (no encoder pass)."""
        pred = self._predictor()
        pred.features, pred.original_size, pred.input_size = (
            emb.features,
            emb.original_size,
            emb.input_size,
        )
        pred.is_image_set = True
        return pred

    def predict(
        self,
        img: LoadedImage,
        z: int,
        points: list[tuple[float, float, int]],
        box: list[float] | None,
        multimask: bool,
        mask_input: str | None = None,
    ) -> Prediction:
        """Masks ``(M, H, W)`` for the prompts on slice ``z`` (M = 3 with ``multimask``, else 1).

        Args:
            mask_input: token of an earlier prediction's mask (:class:`LogitStore`) on this slice;
                its low-res logits go to the decoder as ``mask_input`` (SAM's interactive loop).
                An evicted token is ignored (``used_mask_input`` is then False).
        """
        t0 = time.perf_counter()
        img.check_slice(z)
        coords, labels, b = self.validate_prompts(img, points, box)
        prev = None
        if mask_input is not None:
            prev = self.logits.get(mask_input, img.id, z)
        emb, cached = self.embedding(img, z)
        pred = self.predictor_for(emb)
        with self.model_lock:
            masks, scores, low_res = pred.predict(
                point_coords=coords,
                point_labels=labels,
                box=b,
                mask_input=prev,
                multimask_output=multimask,
            )
        return Prediction(
            masks.astype(bool), scores, low_res, cached, time.perf_counter() - t0, prev is not None
        )

    def propagate(self, img: LoadedImage, keys: dict[int, np.ndarray], direction: str) -> Job:
        """Queue the propagation of one object from its key-slice masks; returns the job."""
        check_keys(img, keys, direction)

        def work(job: Job) -> PropagationOutput:
            prop = self.propagators.get(img)
            feats = cached_features(prop)
            if feats is not None:  # slices already encoded for clicks are not encoded again
                for z in range(img.depth):
                    e = self.embeddings.peek((img.id, z))
                    if e is not None and z not in feats:
                        feats[z], prop._input_size = e.features, e.input_size
            out = run_propagation(prop, keys, direction, job)
            if feats is not None:  # the propagated slices are ready for correcting clicks
                size = (img.height, img.width)
                for z in out.masks:
                    f = feats.get(z)
                    if hasattr(f, "shape") and (img.id, z) not in self.embeddings:
                        self.embeddings.put((img.id, z), Embedding(f, size, prop._input_size))
            return out

        return self.jobs.submit("propagate", img.id, work, self.public_message)

    # ------------------------------------------------------------------ saving

    def save(
        self,
        img: LoadedImage,
        objects: list[LabelledObject],
        name: str | None,
        overwrite: bool = False,
        dicom_seg: bool = False,
    ) -> tuple[Path, Path, Path | None]:
        """Write the label map (input geometry; PNG for 2D) and its JSON sidecar, atomically;
        with ``dicom_seg`` (DICOM inputs only) also ``<name>_seg.dcm`` referencing the source
        series, its segments named after the objects.

        Returns:
            ``(label map path, sidecar path, DICOM-SEG path or None)``.

        Raises:
            MedsaError: ``dicom_seg`` for an image that was not read from DICOM (HTTP 400).
        """
        from dataclasses import replace

        from medsa.data.io import write_image

        if dicom_seg and (img.image.format != "dicom" or img.path is None):
            raise MedsaError(
                f"{img.name}: a DICOM-SEG can only be saved for a DICOM image (this one is "
                f"{img.image.format}); save without DICOM-SEG"
            )
        dest = self.outputs.destination(name or img.info()["save_name"], img, overwrite)
        out = label_map(img, objects)
        self.outputs.check(sidecar_name(dest.name), img, overwrite)  # refuse before writing
        seg = None
        if dicom_seg:
            from medsa.data.dicom_seg import write_dicom_seg

            seg = self.outputs.check(dicom_seg_name(dest.name), img, overwrite)
            # written first: it is the step that can fail on the source's attributes (highdicom
            # validates them), and then nothing has been written
            try:
                write_dicom_seg(out, img.path, {o.label: o.name for o in objects}, seg)
            except DataError as e:  # no server paths in messages sent to the browser
                msg = str(e).replace(str(seg), seg.name).replace(str(img.path), img.name)
                raise DataError(msg) from None
            self.outputs.written(seg)
        like = img.image
        if img.is_3d and like.array.ndim == 4:
            # The 4D header/affine of a multi-channel volume would describe 4 axes; keep the 3D
            # geometry only.
            like = replace(like, array=like.array[0], header=None)
        write_image(out, dest, like=like)
        self.outputs.written(dest)
        sidecar = self.outputs.write_sidecar(dest, img, objects, overwrite)
        return dest, sidecar, seg

    def stats(self) -> dict[str, Any]:
        return {
            "encoder_calls": self.encoder_calls,
            "embedding_cache": len(self.embeddings),
            "embedding_hits": self.embeddings.hits,
            "embedding_misses": self.embeddings.misses,
            "uploads_kept": self.uploads.count,
            "upload_bytes": self.uploads.total_bytes,
        }


def _strip_path(message: str, path: Path, filename: str) -> str:
    """Do not show server-side upload paths in messages sent to the browser."""
    return message.replace(str(path), filename).replace(path.name, filename)
