"""The napari widget's segmentation state, without Qt: model, embedding cache, prompts, labels.

napari gives prompts in layer *data* coordinates: a point is ``(z, row, col)`` (``(row, col)`` in
2D), a rectangle is 4 vertices of that kind. SAM wants ``(x, y) = (col, row)`` and boxes
``(x0, y0, x1, y1)``: :func:`prompts_by_slice` converts (the one place that does), groups the
prompts by slice and object, and clips them to the image.

Volumes use :class:`medsa.engine.propagate.VolumePropagator`: each slice's embedding is computed
once (batched when the whole volume is encoded up front) and cached, so every later click on that
slice costs only the mask decoder. 2D images keep the predictor's own ``set_image`` cache.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from medsa.data.prompts import Prompt
from medsa.errors import PromptError

__all__ = ["Segmenter", "prompts_by_slice", "paint", "apply_propagation"]

Progress = Callable[[int, int], Any] | None


def prompts_by_slice(
    points: np.ndarray,
    positive: Sequence[bool],
    point_objects: Sequence[int],
    boxes: Sequence[np.ndarray],
    box_objects: Sequence[int],
    shape: tuple[int, ...],
    obj: int,
) -> dict[int, Prompt]:
    """The prompts of object ``obj`` per slice: ``{z: Prompt}`` (2D images: ``{0: Prompt}``).

    Args:
        points: ``(N, ndim)`` napari data coordinates (``ndim`` = 3 for volumes, 2 for images;
            extra leading axes, e.g. a channel slider, are ignored).
        positive: ``(N,)`` True = foreground click, False = background click.
        point_objects: ``(N,)`` object (label) of each point.
        boxes: rectangles, each ``(4, ndim)`` vertices; the LAST box of a slice is used (SAM takes
            one box; drawing a new one corrects the old).
        box_objects: object of each box.
        shape: spatial shape ``(D, H, W)`` or ``(H, W)``.
        obj: the object to collect.
    """
    is_3d = len(shape) == 3
    h, w = shape[-2:]
    pts: dict[int, list[tuple[float, float, int]]] = {}
    for p, pos, o in zip(np.asarray(points, dtype=float), positive, point_objects, strict=True):
        if int(o) != obj:
            continue
        z = int(round(p[-3])) if is_3d else 0
        row, col = float(p[-2]), float(p[-1])
        if is_3d and not 0 <= z < shape[0]:
            continue
        if not (0 <= row <= h and 0 <= col <= w):
            continue  # a click outside the image is no prompt
        pts.setdefault(z, []).append((col, row, 1 if pos else 0))
    bxs: dict[int, np.ndarray] = {}
    for b, o in zip(boxes, box_objects, strict=True):
        if int(o) != obj:
            continue
        v = np.asarray(b, dtype=float)
        z = int(round(v[0, -3])) if is_3d else 0
        if is_3d and not 0 <= z < shape[0]:
            continue
        r0, r1 = np.clip([v[:, -2].min(), v[:, -2].max()], 0, h)
        c0, c1 = np.clip([v[:, -1].min(), v[:, -1].max()], 0, w)
        if r1 - r0 < 1 or c1 - c0 < 1:
            continue  # a click-sized rectangle is no box
        bxs[z] = np.array([c0, r0, c1, r1], np.float32)
    out: dict[int, Prompt] = {}
    for z in sorted(set(pts) | set(bxs)):
        p = pts.get(z, [])
        out[z] = Prompt(
            points=np.array([q[:2] for q in p], np.float32).reshape(-1, 2),
            labels=np.array([q[2] for q in p], np.int64),
            box=bxs.get(z),
        )
    return out


def paint(labels: np.ndarray, mask: np.ndarray, obj: int) -> None:
    """Replace object ``obj`` in ``labels`` (same shape as ``mask``) by ``mask``, in place.

    Pixels of OTHER objects are kept: a new mask never eats an object already drawn.
    """
    labels[labels == obj] = 0
    labels[np.asarray(mask, bool) & (labels == 0)] = obj


def apply_propagation(labels: np.ndarray, masks: np.ndarray, obj: int) -> None:
    """Write a propagated object ``masks (D, H, W)`` into the label volume (see :func:`paint`)."""
    paint(labels, masks, obj)


class Segmenter:
    """Interactive SAM on one image or volume.

    Args:
        model: a :class:`medsa.sam.Sam` (or ``SamPredictor``).
        image: the raw layer data: 2D ``(H, W)`` / ``(H, W, C)``; 3D ``(D, H, W)`` / ``(C, D, H, W)``.
        spatial_ndim: 2 or 3.
        intensity: as :func:`medsa.engine.inference.model_input` (one window per volume).
        depth: SD-Trans / MA-SAM chunk depth, None for 2D encoders.
        batch_size: slices per encoder forward when encoding a volume.
    """

    def __init__(
        self,
        model: Any,
        image: np.ndarray,
        spatial_ndim: int,
        intensity: str = "auto",
        depth: int | None = None,
        batch_size: int = 4,
    ) -> None:
        from medsa.engine.inference import as_predictor, model_input

        self.is_3d = spatial_ndim == 3
        arr = np.asarray(image)
        if self.is_3d:
            from medsa.engine.propagate import VolumePropagator

            self.prop = VolumePropagator(
                model, arr, intensity=intensity, depth=depth, batch_size=batch_size
            )
            self.shape: tuple[int, ...] = tuple(self.prop.shape)
            self.predictor = self.prop.predictor
        else:
            self.prop = None
            self.predictor = as_predictor(model)
            self._x = model_input(arr, False, intensity)  # (H, W, 3) in [0, 255]
            self.shape = tuple(int(s) for s in self._x.shape[:2])
            self._set = False

    def is_embedded(self, z: int) -> bool:
        """True if slice ``z``'s embedding is cached (a click there is decoder-only)."""
        if self.prop is not None:
            return int(z) in self.prop.embedded
        return self._set

    def embed(self, zs: Iterable[int] | None = None, progress: Progress = None) -> None:
        """Encode slices ``zs`` (all slices if None) and cache them; ``progress(done, total)``."""
        if self.prop is not None:
            zs = range(self.shape[0]) if zs is None else zs
            self.prop.embed(list(zs), progress=progress)
            return
        if not self._set:
            self.predictor.set_image(self._x)
            self._set = True
        if progress is not None:
            progress(1, 1)

    def segment(self, z: int, prompt: Prompt) -> tuple[np.ndarray, float]:
        """Decode ``prompt`` on slice ``z`` (0 for 2D): ``(mask (H, W) bool, predicted IoU)``."""
        from medsa.engine.inference import _decode_one

        if prompt.empty:
            raise PromptError("empty prompt: click a point or draw a box")
        if self.prop is not None:
            r = self.prop.segment_slice(int(z), prompt)
            return r.mask, float(r.score)
        prompt.validate(self.shape)
        self.embed()
        mask, score, _ = _decode_one(self.predictor, prompt)
        return mask, score

    def propagate(
        self,
        keys: Mapping[int, Prompt | np.ndarray],
        progress: Progress = None,
        **kwargs: Any,
    ) -> Any:
        """Propagate one object from its key slices (volumes only); see ``VolumePropagator``."""
        if self.prop is None:
            raise PromptError("propagation needs a volume; this image is 2D")
        return self.prop.propagate(keys, progress=progress, **kwargs)

    def close(self) -> None:
        """Free the cached embeddings."""
        if self.prop is not None:
            self.prop.close()
