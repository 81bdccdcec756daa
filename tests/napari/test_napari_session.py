"""The widget's Qt-free core: napari coordinates -> SAM prompts, painting, the 2D segmenter."""

from __future__ import annotations

import numpy as np
import pytest

from medsa.errors import PromptError
from medsa.napari._session import Segmenter, paint, prompts_by_slice


def test_prompts_by_slice_converts_napari_coordinates_and_groups_per_object():
    points = np.array([[2, 10, 20], [2, 12, 25], [3, 5, 6], [2, 40, 40], [2, 99, 5]], float)
    positive = [True, False, True, True, True]
    objects = [1, 1, 1, 2, 1]
    box_a = np.array([[2, 8, 30], [2, 8, 18], [2, 30, 18], [2, 30, 30]], float)  # any vertex order
    box_b = np.array([[2, 0, 0], [2, 0, 4], [2, 9, 4], [2, 9, 0]], float)  # drawn later: wins
    out = prompts_by_slice(points, positive, objects, [box_a, box_b], [1, 1], (4, 50, 60), obj=1)
    assert sorted(out) == [2, 3]
    np.testing.assert_allclose(out[2].points, [[20, 10], [25, 12]])  # (x = col, y = row)
    np.testing.assert_array_equal(out[2].labels, [1, 0])
    np.testing.assert_allclose(out[2].box, [0, 0, 4, 9])
    assert out[3].box is None and len(out[3].points) == 1
    # the point at row 99 lies outside the 50-row image: dropped, not clipped onto the border
    assert all(p[1] < 50 for p in out[2].points)
    other = prompts_by_slice(points, positive, objects, [box_a], [1], (4, 50, 60), obj=2)
    assert sorted(other) == [2] and other[2].box is None
    # 2D: (row, col) coordinates, everything on "slice" 0; boxes clipped to the image
    two_d = prompts_by_slice(
        np.array([[3, 4]], float), [True], [1], [np.array([[-5, -5], [70, 80]], float)], [1],
        (50, 60), obj=1,
    )  # fmt: skip
    np.testing.assert_allclose(two_d[0].points, [[4, 3]])
    np.testing.assert_allclose(two_d[0].box, [0, 0, 60, 50])


def test_paint_replaces_the_object_and_keeps_the_others():
    lab = np.zeros((4, 5), np.uint16)
    lab[0, :] = 1
    lab[1, :] = 2
    m = np.zeros((4, 5), bool)
    m[1:3, :2] = True
    paint(lab, m, 1)
    assert (lab[0] == 0).all()  # the old mask of object 1 is gone
    assert (lab[1] == 2).all()  # object 2 is not eaten
    assert (lab[2, :2] == 1).all() and lab.sum() == 2 * 5 + 2


def test_segmenter_2d_caches_the_embedding(tiny_model_napari, monkeypatch):
    img = (np.random.default_rng(0).random((40, 48, 3)) * 255).astype(np.uint8)
    seg = Segmenter(tiny_model_napari, img, 2)
    calls = []
    orig = seg.predictor.set_image
    monkeypatch.setattr(seg.predictor, "set_image", lambda x: (calls.append(1), orig(x)))
    from medsa.data.prompts import Prompt

    p = Prompt(box=np.array([5, 5, 30, 25], np.float32))
    m1, _ = seg.segment(0, p)
    m2, _ = seg.segment(0, Prompt(points=np.array([[10, 10]], np.float32)))
    assert m1.shape == m2.shape == (40, 48) and len(calls) == 1 and seg.is_embedded(0)
    with pytest.raises(PromptError, match="2D"):
        seg.propagate({0: p})
    with pytest.raises(PromptError, match="empty prompt"):
        seg.segment(0, Prompt())


@pytest.fixture(scope="module")
def tiny_model_napari():
    torch = pytest.importorskip("torch")
    from medsa.sam import build_sam

    torch.manual_seed(0)
    return build_sam("vit_tiny").eval()
