"""Edge cases and layouts of the adapter package that the main tests do not pin down (found by
mutation testing, see docs/adapters.md "Mutation testing")."""

from __future__ import annotations

import pytest
import torch

from medsa.adapters.modules import (
    Adapter3D,
    FacTQKV,
    FacTShared,
    HyPAdapter,
    LoRAQKV,
    split_depth,
)
from medsa.errors import DataError

C = 16


def _per_head(delta: torch.Tensor, heads: int) -> tuple[torch.Tensor, ...]:
    """Split a TinyViT-layout qkv delta ``(..., 3C)`` into its per-head q, k, v parts."""
    q, k, v = delta.reshape(*delta.shape[:-1], heads, 3, -1).unbind(-2)
    return q, k, v


def test_lora_and_fact_deltas_use_the_tinyvit_per_head_layout(randomize):
    torch.manual_seed(0)
    x = torch.randn(2, 5, C)
    heads = 4
    lora = LoRAQKV(C, rank=2, targets="qv", heads=heads)
    fact = FacTQKV(FacTShared(C, 3), 3, dropout=0.0, heads=heads)
    for m in (lora, fact):
        randomize(m)
    # the same module without a head layout gives the plain [q | k | v] deltas
    flat_lora = LoRAQKV(C, rank=2, targets="qv")
    flat_lora.load_state_dict(lora.state_dict())
    assert lora(x).shape == fact(x).shape == (2, 5, 3 * C)
    dq, dk, dv = flat_lora(x).split(C, dim=-1)
    q, k, v = _per_head(lora(x), heads)
    torch.testing.assert_close(q, dq.reshape(2, 5, heads, -1))
    torch.testing.assert_close(v, dv.reshape(2, 5, heads, -1))
    assert torch.equal(k, torch.zeros_like(k)) and dk.abs().max() == 0
    assert q.abs().max() > 0 and v.abs().max() > 0

    q, k, v = _per_head(fact(x), heads)
    u, vv = fact.shared.u.weight, fact.shared.v.weight
    torch.testing.assert_close(q, (x @ u.T @ fact.core_q.weight.T @ vv.T).reshape(2, 5, heads, -1))
    torch.testing.assert_close(v, (x @ u.T @ fact.core_v.weight.T @ vv.T).reshape(2, 5, heads, -1))
    assert torch.equal(k, torch.zeros_like(k))


@pytest.mark.parametrize("bad", [0, -1, 2, 4])
def test_adapter3d_rejects_even_or_non_positive_kernels(bad):
    with pytest.raises(ValueError, match="kernel_depth must be odd and positive"):
        Adapter3D(C, 4, kernel_depth=bad)


def _changed_slices(m: Adapter3D, x: torch.Tensor, depth: int | None, which: int) -> list[bool]:
    """Which output images change when input image ``which`` changes."""
    y = m(x, depth)
    x2 = x.clone()
    x2[which] += torch.randn_like(x2[which])
    return ((m(x2, depth) - y).abs().amax(dim=(1, 2, 3)) > 1e-6).tolist()


def test_adapter3d_kernel_sets_the_depth_neighbourhood(randomize):
    torch.manual_seed(0)
    x = torch.randn(5, 2, 2, C)
    default = Adapter3D(C, 4)  # kernel (3, 1, 1): one neighbour on each side
    one = Adapter3D(C, 4, kernel_depth=1)  # a per-slice adapter
    five = Adapter3D(C, 4, kernel_depth=5)
    for m in (default, one, five):
        randomize(m)
    assert _changed_slices(default, x, 5, 2) == [False, True, True, True, False]
    assert _changed_slices(one, x, 5, 2) == [False, False, True, False, False]
    assert _changed_slices(five, x, 5, 0) == [True, True, True, False, False]


def test_adapter3d_2d_input_treats_each_image_as_a_volume(randomize):
    torch.manual_seed(0)
    m = Adapter3D(C, 4)
    randomize(m)
    x = torch.randn(4, 2, 2, C)
    assert _changed_slices(m, x, None, 1) == [False, True, False, False]
    torch.testing.assert_close(m(x, None), m(x, 1))


