"""Automatic ("segment everything") mask generation against segment-anything's generator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsa.errors import ConfigError
from medsa.sam import AutomaticMaskGenerator, build_sam
from medsa.sam.automatic import (
    _batched_nms_torch,
    batched_nms,
    build_point_grid,
    masks_to_boxes,
    stability_score,
)

SETTINGS = {
    "points_per_side": 5,
    "points_per_batch": 7,  # not a divisor of 25: exercises the last partial batch
    "pred_iou_thresh": 0.1,
    "stability_score_thresh": 0.55,
    "stability_score_offset": 0.05,
}


@pytest.mark.parametrize(("nms", "min_masks"), [(1.0, 4), (0.7, 1)])
def test_matches_segment_anything_generator(tiny_oracle, nms: float, min_masks: int) -> None:
    """Random-weight masks are large, so NMS 0.7 keeps few; NMS 1.0 checks filtering and order."""
    pytest.importorskip("torchvision")
    from segment_anything import SamAutomaticMaskGenerator

    ref, ckpt = tiny_oracle
    image = np.random.default_rng(0).integers(0, 256, (72, 96, 3), dtype=np.uint8)
    settings = {**SETTINGS, "box_nms_thresh": nms}
    expected = SamAutomaticMaskGenerator(ref, **settings).generate(image)
    got = AutomaticMaskGenerator(build_sam("vit_tiny", checkpoint=ckpt), **settings).generate(image)
    assert len(expected) >= min_masks
    assert len(got) == len(expected)
    for e, g in zip(expected, got, strict=True):
        assert g["segmentation"].shape == (72, 96) and g["segmentation"].dtype == bool
        assert np.mean(e["segmentation"] != g["segmentation"]) < 1e-3
        assert abs(e["predicted_iou"] - g["predicted_iou"]) < 1e-4
        assert abs(e["stability_score"] - g["stability_score"]) < 1e-2
        assert np.allclose(e["point_coords"], g["point_coords"])
        assert g["area"] == int(g["segmentation"].sum())
    assert [round(float(x), 6) for x in expected[0]["bbox"]] == got[0]["bbox"]


def test_point_grid() -> None:
    grid = build_point_grid(4)
    assert grid.shape == (16, 2)
    assert np.allclose(grid[0], [0.125, 0.125]) and np.allclose(grid[1], [0.375, 0.125])
    assert np.allclose(grid[-1], [0.875, 0.875])


def test_stability_score_and_boxes() -> None:
    logits = torch.full((2, 6, 8), -5.0)
    logits[0, 1:4, 2:6] = 5.0  # 12 px, crisp
    logits[0, 4, 2:6] = 0.2  # 4 px only above the low threshold
    assert torch.allclose(
        stability_score(logits, 0.0, 1.0), torch.tensor([12 / 16, float("nan")]), equal_nan=True
    )
    boxes = masks_to_boxes(logits > 0)
    assert boxes.tolist() == [[2, 1, 5, 4], [0, 0, 0, 0]]


def test_nms_fallback_equals_torchvision() -> None:
    tv = pytest.importorskip("torchvision.ops")
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(200, 2, generator=g) * 80
    wh = torch.rand(200, 2, generator=g) * 40 + 1
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = torch.rand(200, generator=g)
    cats = torch.randint(0, 3, (200,), generator=g)
    for thr in (0.3, 0.7):
        expected = tv.batched_nms(boxes, scores, cats, thr)
        assert torch.equal(_batched_nms_torch(boxes, scores, cats, thr), expected)
        assert torch.equal(batched_nms(boxes, scores, cats, thr), expected)


def test_config_errors(tiny_oracle) -> None:
    model = build_sam("vit_tiny", checkpoint=tiny_oracle[1])
    with pytest.raises(ConfigError):
        AutomaticMaskGenerator(model, points_per_side=0)
    with pytest.raises(ConfigError):
        AutomaticMaskGenerator(model, not_an_option=3)
