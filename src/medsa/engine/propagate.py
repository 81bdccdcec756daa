"""Prompt on one or more key slices -> the object on every slice of a volume (issue #11).

Each next slice is prompted from the previous slice's result: the box of its mask (enlarged by
``box_margin``) and, with ``feed="box+mask"``, its low-resolution logits as ``mask_input``. The
object ends where a slice's mask is empty, smaller than ``min_area`` pixels, or its predicted IoU is
below ``min_score``; that slice and everything beyond it stay empty. See docs/propagation.md for the
choice of the default next-slice prompt (measured on ACDC).

Encoding is lazy and batched: when propagation reaches a slice that has no embedding yet, the next
``batch_size`` slices *in the propagation direction* (up to the end of the current run) are encoded
in one image-encoder forward pass and cached, so slices beyond the object's end are encoded at most
``batch_size - 1`` at a time, and a second ``propagate`` call (a correction, another object) costs
only the decoder. With ``depth`` (SD-Trans / MA-SAM 3D adapters) whole chunks of ``depth`` slices are
encoded together exactly as :class:`medsa.engine.inference.ChunkEncoder` (and the trainer) does.

Any ``SamPredictor``-like object with ``set_image`` / ``predict`` works (then slices are set one by
one, not batched); a :class:`medsa.sam.Sam` or a ``SamPredictor`` gets the batched encoder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medsa.data.prompts import Prompt
from medsa.errors import DataError, PromptError

__all__ = [
    "FEEDS",
    "SliceResult",
    "PropagationResult",
    "VolumePropagator",
    "propagate_volume",
    "propagate_objects",
    "object_keys",
    "next_prompt",
]

#: how the next slice is prompted from the previous result
FEEDS: tuple[str, ...] = ("box", "box+mask", "box+point", "mask")

Progress = Callable[[int, int], Any] | None


@dataclass
class SliceResult:
    """One decoded slice: ``mask (H, W)`` bool, predicted IoU ``score``, ``logits (1, h, w)``.

    ``logits`` are the low-resolution mask logits (``None`` for predictors that return none).
    """

    mask: np.ndarray
    score: float
    logits: np.ndarray | None = field(default=None, repr=False)


@dataclass
class PropagationResult:
    """One object propagated through a volume.

    Attributes:
        masks: ``(D, H, W)`` bool, False outside the propagated range.
        scores: ``(D,)`` float32 predicted IoU per slice; ``nan`` where not predicted (a mask key
            has score 1.0; the slice where the object was found to end keeps its score).
        z_range: ``(z_first, z_last)`` inclusive range of non-empty slices, ``None`` if all empty.
        keys: the key slice indices, sorted.
    """

    masks: np.ndarray
    scores: np.ndarray
    z_range: tuple[int, int] | None
    keys: tuple[int, ...] = ()


def _bbox(mask: np.ndarray) -> np.ndarray:
    """Tight ``(x0, y0, x1, y1)`` box (inclusive pixel indices, as ``prompts.tight_box``)."""
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def _inner_point(mask: np.ndarray) -> np.ndarray:
    """The foreground pixel farthest from the background ``(x, y)``: a safe positive click."""
    from scipy.ndimage import distance_transform_edt

    dist = distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([[x, y]], dtype=np.float32)


def next_prompt(prev: SliceResult, feed: str = "box", box_margin: float = 0.0) -> Prompt:
    """The prompt for the next slice from the previous slice's (non-empty) result.

    Args:
        feed: ``box`` (box of the mask), ``box+mask`` (plus its low-res logits as ``mask_input``),
            ``box+point`` (plus one positive point deep inside the mask), ``mask`` (logits only,
            with the inner point so that the decoder has a location).
        box_margin: enlarge the box by this fraction of its size on each side (at least 1 px when
            > 0), since the object may grow from one slice to the next. The box is clipped to the
            image.
    """
    if feed not in FEEDS:
        raise PromptError(f"unknown feed {feed!r}; choose from {', '.join(FEEDS)}")
    h, w = prev.mask.shape
    box = _bbox(prev.mask)
    if box_margin > 0:
        mx = max(1.0, box_margin * float(box[2] - box[0] + 1))
        my = max(1.0, box_margin * float(box[3] - box[1] + 1))
        box = box + np.array([-mx, -my, mx, my], np.float32)
        box = np.clip(box, 0, [w - 1, h - 1, w - 1, h - 1]).astype(np.float32)
    logits = prev.logits if feed in ("box+mask", "mask") else None
    if feed == "mask":
        if logits is None:  # a predictor without logits: fall back to the box
            return Prompt(box=box)
        return Prompt(points=_inner_point(prev.mask), mask_input=logits)
    if feed == "box+point":
        return Prompt(points=_inner_point(prev.mask), box=box)
    return Prompt(box=box, mask_input=logits)


class VolumePropagator:
    """Propagate objects through one volume; slice embeddings are computed lazily and cached.

    Args:
        predictor_or_model: a :class:`medsa.sam.Sam`, a ``SamPredictor``, or any object with
            ``set_image`` / ``predict`` (see :func:`medsa.engine.inference.as_predictor`).
        volume: ``(D, H, W)`` or ``(C, D, H, W)`` raw intensities (one intensity window per volume).
        intensity: see :func:`medsa.engine.inference.model_input`.
        depth: SD-Trans / MA-SAM chunk depth (chunks of ``depth`` slices encoded together); None: 2D.
        batch_size: slices per image-encoder forward pass (with ``depth``: ``batch_size // depth``
            chunks, at least one).
        model_ready: ``volume`` is already :func:`~medsa.engine.inference.model_input`'s
            ``(D, H, W, 3)`` output (``intensity`` is then ignored).
    """

    def __init__(
        self,
        predictor_or_model: Any,
        volume: np.ndarray,
        intensity: str = "auto",
        depth: int | None = None,
        batch_size: int = 8,
        model_ready: bool = False,
    ) -> None:
        from medsa.engine.inference import as_predictor, model_input

        vol = np.asarray(volume)
        if model_ready:  # already model_input's output (evaluate shares it with other protocols)
            if vol.ndim != 4 or vol.shape[-1] != 3:
                raise DataError(f"a model-ready volume is (D, H, W, 3), got shape {vol.shape}")
        elif vol.ndim not in (3, 4):
            raise DataError(f"expected a volume (D, H, W) or (C, D, H, W), got shape {vol.shape}")
        if batch_size < 1:
            raise PromptError(f"batch_size must be >= 1, got {batch_size}")
        if depth is not None and depth < 1:
            raise PromptError(f"depth must be >= 1, got {depth}")
        self.predictor = as_predictor(predictor_or_model)
        # (D, H, W, 3) in [0, 255]
        self.x = (
            vol.astype(np.float32, copy=False) if model_ready else model_input(vol, True, intensity)
        )
        self.shape: tuple[int, int, int] = tuple(int(v) for v in self.x.shape[:3])  # type: ignore[assignment]
        self.depth = None if depth is None else int(depth)
        self.batch_size = int(batch_size)
        p = self.predictor
        # the batched path needs SamPredictor's internals; anything else is driven by set_image
        self._batched = all(hasattr(p, a) for a in ("model", "transform", "features", "device"))
        if self.depth is not None and not self._batched:
            raise PromptError("depth= needs a medsa Sam model or SamPredictor")
        self._features: dict[int, Any] = {}
        self._input_size: tuple[int, int] = (0, 0)
        #: number of slices whose embedding was computed (encoder work done), for tests / benchmarks
        self.n_encoded = 0

    # ------------------------------------------------------------------ encoding

    def __enter__(self) -> VolumePropagator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Free the cached embeddings."""
        self._features.clear()
        if self._batched:
            self.predictor.reset_image()

    @property
    def embedded(self) -> frozenset[int]:
        """Slices whose embedding is cached."""
        return frozenset(self._features)

    def _check_z(self, z: int) -> int:
        d = self.shape[0]
        if not 0 <= int(z) < d:
            raise PromptError(f"slice index {z} is outside the volume's {d} slices (0..{d - 1})")
        return int(z)

    def embed(self, zs: Iterable[int], progress: Progress = None) -> None:
        """Encode slices ``zs`` (in the given order, ``batch_size`` per forward); cached ones are skipped.

        ``progress(done, total)`` is called after each forward pass (slices done / to do).
        """
        todo = list(dict.fromkeys(self._check_z(z) for z in zs if int(z) not in self._features))
        if not todo or not self._batched:
            # set_image-driven predictors encode when a slice is decoded (see activate)
            return
        if self.depth is None:
            batches = [todo[i : i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        else:
            chunks = list(dict.fromkeys(z // self.depth for z in todo))
            per = max(1, self.batch_size // self.depth)
            batches = [chunks[i : i + per] for i in range(0, len(chunks), per)]
        done = 0
        for b in batches:
            done += self._encode(b)
            if progress is not None:
                progress(min(done, len(todo)), len(todo))

    def _encode(self, batch: list[int]) -> int:
        """One encoder forward: slices ``batch`` (2D) or chunks ``batch`` (depth); returns #new."""
        import torch

        from medsa.data.preprocess import chunk_indices

        p = self.predictor
        model = p.model
        if self.depth is None:
            idx = np.asarray(batch)
        else:
            chunks = chunk_indices(self.shape[0], self.depth, pad="replicate")
            idx = np.concatenate([chunks[k] for k in batch])
        imgs = [p.transform.apply_image(np.ascontiguousarray(self.x[i])) for i in idx]
        t = torch.as_tensor(np.stack(imgs), device=p.device).permute(0, 3, 1, 2).float()
        self._input_size = (int(t.shape[-2]), int(t.shape[-1]))
        dtype = next(model.image_encoder.parameters()).dtype
        with torch.no_grad():
            x = model.preprocess(t).to(dtype)
            feats = (
                model.image_encoder(x)
                if self.depth is None
                else model.image_encoder(x, depth=self.depth)
            )
        feats = feats.contiguous(memory_format=torch.channels_last)  # as SamPredictor stores them
        new = 0
        for j, z in enumerate(idx.tolist()):
            if z not in self._features:  # replicated padding slices repeat the last one
                self._features[z] = feats[j : j + 1]
                new += 1
        self.n_encoded += new
        return new

    def activate(self, z: int) -> None:
        """Make slice ``z`` the predictor's current image (embedding from the cache, encoded if
        missing), e.g. to decode other prompts on it with the predictor directly."""
        z = self._check_z(z)
        p = self.predictor
        if not self._batched:
            p.set_image(self.x[z])  # no embedding to cache: the predictor keeps its own
            if z not in self._features:
                self._features[z] = True
                self.n_encoded += 1
        else:
            if z not in self._features:
                self.embed([z])
            if p.is_image_set and p.features is self._features[z]:
                return  # already current (others, e.g. "everything" mode, may set images)
            p.reset_image()
            p.features = self._features[z]
            p.original_size = (self.shape[1], self.shape[2])
            p.input_size = self._input_size
            p.is_image_set = True

    # ------------------------------------------------------------------ decoding

    def segment_slice(self, z: int, prompt: Prompt) -> SliceResult:
        """Decode ``prompt`` on slice ``z`` (encoding it if needed)."""
        from medsa.engine.inference import _decode_one

        z = self._check_z(z)
        if prompt.empty:
            raise PromptError(f"empty prompt on slice {z}: give a box, points or a mask")
        prompt.validate(self.shape[1:])
        self.activate(z)
        mask, score, logits = _decode_one(self.predictor, prompt)
        return SliceResult(mask, score, logits if logits.size else None)

    def mask_logits(self, mask: np.ndarray) -> np.ndarray | None:
        """Low-res logits ``(1, h, w)`` that stand for a given binary ``mask (H, W)`` (mask keys).

        The mask is brought into the model's padded input frame (same resize as the image) and
        down-sampled to the decoder's mask-input size; +-10 logits (a confident mask).
        """
        if not self._batched:
            return None
        import torch
        import torch.nn.functional as F

        p = self.predictor
        model = p.model
        th, tw = p.transform.target_size(self.shape[1:])
        m = torch.as_tensor(np.asarray(mask, np.float32))[None, None]
        m = F.interpolate(m, (th, tw), mode="bilinear", align_corners=False)
        m = F.pad(m, (0, model.img_size - tw, 0, model.img_size - th))
        m = F.interpolate(m, tuple(model.prompt_encoder.mask_input_size), mode="bilinear")
        return ((m[0] > 0.5).float() * 20.0 - 10.0).numpy()

    def propagate(
        self,
        keys: Mapping[int, Prompt | np.ndarray],
        direction: str = "both",
        progress: Progress = None,
        min_score: float = 0.5,
        min_area: int = 10,
        feed: str = "box",
        box_margin: float = 0.1,
    ) -> PropagationResult:
        """Propagate ONE object from its key slices through the volume.

        Args:
            keys: ``{z: Prompt | mask (H, W) bool}``. A prompt key is decoded; a mask key is taken
                verbatim (an EMPTY mask key marks "the object is absent here" and stops
                propagation at that slice). Several keys: each slice between two keys is
                predicted from the nearer key (``both``) or the key below (``up``) / above
                (``down``); beyond the outermost keys propagation goes on to the object's end.
                A correction = the same keys plus the corrected slice.
            direction: ``both`` | ``up`` (z increasing) | ``down``.
            progress: ``progress(done, total)`` after each slice, from the calling thread
                (``total`` = slices that may be visited; the last call is ``(total, total)``).
            min_score: a slice whose predicted IoU is below this ends the object.
            min_area: a slice whose mask has fewer pixels ends the object.
            feed, box_margin: the next-slice prompt, see :func:`next_prompt`. The defaults (the
                previous mask's box, 10 % larger on each side) gave the best volume Dice with
                LiteMedSAM on ACDC (docs/propagation.md).
        """
        if direction not in ("both", "up", "down"):
            raise PromptError(f"direction must be 'both', 'up' or 'down', got {direction!r}")
        if feed not in FEEDS:
            raise PromptError(f"unknown feed {feed!r}; choose from {', '.join(FEEDS)}")
        if not keys:
            raise PromptError("propagation needs at least one key slice")
        d, h, w = self.shape
        norm: dict[int, Prompt | np.ndarray] = {}
        for z, k in keys.items():
            z = self._check_z(z)
            if isinstance(k, Prompt):
                if k.empty:
                    raise PromptError(f"empty prompt on key slice {z}")
                k.validate((h, w))
            else:
                k = np.asarray(k).astype(bool)
                if k.shape != (h, w):
                    raise PromptError(
                        f"mask key on slice {z} has shape {k.shape}, the slices are {(h, w)}"
                    )
            norm[z] = k
        zs = sorted(norm)

        def absent(z: int) -> bool:  # an empty mask key: the object is not on this slice
            return not isinstance(norm[z], Prompt) and not norm[z].any()  # type: ignore[union-attr]

        # runs: (key, last, step) -- the slices after the key up to ``last`` (inclusive) are
        # predicted from that key; between two keys the nearer one wins (``both``), but an absent
        # key never propagates, so its neighbour runs up to it
        runs: list[tuple[int, int, int]] = []
        for i, z in enumerate(zs):
            if absent(z):
                continue
            lo = zs[i - 1] if i > 0 else None
            hi = zs[i + 1] if i + 1 < len(zs) else None
            if direction in ("both", "up"):
                if hi is None:
                    end = d - 1
                elif direction == "up" or absent(hi):
                    end = hi - 1
                else:
                    end = (z + hi) // 2
                if end > z:
                    runs.append((z, end, 1))
            if direction in ("both", "down"):
                if lo is None:
                    end = 0
                elif direction == "down" or absent(lo):
                    end = lo + 1
                else:
                    end = (lo + z) // 2 + 1
                if end < z:
                    runs.append((z, end, -1))
        total = len(zs) + sum(abs(e - z) for z, e, _ in runs)
        done = 0

        masks = np.zeros((d, h, w), dtype=bool)
        scores = np.full(d, np.nan, dtype=np.float32)
        key_res: dict[int, SliceResult] = {}
        for z in zs:
            k = norm[z]
            if isinstance(k, Prompt):
                # encode the key with the first batch of its first run, not in a forward of its own
                first = next(((e, s) for z0, e, s in runs if z0 == z), (z, 1))
                self.embed(self._ahead(z, first[1], z, first[0]))
                r = self.segment_slice(z, k)
            else:
                r = SliceResult(k, 1.0, self.mask_logits(k) if k.any() else None)
            key_res[z] = r
            masks[z], scores[z] = r.mask, r.score
            done += 1
            if progress is not None:
                progress(done, total)
        for z0, end, step in runs:
            prev = key_res[z0]
            z = z0 + step
            stopped = not prev.mask.any()
            while (z <= end) if step > 0 else (z >= end):
                if not stopped:
                    if z not in self._features:
                        self.embed(self._ahead(z, step, z, end))
                    r = self.segment_slice(z, next_prompt(prev, feed, box_margin))
                    scores[z] = r.score
                    if r.mask.sum() < max(int(min_area), 1) or r.score < min_score:
                        stopped = True
                    else:
                        masks[z] = r.mask
                        prev = r
                done += 1
                if progress is not None:
                    progress(done, total)
                if stopped:
                    done += abs(end - z)  # the rest of the run is skipped
                    break
                z += step
        if progress is not None:
            progress(total, total)
        nz = np.flatnonzero(masks.reshape(d, -1).any(1))
        z_range = (int(nz[0]), int(nz[-1])) if len(nz) else None
        return PropagationResult(masks, scores, z_range, tuple(zs))

    def _ahead(self, z: int, step: int, first: int, end: int) -> list[int]:
        """Up to ``batch_size`` not-yet-encoded slices from ``z`` towards ``end`` (inclusive)."""
        out: list[int] = []
        while len(out) < self.batch_size and ((z <= end) if step > 0 else (z >= end)):
            if z not in self._features:
                out.append(z)
            z += step
        return out or [first]


def propagate_volume(
    predictor_or_model: Any,
    volume: np.ndarray,
    keys: Mapping[int, Prompt | np.ndarray],
    intensity: str = "auto",
    depth: int | None = None,
    batch_size: int = 8,
    **kwargs: Any,
) -> PropagationResult:
    """One-shot :meth:`VolumePropagator.propagate` (``kwargs``: direction, progress, min_score, ...)."""
    with VolumePropagator(predictor_or_model, volume, intensity, depth, batch_size) as prop:
        return prop.propagate(keys, **kwargs)


def object_keys(
    slice_prompts: Mapping[int, Sequence[Prompt | None]] | None = None,
    key_labels: np.ndarray | None = None,
) -> list[dict[int, Prompt | np.ndarray]]:
    """Key slices of each object from per-slice prompts and / or a key label map.

    Args:
        slice_prompts: ``{z: [prompt of object 0, prompt of object 1, ...]}`` (``None``: absent).
        key_labels: ``(D, H, W)`` int label map; every non-empty slice of label ``k`` (1..K) is a
            mask key of object ``k - 1`` (a mask drawn or corrected by hand).
    Returns:
        one ``{z: Prompt | mask (H, W)}`` per object (object k = label k + 1), a mask key winning
        over a prompt on the same slice.
    """
    objs: dict[int, dict[int, Prompt | np.ndarray]] = {}
    for z, prompts in (slice_prompts or {}).items():
        for k, p in enumerate(prompts):
            if p is not None and not p.empty:
                objs.setdefault(k, {})[int(z)] = p
    if key_labels is not None:
        lab = np.asarray(key_labels)
        if lab.ndim != 3:
            raise PromptError(f"a key label map is (D, H, W), got shape {lab.shape}")
        for v in np.unique(lab[lab > 0]).astype(int):
            m = lab == v
            for z in np.flatnonzero(m.reshape(len(m), -1).any(1)):
                objs.setdefault(int(v) - 1, {})[int(z)] = m[z]
    if not objs:
        raise PromptError("no key slice: give a prompt or a mask on at least one slice")
    return [objs.get(k, {}) for k in range(max(objs) + 1)]


def propagate_objects(
    predictor_or_model: Any,
    volume: np.ndarray,
    objects: Sequence[Mapping[int, Prompt | np.ndarray]],
    intensity: str = "auto",
    depth: int | None = None,
    batch_size: int = 8,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """Propagate several objects through one volume (shared embeddings).

    ``objects``: one key dict per object (see :func:`object_keys`; an empty dict gives an empty
    object). Returns ``masks (K, D, H, W)`` bool and ``scores (K, D)``.
    """
    with VolumePropagator(predictor_or_model, volume, intensity, depth, batch_size) as prop:
        d, h, w = prop.shape
        masks = np.zeros((len(objects), d, h, w), dtype=bool)
        scores = np.full((len(objects), d), np.nan, dtype=np.float32)
        for k, keys in enumerate(objects):
            if keys:
                r = prop.propagate(keys, **kwargs)
                masks[k], scores[k] = r.masks, r.scores
    return masks, scores