def test_qkv_deltas_on_tinyvit_leave_every_heads_key_untouched(randomize):
    """LiteMedSAM's TinyViT packs qkv per head: LoRA / FacT on q and v must put their deltas in
    each head's q and v slots and leave all keys as the frozen model computes them."""
    from medsa.adapters import LoRAConfig, MASAMConfig, apply_method, encoder_blocks
    from medsa.sam.build import build_sam_from_config, get_config

    for cfg in (LoRAConfig(rank=2), MASAMConfig(fact_rank=2, adapter_dim=4, fact_dropout=0.0)):
        torch.manual_seed(0)
        model = build_sam_from_config(get_config("lite_medsam", img_size=64), name="lite_medsam")
        apply_method(model, cfg)
        randomize(model, std=0.2)
        blocks = encoder_blocks(model)
        assert len({b.attn.num_heads for b in blocks}) > 1  # several head counts and widths
        for blk in blocks:
            attn = blk.attn
            x = torch.randn(3, attn.qkv.in_features)
            delta = attn.qkv_delta(x).view(3, attn.num_heads, -1)
            q, k, v = delta.split([attn.key_dim, attn.key_dim, attn.d], dim=-1)
            assert torch.equal(k, torch.zeros_like(k))
            assert q.abs().amax(dim=(0, 2)).min() > 0  # every head's query is adapted
            assert v.abs().amax(dim=(0, 2)).min() > 0


def _sd_block(seed: int = 0):
    from medsa.sam.image_encoder import Block

    torch.manual_seed(seed)
    return Block(C, num_heads=2, use_rel_pos=True, window_size=3, input_size=(3, 4)).eval()


@pytest.mark.parametrize(
    "fusion, residual",
    [("add", False), ("add", True), ("concat", False), ("cross_attn", False)],
)
def test_sdtrans_fusions_follow_their_formulas(fusion, residual, randomize):
    """Each fusion against a per-token reference written from the SDTrans docstring."""
    import torch.nn.functional as F

    from medsa.adapters.modules import SDTrans

    depth, vols = 3, 2
    blk = _sd_block()
    sd = SDTrans(C, 4, fusion=fusion, depth_residual=residual)
    randomize(sd, std=0.3)
    a, xn = torch.randn(vols * depth, 3, 4, C), torch.randn(vols * depth, 3, 4, C)
    o = SDTrans.depth_attention(xn, blk.attn, depth)
    ad = sd.depth_adapter(o)
    if fusion == "add":
        want = a + o + ad if residual else a + ad
    elif fusion == "concat":
        d = o + ad
        want = a + sd.fuse_up(F.relu(sd.fuse_down(torch.cat([a, d], dim=-1))))
    else:
        d = o + ad
        want = torch.empty_like(a)
        for b in range(vols):
            s = slice(b * depth, (b + 1) * depth)
            for y in range(3):
                for x in range(4):
                    q, k, v = sd.q(a[s, y, x]), sd.k(d[s, y, x]), sd.v(d[s, y, x])  # (D, r)
                    att = (q @ k.T / 4**0.5).softmax(-1)
                    want[s, y, x] = a[s, y, x] + sd.out(att @ v)
    got = sd(a, xn, blk, depth)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (got - a).abs().max() > 1e-3


def _table_rows(text: str) -> list[list[str]]:
    """The cells of ``ParamCounts.format()``: columns are separated by two or more spaces."""
    import re

    return [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()]


def test_param_table_lists_components_adapters_and_percentages():
    from medsa.adapters.params import ParamCounts

    counts = ParamCounts(
        modules={"image_encoder": (12_000, 300), "mask_decoder": (4_000, 0)},
        adapters={"lora": (300, 300)},
        backbone=15_700,
    )
    text = counts.format()
    lines = text.splitlines()
    rows = _table_rows(text)

    def pct(n: int) -> str:
        return f"{100 * n / 15_700:.2f}%"

    assert rows[0] == ["module", "total", "tunable", "% of SAM"]
    assert lines[1] == lines[5] == "-" * len(lines[0])
    assert rows[2] == ["image_encoder", "12,000", "300", pct(300)]
    assert rows[3] == ["mask_decoder", "4,000", "0", pct(0)]
    assert rows[4] == ["adapter: lora", "300", "300", pct(300)]
    assert rows[6] == ["total", "16,000", "300", pct(300)]
    assert rows[7] == ["pre-trained SAM", "15,700"]
    assert rows[8] == ["added by the method", "300"]
    assert len(lines) == 9
    # every row is as wide as the header (aligned columns)
    assert {len(line) for line in lines[:7] if not line.startswith("-")} == {len(lines[0])}
    # without a backbone count there is no percentage to show
    empty = _table_rows(ParamCounts(modules={"x": (5, 5)}, adapters={"fact": (5, 5)}).format())
    assert empty[2] == ["x", "5", "5", "-"] and empty[3] == ["adapter: fact", "5", "5", "-"]


