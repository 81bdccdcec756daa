"""SAM resize / inverse, normalisation, CT windows, 3D chunks, volume resize."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsa.data.preprocess import (
    CT_WINDOWS,
    SAM_PIXEL_MEAN,
    SamTransform,
    chunk_indices,
    get_preprocess_shape,
    normalize,
    percentile_normalize,
    resize_boxes,
    resize_coords,
    resize_volume,
    sam_resize,
    sam_resize_mask,
    scale_intensity,
    slice_stack,
    take_slices,
    to_three_channels,
    undo_sam_resize,
    window,
)
from medsa.errors import ConfigError


def test_preprocess_shape_and_coords_match_segment_anything():
    from segment_anything.utils.transforms import ResizeLongestSide

    ref = ResizeLongestSide(1024)
    for h, w in [(288, 384), (729, 1024), (101, 37)]:
        assert get_preprocess_shape(h, w, 1024) == ResizeLongestSide.get_preprocess_shape(
            h, w, 1024
        )
        pts = np.array([[5.0, 17.0], [w - 1.0, h - 1.0]])
        np.testing.assert_allclose(
            resize_coords(pts, (h, w)), ref.apply_coords(pts, (h, w)), rtol=1e-5
        )
        box = np.array([[3.0, 4.0, 20.0, 30.0]])
        np.testing.assert_allclose(
            resize_boxes(box, (h, w)), ref.apply_boxes(box, (h, w)), rtol=1e-5
        )


def test_sam_resize_pads_bottom_right_and_inverts():
    img = np.zeros((30, 60), np.float32)
    img[:, 40:] = 200.0  # bright right part: an x/y swap would move it to the bottom
    out, info = sam_resize(img, 64)
    assert (
        out.shape == (64, 64) and info.resized_size == (32, 64) and info.original_size == (30, 60)
    )
    assert out[32:].max() == 0.0  # padding at the bottom
    assert out[:32, 50].min() > 150 and out[:32, 10].max() < 1
    back = undo_sam_resize(out, info)
    assert back.shape == (30, 60)
    np.testing.assert_allclose(back[:, :35], 0, atol=1e-3)
    np.testing.assert_allclose(back[:, 45:], 200, atol=1e-3)


def test_resize_mask_nearest_and_undo_low_res_torch():
    m = np.zeros((40, 20), np.uint8)
    m[5:15, 2:8] = 3
    r = sam_resize_mask(m, 80)
    assert r.shape == (80, 80) and r.dtype == np.uint8 and set(np.unique(r)) == {0, 3}
    assert r[:, 40:].max() == 0  # padding on the right for a tall image
    _, info = sam_resize(m, 80)
    low = torch.from_numpy(sam_resize_mask(m, 80).astype(np.float32))[None, None]
    low = torch.nn.functional.interpolate(low, size=(20, 20), mode="nearest")
    back = undo_sam_resize(low, info, mode="nearest")
    assert isinstance(back, torch.Tensor) and back.shape == (1, 1, 40, 20)
    inter = ((back[0, 0].numpy() > 0) & (m > 0)).sum()
    assert inter / (m > 0).sum() > 0.7


def test_normalize_methods():
    img = np.full((4, 5, 3), 100.0, np.float32)
    img[..., 0] = SAM_PIXEL_MEAN[0]
    s = normalize(img, "sam")
    np.testing.assert_allclose(s[..., 0], 0.0, atol=1e-6)
    assert s[..., 1].mean() < 0
    mm = normalize(np.array([[2.0, 4.0], [6.0, 10.0]]), "minmax")
    np.testing.assert_allclose(mm, [[0, 0.25], [0.5, 1.0]])
    with pytest.raises(ConfigError):
        normalize(img, "zscore")


def test_ct_window_and_percentile():
    hu = np.array([-1000.0, -160.0, 40.0, 240.0, 1000.0])
    np.testing.assert_allclose(window(hu, "abdomen"), [0, 0, 0.5, 1, 1])
    assert set(CT_WINDOWS) >= {"abdomen", "lung", "bone", "brain", "liver", "mediastinum"}
    np.testing.assert_allclose(window(hu, (0, 2000)), [0.0, 0.42, 0.52, 0.62, 1.0])
    np.testing.assert_allclose(scale_intensity(hu, "ct:40,400"), window(hu, "abdomen") * 255)
    x = np.arange(1000, dtype=np.float32)
    x[0], x[-1] = -1e6, 1e6  # outliers are clipped
    p = percentile_normalize(x)
    assert p.min() == 0 and p.max() == 1 and 0.45 < p[500] < 0.55
    assert scale_intensity(np.array([[3, 200]], np.uint8)).tolist() == [[3.0, 200.0]]
    with pytest.raises(ConfigError):
        window(hu, "kidney")


def test_three_channels():
    assert to_three_channels(np.zeros((4, 6))).shape == (4, 6, 3)
    assert to_three_channels(np.zeros((4, 6, 4))).shape == (4, 6, 3)


def test_chunks_cover_all_slices_with_padding_policies():
    c = chunk_indices(10, 4)
    assert [i.tolist() for i in c] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 9, 9]]
    z = chunk_indices(10, 4, pad="zero")
    assert z[-1].tolist() == [8, 9, -1, -1]
    s = chunk_indices(10, 4, pad="shift")
    assert s[-1].tolist() == [6, 7, 8, 9]
    assert chunk_indices(3, 5, pad="shift")[0].tolist() == [0, 1, 2, 2, 2]
    o = chunk_indices(10, 4, stride=2)
    covered = set(np.concatenate(o).tolist())
    assert covered == set(range(10))
    vol = np.arange(10)[:, None, None] * np.ones((1, 2, 3)) + 1
    t = take_slices(vol, z[-1])
    assert t[:, 0, 0].tolist() == [9, 10, 0, 0]


def test_slice_stack_and_resize_volume():
    vol = np.arange(5)[:, None, None] * np.ones((1, 4, 6))
    st = slice_stack(vol, 0)
    assert st.shape == (4, 6, 3) and st[0, 0].tolist() == [0, 0, 1]
    assert slice_stack(vol, 4)[0, 0].tolist() == [3, 4, 4]
    lab = np.zeros((6, 10, 14), np.uint8)
    lab[:, :, 7:] = 2
    r = resize_volume(lab, (12, 5, 7), kind="label")
    assert r.shape == (12, 5, 7) and r.dtype == np.uint8 and set(np.unique(r)) == {0, 2}
    assert r[:, :, -1].min() == 2 and r[:, :, 0].max() == 0
    img = resize_volume(lab.astype(np.float32), (12, 5, 7))
    assert img.dtype == np.float32 and 0 < img[0, 0, 3] < 2  # trilinear blends the edge


def test_sam_transform():
    img = np.zeros((30, 60, 3), np.uint8)
    tgt = np.zeros((30, 60), np.uint8)
    tgt[2:5, 40:50] = 1
    out = SamTransform(size=64)({"image": img, "target": tgt, "case_id": "a"})
    assert out["image"].shape == (3, 64, 64) and out["image"].dtype == torch.float32
    assert out["target"].shape == (64, 64) and out["target"][:, :40].sum() == 0
    assert out["original_size"] == (30, 60) and out["case_id"] == "a"
    assert out["image"][:, 40:].abs().max() == 0  # pad after normalisation


def test_resize_spatial_shapes_kinds_and_spacing():
    from medsa.data.preprocess import (
        check_resize_to,
        resize_spatial,
        resized_shape,
        resized_spacing,
    )

    vol = np.zeros((5, 12, 16), bool)
    vol[1:4, 3:9, 4:12] = True
    up = resize_spatial(vol, (10, 24, 32), kind="label")
    assert up.dtype == bool and up.shape == (10, 24, 32) and up.sum() == vol.sum() * 8
    assert np.array_equal(resize_spatial(up, vol.shape, kind="label"), vol)  # exact inverse
    rgb = np.random.default_rng(0).uniform(0, 255, (12, 16, 3)).astype(np.float32)
    small = resize_spatial(rgb, (6, 8), kind="image", channels_last=True)
    assert small.shape == (6, 8, 3) and small.dtype == np.float32
    np.testing.assert_allclose(small[0, 0], rgb[:2, :2].mean(axis=(0, 1)), rtol=1e-5)
    assert resized_shape((5, 12, 16), (8, 8)) == (5, 8, 8)  # in-plane: slices kept
    assert resized_shape((5, 12, 16), (2, 8, 8)) == (2, 8, 8)
    with pytest.raises(ConfigError, match="data is 2D"):
        resized_shape((12, 16), (2, 8, 8))
    with pytest.raises(ConfigError):
        check_resize_to((0, 8))
    sp = resized_spacing((2.5, 0.8, 0.7), (5, 12, 16), (10, 24, 32))
    np.testing.assert_allclose(sp, (1.25, 0.4, 0.35))  # same physical extent
