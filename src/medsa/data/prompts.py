"""Prompt simulation: the papers' protocols (1-point, 3-points, BBox 0.5 / 0.75), iterative clicks.

Coordinates: points are ``(x, y)`` = (column, row) pixel indices of the mask they were drawn from;
boxes are ``(x0, y0, x1, y1)`` with INCLUSIVE pixel indices of the extreme foreground pixels (the
convention of SAM / MedSAM ground-truth boxes). Masks are ``(H, W)`` arrays, non-zero = foreground.

Box IoU (:func:`box_iou`) treats a box as the set of pixels it covers, i.e. the continuous extent
``[x0, x1 + 1) x [y0, y1 + 1)``, so a one-pixel object has a one-pixel (not zero-area) box.

Empty targets: every prompt generator that needs foreground raises :class:`PromptError` on an empty
mask; :func:`per_slice_prompts` returns ``None`` for empty slices instead (nothing to prompt).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medsa.errors import ConfigError, PromptError

__all__ = [
    "Prompt",
    "random_points",
    "negative_points",
    "tight_box",
    "jittered_box",
    "box_iou",
    "next_click",
    "point_grid",
    "PROMPT_PROTOCOLS",
    "get_protocol",
    "per_slice_prompts",
]


@dataclass(frozen=True)
class Prompt:
    """A SAM prompt for one object in one 2D image (simulated, parsed from JSON or from the CLI).

    "No points" is always the empty ``(0, 2)`` / ``(0,)`` arrays, never ``None``, so callers can
    take ``len(prompt.points)`` and concatenate clicks without special cases.

    Attributes:
        points: ``(N, 2)`` float32 ``(x, y)`` = (column, row) pixel coordinates (``N`` may be 0).
        labels: ``(N,)`` int64, 1 = positive (foreground), 0 = negative (background); defaults to
            all positive when points are given without labels.
        box: ``(4,)`` float32 ``(x0, y0, x1, y1)`` with ``x0 <= x1``, ``y0 <= y1``, or ``None``.
        mask_input: ``(1, h, w)`` low-resolution logits of a previous prediction (iterative
            clicks), or ``None``.

    Raises:
        PromptError: points and labels of different lengths, labels without points, or a box
            that is not 4 numbers with ``x0 <= x1``, ``y0 <= y1``.
    """

    points: np.ndarray | None = None
    labels: np.ndarray | None = None
    box: np.ndarray | None = None
    mask_input: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # frozen dataclass: normalise fields through object.__setattr__
        if self.points is None:
            if self.labels is not None and len(np.asarray(self.labels).reshape(-1)):
                raise PromptError("point labels were given without points")
            pts, lab = np.zeros((0, 2), np.float32), np.zeros(0, np.int64)
        else:
            pts = np.asarray(self.points, dtype=np.float32).reshape(-1, 2)
            if self.labels is None:
                lab = np.ones(len(pts), dtype=np.int64)
            else:
                lab = np.asarray(self.labels, dtype=np.int64).reshape(-1)
            if len(pts) != len(lab):
                raise PromptError(f"{len(pts)} points but {len(lab)} labels were given")
        object.__setattr__(self, "points", pts)
        object.__setattr__(self, "labels", lab)
        if self.box is not None:
            box = np.asarray(self.box, dtype=np.float32).reshape(-1)
            if box.shape != (4,):
                raise PromptError(f"a box needs 4 numbers x0,y0,x1,y1, got {box.tolist()}")
            # x0 == x1 is allowed: the tight box of a one-pixel-wide object (inclusive corners)
            if box[2] < box[0] or box[3] < box[1]:
                x0, y0, x1, y1 = (float(v) for v in box)
                raise PromptError(
                    f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) needs x0 <= x1 and y0 <= y1"
                )
            object.__setattr__(self, "box", box)

    @property
    def empty(self) -> bool:
        """No points, no box and no mask input: nothing to decode."""
        return len(self.points) == 0 and self.box is None and self.mask_input is None

    @property
    def ambiguous(self) -> bool:
        """A single point and no box: SAM returns 3 candidate masks and we keep the best."""
        return self.box is None and len(self.points) == 1

    def validate(self, image_size: tuple[int, int]) -> Prompt:
        """Check the prompt against an ``(H, W)`` image; returns ``self``.

        Bounds follow ``SamPredictor``: ``0 <= x <= W``, ``0 <= y <= H`` (pixel edges), for points
        and box corners alike.

        Raises:
            PromptError: an empty prompt, non-finite values, a point label other than 0/1, or a
                point or box outside the image.
        """
        height, width = (int(v) for v in image_size)
        if self.empty:
            raise PromptError("empty prompt: give at least one point or a box")
        if len(self.points):
            p = self.points
            if not np.isfinite(p).all():
                raise PromptError("point coordinates must be finite numbers")
            bad = (p[:, 0] < 0) | (p[:, 0] > width) | (p[:, 1] < 0) | (p[:, 1] > height)
            if bad.any():
                x, y = p[bad][0]
                raise PromptError(
                    f"point ({x:g}, {y:g}) lies outside the {width}x{height} (W x H) image; "
                    "points are (x, y) = (column, row)"
                )
            if not np.isin(self.labels, (0, 1)).all():
                raise PromptError(
                    f"point labels must be 1 (positive) or 0 (negative), got {self.labels.tolist()}"
                )
        if self.box is not None:
            x0, y0, x1, y1 = (float(v) for v in self.box)
            if not np.isfinite(self.box).all():
                raise PromptError("box coordinates must be finite numbers")
            if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                raise PromptError(
                    f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) lies outside the {width}x{height} image"
                )
        return self

    def with_click(
        self, xy: np.ndarray, label: int, mask_input: np.ndarray | None = None
    ) -> Prompt:
        """A new prompt with one more point ``xy (2,)`` appended (iterative refinement).

        ``mask_input``: the previous prediction's low-res logits ``(1, h, w)`` to feed back (the
        old ``mask_input`` is not carried over: it belonged to the previous round).
        """
        return Prompt(
            np.concatenate([self.points, np.asarray(xy, np.float32).reshape(1, 2)]),
            np.concatenate([self.labels, np.asarray([int(label)], np.int64)]),
            self.box,
            mask_input,
        )

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable form (as read by :meth:`from_json`; ``mask_input`` is not stored)."""
        out: dict[str, Any] = {}
        if len(self.points):
            out["points"] = [
                [float(x), float(y), int(lab)]
                for (x, y), lab in zip(self.points, self.labels, strict=True)
            ]
        if self.box is not None:
            out["box"] = [float(v) for v in self.box]
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Prompt:
        """Parse ``{"points": [[x, y, label?], ...], "box": [x0, y0, x1, y1]}``."""
        if not isinstance(obj, Mapping):
            raise PromptError(f"a prompt must be an object with 'points' and/or 'box', got {obj!r}")
        unknown = set(obj) - {"points", "box", "slice"}
        if unknown:
            raise PromptError(f"unknown prompt keys {sorted(unknown)}; use 'points' and/or 'box'")
        points = labels = None
        if obj.get("points"):
            try:
                rows = [list(map(float, p)) for p in obj["points"]]
            except (TypeError, ValueError) as e:
                raise PromptError(
                    f"points must be [[x, y, label], ...], got {obj['points']!r}"
                ) from e
            if any(len(r) not in (2, 3) for r in rows):
                raise PromptError(
                    f"each point must be [x, y] or [x, y, label], got {obj['points']!r}"
                )
            if any(len(r) == 3 and r[2] not in (0.0, 1.0) for r in rows):
                raise PromptError(f"point labels must be 1 or 0, got {obj['points']!r}")
            points = np.array([r[:2] for r in rows], dtype=np.float32)
            labels = np.array([int(r[2]) if len(r) == 3 else 1 for r in rows], dtype=np.int64)
        box = None
        if obj.get("box") is not None:
            try:
                box = np.array([float(v) for v in obj["box"]], dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise PromptError(f"box must be [x0, y0, x1, y1], got {obj['box']!r}") from e
        return cls(points=points, labels=labels, box=box)


def _binary(mask: np.ndarray, what: str = "mask") -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise PromptError(f"{what} must be 2D (H, W), got shape {m.shape}")
    return m != 0 if m.dtype != bool else m


def _require_foreground(m: np.ndarray) -> None:
    if not m.any():
        raise PromptError("the target mask is empty: there is no object to prompt")


def _rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _interior_distance(m: np.ndarray) -> np.ndarray:
    """Euclidean distance of each foreground pixel to the nearest background pixel or image border."""
    from scipy.ndimage import distance_transform_edt

    # pad with background so the image border counts as a boundary (as RITM does)
    return distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]