def test_apply_method_rejects_models_it_cannot_adapt(tiny):
    from torch import nn

    from medsa.adapters import LoRAConfig, apply_method, encoder_blocks
    from medsa.errors import ConfigError

    class NoEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(2, 2)

    class NoBlocks(nn.Module):  # an image encoder without adapter hooks (a plain CNN)
        def __init__(self) -> None:
            super().__init__()
            self.image_encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())

    with pytest.raises(ConfigError, match="no image_encoder"):
        encoder_blocks(NoEncoder())
    with pytest.raises(ConfigError, match="no image_encoder"):
        apply_method(NoEncoder(), LoRAConfig())
    with pytest.raises(ConfigError, match="no transformer blocks with adapter hooks"):
        apply_method(NoBlocks(), LoRAConfig())
    with pytest.raises(ConfigError, match="has no parameters"):
        apply_method(nn.Module(), LoRAConfig())
    with pytest.raises(ConfigError, match="not a method config"):
        apply_method(tiny(0), {"method": "lora"})
    # a block needs every adapter hook *and* an attention: a module with only `attn` is none
    model = tiny(0)
    n = len(encoder_blocks(model))
    model.image_encoder.stray = nn.Module()
    model.image_encoder.stray.attn = nn.Identity()
    assert len(encoder_blocks(model)) == n and model.image_encoder.stray not in encoder_blocks(
        model
    )


