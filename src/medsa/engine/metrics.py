"""Segmentation metrics: Dice, IoU, HD95 (mm) and normalised surface Dice (NSD), 2D and 3D.

All functions take binary masks of shape ``(H, W)`` or ``(D, H, W)`` as numpy arrays or torch
tensors (any dtype; non-zero is foreground) and, for the distance metrics, a voxel ``spacing`` in
**array axis order** (``(dy, dx)`` for 2D, ``(dz, dy, dx)`` for 3D) in millimetres.

Definitions (they match MONAI's ``compute_dice`` / ``compute_iou`` /
``compute_hausdorff_distance(percentile=95)`` / ``compute_surface_dice``; tests cross-check):

- *Boundary*: ``mask XOR binary_erosion(mask)`` with the 4-/6-connected cross structuring element
  and zero outside the image (a mask touching the image border has a boundary there).
- *Surface distances*: exact Euclidean distance (``scipy.ndimage.distance_transform_edt`` with
  ``sampling=spacing``) from every boundary voxel of one mask to the nearest boundary voxel of
  the other, in both directions.
- *HD95*: ``max(P95(d(pred -> gt)), P95(d(gt -> pred)))``, the maximum of the two *directed*
  95th percentiles (linear interpolation) -- MONAI's undirected HD95. Note that medpy's ``hd95``
  instead takes the 95th percentile of the *pooled* distances, which is slightly smaller.
- *NSD* at tolerance ``tau`` mm: ``(#{d(pred->gt) <= tau} + #{d(gt->pred) <= tau}) /
  (#boundary(pred) + #boundary(gt))``; boundary elements are counted as voxels (MONAI with
  ``use_subvoxels=False``), not as surfel areas as in DeepMind's ``surface-distance``.

Empty-mask policy (explicit, see :class:`MetricConfig`):

==================  ======  ======  ====================================  =====
case                Dice    IoU     HD95                                  NSD
==================  ======  ======  ====================================  =====
both empty          1       1       0                                     1
exactly one empty   0       0       ``nan`` (default) or image diagonal   0
==================  ======  ======  ====================================  =====

The default ``nan`` for HD95 follows MONAI's convention that undefined values are skipped when
aggregating (MONAI itself returns ``inf`` here, which makes any mean infinite). The alternative
``"diagonal"`` charges the image diagonal in mm -- the largest distance possible inside the
image, as several challenges do -- so that missed objects penalise the mean HD95. Summaries
report how many HD95 values were undefined.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from medsa.errors import ConfigError, DataError

__all__ = [
    "MetricConfig",
    "METRIC_NAMES",
    "to_binary_numpy",
    "dice",
    "iou",
    "boundary",
    "surface_distances",
    "hausdorff_distance",
    "hd95",
    "normalized_surface_dice",
    "compute_metrics",
    "compute_metrics_per_class",
]

#: names of the metrics produced by :func:`compute_metrics`, in table order
METRIC_NAMES: tuple[str, ...] = ("dice", "iou", "hd95", "nsd")


@dataclass(frozen=True)
class MetricConfig:
    """How metrics are computed.

    Attributes:
        nsd_tolerance_mm: tolerance ``tau`` of the normalised surface Dice, in mm.
        hd_percentile: percentile of the Hausdorff distance (95 -> HD95; 100 -> classic HD).
        hd_one_empty: HD95 when exactly one of prediction / ground truth is empty: ``"nan"``
            (undefined, skipped in means) or ``"diagonal"`` (the image diagonal in mm).
    """

    nsd_tolerance_mm: float = 2.0
    hd_percentile: float = 95.0
    hd_one_empty: Literal["nan", "diagonal"] = "nan"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.nsd_tolerance_mm) and self.nsd_tolerance_mm >= 0):
            raise ConfigError(f"nsd_tolerance_mm must be >= 0, got {self.nsd_tolerance_mm}")
        if not 0 <= self.hd_percentile <= 100:
            raise ConfigError(f"hd_percentile must be in [0, 100], got {self.hd_percentile}")
        if self.hd_one_empty not in ("nan", "diagonal"):
            raise ConfigError(
                f"hd_one_empty must be 'nan' or 'diagonal', got {self.hd_one_empty!r}"
            )


def to_binary_numpy(mask: Any) -> np.ndarray:
    """Convert a numpy array / torch tensor / nested list to a boolean numpy array (non-zero = 1)."""
    if hasattr(mask, "detach"):  # torch.Tensor without importing torch
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    if arr.dtype == bool:
        return arr
    if np.issubdtype(arr.dtype, np.floating) and np.isnan(arr).any():
        raise DataError("mask contains NaN values")
    return arr != 0


def _pair(pred: Any, gt: Any) -> tuple[np.ndarray, np.ndarray]:
    p, g = to_binary_numpy(pred), to_binary_numpy(gt)
    if p.shape != g.shape:
        raise DataError(f"prediction shape {p.shape} does not match ground-truth shape {g.shape}")
    if p.ndim not in (2, 3):
        raise DataError(f"masks must be 2D (H, W) or 3D (D, H, W), got shape {p.shape}")
    return p, g


def _spacing(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    scalar = np.isscalar(spacing)
    sp = (float(spacing),) * ndim if scalar else tuple(float(s) for s in spacing)  # type: ignore
    if len(sp) != ndim:
        raise DataError(f"spacing {sp} has {len(sp)} values but the mask has {ndim} dimensions")
    if not all(math.isfinite(s) and s > 0 for s in sp):
        raise DataError(f"spacing must be positive and finite, got {sp}")
    return sp


def dice(pred: Any, gt: Any) -> float:
    """Dice ``2|P∩G| / (|P|+|G|)`` of two binary masks ``(H, W)`` / ``(D, H, W)``; 1 if both empty."""
    p, g = _pair(pred, gt)
    denom = int(p.sum()) + int(g.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, g).sum()) / denom


def iou(pred: Any, gt: Any) -> float:
    """Intersection over union ``|P∩G| / |P∪G|``; 1 if both empty."""
    p, g = _pair(pred, gt)
    union = int(np.logical_or(p, g).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(p, g).sum()) / union


def boundary(mask: Any) -> np.ndarray:
    """Boundary voxels ``mask XOR erode(mask)`` (cross structuring element, zero outside)."""
    from scipy import ndimage

    m = to_binary_numpy(mask)
    return m ^ ndimage.binary_erosion(m)


def _crop_to_union(p: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus a 1-voxel margin.

    The margin keeps the erosion exact; distances are unchanged because every boundary voxel
    of either mask lies inside the box. This makes large, sparse volumes cheap.
    """
    idx = np.nonzero(p | g)
    sl = tuple(
        slice(max(int(i.min()) - 1, 0), min(int(i.max()) + 2, n))
        for i, n in zip(idx, p.shape, strict=True)
    )
    return p[sl], g[sl]