def random_points(
    mask: np.ndarray,
    n: int,
    rng: np.random.Generator | int | None = None,
    *,
    interior: bool = False,
) -> np.ndarray:
    """``n`` positive points drawn uniformly from the foreground.

    Args:
        mask: ``(H, W)``, non-zero = foreground.
        n: number of points; drawn without replacement while the object has enough pixels.
        rng: numpy Generator (or seed).
        interior: weight pixels by their distance to the object boundary (favours the inside,
            avoids ambiguous edge clicks).

    Returns:
        ``(n, 2)`` float32 ``(x, y)``.
    """
    m = _binary(mask)
    _require_foreground(m)
    g = _rng(rng)
    ys, xs = np.nonzero(m)
    p = None
    if interior:
        w = _interior_distance(m)[ys, xs]
        p = w / w.sum()
    idx = g.choice(len(xs), size=n, replace=n > len(xs), p=p)
    return np.stack([xs[idx], ys[idx]], axis=1).astype(np.float32)


def negative_points(
    mask: np.ndarray,
    n: int,
    rng: np.random.Generator | int | None = None,
    *,
    margin: int | None = None,
) -> np.ndarray:
    """``n`` negative points drawn uniformly from the background.

    Args:
        margin: if given, only from background within ``margin`` pixels of the object (hard
            negatives next to the boundary); falls back to the whole background if that band is empty.

    Returns:
        ``(n, 2)`` float32 ``(x, y)``.

    Raises:
        PromptError: the mask has no background pixel.
    """
    m = _binary(mask)
    bg = ~m
    if margin is not None and m.any():
        from scipy.ndimage import binary_dilation

        band = binary_dilation(m, iterations=int(margin)) & bg
        if band.any():
            bg = band
    if not bg.any():
        raise PromptError("the mask covers the whole image: no background for a negative point")
    ys, xs = np.nonzero(bg)
    idx = _rng(rng).choice(len(xs), size=n, replace=n > len(xs))
    return np.stack([xs[idx], ys[idx]], axis=1).astype(np.float32)


