"""Propagate one object through an opened volume (``medsa.engine.propagate.VolumePropagator``).

The page sends the object's key slices as masks (what the user sees after clicks / boxes: taken
verbatim, as the propagation API does for mask keys). The volume given to the propagator is the
stack of the exact uint8 slices the clicks use (:meth:`LoadedImage.model_input`, the volume's
0.5-99.5 percentile window), with ``intensity="none"``, so clicks and propagation see the same
image. One propagator per image is kept (:class:`PropagatorCache`): its embeddings are cached per
slice, so a second object, or a correction that re-propagates, encodes nothing again.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medsa.errors import PromptError

if TYPE_CHECKING:
    from .images import LoadedImage
    from .jobs import Job

__all__ = ["PropagationOutput", "PropagatorCache", "check_keys", "run_propagation"]


@dataclass
class PropagationOutput:
    masks: dict[int, np.ndarray]  # slice -> (H, W) bool, non-empty slices only
    scores: dict[int, float]  # slice -> predicted IoU (key slices: nan)
    z_range: tuple[int, int] | None


def check_keys(img: LoadedImage, keys: dict[int, np.ndarray], direction: str) -> None:
    """Refuse what cannot be propagated, before a job is queued.

    Raises:
        PromptError: a 2D image, no key slice, or an empty key mask.
    """
    if not img.is_3d or img.depth < 2:
        raise PromptError("propagation needs a volume with several slices")
    if direction not in ("both", "up", "down"):
        raise PromptError(f"direction must be both, up or down, got {direction!r}")
    if not keys:
        raise PromptError("give at least one key slice with a mask")
    for z, m in keys.items():
        if not m.any():
            raise PromptError(f"the mask on slice {z} is empty: segment the object there first")


class PropagatorCache:
    """The ``VolumePropagator`` of the last ``capacity`` volumes (their embeddings stay cached)."""

    def __init__(self, model: Any, capacity: int = 1, batch_size: int = 4) -> None:
        self.model = model
        self.capacity = capacity
        self.batch_size = batch_size
        self._props: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, img: LoadedImage) -> Any:
        from medsa.engine.propagate import VolumePropagator

        with self._lock:
            prop = self._props.get(img.id)
            if prop is not None:
                self._props.move_to_end(img.id)
                return prop
        volume = np.stack([img.model_input(z) for z in range(img.depth)])  # (D, H, W[, 3]) uint8
        if volume.ndim == 4:  # colour volume: the propagator takes (C, D, H, W)
            volume = np.moveaxis(volume, -1, 0)
        prop = VolumePropagator(self.model, volume, intensity="none", batch_size=self.batch_size)
        with self._lock:
            self._props[img.id] = prop
            while len(self._props) > self.capacity:
                _, old = self._props.popitem(last=False)
                _close(old)
        return prop

    def close(self) -> None:
        with self._lock:
            props = list(self._props.values())
            self._props.clear()
        for p in props:
            _close(p)


def _close(prop: Any) -> None:
    close = getattr(prop, "close", None)
    if close is not None:
        close()


def cached_features(prop: Any) -> dict[int, Any] | None:
    """The propagator's per-slice embedding cache (``{z: (1, C, h, w) tensor}``), if it has one.

    Used to share embeddings both ways with the server's per-``(image, slice)`` cache: slices a
    click already encoded are not encoded again by propagation, and the propagated slices are
    ready for correcting clicks.
    """
    feats = getattr(prop, "_features", None)
    return feats if isinstance(feats, dict) and hasattr(prop, "_input_size") else None


def run_propagation(
    prop: Any,
    keys: dict[int, np.ndarray],
    direction: str,
    job: Job,
) -> PropagationOutput:
    """Propagate the object given by ``keys`` with ``prop`` (in the job's worker thread)."""
    res = prop.propagate(dict(keys), direction=direction, progress=job.progress)
    masks = np.asarray(res.masks, dtype=bool)
    scores = np.asarray(res.scores, dtype=np.float64)
    out = {z: masks[z] for z in range(masks.shape[0]) if masks[z].any()}
    z_range = None if res.z_range is None else (int(res.z_range[0]), int(res.z_range[1]))
    return PropagationOutput(out, {z: float(scores[z]) for z in out}, z_range)
