"""SamPredictor: coordinate convention, prompt validation, embedding cache, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsa.errors import DataError, PromptError
from medsa.sam import SamPredictor, build_sam
from medsa.sam.transforms import ResizeLongestSide, ResizeStretch


@pytest.fixture(scope="module")
def model(tiny_oracle):
    return build_sam("vit_tiny", checkpoint=tiny_oracle[1])


def _blob(shape: tuple[int, int], x: float, y: float, sigma: float = 6.0) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    g = np.exp(-(((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2)))
    return (255 * g).astype(np.uint8)


@pytest.mark.parametrize("transform", [ResizeLongestSide(128), ResizeStretch(128)])
def test_xy_convention_follows_the_image_resize(transform) -> None:
    """A blob drawn at column x, row y ends up where apply_coords maps (x, y)."""
    h, w, x, y = 90, 200, 150.0, 25.0
    img = np.repeat(_blob((h, w), x, y)[..., None], 3, axis=-1)
    resized = transform.apply_image(img)[..., 0].astype(float)
    row, col = np.unravel_index(np.argmax(resized), resized.shape)
    ((tx, ty),) = transform.apply_coords(np.array([[x, y]]), (h, w))
    assert abs(col - tx) <= 1.0 and abs(row - ty) <= 1.0
    if isinstance(transform, ResizeLongestSide) and not isinstance(transform, ResizeStretch):
        assert resized.shape == (58, 128)  # long side 128, aspect kept (90 * 128 / 200 = 57.6)
    else:
        assert resized.shape == (128, 128)
    box = transform.apply_boxes(np.array([[x, y, x + 20, y + 10]]), (h, w))
    assert np.allclose(box[0, :2], [tx, ty])


def test_predictor_passes_transformed_xy_to_prompt_encoder(model) -> None:
    pred = SamPredictor(model)
    pred.set_image(np.zeros((90, 200, 3), np.uint8))
    seen = {}
    orig = model.prompt_encoder.forward

    def spy(points, boxes, masks):
        seen["points"], seen["boxes"] = points, boxes
        return orig(points, boxes, masks)

    model.prompt_encoder.forward = spy
    try:
        pred.predict(
            point_coords=np.array([[150.0, 25.0]]), point_labels=np.array([1]), box=[0, 0, 200, 90]
        )
    finally:
        del model.prompt_encoder.forward
    scale = 128 / 200
    assert torch.allclose(seen["points"][0], torch.tensor([[[150 * scale, 25 * 58 / 90]]]))
    assert seen["points"][1].tolist() == [[1]]
    assert torch.allclose(seen["boxes"], torch.tensor([[0.0, 0.0, 128.0, 58.0]]))


def test_outputs_have_original_size(model) -> None:
    pred = SamPredictor(model)
    pred.set_image(np.random.default_rng(0).integers(0, 255, (70, 50, 3), dtype=np.uint8))
    masks, scores, low = pred.predict(point_coords=[[10, 20]], point_labels=[1])
    assert masks.shape == (3, 70, 50) and masks.dtype == bool
    assert scores.shape == (3,) and low.shape == (3, 32, 32)
    masks, scores, low = pred.predict(box=[5, 5, 40, 60], multimask_output=False)
    assert masks.shape == (1, 70, 50) and scores.shape == (1,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"point_coords": [[60, 10]], "point_labels": [1]}, "outside the image"),
        ({"point_coords": [[-1, 10]], "point_labels": [1]}, "outside the image"),
        ({"point_coords": [[10, 41]], "point_labels": [1]}, "outside the image"),
        ({"point_coords": [[np.nan, 10]], "point_labels": [1]}, "NaN"),
        ({"point_coords": [10, 10], "point_labels": [1]}, r"shape \(N, 2\).*\(2,\)"),
        ({"point_coords": [[1, 2, 3]], "point_labels": [1]}, r"\(1, 3\)"),
        ({"point_coords": [[1, 2], [3, 4]], "point_labels": [1]}, r"\(2,\).*got \(1,\)"),
        ({"point_coords": [[1, 2]]}, "together"),
        ({"point_coords": [[1, 2]], "point_labels": [7]}, "foreground"),
        ({"box": [0, 0, 10]}, r"shape \(4,\).*\(3,\)"),
        ({"box": [20, 0, 10, 10]}, "x0 <= x1"),
        ({"box": [0, 0, 10, 100]}, "outside the image"),
        ({"box": [0, np.inf, 10, 10]}, "NaN or infinite"),
        ({"mask_input": np.zeros((1, 64, 64))}, r"\(1, 32, 32\).*\(1, 64, 64\)"),
        ({"mask_input": np.full((1, 32, 32), np.nan)}, "NaN"),
    ],
)
def test_invalid_prompts(model, kwargs, match) -> None:
    pred = SamPredictor(model)
    pred.set_image(np.zeros((40, 50), np.uint8))
    with pytest.raises(PromptError, match=match):
        pred.predict(**kwargs)


def test_predict_before_set_image_and_bad_images(model) -> None:
    pred = SamPredictor(model)
    with pytest.raises(PromptError, match="set_image"):
        pred.predict(box=[0, 0, 1, 1])
    with pytest.raises(DataError, match=r"got \(4, 5, 6, 7\)"):
        pred.set_image(np.zeros((4, 5, 6, 7), np.uint8))
    with pytest.raises(DataError, match="NaN"):
        pred.set_image(np.full((8, 8), np.nan, np.float32))


def test_embedding_cache(model) -> None:
    calls = []
    handle = model.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        rng = np.random.default_rng(1)
        a = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
        b = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
        pred = SamPredictor(model, cache_size=2)
        pred.set_image(a)
        emb_a = pred.get_image_embedding().clone()
        pred.set_image(b)
        pred.set_image(a.copy())  # same content, different object: cache hit
        assert len(calls) == 2 and pred.cache_hits == 1 and pred.cache_misses == 2
        assert torch.equal(pred.get_image_embedding(), emb_a)
        assert pred.original_size == (40, 60)

        lru = SamPredictor(model, cache_size=1)
        for img in (a, b, a):
            lru.set_image(img)
        assert lru.cache_hits == 0 and len(calls) == 5  # a was evicted by b
        lru.clear_cache()
        lru.set_image(a)
        assert len(calls) == 6
    finally:
        handle.remove()


def test_grayscale_and_float_images_match_uint8_rgb(model) -> None:
    gray = np.random.default_rng(2).integers(0, 255, (50, 40), dtype=np.uint8)
    pred = SamPredictor(model, cache_size=0)
    pred.set_image(np.stack([gray] * 3, axis=-1))
    ref = pred.get_image_embedding().clone()
    pred.set_image(gray)
    assert torch.equal(pred.get_image_embedding(), ref)
    pred.set_image(gray[..., None].astype(np.float32) / 255.0)
    assert (pred.get_image_embedding() - ref).abs().max() < 0.05


def test_predict_torch_batch_equals_single_predictions(model) -> None:
    pred = SamPredictor(model)
    pred.set_image(np.random.default_rng(3).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    boxes = np.array([[5, 5, 50, 40], [30, 10, 90, 60], [0, 0, 96, 64]], dtype=float)
    t = pred.transform.apply_boxes_torch(torch.as_tensor(boxes), pred.original_size)
    masks, iou, low = pred.predict_torch(None, None, boxes=t, multimask_output=False)
    assert masks.shape == (3, 1, 64, 96) and iou.shape == (3, 1) and low.shape == (3, 1, 32, 32)
    for i, box in enumerate(boxes):
        _, s, lo = pred.predict(box=box, multimask_output=False)
        assert np.allclose(lo, low[i].numpy(), atol=1e-5)
        assert np.allclose(s, iou[i].numpy(), atol=1e-5)
    with pytest.raises(PromptError, match="batch sizes differ"):
        pred.predict_torch(torch.zeros(2, 1, 2), torch.ones(2, 1), boxes=t, multimask_output=False)


def test_half_precision_model(tiny_oracle) -> None:
    """A model cast to bfloat16 works through the predictor and stays close to fp32."""
    img = np.random.default_rng(4).integers(0, 255, (50, 60, 3), dtype=np.uint8)
    prompt = {"point_coords": [[10, 12]], "point_labels": [1], "box": [2, 3, 40, 45]}
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        model = build_sam("vit_tiny", checkpoint=tiny_oracle[1]).to(dtype)
        pred = SamPredictor(model)
        pred.set_image(img)
        assert pred.get_image_embedding().dtype == dtype
        logits, scores, low = pred.predict(**prompt, return_logits=True, mask_input=None)
        assert logits.dtype == np.float32 and scores.dtype == np.float32
        outs.append(low)
    assert np.abs(outs[0] - outs[1]).max() < 0.1 * np.abs(outs[0]).max()


def test_image_to_rgb_intensity_rules() -> None:
    from medsa.sam.predictor import image_to_rgb

    u8 = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    assert image_to_rgb(u8) is not None and np.array_equal(image_to_rgb(u8), u8)
    unit = np.array([[0.0, 0.5], [1.0, 0.25]], np.float32)
    out = image_to_rgb(unit)
    assert out.shape == (2, 2, 3) and np.allclose(out[..., 1], unit * 255)
    ct = np.array([[-1000, 0], [500, 3000]], np.int16)  # outside [0, 255]: min-max rescaled
    out = image_to_rgb(ct)
    assert np.isclose(out.min(), 0) and np.isclose(out.max(), 255)
    assert np.isclose(out[0, 1, 0], 1000 / 4000 * 255)
    rgba = np.zeros((3, 4, 4), np.uint8)
    assert image_to_rgb(rgba).shape == (3, 4, 3)
    assert image_to_rgb(np.ones((2, 2), bool)).max() == 255


def test_dense_pe_is_reused_until_the_buffer_changes(tiny_oracle) -> None:
    """The predictor computes the prompt encoder's dense PE once, but a changed PE buffer (new
    weights loaded in place) or a clear_cache() is picked up on the next prediction."""
    model = build_sam("vit_tiny", checkpoint=tiny_oracle[1])
    calls = []
    orig = model.prompt_encoder.get_dense_pe
    model.prompt_encoder.get_dense_pe = lambda: (calls.append(1), orig())[1]
    pred = SamPredictor(model)
    pred.set_image(np.random.default_rng(5).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    assert pred.get_image_embedding().is_contiguous(memory_format=torch.channels_last)
    box = np.array([5, 5, 40, 30])
    low1 = pred.predict(box=box)[2]
    assert np.array_equal(pred.predict(box=box)[2], low1)
    assert len(calls) == 1

    gaussian = model.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    with torch.no_grad():
        gaussian.mul_(1.5)  # bumps the buffer's version
    low2 = pred.predict(box=box)[2]
    assert len(calls) == 2 and np.abs(low2 - low1).max() > 1e-3
    fresh = SamPredictor(model, cache_size=0)
    fresh.set_image(np.random.default_rng(5).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    np.testing.assert_allclose(fresh.predict(box=box)[2], low2, atol=1e-5)
    pred.clear_cache()
    pred.predict(box=box)
    assert len(calls) == 4  # fresh predictor + after clear_cache