def tight_box(mask: np.ndarray) -> np.ndarray:
    """Tight bounding box ``(x0, y0, x1, y1)`` (inclusive pixel indices) of the foreground, float32."""
    m = _binary(mask)
    _require_foreground(m)
    ys, xs = np.nonzero(m)
    return np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two ``(x0, y0, x1, y1)`` boxes with inclusive pixel corners (extent ``[x0, x1 + 1)``)."""
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    iw = min(a[2], b[2]) + 1 - max(a[0], b[0])
    ih = min(a[3], b[3]) + 1 - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    area = lambda r: max(r[2] + 1 - r[0], 0.0) * max(r[3] + 1 - r[1], 0.0)  # noqa: E731
    union = area(a) + area(b) - inter
    return float(inter / union) if union > 0 else 0.0


def jittered_box(
    mask: np.ndarray,
    target_iou: float,
    rng: np.random.Generator | int | None = None,
    *,
    tol: float = 0.05,
    max_tries: int = 50,
) -> np.ndarray:
    """A box whose IoU with the tight box is ``target_iou`` (within ``tol``): "BBox 0.5 / 0.75".

    Construction: draw a random perturbation direction ``d ~ N(0, I_4)`` for the four edges, scaled
    by the box width/height (``dx0, dx1`` in units of w, ``dy0, dy1`` in units of h), and move the
    edges along it, ``box(t) = tight + t * d * (w, h, w, h)``, clipped to the image. The step ``t``
    is solved by bisection so that ``IoU(box(t), tight) = target_iou``: IoU is 1 at ``t = 0`` and
    continuous in ``t``; we bracket the first crossing on a coarse grid, then bisect. A direction
    whose clipped box cannot reach the target (e.g. growing against the image border) is redrawn.
    Shift, scale and aspect change all occur, as they would from an inaccurate annotator.

    Returns:
        ``(4,)`` float32 ``(x0, y0, x1, y1)`` with ``|IoU - target_iou| <= tol``.

    Raises:
        PromptError: empty mask, or no valid box after ``max_tries`` directions.
        ConfigError: ``target_iou`` not in ``(0, 1]``.
    """
    if not 0.0 < target_iou <= 1.0:
        raise ConfigError(f"target_iou must be in (0, 1], got {target_iou}")
    m = _binary(mask)
    tight = tight_box(m).astype(float)
    if target_iou >= 1.0 - 1e-9:
        return tight.astype(np.float32)
    h_img, w_img = m.shape
    w, h = tight[2] + 1 - tight[0], tight[3] + 1 - tight[1]
    scale = np.array([w, h, w, h])
    lo_clip = np.zeros(4)
    hi_clip = np.array([w_img - 1, h_img - 1, w_img - 1, h_img - 1], float)
    g = _rng(rng)

    def box_at(d: np.ndarray, t: float) -> np.ndarray | None:
        b = np.clip(tight + t * d * scale, lo_clip, hi_clip)
        return b if (b[2] >= b[0] and b[3] >= b[1]) else None

    def iou_at(d: np.ndarray, t: float) -> float:
        b = box_at(d, t)
        return -1.0 if b is None else box_iou(b, tight)

    for _ in range(max_tries):
        d = g.standard_normal(4)
        d /= np.linalg.norm(d)
        # bracket the first crossing: IoU(0) = 1 > target
        t_prev, t_hi = 0.0, None
        for t in np.linspace(0.05, 4.0, 80):
            v = iou_at(d, t)
            if v < 0:  # box collapsed before reaching the target: unusable direction
                break
            if v <= target_iou:
                t_hi = t
                break
            t_prev = t
        if t_hi is None:
            continue
        lo, hi = t_prev, t_hi
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            if iou_at(d, mid) > target_iou:
                lo = mid
            else:
                hi = mid
        box = box_at(d, 0.5 * (lo + hi))
        if box is not None and abs(box_iou(box, tight) - target_iou) <= tol:
            return box.astype(np.float32)
    raise PromptError(
        f"could not build a box with IoU {target_iou}±{tol} to the tight box {tight.tolist()} "
        f"inside a {w_img}x{h_img} image"
    )


def next_click(
    pred: np.ndarray,
    target: np.ndarray,
    rng: np.random.Generator | int | None = None,
) -> tuple[np.ndarray, int] | None:
    """Next simulated user click on the largest error region (RITM / Mahadevan et al. 2018).

    The false-negative (``target & ~pred``) and false-positive (``pred & ~target``) regions are
    split into connected components (8-connectivity); the click goes into the largest component,
    at the pixel farthest from that component's boundary (Euclidean distance transform, image border
    counts as boundary); ties are broken at random. It is positive (1) for a false-negative region,
    negative (0) for a false-positive one.

    Args:
        pred, target: ``(H, W)`` masks (non-zero = foreground), same shape.

    Returns:
        ``((x, y) float32 (2,), label)``, or ``None`` if the prediction has no error.
    """
    from scipy.ndimage import label as cc_label

    p = _binary(pred, "pred")
    t = _binary(target, "target")
    if p.shape != t.shape:
        raise PromptError(f"pred {p.shape} and target {t.shape} shapes differ")
    g = _rng(rng)
    best: tuple[int, np.ndarray, int] | None = None  # (size, component mask, label)
    structure = np.ones((3, 3), bool)
    for err, lab in ((t & ~p, 1), (p & ~t, 0)):
        if not err.any():
            continue
        comps, n = cc_label(err, structure=structure)
        sizes = np.bincount(comps.ravel())[1:]
        k = int(np.argmax(sizes))
        if best is None or sizes[k] > best[0]:
            best = (int(sizes[k]), comps == k + 1, lab)
    if best is None:
        return None
    _, comp, lab = best
    dist = _interior_distance(comp)
    ys, xs = np.nonzero(dist == dist.max())
    i = int(g.integers(len(xs)))
    return np.array([xs[i], ys[i]], dtype=np.float32), lab


def point_grid(n_per_side: int, image_size: tuple[int, int] | None = None) -> np.ndarray:
    """Regular grid for "segment everything" (as SAM's ``build_point_grid``).

    Args:
        n_per_side: points per side (SAM default 32).
        image_size: ``(H, W)``; if given the grid is in pixel ``(x, y)``, else normalised to [0, 1].

    Returns:
        ``(n_per_side**2, 2)`` float32 ``(x, y)``, x varying fastest.
    """
    if n_per_side < 1:
        raise ConfigError(f"n_per_side must be >= 1, got {n_per_side}")
    offset = 1.0 / (2 * n_per_side)
    side = np.linspace(offset, 1 - offset, n_per_side)
    xs, ys = np.meshgrid(side, side)
    grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
    if image_size is not None:
        h, w = image_size
        grid = grid * np.array([w, h])
    return grid.astype(np.float32)


# --------------------------------------------------------------------------- protocols

PromptFn = Callable[[np.ndarray, np.random.Generator], Prompt]


def _points_protocol(n: int) -> PromptFn:
    def fn(mask: np.ndarray, rng: np.random.Generator) -> Prompt:
        return Prompt(random_points(mask, n, rng), np.ones(n, np.int64))

    return fn


def _box_protocol(iou: float | None) -> PromptFn:
    def fn(mask: np.ndarray, rng: np.random.Generator) -> Prompt:
        box = tight_box(mask) if iou is None else jittered_box(mask, iou, rng)
        return Prompt(np.zeros((0, 2)), np.zeros(0), box)

    return fn


def _everything(mask: np.ndarray, rng: np.random.Generator) -> Prompt:
    m = np.asarray(mask)
    grid = point_grid(32, m.shape[-2:])
    return Prompt(grid, np.ones(len(grid), np.int64))


#: name -> function(mask (H, W), rng) -> Prompt. "everything" ignores the mask content and gives a
#: 32x32 grid of positive points (each is a separate query in SAM's automatic mode).
PROMPT_PROTOCOLS: dict[str, PromptFn] = {
    "1pt": _points_protocol(1),
    "3pt": _points_protocol(3),
    "bbox0.5": _box_protocol(0.5),
    "bbox0.75": _box_protocol(0.75),
    "box": _box_protocol(None),
    "everything": _everything,
}


def get_protocol(name: str) -> PromptFn:
    """The protocol ``name`` from :data:`PROMPT_PROTOCOLS` (ConfigError lists the valid names)."""
    try:
        return PROMPT_PROTOCOLS[name]
    except KeyError:
        raise ConfigError(
            f"unknown prompt protocol {name!r}; choose from {', '.join(PROMPT_PROTOCOLS)}"
        ) from None


def per_slice_prompts(
    volume_mask: np.ndarray,
    protocol: str | PromptFn,
    rng: np.random.Generator | int | None = None,
) -> list[Prompt | None]:
    """One prompt per slice of a ``(D, H, W)`` mask (the paper prompts every slice separately).

    Returns:
        ``D`` entries, ``None`` where the slice has no foreground.
    """
    v = np.asarray(volume_mask)
    if v.ndim != 3:
        raise PromptError(f"volume mask must be (D, H, W), got shape {v.shape}")
    fn = get_protocol(protocol) if isinstance(protocol, str) else protocol
    g = _rng(rng)
    return [fn(s, g) if s.any() else None for s in v]
