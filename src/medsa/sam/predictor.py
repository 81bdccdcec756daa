"""Interactive prediction on one image: compute the embedding once, decode many prompts.

Embeddings are kept in a small LRU cache keyed by a hash of the image bytes, so switching back to a
recently seen image (web app, slice browsing) costs no encoder pass. Call :meth:`clear_cache` after
changing the model's weights.

Batched encoding: :meth:`SamPredictor.embed_batch` encodes several images in one image-encoder
forward pass and puts them in the cache; :meth:`SamPredictor.expect` announces the images that
will be set next, so that the first cache miss among them encodes it together with the following
``batch_size - 1`` expected ones (evaluation and volume loops use it without changing their
``set_image`` calls). Results are the same as one image at a time (the encoder is per-sample).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from medsa.errors import DataError, MedsaError, PromptError

from .sam import Sam
from .transforms import transform_for

__all__ = ["SamPredictor", "image_to_rgb"]

_VALID_LABELS = (-1, 0, 1, 2, 3)


def image_to_rgb(image: np.ndarray) -> np.ndarray:
    """Bring an image to ``(H, W, 3)`` in the ``[0, 255]`` range SAM expects.

    ``(H, W)`` / ``(H, W, 1)`` grayscale is replicated to 3 channels, RGBA drops alpha. ``uint8``
    is returned unchanged. Other types become ``float32``: values in ``[0, 1]`` are scaled by 255,
    values in ``[0, 255]`` are kept, anything else (CT, 16-bit) is min-max rescaled to ``[0, 255]``.
    """
    if not isinstance(image, np.ndarray):
        raise DataError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[-1] not in (3, 4):
        raise DataError(
            f"image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {image.shape}"
        )
    if image.shape[-1] == 4:
        image = image[..., :3]
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise DataError(f"image is empty: shape {image.shape}")
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise DataError(f"unsupported image dtype {image.dtype}")
    img = image.astype(np.float32)
    if not np.isfinite(img).all():
        raise DataError("image contains NaN or infinite values")
    lo, hi = float(img.min()), float(img.max())
    if lo >= 0.0 and hi <= 1.0:
        return img * 255.0
    if lo >= 0.0 and hi <= 255.0:
        return img
    return (img - lo) * (255.0 / max(hi - lo, 1e-8))


@dataclass
class _Entry:
    features: torch.Tensor
    original_size: tuple[int, int]
    input_size: tuple[int, int]


class SamPredictor:
    """Predict masks for one image at a time from point / box / mask prompts.

    Args:
        model: a :class:`~medsa.sam.sam.Sam` (any variant; LiteMedSAM's stretch resize and
            normalisation are taken from the model).
        cache_size: number of image embeddings kept (LRU); 0 disables caching.
    """

    def __init__(self, model: Sam, cache_size: int = 8) -> None:
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self.model = model
        self.transform = transform_for(model)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._pe: tuple[tuple, torch.Tensor] | None = None
        self.cache_hits = 0
        self.cache_misses = 0
        #: announced upcoming images (:meth:`expect`): cache key -> image, in order
        self._expected: OrderedDict[str, np.ndarray] = OrderedDict()
        self._batch_size = 1
        self.reset_image()

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def _dtype(self) -> torch.dtype:
        """Floating dtype of the model weights (images and mask inputs are cast to it)."""
        return next(self.model.image_encoder.parameters()).dtype

    def reset_image(self) -> None:
        """Forget the current image (the cache is kept)."""
        self.is_image_set = False
        self.features: torch.Tensor | None = None
        self.original_size: tuple[int, int] | None = None
        self.input_size: tuple[int, int] | None = None

    def clear_cache(self) -> None:
        """Drop all cached embeddings (needed after the model weights change)."""
        self._cache.clear()
        self._pe = None

    @staticmethod
    def _image_key(image: np.ndarray) -> str:
        h = hashlib.blake2b(digest_size=20)
        h.update(f"{image.shape}|{image.dtype}".encode())
        h.update(np.ascontiguousarray(image).tobytes())
        return h.hexdigest()

    def set_image(self, image: np.ndarray, image_format: str = "RGB") -> None:
        """Compute (or fetch from the cache) the embedding of ``image``.

        Args:
            image: ``(H, W)`` or ``(H, W, 3)`` (``1``/``4`` channels also accepted), ``uint8`` or
                float; see :func:`image_to_rgb` for the intensity handling.
            image_format: ``"RGB"`` or ``"BGR"``.
        """
        if image_format not in ("RGB", "BGR"):
            raise MedsaError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        key = self._image_key(image) + image_format if isinstance(image, np.ndarray) else ""
        if key and key not in self._cache and key in self._expected:
            self._embed_expected(key, image_format)
        if key and key in self._cache:
            self._cache.move_to_end(key)
            self.cache_hits += 1
            self._use(self._cache[key])
            return
        tensor, size = self._to_input(image, image_format)
        self.set_torch_image(tensor, size)
        self.cache_misses += 1
        if self.cache_size > 0:
            assert self.features is not None and self.input_size is not None
            self._cache[key] = _Entry(self.features, self.original_size, self.input_size)  # type: ignore[arg-type]
        while len(self._cache) > self.cache_size:  # also drops what embed_batch kept beyond it
            self._cache.popitem(last=False)

    def _to_input(
        self, image: np.ndarray, image_format: str
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """``image`` -> resized ``(1, 3, h, w)`` float tensor in ``[0, 255]`` and its ``(H, W)``."""
        rgb = image_to_rgb(image)
        if image_format != self.model.image_format:
            rgb = rgb[..., ::-1]
        resized = self.transform.apply_image(np.ascontiguousarray(rgb))
        tensor = torch.as_tensor(resized, device=self.device).permute(2, 0, 1)[None].float()
        return tensor, (int(rgb.shape[0]), int(rgb.shape[1]))

    @torch.no_grad()
    def embed_batch(self, images: list[np.ndarray], image_format: str = "RGB") -> int:
        """Encode ``images`` (each as for :meth:`set_image`) in one encoder pass into the cache.

        Images already cached are skipped; a later ``set_image`` of any of them is a cache hit.
        The cache keeps at least ``len(images)`` entries until the next miss. Sizes may differ
        (SAM pads every image to the same square input). Returns the number of images encoded.
        """
        if image_format not in ("RGB", "BGR"):
            raise MedsaError(f"image_format must be 'RGB' or 'BGR', got {image_format!r}")
        todo: dict[str, np.ndarray] = {}
        for im in images:
            if not isinstance(im, np.ndarray):
                raise DataError(f"image must be a numpy array, got {type(im).__name__}")
            key = self._image_key(im) + image_format
            if key not in self._cache:
                todo.setdefault(key, im)
        if not todo:
            return 0
        inputs = [self._to_input(im, image_format) for im in todo.values()]
        x = torch.cat([self.model.preprocess(t.to(self.device, torch.float32)) for t, _ in inputs])
        feats = self._encode(x)
        for (key, (t, size)), f in zip(zip(todo, inputs, strict=True), feats, strict=True):
            entry = _Entry(
                f[None].contiguous(memory_format=torch.channels_last),
                size,
                (int(t.shape[-2]), int(t.shape[-1])),
            )
            self._cache[key] = entry
            self._expected.pop(key, None)
        self.cache_misses += len(todo)
        while len(self._cache) > max(self.cache_size, len(todo)):
            self._cache.popitem(last=False)
        return len(todo)

    def expect(
        self, images: list[np.ndarray], batch_size: int = 4, image_format: str = "RGB"
    ) -> None:
        """Announce the images that will be ``set_image``-d next (replaces earlier announcements).

        The first ``set_image`` of an announced image that is not cached encodes it together with
        the next ``batch_size - 1`` announced, uncached images (:meth:`embed_batch`). Only
        references are kept; images that are never set cost nothing.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self._batch_size = int(batch_size)
        self._expected = OrderedDict((self._image_key(im) + image_format, im) for im in images)

    def _embed_expected(self, key: str, image_format: str) -> None:
        keys = list(self._expected)
        i = keys.index(key)
        batch = [k for k in keys[i:] if k not in self._cache][: self._batch_size]
        for k in keys[: i + 1]:  # passed over: not going to be set in this order any more
            if k not in batch:
                self._expected.pop(k, None)
        self.embed_batch([self._expected[k] for k in batch], image_format)

    def _use(self, entry: _Entry) -> None:
        self.features = entry.features
        self.original_size = entry.original_size
        self.input_size = entry.input_size
        self.is_image_set = True

    @torch.no_grad()
    def set_torch_image(
        self, transformed_image: torch.Tensor, original_image_size: tuple[int, ...]
    ) -> None:
        """Embed an already resized ``(1, 3, h, w)`` image in ``[0, 255]`` (not cached)."""
        s = self.model.img_size
        if (
            transformed_image.ndim != 4
            or transformed_image.shape[1] != 3
            or max(transformed_image.shape[2:]) != s
        ):
            raise DataError(
                f"set_torch_image expects (1, 3, h, w) with long side {s}, "
                f"got {tuple(transformed_image.shape)}"
            )
        self.reset_image()
        x = self.model.preprocess(transformed_image.to(self.device, torch.float32))
        features = self._encode(x)
        # stored channels-last: the decoder's (1, h*w, C) token view is then free on every click
        features = features.contiguous(memory_format=torch.channels_last)
        self._use(
            _Entry(
                features,
                (int(original_image_size[0]), int(original_image_size[1])),
                (int(transformed_image.shape[-2]), int(transformed_image.shape[-1])),
            )
        )

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image encoder on preprocessed images ``(B, 3, S, S)`` -> embeddings ``(B, C, h, w)``;
        the one place a runtime (e.g. ONNX Runtime, ``medsa.export.runtime``) replaces."""
        return self.model.image_encoder(x.to(self._dtype))

    def _dense_pe(self) -> torch.Tensor:
        """The prompt encoder's ``get_dense_pe()``, computed once per device and dtype.

        It depends only on a fixed buffer, not on the image or the prompt; :meth:`clear_cache`
        drops it together with the embeddings.
        """
        gaussian = self.model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        key = (self.device, self._dtype, id(gaussian), gaussian._version)
        if self._pe is None or self._pe[0] != key:
            self._pe = (key, self.model.prompt_encoder.get_dense_pe())
        return self._pe[1]

    def get_image_embedding(self) -> torch.Tensor:
        """Embedding of the current image, ``(1, C, h, w)``."""
        self._require_image()
        assert self.features is not None
        return self.features

    def _require_image(self) -> None:
        if not self.is_image_set:
            raise PromptError("no image set: call set_image(image) before predicting")

    # ---------------------------------------------------------------------------------------
    # Prompt validation
    # ---------------------------------------------------------------------------------------

    def _check_xy(self, xy: np.ndarray, what: str) -> None:
        if not np.isfinite(xy).all():
            raise PromptError(f"{what} contain NaN or infinite values: {xy.tolist()}")
        h, w = self.original_size  # type: ignore[misc]
        outside = (xy[..., 0] < 0) | (xy[..., 0] > w) | (xy[..., 1] < 0) | (xy[..., 1] > h)
        if outside.any():
            bad = xy.reshape(-1, 2)[outside.reshape(-1)].tolist()
            raise PromptError(
                f"{what} outside the image: {bad}; coordinates are (x, y) pixels with "
                f"0 <= x <= {w} (width) and 0 <= y <= {h} (height)"
            )

    def _validate(
        self,
        point_coords: np.ndarray | None,
        point_labels: np.ndarray | None,
        box: np.ndarray | None,
        mask_input: np.ndarray | None,
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        coords = labels = b = m = None
        if point_coords is not None or point_labels is not None:
            if point_coords is None or point_labels is None:
                raise PromptError("point_coords and point_labels must be given together")
            coords = np.asarray(point_coords, dtype=np.float64)
            labels = np.asarray(point_labels)
            if coords.ndim != 2 or coords.shape[1] != 2 or coords.shape[0] == 0:
                raise PromptError(
                    f"point_coords must have shape (N, 2) as (x, y), got {coords.shape}"
                )
            if labels.shape != (coords.shape[0],):
                raise PromptError(
                    f"point_labels must have shape (N,) = ({coords.shape[0]},) to match "
                    f"point_coords {coords.shape}, got {labels.shape}"
                )
            if not np.isin(labels, _VALID_LABELS).all():
                raise PromptError(
                    f"point_labels must be 1 (foreground) or 0 (background), got {labels.tolist()}"
                )
            self._check_xy(coords, "points")
        if box is not None:
            b = np.asarray(box, dtype=np.float64)
            if b.shape not in ((4,), (1, 4)):
                raise PromptError(f"box must have shape (4,) as (x0, y0, x1, y1), got {b.shape}")
            b = b.reshape(4)
            self._check_xy(b.reshape(2, 2), "box corners")
            if b[2] < b[0] or b[3] < b[1]:
                raise PromptError(
                    f"box must be (x0, y0, x1, y1) with x0 <= x1, y0 <= y1: {b.tolist()}"
                )
        if mask_input is not None:
            m = np.asarray(mask_input, dtype=np.float32)
            hw = self.model.mask_input_size
            if m.shape == hw:
                m = m[None]
            if m.shape != (1, *hw):
                raise PromptError(
                    f"mask_input must have shape (1, {hw[0]}, {hw[1]}), got {m.shape}"
                )
            if not np.isfinite(m).all():
                raise PromptError("mask_input contains NaN or infinite values")
        return coords, labels, b, m

    # ---------------------------------------------------------------------------------------
    # Prediction
    # ---------------------------------------------------------------------------------------

    def predict(
        self,
        point_coords: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
        mask_input: np.ndarray | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predict masks for one prompt set on the current image.

        Args:
            point_coords: ``(N, 2)`` ``(x, y)`` in original-image pixels.
            point_labels: ``(N,)``, 1 foreground / 0 background.
            box: ``(4,)`` ``(x0, y0, x1, y1)`` in original-image pixels.
            mask_input: ``(1, 4h, 4w)`` low-res logits from a previous call (256x256 for SAM).
            multimask_output: 3 candidate masks (ambiguous prompts) instead of 1.
            return_logits: return float logits instead of boolean masks.
        Returns:
            masks ``(M, H, W)`` (bool, or float logits), scores ``(M,)`` (predicted IoU) and
            low-res logits ``(M, 4h, 4w)``.
        """
        self._require_image()
        coords, labels, b, m = self._validate(point_coords, point_labels, box, mask_input)
        dev = self.device
        coords_t = labels_t = box_t = mask_t = None
        if coords is not None:
            coords = self.transform.apply_coords(coords, self.original_size)  # type: ignore[arg-type]
            coords_t = torch.as_tensor(coords, dtype=torch.float, device=dev)[None]
            labels_t = torch.as_tensor(labels, dtype=torch.int, device=dev)[None]
        if b is not None:
            b = self.transform.apply_boxes(b, self.original_size)  # type: ignore[arg-type]
            box_t = torch.as_tensor(b, dtype=torch.float, device=dev)
        if m is not None:
            mask_t = torch.as_tensor(m, dtype=self._dtype, device=dev)[None]
        masks, scores, low_res = self.predict_torch(
            coords_t, labels_t, box_t, mask_t, multimask_output, return_logits=return_logits
        )
        if return_logits:
            masks = masks.float()
        return (
            masks[0].detach().cpu().numpy(),
            scores[0].detach().float().cpu().numpy(),
            low_res[0].detach().float().cpu().numpy(),
        )

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Batched prediction of ``B`` prompt sets on the current image embedding.

        Prompts are already in the *input* frame (use ``self.transform.apply_coords_torch`` /
        ``apply_boxes_torch``): ``point_coords (B, N, 2)``, ``point_labels (B, N)``,
        ``boxes (B, 4)``, ``mask_input (B, 1, 4h, 4w)``.

        Returns:
            masks ``(B, M, H, W)`` (bool or logits), IoU predictions ``(B, M)``, low-res logits
            ``(B, M, 4h, 4w)``.
        """
        self._require_image()
        batch = {
            name: t.shape[0]
            for name, t in (
                ("point_coords", point_coords),
                ("boxes", boxes),
                ("mask_input", mask_input),
            )
            if t is not None
        }
        if len(set(batch.values())) > 1:
            raise PromptError(f"prompt batch sizes differ: {batch}")
        points = None
        if point_coords is not None:
            if point_labels is None:
                raise PromptError("point_labels are required with point_coords")
            if point_coords.ndim != 3 or point_coords.shape[-1] != 2:
                raise PromptError(
                    f"point_coords must be (B, N, 2), got {tuple(point_coords.shape)}"
                )
            if point_labels.shape != point_coords.shape[:2]:
                raise PromptError(
                    f"point_labels must be (B, N) = {tuple(point_coords.shape[:2])}, "
                    f"got {tuple(point_labels.shape)}"
                )
            points = (point_coords, point_labels)
        if boxes is not None and (boxes.ndim != 2 or boxes.shape[-1] != 4):
            raise PromptError(f"boxes must be (B, 4), got {tuple(boxes.shape)}")
        assert self.features is not None
        sparse, dense = self.model.prompt_encoder(points=points, boxes=boxes, masks=mask_input)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=self.features,
            image_pe=self._dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
        masks = self.model.postprocess_masks(low_res, self.input_size, self.original_size)  # type: ignore[arg-type]
        if not return_logits:
            masks = masks > self.model.mask_threshold
        return masks, iou, low_res
