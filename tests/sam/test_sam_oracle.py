"""End-to-end equality with Meta's segment-anything (predictor, prompt encoder, mask decoder)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsa.sam import SamPredictor, build_sam
from medsa.sam.transformer import Attention

pytest.importorskip("torchvision")  # Meta's ResizeLongestSide needs it
from segment_anything import SamPredictor as MetaPredictor  # noqa: E402

TOL = 1e-4


def _prompts(h: int, w: int, prev_logits: np.ndarray) -> list[dict]:
    return [
        {"point_coords": np.array([[w * 0.3, h * 0.6]]), "point_labels": np.array([1])},
        {
            "point_coords": np.array([[w * 0.2, h * 0.2], [w * 0.7, h * 0.5], [w - 1, h - 1]]),
            "point_labels": np.array([1, 0, 1]),
        },
        {"box": np.array([w * 0.1, h * 0.2, w * 0.8, h * 0.9])},
        {
            "box": np.array([w * 0.1, h * 0.2, w * 0.8, h * 0.9]),
            "point_coords": np.array([[w * 0.5, h * 0.5], [w * 0.15, h * 0.85]]),
            "point_labels": np.array([1, 0]),
        },
        {
            "point_coords": np.array([[w * 0.5, h * 0.5]]),
            "point_labels": np.array([1]),
            "mask_input": prev_logits,
        },
    ]


@pytest.mark.parametrize("fold", ["auto", "always"])
@pytest.mark.parametrize("shape", [(100, 128), (128, 72)])
def test_predictor_matches_segment_anything(tiny_oracle, shape, fold) -> None:
    """``fold="always"``: the decoder's folded few-token cross-attention (which the tiny model
    does not pick on its own, its 8x8 grid is too small) gives Meta's results too."""
    ref, ckpt = tiny_oracle
    ours = build_sam("vit_tiny", checkpoint=ckpt)
    for mod in ours.mask_decoder.modules():
        if isinstance(mod, Attention):
            mod.fold = fold
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)

    meta = MetaPredictor(ref)
    meta.set_image(image)
    pred = SamPredictor(ours)
    pred.set_image(image)
    emb_diff = (meta.get_image_embedding() - pred.get_image_embedding()).abs().max().item()
    assert emb_diff <= TOL

    prev = rng.normal(size=(1, 32, 32)).astype(np.float32) * 3
    outputs = []
    for multimask in (True, False):
        for prompt in _prompts(*shape, prev):
            m_ref, s_ref, l_ref = meta.predict(
                **prompt, multimask_output=multimask, return_logits=True
            )
            m, s, lo = pred.predict(**prompt, multimask_output=multimask, return_logits=True)
            assert m.shape == m_ref.shape == (3 if multimask else 1, *shape)
            assert np.abs(lo - l_ref).max() <= TOL, prompt.keys()
            assert np.abs(s - s_ref).max() <= TOL
            assert np.abs(m - m_ref).max() <= TOL
            outputs.append(lo)
    # The comparison is meaningful: each prompt changes the logits far beyond the tolerance.
    for a, b in zip(outputs[:4], outputs[1:5], strict=True):
        assert np.abs(a - b).max() > 100 * TOL


def test_sam_forward_matches_segment_anything(tiny_oracle) -> None:
    """Meta's batched ``Sam.forward`` API gives the same result; larger img_size also works."""
    ref, ckpt = tiny_oracle
    ours = build_sam("vit_tiny", checkpoint=ckpt)
    g = torch.Generator().manual_seed(3)
    batch = [
        {
            "image": torch.rand(3, 128, 96, generator=g) * 255,
            "original_size": (160, 120),
            "boxes": torch.tensor([[10.0, 20.0, 80.0, 100.0], [0.0, 0.0, 50.0, 60.0]]),
        },
        {
            "image": torch.rand(3, 90, 128, generator=g) * 255,
            "original_size": (90, 128),
            "point_coords": torch.tensor([[[30.0, 40.0], [60.0, 10.0]]]),
            "point_labels": torch.tensor([[1, 0]]),
        },
    ]
    with torch.no_grad():
        expected = ref(batch, multimask_output=True)
        got = ours(batch, multimask_output=True)
    for e, o in zip(expected, got, strict=True):
        assert (e["low_res_logits"] - o["low_res_logits"]).abs().max() <= TOL
        assert (e["iou_predictions"] - o["iou_predictions"]).abs().max() <= TOL
        assert e["masks"].shape == o["masks"].shape


def test_predict_masks_batched_equals_per_image(tiny_oracle) -> None:
    """Sam.predict_masks with one prompt set per image equals Meta's decoder run image by image."""
    ref, ckpt = tiny_oracle
    ours = build_sam("vit_tiny", checkpoint=ckpt)
    g = torch.Generator().manual_seed(5)
    emb = torch.randn(3, 32, 8, 8, generator=g)
    coords = torch.rand(3, 2, 2, generator=g) * 128
    labels = torch.tensor([[1, 0], [1, 1], [0, 1]])
    boxes = torch.tensor([[0.0, 0.0, 60.0, 60.0], [10.0, 5.0, 120.0, 90.0], [30, 30, 40, 50]])
    with torch.no_grad():
        low, iou = ours.predict_masks(emb, points=(coords, labels), boxes=boxes)
        for i in range(3):
            sp, de = ref.prompt_encoder(
                points=(coords[i : i + 1], labels[i : i + 1]), boxes=boxes[i : i + 1], masks=None
            )
            l_ref, i_ref = ref.mask_decoder(
                emb[i : i + 1], ref.prompt_encoder.get_dense_pe(), sp, de, False
            )
            assert (low[i : i + 1] - l_ref).abs().max() <= TOL
            assert (iou[i : i + 1] - i_ref).abs().max() <= TOL
    assert low.shape == (3, 1, 32, 32) and iou.shape == (3, 1)
    # No prompt at all: one "no-prompt" mask per image.
    with torch.no_grad():
        low0, _ = ours.predict_masks(emb)
    assert low0.shape == (3, 1, 32, 32)


def test_predictor_matches_segment_anything_at_256(tmp_path) -> None:
    """Another encoder input size (16x16 tokens: windows padded, rel-pos tables 31 long)."""
    from sam_helpers import meta_sam, randomise

    from medsa.sam.build import get_config

    ref = meta_sam(get_config("vit_tiny", img_size=256))
    randomise(ref, seed=7)
    path = tmp_path / "tiny256.pth"
    torch.save(ref.state_dict(), path)
    ours = build_sam("vit_tiny", checkpoint=path, img_size=256)
    image = np.random.default_rng(1).integers(0, 256, size=(150, 200, 3), dtype=np.uint8)
    meta, pred = MetaPredictor(ref), SamPredictor(ours)
    meta.set_image(image)
    pred.set_image(image)
    assert (meta.get_image_embedding() - pred.get_image_embedding()).abs().max() <= TOL
    for prompt in _prompts(150, 200, np.zeros((1, 64, 64), np.float32)):
        _, s_ref, l_ref = meta.predict(**prompt, return_logits=True)
        _, s, lo = pred.predict(**prompt, return_logits=True)
        assert np.abs(lo - l_ref).max() <= TOL and np.abs(s - s_ref).max() <= TOL
