"""apply_method / configure_trainable on the tiny ViT backbone (and LiteMedSAM's TinyViT)."""

from __future__ import annotations

import pytest
import torch

from medsa.adapters import (
    AdapterModule,
    FullFTConfig,
    LoRAConfig,
    MASAMConfig,
    MedSAConfig,
    ZeroShotConfig,
    apply_method,
    encoder_blocks,
    get_method,
)
from medsa.errors import ConfigError

METHODS = {
    "medsa": MedSAConfig(rank=4),
    "medsa_sdtrans": MedSAConfig(rank=4, sd_trans=True),
    "medsa_concat": MedSAConfig(
        rank=4, sd_trans=True, sd_fusion="concat", prompt_conditioning="concat"
    ),
    "medsa_xattn": MedSAConfig(
        rank=4, sd_trans=True, sd_fusion="cross_attn", prompt_conditioning="add"
    ),
    "medsa_paper_hyp": MedSAConfig(rank=4, hyper_shapes="paper"),
    "masam": MASAMConfig(fact_rank=4, adapter_dim=8, fact_dropout=0.0),
    "lora": LoRAConfig(rank=2),
    "full": FullFTConfig(),
    "zeroshot": ZeroShotConfig(),
}
ADAPTER_METHODS = [
    "medsa",
    "medsa_sdtrans",
    "medsa_concat",
    "medsa_xattn",
    "medsa_paper_hyp",
    "masam",
    "lora",
]
DEPTH = 2


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * DEPTH, 3, 128, 128, generator=g)
    points = (
        torch.rand(2 * DEPTH, 2, 2, generator=g) * 128,
        torch.ones(2 * DEPTH, 2, dtype=torch.long),
    )
    return x, points


def _run(model, depth=DEPTH):
    x, points = _inputs()
    emb = model.image_encoder(x, depth=depth)
    masks, iou = model.predict_masks(emb, points=points, multimask_output=True)
    return emb, masks, iou


@pytest.mark.parametrize("key", list(METHODS))
def test_adapted_model_starts_equal_to_frozen(key, tiny):
    base = tiny(0)
    model = apply_method(tiny(0), METHODS[key])
    with torch.no_grad():
        for depth in (None, DEPTH):
            for ref, got in zip(_run(base, depth), _run(model, depth), strict=True):
                assert torch.equal(ref, got)


@pytest.mark.parametrize("key", ADAPTER_METHODS)
def test_adapters_change_outputs_once_trained(key, tiny, randomize):
    base = tiny(0)
    model = apply_method(tiny(0), METHODS[key])
    randomize(model, std=0.2)
    with torch.no_grad():
        emb0, masks0, _ = _run(base)
        emb1, masks1, _ = _run(model)
    assert (emb0 - emb1).abs().max() > 1e-4
    if key.startswith("medsa"):  # decoder adapters act even on identical embeddings
        m_same, _ = model.predict_masks(emb0, points=_inputs()[1])
        m_base, _ = base.predict_masks(emb0, points=_inputs()[1])
        assert (m_same - m_base).abs().max() > 1e-4


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _adapter_param_names(model) -> set[str]:
    prefixes = [n for n, m in model.named_modules() if isinstance(m, AdapterModule)]
    return {n for n, _ in model.named_parameters() if any(n.startswith(p + ".") for p in prefixes)}


@pytest.mark.parametrize("key", ["medsa", "medsa_sdtrans", "lora", "masam"])
def test_only_the_method_trains_and_gradients_reach_it(key, tiny):
    model = apply_method(tiny(0), METHODS[key])
    cfg = METHODS[key]
    expected = _adapter_param_names(model)
    if getattr(cfg, "train_mask_decoder", False):
        expected |= {n for n, _ in model.named_parameters() if n.startswith("mask_decoder.")}
    if getattr(cfg, "train_prompt_encoder", False):
        expected |= {n for n, _ in model.named_parameters() if n.startswith("prompt_encoder.")}
    assert expected and _trainable(model) == expected
    assert not any(
        n.startswith("image_encoder.")
        and "adapter" not in n
        and "delta" not in n
        and "depth_branch" not in n
        for n in _trainable(model)
    )

    model.train()
    _, masks, iou = _run(model)
    (masks.square().mean() + iou.mean()).backward()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, n
        elif not n.startswith(("prompt_encoder.", "mask_decoder.")):  # unused prompt types: None
            assert p.grad is not None, n
    # zero-initialised output projections get a non-zero gradient at step 0
    ups = [
        p.grad
        for n, p in model.named_parameters()
        if p.requires_grad and n.endswith(("up.weight", "lora_b.v.weight", "shared.v.weight"))
    ]
    assert ups and all(g.abs().sum() > 0 for g in ups)


def test_medsa_decoder_frozen_by_default_and_trainable_on_request(tiny):
    model = apply_method(tiny(0), MedSAConfig(rank=4))
    dec = {n for n in _trainable(model) if n.startswith("mask_decoder.")}
    assert dec and all("_adapter." in n for n in dec)
    model = apply_method(tiny(0), MedSAConfig(rank=4, train_mask_decoder=True))
    assert "mask_decoder.iou_token.weight" in _trainable(model)