def surface_distances(
    pred: Any, gt: Any, spacing: float | Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each boundary voxel of ``pred`` to the boundary of ``gt`` and back.

    Both masks must be non-empty. Returns ``(d_pred_to_gt (Np,), d_gt_to_pred (Ng,))``.
    """
    from scipy import ndimage

    p, g = _pair(pred, gt)
    sp = _spacing(spacing, p.ndim)
    if not p.any() or not g.any():
        raise DataError("surface distances are undefined when a mask is empty")
    p, g = _crop_to_union(p, g)
    bp, bg = boundary(p), boundary(g)
    # EDT of the complement of a boundary = distance of every voxel to that boundary (mm)
    dist_to_g = ndimage.distance_transform_edt(~bg, sampling=sp)
    dist_to_p = ndimage.distance_transform_edt(~bp, sampling=sp)
    return dist_to_g[bp], dist_to_p[bg]


def _diagonal_mm(shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    return float(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing, strict=True))))


def hausdorff_distance(
    pred: Any,
    gt: Any,
    spacing: float | Sequence[float] | None = None,
    percentile: float = 95.0,
    one_empty: Literal["nan", "diagonal"] = "nan",
) -> float:
    """Undirected percentile Hausdorff distance in mm (max of the two directed percentiles).

    Both empty -> 0. Exactly one empty -> ``nan`` or the image diagonal (``one_empty``).
    """
    p, g = _pair(pred, gt)
    sp = _spacing(spacing, p.ndim)
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return 0.0
    if has_p != has_g:
        return _diagonal_mm(p.shape, sp) if one_empty == "diagonal" else float("nan")
    d_pg, d_gp = surface_distances(p, g, sp)
    return float(max(np.percentile(d_pg, percentile), np.percentile(d_gp, percentile)))


def hd95(
    pred: Any,
    gt: Any,
    spacing: float | Sequence[float] | None = None,
    one_empty: Literal["nan", "diagonal"] = "nan",
) -> float:
    """95th-percentile Hausdorff distance in mm; see :func:`hausdorff_distance`."""
    return hausdorff_distance(pred, gt, spacing, 95.0, one_empty)


def normalized_surface_dice(
    pred: Any, gt: Any, spacing: float | Sequence[float] | None = None, tolerance_mm: float = 2.0
) -> float:
    """Normalised surface Dice at tolerance ``tolerance_mm``; 1 if both empty, 0 if one is."""
    p, g = _pair(pred, gt)
    sp = _spacing(spacing, p.ndim)
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return 1.0
    if has_p != has_g:
        return 0.0
    d_pg, d_gp = surface_distances(p, g, sp)
    ok = int((d_pg <= tolerance_mm).sum()) + int((d_gp <= tolerance_mm).sum())
    return ok / (d_pg.size + d_gp.size)


def compute_metrics(
    pred: Any,
    gt: Any,
    spacing: float | Sequence[float] | None = None,
    config: MetricConfig | None = None,
) -> dict[str, float]:
    """All metrics of one binary mask pair ``(H, W)`` / ``(D, H, W)``.

    Returns ``{"dice", "iou", "hd95", "nsd"}`` (HD95 / NSD in mm, at ``config``'s settings);
    the surface distances are computed once and shared.
    """
    cfg = config or MetricConfig()
    p, g = _pair(pred, gt)
    sp = _spacing(spacing, p.ndim)
    out = {"dice": dice(p, g), "iou": iou(p, g)}
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        out.update(hd95=0.0, nsd=1.0)
    elif has_p != has_g:
        hd = _diagonal_mm(p.shape, sp) if cfg.hd_one_empty == "diagonal" else float("nan")
        out.update(hd95=hd, nsd=0.0)
    else:
        d_pg, d_gp = surface_distances(p, g, sp)
        q = cfg.hd_percentile
        out["hd95"] = float(max(np.percentile(d_pg, q), np.percentile(d_gp, q)))
        tau = cfg.nsd_tolerance_mm
        ok = int((d_pg <= tau).sum()) + int((d_gp <= tau).sum())
        out["nsd"] = ok / (d_pg.size + d_gp.size)
    return out


def compute_metrics_per_class(
    pred_labels: Any,
    gt_labels: Any,
    classes: Iterable[int],
    spacing: float | Sequence[float] | None = None,
    config: MetricConfig | None = None,
) -> dict[int, dict[str, float]]:
    """Metrics per class of two integer label maps ``(H, W)`` / ``(D, H, W)`` (0 = background).

    Returns ``{class_id: compute_metrics(pred == c, gt == c)}``.
    """
    p = np.asarray(pred_labels.detach().cpu() if hasattr(pred_labels, "detach") else pred_labels)
    g = np.asarray(gt_labels.detach().cpu() if hasattr(gt_labels, "detach") else gt_labels)
    if p.shape != g.shape:
        raise DataError(f"prediction shape {p.shape} does not match ground-truth shape {g.shape}")
    return {int(c): compute_metrics(p == c, g == c, spacing, config) for c in classes}
