"""Metrics: cross-checked against MONAI on random blobs with anisotropic spacing, 2D and 3D."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from medsa.engine import metrics as M
from medsa.errors import ConfigError, DataError


def _blob(rng: np.random.Generator, shape: tuple[int, ...], frac: float = 0.5) -> np.ndarray:
    """Random smooth blob: thresholded Gaussian-filtered noise (irregular, sometimes several parts)."""
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=max(shape) / 8)
    return noise > np.quantile(noise, 1 - frac * 0.5)


def _monai(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...], tau: float) -> dict:
    from monai.metrics import (
        compute_dice,
        compute_hausdorff_distance,
        compute_iou,
        compute_surface_dice,
    )

    p = torch.from_numpy(pred[None, None].astype(np.float32))
    g = torch.from_numpy(gt[None, None].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {
            "dice": compute_dice(p, g, include_background=True).item(),
            "iou": compute_iou(p, g, include_background=True).item(),
            "hd95": compute_hausdorff_distance(
                p, g, include_background=True, percentile=95, spacing=list(spacing)
            ).item(),
            "nsd": compute_surface_dice(
                p, g, class_thresholds=[tau], include_background=True, spacing=list(spacing)
            ).item(),
        }


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((48, 64), (0.7, 1.3)), ((12, 32, 40), (3.0, 0.8, 1.1))],
    ids=["2d", "3d"],
)
def test_metrics_match_monai_on_random_blobs(shape, spacing):
    rng = np.random.default_rng(0)
    cfg = M.MetricConfig(nsd_tolerance_mm=1.5)
    for _ in range(4):
        gt = _blob(rng, shape)
        # prediction: perturbed gt (dilated/eroded + random blob pieces) so metrics are in (0, 1)
        pred = ndimage.binary_dilation(gt, iterations=int(rng.integers(1, 3)))
        pred ^= _blob(rng, shape, 0.1)
        assert gt.any() and pred.any()
        ours = M.compute_metrics(pred, gt, spacing, cfg)
        ref = _monai(pred, gt, spacing, cfg.nsd_tolerance_mm)
        assert 0.0 < ours["dice"] < 1.0 and ours["hd95"] > 0
        for k in M.METRIC_NAMES:
            assert ours[k] == pytest.approx(ref[k], rel=1e-4, abs=1e-4), k


def test_torch_and_numpy_inputs_agree_and_spacing_scales_hd():
    rng = np.random.default_rng(1)
    gt = _blob(rng, (40, 40))
    pred = ndimage.binary_erosion(gt, iterations=2)
    a = M.compute_metrics(pred, gt, (1.0, 1.0))
    b = M.compute_metrics(torch.from_numpy(pred).float(), torch.from_numpy(gt.astype(np.uint8)))
    assert a == b
    # isotropic scaling of the spacing scales distances, leaves overlap metrics unchanged
    c = M.compute_metrics(pred, gt, 2.5)
    assert c["hd95"] == pytest.approx(2.5 * a["hd95"])
    assert c["dice"] == a["dice"]


def test_known_values_on_squares():
    gt = np.zeros((20, 20), bool)
    gt[5:15, 5:15] = True  # 100 px
    pred = np.zeros_like(gt)
    pred[5:15, 7:17] = True  # shifted by 2 columns
    assert M.dice(pred, gt) == pytest.approx(2 * 80 / 200)
    assert M.iou(pred, gt) == pytest.approx(80 / 120)
    # every boundary pixel is at most 2 columns away; spacing (dy, dx) = (1, 0.5) -> 1 mm
    assert M.hausdorff_distance(pred, gt, (1.0, 0.5), percentile=100) == pytest.approx(1.0)
    assert M.hausdorff_distance(pred, gt, (0.5, 1.0), percentile=100) == pytest.approx(2.0)
    assert M.normalized_surface_dice(pred, gt, 1.0, tolerance_mm=2.0) == 1.0
    assert M.normalized_surface_dice(pred, gt, 1.0, tolerance_mm=0.5) < 1.0
    assert M.dice(gt, gt) == 1.0 and M.hd95(gt, gt) == 0.0


def test_empty_mask_policy():
    empty = np.zeros((10, 20), bool)
    full = empty.copy()
    full[2:5, 3:9] = True
    both = M.compute_metrics(empty, empty, (1.0, 1.0))
    assert both == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0}
    for p, g in [(empty, full), (full, empty)]:
        one = M.compute_metrics(p, g, (2.0, 1.0))
        assert one["dice"] == 0.0 and one["iou"] == 0.0 and one["nsd"] == 0.0
        assert math.isnan(one["hd95"])
        diag = M.compute_metrics(p, g, (2.0, 1.0), M.MetricConfig(hd_one_empty="diagonal"))
        assert diag["hd95"] == pytest.approx(math.hypot(10 * 2.0, 20 * 1.0))
    assert math.isnan(M.hd95(empty, full))


def test_per_class_on_label_maps():
    gt = np.zeros((4, 24, 24), np.int64)
    gt[1:3, 2:10, 2:10] = 1
    gt[:, 12:20, 12:22] = 2
    pred = gt.copy()
    pred[pred == 2] = 0  # class 2 missed entirely
    pred[0, 0, 0] = 1  # one false-positive voxel of class 1
    res = M.compute_metrics_per_class(pred, gt, [1, 2, 3], spacing=(5.0, 1.0, 1.0))
    assert set(res) == {1, 2, 3}
    assert 0.9 < res[1]["dice"] < 1.0
    assert res[2]["dice"] == 0.0 and math.isnan(res[2]["hd95"])
    assert res[3] == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0}


def test_bad_inputs_raise_clear_errors():
    a = np.zeros((4, 4))
    with pytest.raises(DataError, match="does not match"):
        M.dice(a, np.zeros((4, 5)))
    with pytest.raises(DataError, match="2D"):
        M.dice(np.zeros(4), np.zeros(4))
    with pytest.raises(DataError, match="spacing"):
        M.compute_metrics(a, a, (1.0, 1.0, 1.0))
    with pytest.raises(DataError, match="spacing"):
        M.hd95(a, a, (1.0, 0.0))
    with pytest.raises(DataError, match="NaN"):
        M.dice(np.full((2, 2), np.nan), a[:2, :2])
    with pytest.raises(ConfigError):
        M.MetricConfig(hd_one_empty="inf")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        M.MetricConfig(nsd_tolerance_mm=-1)