def test_full_and_zeroshot_trainable_sets(tiny):
    full = apply_method(tiny(0), FullFTConfig(train_prompt_encoder=False))
    names = {n for n, _ in full.named_parameters()}
    assert _trainable(full) == {n for n in names if not n.startswith("prompt_encoder.")}
    assert _trainable(apply_method(tiny(0), ZeroShotConfig())) == set()


def test_block_selection_and_positions(tiny):
    model = apply_method(tiny(0), MedSAConfig(rank=4, blocks="2-3", positions="mlp"))
    blocks = encoder_blocks(model)
    assert [b.mlp_adapter is not None for b in blocks] == [False, True, True]
    assert all(b.attn_adapter is None for b in blocks)
    model = apply_method(
        tiny(0), MedSAConfig(rank=4, blocks=[1], positions="main", decoder_adapters=False)
    )
    assert [b.attn_adapter is not None for b in encoder_blocks(model)] == [True, False, False]
    assert all(layer.token_adapter is None for layer in model.mask_decoder.transformer.layers)
    with pytest.raises(ConfigError, match="1-3"):
        apply_method(tiny(0), MedSAConfig(rank=4, blocks="4"))


def test_ratio_sets_the_bottleneck(tiny):
    model = apply_method(tiny(0), MedSAConfig(rank=None, ratio=0.25, decoder_adapters=False))
    assert encoder_blocks(model)[0].attn_adapter.down.out_features == 8  # 0.25 * 32


def test_apply_twice_is_refused(tiny):
    model = apply_method(tiny(0), LoRAConfig(rank=2))
    assert isinstance(get_method(model), LoRAConfig)
    with pytest.raises(ConfigError, match="already applied"):
        apply_method(model, MedSAConfig())


def test_masam_decoder_shapes_and_fact_sharing(tiny, randomize):
    model = apply_method(tiny(0), MASAMConfig(fact_rank=4, adapter_dim=8, num_classes=3))
    blocks = encoder_blocks(model)
    assert blocks[0].attn.qkv_delta.shared is blocks[-1].attn.qkv_delta.shared
    emb = torch.randn(2, 32, 8, 8)
    logits = model.masam_decoder(emb)
    assert logits.shape == (2, 3, 128, 128)  # x16 of the embedding grid
    # the head re-uses SAM's decoder transformer (fully fine-tuned, counted once)
    assert model.masam_decoder.transformer is model.mask_decoder.transformer
    assert all(p.requires_grad for p in model.masam_decoder.parameters())
    logits.mean().backward()
    assert model.masam_decoder.class_tokens.grad is not None


@pytest.mark.parametrize(
    "cfg",
    [
        MedSAConfig(rank=4, sd_trans=True),
        MASAMConfig(fact_rank=4, adapter_dim=8, fact_dropout=0.0),
        LoRAConfig(rank=2),
    ],
    ids=["medsa", "masam", "lora"],
)
def test_lite_medsam_tinyvit_adapts(cfg, randomize):
    from medsa.sam.build import build_sam_from_config, get_config

    def lite():  # LiteMedSAM's TinyViT at 64 px, random weights (fast)
        torch.manual_seed(0)
        return build_sam_from_config(get_config("lite_medsam", img_size=64), name="lite_medsam")

    base, model = lite(), apply_method(lite(), cfg)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = base.image_encoder(x)
        assert torch.equal(model.image_encoder(x, depth=2), ref)
        randomize(model, std=0.2)
        assert (model.image_encoder(x, depth=2) - ref).abs().max() > 1e-4


def test_sdtrans_encoder_is_permutation_equivariant_over_slices(tiny, randomize):
    model = apply_method(tiny(0), MedSAConfig(rank=4, sd_trans=True))
    randomize(model, std=0.3)
    x = torch.randn(2 * 3, 3, 128, 128)
    idx = torch.tensor([2, 0, 1, 4, 5, 3])  # a different permutation inside each volume
    with torch.no_grad():
        y = model.image_encoder(x, depth=3)
        torch.testing.assert_close(
            model.image_encoder(x[idx], depth=3), y[idx], rtol=1e-4, atol=1e-5
        )
        # slices really interact: the same slices as 2D images give other embeddings
        assert (model.image_encoder(x) - y).abs().max() > 1e-4


def test_adapters_follow_the_model_dtype(tiny):
    model = tiny(0).to(torch.bfloat16)
    apply_method(model, MedSAConfig(rank=4, sd_trans=True))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_importing_adapters_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, medsa.adapters, medsa.adapters.config; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_few_training_steps_reduce_the_loss(tiny):
    """Med-SA with SD-Trans + HyP-Adpt on a 3D batch: the adapters alone can fit a target."""
    torch.manual_seed(0)
    model = apply_method(tiny(0), MedSAConfig(rank=4, sd_trans=True)).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=5e-2)
    x, points = _inputs()
    target = torch.zeros(2 * DEPTH, 1, 32, 32)
    target[..., 8:24, 8:24] = 1.0
    losses = []
    for _ in range(12):
        emb = model.image_encoder(x, depth=DEPTH)
        masks, _ = model.predict_masks(emb, points=points)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(masks, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0], losses  # frozen model: the loss could not move
