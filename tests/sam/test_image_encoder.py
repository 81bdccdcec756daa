"""Image encoder: numerical equality with Meta's segment-anything, hooks, key layout."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from sam_helpers import meta_encoder, randomise
from torch import nn

from medsa.sam.image_encoder import VIT_PRESETS, Block, ImageEncoderViT

sam_modeling = pytest.importorskip("segment_anything.modeling")


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, ImageEncoderViT]:
    cfg = VIT_PRESETS["vit_tiny"]
    ref = meta_encoder(cfg).eval()
    randomise(ref)
    ours = ImageEncoderViT(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_encoder_matches_segment_anything(pair) -> None:
    ref, ours = pair
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
        got = ours(x)
    assert got.shape == (2, 32, 8, 8)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["vit_b", "vit_l", "vit_h"])
def test_official_key_layout(name: str) -> None:
    """Same keys and shapes as Meta's official builds (on the meta device: no memory, no compute)."""
    from segment_anything import sam_model_registry

    with torch.device("meta"):
        ref = sam_model_registry[name]().image_encoder
        ours = ImageEncoderViT(VIT_PRESETS[name])
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes


class _Const(nn.Module):
    """Hook returning a constant delta (with a parameter, to check state-dict registration)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return torch.zeros_like(x) + self.delta


@pytest.mark.parametrize(
    "hook", ["pre_attn_adapter", "attn_adapter", "pre_mlp_adapter", "mlp_adapter"]
)
def test_block_hooks_change_output_and_register(pair, hook: str) -> None:
    _, ours = pair
    x = torch.randn(1, 3, 128, 128)
    base_keys = set(ours.state_dict())
    with torch.no_grad():
        base = ours(x)
        setattr(ours.blocks[0], hook, _Const(32))
        try:
            assert f"blocks.0.{hook}.delta" in ours.state_dict()
            hooked = ours(x)
        finally:
            setattr(ours.blocks[0], hook, None)
        assert set(ours.state_dict()) == base_keys
        again = ours(x)
    assert not torch.allclose(base, hooked)
    assert torch.equal(base, again)


def test_depth_passed_to_blocks_and_depth_branch(pair) -> None:
    _, ours = pair
    seen: list[int | None] = []

    def branch(a: torch.Tensor, xn: torch.Tensor, block: Block, depth: int | None) -> torch.Tensor:
        seen.append(depth)
        # Re-use the block's attention without rel-pos over a (B*H*W, 1, D, C) "image" of slices.
        b, h, w, c = xn.shape
        seq = xn.reshape(b // depth, depth, h * w, c).permute(0, 2, 1, 3).reshape(-1, 1, depth, c)
        out = block.attn(seq, use_rel_pos=False)
        out = out.reshape(b // depth, h * w, depth, c).permute(0, 2, 1, 3).reshape(b, h, w, c)
        return a + out

    x = torch.randn(4, 3, 128, 128)
    with torch.no_grad():
        base = ours(x, depth=2)
        for blk in ours.blocks:
            blk.depth_branch = branch
        try:
            fused = ours(x, depth=2)
        finally:
            for blk in ours.blocks:
                blk.depth_branch = None
    assert seen == [2] * len(ours.blocks)
    assert not torch.allclose(base, fused)


def test_qkv_and_proj_delta(pair) -> None:
    _, ours = pair
    attn = ours.blocks[1].attn
    x = torch.randn(1, 8, 8, 32)
    with torch.no_grad():
        base = attn(x)
        attn.qkv_delta = lambda t: torch.ones(*t.shape[:-1], 96)
        with_qkv = attn(x)
        attn.qkv_delta = None
        attn.proj_delta = lambda t: torch.ones_like(t)
        with_proj = attn(x)
        attn.proj_delta = None
    assert not torch.allclose(base, with_qkv)
    assert torch.allclose(with_proj, base + 1, atol=1e-6)


def test_other_input_size_runs() -> None:
    """A 64 px input resizes the absolute positions instead of failing."""
    enc = ImageEncoderViT(replace(VIT_PRESETS["vit_tiny"], img_size=128)).eval()
    with torch.no_grad():
        out = enc(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 32, 4, 4)