def test_ratio_sets_the_bottleneck_of_encoder_and_decoder_adapters(tiny):
    """``ratio`` instead of ``rank``: encoder adapters get round(ratio * C), the decoder's
    HyP-Adpt / plain adapters max(2, min(round(ratio * c), c // 4)) of the decoder width c."""
    from medsa.adapters import MedSAConfig, apply_method, encoder_blocks
    from medsa.adapters.apply import _decoder_blocks

    model = apply_method(tiny(0), MedSAConfig(ratio=0.25, rank=None, prompt_conditioning="hyper"))
    for blk in encoder_blocks(model):
        c = blk.attn_adapter.down.in_features
        assert blk.attn_adapter.down.out_features == round(0.25 * c)
    for blk in _decoder_blocks(model):
        c = int(blk.mlp.lin1.in_features)
        assert blk.image_adapter.down.out_features == max(2, min(round(0.25 * c), c // 4))


def test_split_depth_counts_volumes_and_explains_bad_batches():
    assert split_depth(6, None) == 6  # 2D: every image is its own volume
    assert split_depth(6, 1) == 6
    assert split_depth(6, 3) == 2
    for bad in (0, 4, -2):
        with pytest.raises(DataError, match=r"pass \(B\*D, 3, H, W\) with the D slices"):
            split_depth(6, bad)


def test_hyp_adapter_pools_one_prompt_token_and_handles_none(randomize):
    torch.manual_seed(0)
    n_out = 2
    m = HyPAdapter(C, 4, prompt_dim=8, num_output_tokens=n_out)
    randomize(m, std=0.3)
    q, pe = torch.randn(1, n_out + 1, C), torch.randn(1, n_out + 1, C)
    # a single prompt token (one click) already conditions the output tokens
    pe2 = pe.clone()
    pe2[:, n_out] += 1.0
    assert (m(q, pe2)[:, :n_out] - m(q, pe)[:, :n_out]).abs().max() > 1e-4
    # no prompt token at all: the pooled prompt is zero (finite output, no mean of nothing)
    y = m(q[:, :n_out], pe[:, :n_out])
    assert torch.isfinite(y).all()
    both = torch.cat([pe[:, :n_out], torch.zeros_like(pe[:, :n_out])], dim=-1)
    torch.testing.assert_close(m.prompt_embedding(pe[:, :n_out]), m.prompt_reduce(both))


def test_fact_drops_out_by_default_in_training_only(randomize):
    torch.manual_seed(0)
    f = FacTQKV(FacTShared(C, 8), 8)  # MA-SAM's default dropout
    randomize(f)
    x = torch.randn(64, C)
    f.train()
    assert not torch.equal(f(x), f(x))  # stochastic while training
    f.eval()
    assert torch.equal(f(x), f(x))
    u, v = f.shared.u.weight, f.shared.v.weight
    torch.testing.assert_close(f(x)[:, :C], x @ u.T @ f.core_q.weight.T @ v.T)


def test_masam_head_starts_from_sams_tokens_and_owns_its_copies(tiny):
    from medsa.adapters.masam import MASAMDecoder

    model = tiny(0)
    dec, pe = model.mask_decoder, model.prompt_encoder
    with pytest.raises(ValueError, match="channels must be one of"):
        MASAMDecoder(dec, pe, 3, channels="wide")
    k = dec.num_mask_tokens + 2  # more classes than SAM has mask tokens: cycle through them
    head = MASAMDecoder(dec, pe, k, channels="constant")
    t = torch.randn(3, dec.transformer_dim)
    for i in range(k):
        j = i % dec.num_mask_tokens
        assert torch.equal(head.class_tokens[i], dec.mask_tokens.weight[j])
        torch.testing.assert_close(head.hypernetworks[i](t), dec.output_hypernetworks_mlps[j](t))
    torch.testing.assert_close(head.dense_embed, pe.no_mask_embed.weight)
    # training the head must not move the promptable decoder's own (frozen) tensors
    before = [p.clone() for p in (dec.mask_tokens.weight, pe.no_mask_embed.weight)]
    before_mlp = dec.output_hypernetworks_mlps[0](t)
    with torch.no_grad():
        for p in head.parameters():
            if p is not None and not any(p is q for q in head.transformer.parameters()):
                p.add_(1.0)
    assert torch.equal(dec.mask_tokens.weight, before[0])
    assert torch.equal(pe.no_mask_embed.weight, before[1])
    assert torch.equal(dec.output_hypernetworks_mlps[0](t), before_mlp)
    # its positional encoding is a copy too (a buffer, so not among the parameters above)
    pe_before = pe.pe_layer((4, 4)).clone()
    with torch.no_grad():
        for buf in head.pe_layer.buffers():
            buf.mul_(2.0)
    assert torch.equal(pe.pe_layer((4, 4)), pe_before)
    assert not torch.equal(head.pe_layer((4, 4)), pe_before)


def test_masam_class_logits_come_from_their_own_hypernetwork(tiny):
    from medsa.adapters.masam import MASAMDecoder

    model = tiny(0)
    head = MASAMDecoder(model.mask_decoder, model.prompt_encoder, 3).eval()
    emb = torch.randn(2, model.mask_decoder.transformer_dim, 4, 4)
    with torch.no_grad():
        y = head(emb)
        assert y.shape == (2, 3, 64, 64)
        last = head.hypernetworks[1].layers[-1]
        last.weight.zero_()
        last.bias.zero_()
        y2 = head(emb)
    assert torch.equal(y2[:, 1], torch.zeros_like(y2[:, 1]))
    assert torch.equal(y2[:, [0, 2]], y[:, [0, 2]])
    assert y[:, 1].abs().max() > 0
    # the images of a batch are independent, and the dense "no mask" embedding is added
    with torch.no_grad():
        torch.testing.assert_close(head(emb[1:]), y2[1:], rtol=1e-4, atol=1e-5)
        head.dense_embed.add_(1.0)
        assert (head(emb) - y2).abs().max() > 1e-4


@pytest.mark.parametrize("bad", ["", "qx", "QV", "X"])
def test_lora_targets_must_be_letters_of_qkv(bad):
    with pytest.raises(ValueError, match="targets must be letters of 'qkv'"):
        LoRAQKV(C, 2, targets=bad)


def test_lora_defaults_adapt_q_and_v_with_linear_style_init():
    torch.manual_seed(0)
    dim = 64
    lora = LoRAQKV(dim, rank=64)  # SAMed: q and v
    assert sorted(lora.lora_a) == sorted(lora.lora_b) == ["q", "v"]
    # A is Kaiming-uniform with a = sqrt(5) (as nn.Linear, SAMed): U(-1/sqrt(dim), 1/sqrt(dim))
    bound = dim**-0.5
    for t in "qv":
        a = lora.lora_a[t].weight
        assert 0.97 * bound < a.abs().max() <= bound
        assert torch.equal(lora.lora_b[t].weight, torch.zeros_like(lora.lora_b[t].weight))


def test_sdtrans_checks_fusion_and_passes_the_activation_on(randomize):
    import torch.nn.functional as F

    from medsa.adapters.modules import SDTrans

    with pytest.raises(ValueError, match="fusion must be one of"):
        SDTrans(C, 4, fusion="mean")
    sd = SDTrans(C, 4, activation="gelu")
    randomize(sd)
    o = torch.randn(2, 3, C)
    ad = sd.depth_adapter
    torch.testing.assert_close(ad(o), ad.up(F.gelu(ad.down(o))))


@pytest.mark.parametrize("mode", ["add", "concat"])
def test_hyp_adapter_add_and_concat_modes_follow_their_formulas(mode, randomize):
    import torch.nn.functional as F

    torch.manual_seed(0)
    m = HyPAdapter(C, 4, prompt_dim=8, mode=mode, num_output_tokens=1)
    randomize(m, std=0.3)
    q, pe = torch.randn(2, 4, C), torch.randn(2, 4, C)
    p = m.prompt_reduce(torch.cat([pe, pe[:, 1:].mean(1, keepdim=True).expand_as(pe)], dim=-1))
    e = F.relu(m.down(q))
    if mode == "add":
        want = m.up(e + m.prompt_proj(p))
    else:
        want = m.up(F.relu(m.fuse(torch.cat([e, p], dim=-1))))
    torch.testing.assert_close(m(q, pe), want)


def _decoder_widths(model) -> set[tuple[int, int, int]]:
    return {
        (
            layer.token_adapter.down.out_features,
            layer.mlp_adapter.down.out_features,
            layer.image_adapter.down.out_features,
        )
        for layer in model.mask_decoder.transformer.layers
    }


def test_medsa_widths_and_scales_reach_every_adapter(tiny):
    from medsa.adapters import MedSAConfig, apply_method, encoder_blocks

    # decoder width 32 (vit_tiny): rank capped at 32 / 4 = 8, and at least 2 (HyP LayerNorm)
    for cfg, width in [
        (MedSAConfig(rank=4), 4),
        (MedSAConfig(rank=16), 8),
        (MedSAConfig(rank=1), 2),
        (MedSAConfig(rank=16, decoder_rank=3), 3),
    ]:
        assert _decoder_widths(apply_method(tiny(0), cfg)) == {(width, width, width)}, cfg
    model = apply_method(tiny(0), MedSAConfig(rank=4, scale=0.3, sd_trans=True, sd_rank=3))
    for blk in encoder_blocks(model):
        assert (blk.attn_adapter.scale, blk.mlp_adapter.scale) == (1.0, 0.3)
        assert blk.attn_adapter.down.out_features == blk.mlp_adapter.down.out_features == 4
        assert blk.depth_branch.depth_adapter.down.out_features == 3
    for layer in model.mask_decoder.transformer.layers:
        assert (layer.mlp_adapter.scale, layer.image_adapter.scale) == (0.3, 1.0)
    plain = apply_method(tiny(0), MedSAConfig(rank=4, sd_trans=True))
    assert encoder_blocks(plain)[0].depth_branch.depth_adapter.down.out_features == 4


def test_decoder_hyp_adapter_pools_exactly_the_prompt_tokens(tiny, randomize):
    """SAM's decoder tokens are [IoU, 4 mask tokens, prompt tokens...]: only the prompt tokens
    are averaged into the prompt embedding."""
    from medsa.adapters import MedSAConfig, apply_method

    model = apply_method(tiny(0), MedSAConfig(rank=4))
    randomize(model, std=0.3)
    hyp = model.mask_decoder.transformer.layers[0].token_adapter
    n_out = 1 + model.mask_decoder.num_mask_tokens
    pe = torch.randn(1, n_out + 2, 32)
    ref = hyp.prompt_embedding(pe)
    last_output, first_prompt = pe.clone(), pe.clone()
    last_output[:, n_out - 1] += 1.0
    first_prompt[:, n_out] += 1.0
    torch.testing.assert_close(hyp.prompt_embedding(last_output)[:, n_out + 1], ref[:, n_out + 1])
    assert (hyp.prompt_embedding(first_prompt)[:, n_out + 1] - ref[:, n_out + 1]).abs().max() > 1e-4


def test_hyp_adapter_validates_mode_and_width():
    with pytest.raises(ValueError, match="mode must be one of"):
        HyPAdapter(C, 4, mode="gate")
    with pytest.raises(ValueError, match="HyP-Adpt needs mid_dim >= 2"):
        HyPAdapter(C, 1, mode="hyper")
    assert HyPAdapter(C, 2, mode="hyper").down.out_features == 2
    for mode in ("add", "concat", "none"):  # no LayerNorm over the bottleneck: width 1 is fine
        assert HyPAdapter(C, 1, mode=mode).down.out_features == 1


def test_hyp_adapter_by_default_treats_every_token_as_a_prompt(randomize):
    torch.manual_seed(0)
    m = HyPAdapter(C, 4, prompt_dim=8)  # num_output_tokens=0
    randomize(m)
    pe = torch.randn(1, 3, C)
    pe2 = pe.clone()
    pe2[:, 0] += 1.0
    assert (m.prompt_embedding(pe2)[:, 2] - m.prompt_embedding(pe)[:, 2]).abs().max() > 1e-4


def test_default_adapter_is_the_papers_relu_bottleneck(randomize):
    import torch.nn.functional as F

    from medsa.adapters.modules import Adapter

    torch.manual_seed(0)
    a = Adapter(C, 4)
    randomize(a)
    x = torch.randn(3, C)
    torch.testing.assert_close(a(x), a.up(F.relu(a.down(x))))


def test_hyp_adapter_without_prompt_is_a_plain_adapter_in_size():
    plain = 2 * C * 4 + 4 + C  # down (C*r + r) + up (r*C + C)
    assert sum(p.numel() for p in HyPAdapter(C, 4, mode="none").parameters()) == plain
    prompted = sum(p.numel() for p in HyPAdapter(C, 4, prompt_dim=8, mode="add").parameters())
    assert prompted == plain + (2 * C * 8 + 8) + (8 * 4 + 4)  # + prompt_reduce + prompt_proj


def test_masam_options_reach_the_installed_modules(tiny, randomize):
    from medsa.adapters import MASAMConfig, apply_method, count_parameters, encoder_blocks

    model = apply_method(tiny(0), MASAMConfig(fact_rank=2, adapter_dim=4, blocks="2"))
    installed = [
        (
            b.attn.qkv_delta is not None,
            b.pre_attn_adapter is not None,
            b.pre_mlp_adapter is not None,
        )
        for b in encoder_blocks(model)
    ]
    assert installed == [(False, False, False), (True, True, True), (False, False, False)]

    def adapter3d(kernel: int) -> int:
        cfg = MASAMConfig(fact_rank=2, adapter_dim=4, kernel_depth=kernel)
        return count_parameters(apply_method(tiny(0), cfg)).adapters["adapter3d"][0]

    # conv (m -> m, kernel (k, 1, 1)): 2 more taps = 2 * m * m more weights per adapter
    assert adapter3d(5) - adapter3d(3) == 3 * 2 * (2 * 4 * 4)

    x = torch.randn(64, 32)
    for p, stochastic in ((0.0, False), (0.5, True)):
        cfg = MASAMConfig(fact_rank=8, adapter_dim=4, adapters_3d=False, fact_dropout=p)
        model = apply_method(tiny(0), cfg).train()
        randomize(model)
        delta = encoder_blocks(model)[0].attn.qkv_delta
        assert (not torch.equal(delta(x), delta(x))) == stochastic


def test_lora_options_reach_the_installed_modules(tiny, randomize):
    from medsa.adapters import LoRAConfig, apply_method, encoder_blocks

    cfg = LoRAConfig(rank=2, alpha=8.0, targets="qkv", blocks="1,3")
    blocks = encoder_blocks(apply_method(tiny(0), cfg))
    assert [b.attn.qkv_delta is not None for b in blocks] == [True, False, True]
    lora = blocks[0].attn.qkv_delta
    randomize(lora)
    x = torch.randn(4, 32)
    d = lora(x).split(32, dim=-1)
    for t, part in zip("qkv", d, strict=True):  # alpha / rank = 4, and k is adapted too
        want = 4.0 * x @ lora.lora_a[t].weight.T @ lora.lora_b[t].weight.T
        torch.testing.assert_close(part, want)


def test_medsa_activation_and_depth_residual_reach_the_modules(tiny):
    from torch import nn

    from medsa.adapters import MedSAConfig, apply_method
    from medsa.adapters.modules import Adapter

    model = apply_method(tiny(0), MedSAConfig(rank=4, activation="gelu", sd_trans=True))
    acts = {type(m.act) for m in model.modules() if isinstance(m, (Adapter, HyPAdapter))}
    assert acts == {nn.GELU}
    # the literal "add the depth branch" (depth_residual) changes the model before training
    base = tiny(0)
    literal = apply_method(tiny(0), MedSAConfig(rank=4, sd_trans=True, depth_residual=True))
    x = torch.randn(4, 3, 128, 128)
    with torch.no_grad():
        assert (literal.image_encoder(x, depth=2) - base.image_encoder(x, depth=2)).abs().max() > 0


def test_masam_head_is_sams_decoder_run_with_class_tokens(tiny, randomize):
    """Reference from the MASAMDecoder docstring: SAM's two-way transformer on the image
    embedding plus the dense "no mask" embedding, class tokens as queries, the image tokens laid
    back out as (C, h, w), upscaled x16, and one hypernetwork weight vector per class."""
    import torch.nn.functional as F

    from medsa.adapters.masam import MASAMDecoder

    model = tiny(0)
    head = MASAMDecoder(model.mask_decoder, model.prompt_encoder, 2).eval()
    randomize(head, std=0.3)  # every weight, so that the spatial layout shows in the output
    with torch.no_grad():
        b, c, h, w = 2, model.mask_decoder.transformer_dim, 4, 3
        emb = torch.randn(b, c, h, w)
        pe = head.pe_layer((h, w)).unsqueeze(0).expand(b, -1, -1, -1)
        tokens = head.class_tokens.unsqueeze(0).expand(b, -1, -1)
        hs, keys = head.transformer(emb + head.dense_embed.view(1, c, 1, 1), pe, tokens)
        # the two extra x2 stages of the released MA-SAM code: ConvT, LayerNorm2d, GELU, ConvT, GELU
        up = head.extra_upscaling
        feat = head.output_upscaling(keys.transpose(1, 2).view(b, c, h, w))
        feat = F.gelu(up[1](F.conv_transpose2d(feat, up[0].weight, up[0].bias, stride=2)))
        feat = F.gelu(F.conv_transpose2d(feat, up[3].weight, up[3].bias, stride=2))
        weights = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(head.hypernetworks)], 1)
        want = torch.einsum("bkm,bmyx->bkyx", weights, feat)
        torch.testing.assert_close(head(emb), want, rtol=1e-4, atol=1e-5)
        assert want.shape == (b, 2, 16 * h, 16 * w)


def test_masam_head_runs_in_the_embedding_dtype(tiny, randomize):
    """A bf16 model (``model.to(torch.bfloat16)``, as for bf16 inference) gets bf16 embeddings;
    the head's positional encoding must follow their dtype, and the result stay close to fp32."""
    from medsa.adapters.masam import MASAMDecoder

    model = tiny(0)
    head = MASAMDecoder(model.mask_decoder, model.prompt_encoder, 2).eval()
    randomize(head, std=0.3)
    emb = torch.randn(1, model.mask_decoder.transformer_dim, 4, 3)
    with torch.no_grad():
        want = head(emb)
        got = head.to(torch.bfloat16)(emb.to(torch.bfloat16))
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.1 * want.abs().max()
