"""Mask-decoder hook points on TwoWayAttentionBlock (token_adapter, mlp_adapter, image_adapter)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medsa.sam import build_sam


@pytest.fixture(scope="module")
def setup(tiny_oracle):
    model = build_sam("vit_tiny", checkpoint=tiny_oracle[1])
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(2, 32, 8, 8, generator=g)
    boxes = torch.tensor([[10.0, 10.0, 90.0, 70.0], [0.0, 20.0, 60.0, 120.0]])
    return model, emb, boxes


class _Delta(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # varies over channels: a constant shift would be removed by the following LayerNorm
        self.w = nn.Parameter(torch.linspace(-1.0, 1.0, 32))
        self.calls: list[tuple[tuple[int, ...], ...]] = []

    def forward(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(tuple(t.shape) for t in (x, *extra)))
        return torch.zeros_like(x) + self.w


@pytest.mark.parametrize(
    ("hook", "shapes"),
    [
        # queries: 5 output tokens + 2 box corners; query_pe has the same shape
        ("token_adapter", ((2, 7, 32), (2, 7, 32))),
        ("mlp_adapter", ((2, 7, 32),)),
        ("image_adapter", ((2, 64, 32),)),  # image tokens (B, h*w, C)
    ],
)
def test_decoder_hooks(setup, hook, shapes) -> None:
    model, emb, boxes = setup
    layer = model.mask_decoder.transformer.layers[1]
    keys = set(model.state_dict())
    with torch.no_grad():
        base, base_iou = model.predict_masks(emb, boxes=boxes)
        delta = _Delta()
        setattr(layer, hook, delta)
        try:
            assert f"mask_decoder.transformer.layers.1.{hook}.w" in model.state_dict()
            hooked, _ = model.predict_masks(emb, boxes=boxes)
        finally:
            setattr(layer, hook, None)
        again, again_iou = model.predict_masks(emb, boxes=boxes)
    assert delta.calls == [shapes]
    assert set(model.state_dict()) == keys
    assert (hooked - base).abs().max() > 1e-3
    assert torch.equal(base, again) and torch.equal(base_iou, again_iou)
