"""Prompt simulation. Masks are asymmetric (wide, off-centre) so an x/y swap fails the tests."""

from __future__ import annotations

import numpy as np
import pytest

from medsa.data.prompts import (
    PROMPT_PROTOCOLS,
    Prompt,
    box_iou,
    get_protocol,
    jittered_box,
    negative_points,
    next_click,
    per_slice_prompts,
    point_grid,
    random_points,
    tight_box,
)
from medsa.errors import ConfigError, PromptError


def _mask(h: int = 40, w: int = 60) -> np.ndarray:
    """Rows 5..9, columns 30..49: a wide bar in the upper right."""
    m = np.zeros((h, w), np.uint8)
    m[5:10, 30:50] = 255
    return m


def test_random_points_are_xy_in_foreground():
    m = _mask()
    pts = random_points(m, 50, np.random.default_rng(0))
    assert pts.shape == (50, 2) and pts.dtype == np.float32
    xs, ys = pts[:, 0].astype(int), pts[:, 1].astype(int)
    assert (m[ys, xs] > 0).all()
    assert xs.min() >= 30 and xs.max() <= 49 and ys.min() >= 5 and ys.max() <= 9
    # uniform: both halves of the bar are hit
    assert (xs < 40).any() and (xs >= 40).any()


def test_random_points_reproducible_and_interior():
    m = np.zeros((50, 50), bool)
    m[10:41, 5:36] = True
    a = random_points(m, 3, np.random.default_rng(7))
    b = random_points(m, 3, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    inner = random_points(m, 400, np.random.default_rng(1), interior=True)
    plain = random_points(m, 400, np.random.default_rng(1))
    centre = np.array([20.0, 25.0])  # (x, y) of the square's centre
    d_in = np.linalg.norm(inner - centre, axis=1).mean()
    d_pl = np.linalg.norm(plain - centre, axis=1).mean()
    assert d_in < d_pl  # distance weighting pulls samples inwards


def test_negative_points_in_background_and_margin():
    m = _mask()
    pts = negative_points(m, 30, np.random.default_rng(0))
    assert (m[pts[:, 1].astype(int), pts[:, 0].astype(int)] == 0).all()
    near = negative_points(m, 30, np.random.default_rng(0), margin=2)
    xs, ys = near[:, 0], near[:, 1]
    assert (m[ys.astype(int), xs.astype(int)] == 0).all()
    assert xs.min() >= 28 and xs.max() <= 51 and ys.min() >= 3 and ys.max() <= 11
    with pytest.raises(PromptError, match="whole image"):
        negative_points(np.ones((4, 4)), 1, np.random.default_rng(0))


def test_tight_box_xy_order():
    np.testing.assert_array_equal(tight_box(_mask()), [30, 5, 49, 9])


def test_box_iou():
    assert box_iou([0, 0, 9, 9], [0, 0, 9, 9]) == 1.0
    assert box_iou([0, 0, 9, 9], [0, 0, 4, 9]) == pytest.approx(0.5)
    assert box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 1.0  # one-pixel box has area 1
    assert box_iou([0, 0, 4, 4], [10, 10, 12, 12]) == 0.0


@pytest.mark.parametrize("target", [0.5, 0.75])
def test_jittered_box_hits_iou(target):
    m = _mask()
    g = np.random.default_rng(3)
    tight = tight_box(m)
    ious, centres = [], []
    for _ in range(30):
        b = jittered_box(m, target, g)
        assert 0 <= b[0] <= b[2] <= m.shape[1] - 1 and 0 <= b[1] <= b[3] <= m.shape[0] - 1
        ious.append(box_iou(b, tight))
        centres.append(((b[0] + b[2]) / 2, (b[1] + b[3]) / 2))
    assert np.all(np.abs(np.array(ious) - target) <= 0.05)
    c = np.array(centres)
    # the jittered boxes stay around the object (x ~ 39.5, y ~ 7), not its transpose
    assert abs(c[:, 0].mean() - 39.5) < 6 and abs(c[:, 1].mean() - 7) < 3
    assert c[:, 0].std() > 0  # not a deterministic box


def test_jittered_box_object_filling_image_and_tiny():
    full = np.ones((20, 30), bool)  # growing is impossible: must shrink/shift inside
    b = jittered_box(full, 0.5, np.random.default_rng(0))
    assert abs(box_iou(b, tight_box(full)) - 0.5) <= 0.05
    one = np.zeros((20, 30), bool)
    one[4, 25] = True
    b = jittered_box(one, 0.75, np.random.default_rng(0))
    assert abs(box_iou(b, [25, 4, 25, 4]) - 0.75) <= 0.05
    with pytest.raises(ConfigError):
        jittered_box(one, 1.5, np.random.default_rng(0))


def test_next_click_positive_on_largest_false_negative():
    target = np.zeros((30, 50), bool)
    target[2:12, 20:45] = True  # 10 rows x 25 cols
    pred = np.zeros_like(target)
    pred[2:12, 20:25] = True  # misses columns 25..44
    xy, label = next_click(pred, target, np.random.default_rng(0))
    assert label == 1
    x, y = xy
    assert target[int(y), int(x)] and not pred[int(y), int(x)]
    # farthest from the error region's boundary: centre of rows 2..11, columns 25..44
    assert 29 <= x <= 40 and 6 <= y <= 7  # distance 5 to the boundary only there


def test_next_click_negative_on_false_positive_and_none():
    target = np.zeros((30, 50), bool)
    target[20:25, 5:10] = True
    pred = target.copy()
    pred[2:8, 30:48] = True  # a false-positive blob, larger than any miss
    xy, label = next_click(pred, target, np.random.default_rng(0))
    assert label == 0 and 30 <= xy[0] <= 47 and 2 <= xy[1] <= 7
    assert next_click(target, target, np.random.default_rng(0)) is None
    with pytest.raises(PromptError, match="shapes differ"):
        next_click(target, target.T)


def test_point_grid():
    g = point_grid(4)
    assert g.shape == (16, 2)
    np.testing.assert_allclose(g[0], [0.125, 0.125])
    np.testing.assert_allclose(g[1], [0.375, 0.125])  # x varies fastest
    px = point_grid(2, image_size=(100, 200))
    np.testing.assert_allclose(px, [[50, 25], [150, 25], [50, 75], [150, 75]])


def test_protocol_registry():
    m = _mask()
    assert set(PROMPT_PROTOCOLS) == {"1pt", "3pt", "bbox0.5", "bbox0.75", "box", "everything"}
    g = np.random.default_rng(0)
    p1 = get_protocol("1pt")(m, g)
    assert p1.points.shape == (1, 2) and p1.labels.tolist() == [1] and p1.box is None
    p3 = get_protocol("3pt")(m, g)
    assert (
        p3.points.shape == (3, 2)
        and (m[p3.points[:, 1].astype(int), p3.points[:, 0].astype(int)] > 0).all()
    )
    pb = get_protocol("box")(m, g)
    assert pb.points.shape == (0, 2) and pb.box.tolist() == [30, 5, 49, 9]
    assert abs(box_iou(get_protocol("bbox0.75")(m, g).box, pb.box) - 0.75) <= 0.05
    assert get_protocol("everything")(m, g).points.shape == (1024, 2)
    with pytest.raises(ConfigError, match="unknown prompt protocol"):
        get_protocol("2pt")


@pytest.mark.parametrize("name", ["1pt", "3pt", "bbox0.5", "bbox0.75", "box"])
def test_empty_target_raises_prompt_error(name):
    with pytest.raises(PromptError, match="empty"):
        get_protocol(name)(np.zeros((10, 12)), np.random.default_rng(0))


def test_per_slice_prompts_and_with_click():
    vol = np.zeros((3, 20, 30), bool)
    vol[0, 2:5, 20:28] = True
    vol[2, 10:15, 1:4] = True
    ps = per_slice_prompts(vol, "box", np.random.default_rng(0))
    assert ps[1] is None
    assert ps[0].box.tolist() == [20, 2, 27, 4] and ps[2].box.tolist() == [1, 10, 3, 14]
    p = ps[0].with_click(np.array([3.0, 4.0]), 0)
    assert p.points.tolist() == [[3.0, 4.0]] and p.labels.tolist() == [0] and p.box is not None
    with pytest.raises(PromptError):
        Prompt(np.zeros((2, 2)), np.zeros(3))


def test_prompt_validate_checks_xy_bounds():
    ok = Prompt(np.array([[59.0, 5.0]]), np.array([1]))
    assert ok.validate((40, 60)) is ok  # x up to W-1 = 59 is inside a 40x60 (HxW) image
    with pytest.raises(PromptError, match="outside"):
        Prompt(np.array([[5.0, 59.0]]), np.array([1])).validate((40, 60))  # y too large: swapped
    with pytest.raises(PromptError, match=r"box \(0, 0, 70, 10\) lies outside"):
        Prompt(np.zeros((0, 2)), np.zeros(0), box=[0, 0, 70, 10]).validate((40, 60))
    with pytest.raises(PromptError, match="empty prompt"):
        Prompt(np.zeros((0, 2)), np.zeros(0)).validate((40, 60))
    with pytest.raises(PromptError, match="labels"):
        Prompt(np.array([[1.0, 1.0]]), np.array([2])).validate((40, 60))
    with pytest.raises(PromptError, match="finite"):
        Prompt(np.array([[np.nan, 1.0]]), np.array([1])).validate((40, 60))


def test_prompt_defaults_no_points_as_empty_arrays():
    p = Prompt(box=[1, 2, 3, 4])  # points/labels optional; "no points" is (0, 2) / (0,), not None
    assert p.points.shape == (0, 2) and p.points.dtype == np.float32
    assert p.labels.shape == (0,) and p.labels.dtype == np.int64
    q = Prompt(points=[[3, 4], [5, 6]])  # labels default to positive
    assert q.labels.tolist() == [1, 1] and q.box is None
    with pytest.raises(PromptError, match="without points"):
        Prompt(labels=[1])
    with pytest.raises(PromptError, match="4 numbers"):
        Prompt(box=[1, 2, 3])
    with pytest.raises(PromptError, match="x0 <= x1"):  # an inverted box cannot be built
        Prompt(box=[5, 5, 1, 1])


def test_prompt_empty_and_ambiguous():
    assert Prompt().empty and Prompt(np.zeros((0, 2)), np.zeros(0)).empty
    assert not Prompt(mask_input=np.zeros((1, 8, 8), np.float32)).empty  # mask-only is a prompt
    assert not Prompt(box=[0, 0, 1, 1]).empty
    assert Prompt(points=[[1, 1]]).ambiguous  # one point, no box: SAM's 3 candidates
    assert not Prompt(points=[[1, 1]], box=[0, 0, 2, 2]).ambiguous
    assert not Prompt(points=[[1, 1], [2, 2]]).ambiguous
    assert not Prompt(box=[0, 0, 2, 2]).ambiguous


def test_prompt_validate_uses_sam_pixel_edge_bounds():
    # SamPredictor's rule: 0 <= x <= W, 0 <= y <= H, for points and box corners
    Prompt(points=[[60, 40]]).validate((40, 60))
    Prompt(box=[0, 0, 60, 40]).validate((40, 60))
    with pytest.raises(PromptError, match=r"point \(60.5, 1\) lies outside the 60x40"):
        Prompt(points=[[60.5, 1]]).validate((40, 60))
    with pytest.raises(PromptError, match="box coordinates must be finite"):
        Prompt(box=[0, 0, np.inf, 3]).validate((40, 60))
    assert Prompt(mask_input=np.zeros((1, 8, 8))).validate((40, 60)).mask_input is not None


def test_prompt_json_round_trip_and_errors():
    p = Prompt(points=[[1.5, 2], [3, 4]], labels=[1, 0], box=[0, 1, 5, 6])
    obj = p.to_json()
    assert obj == {"points": [[1.5, 2.0, 1], [3.0, 4.0, 0]], "box": [0.0, 1.0, 5.0, 6.0]}
    q = Prompt.from_json(obj)
    np.testing.assert_array_equal(q.points, p.points)
    np.testing.assert_array_equal(q.labels, p.labels)
    np.testing.assert_array_equal(q.box, p.box)
    assert Prompt(box=[1, 2, 3, 4]).to_json() == {"box": [1.0, 2.0, 3.0, 4.0]}  # no "points": []
    assert Prompt.from_json({"points": [[7, 8]]}).labels.tolist() == [1]
    for bad, msg in [
        ([1, 2], "must be an object"),
        ({"bx": [1, 2, 3, 4]}, "unknown prompt keys"),
        ({"points": [["a", 1]]}, "points must be"),
        ({"points": [[1, 2, 1, 0]]}, r"\[x, y\] or \[x, y, label\]"),
        ({"points": [[1, 2, 0.5]]}, "labels must be 1 or 0"),
        ({"box": [1, "b", 3, 4]}, "box must be"),
    ]:
        with pytest.raises(PromptError, match=msg):
            Prompt.from_json(bad)


def test_with_click_carries_mask_input():
    logits = np.ones((1, 8, 8), np.float32)
    p = Prompt(box=[0, 0, 5, 5]).with_click([2, 3], 1, logits)
    assert p.points.tolist() == [[2.0, 3.0]] and p.labels.tolist() == [1]
    assert p.mask_input is logits and p.box.tolist() == [0, 0, 5, 5]
    assert p.with_click([1, 1], 0).mask_input is None  # old logits belong to the old round
