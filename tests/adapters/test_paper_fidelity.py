"""Med-SA maths written from the paper's formulas, independent of the adapter modules' forward.

These tests use only the modules' *parameters* (weights and biases) and recompute every
formula with plain tensor algebra, so that a wrong input, scale or wiring in the code under
test makes them fail (each was checked by breaking the code once; see docs/adapters.md).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medsa.adapters import MedSAConfig, apply_method, encoder_blocks
from medsa.adapters.modules import HyPAdapter

S_PAPER = 0.05  # paper Sec. 3.2 / Table 7c: the MLP-parallel adapter's scale


def _bottleneck(x: torch.Tensor, down: torch.nn.Linear, up: torch.nn.Linear) -> torch.Tensor:
    """``up(ReLU(down(x)))`` from the raw weights (paper Fig. 1b: down, ReLU, up)."""
    h = torch.relu(x @ down.weight.T + down.bias)
    return h @ up.weight.T + up.bias


def test_medsa_block_output_is_the_papers_formula(tiny, randomize):
    """``x + a + A(a) + mlp(n2) + s * A'(n2)`` with ``n2 = norm2(x + a + A(a))`` and s = 0.05."""
    model = tiny()
    cfg = MedSAConfig(rank=4)
    assert cfg.scale == S_PAPER  # the default is the paper's s
    apply_method(model, cfg)
    randomize(model, std=0.2)
    blk = encoder_blocks(model)[0]
    g = torch.Generator().manual_seed(3)
    c = blk.norm1.normalized_shape[0]
    x = torch.randn(2, 8, 8, c, generator=g)
    with torch.no_grad():
        # frozen host pieces (SAM's own modules): attention of norm1(x), the MLP, the norms
        a = blk.attend(F.layer_norm(x, (c,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps))
        x1 = x + a + _bottleneck(a, blk.attn_adapter.down, blk.attn_adapter.up)  # scale 1
        n2 = F.layer_norm(x1, (c,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
        expected = (
            x1 + blk.mlp(n2) + S_PAPER * _bottleneck(n2, blk.mlp_adapter.down, blk.mlp_adapter.up)
        )
        got = blk(x)
        # the adapters must matter at this size, else the comparison proves nothing
        assert (expected - (x1 + blk.mlp(n2))).abs().max() > 1e-3
        assert (x1 - (x + a)).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _hyp_reference_paper(
    m: HyPAdapter, q: torch.Tensor, pe: torch.Tensor, n_out: int
) -> torch.Tensor:
    """HyP-Adpt from eq. (1)-(2) alone, with loops and raw weights.

    ``e_prompt`` = reduce([pe_t, mean of the sparse prompt tokens]); for each hyper layer i with
    its own two-layer MLP ``M_i``: ``W_i = Re(M_i(e_prompt)) in R^{L_in x L_out}`` (eq. 1), where
    ``L_in`` of the first weight is the length of ``e_down`` and ``L_out`` of the last one is the
    output length ``C``; ``e_{i+1} = ReLU(Norm(e_i @ W_i))`` (eq. 2). The delta is the last
    ``e`` times medsa's per-channel output gate (zero at init so the model starts as SAM).
    """
    b, n, c = q.shape
    r = m.mid_dim
    out = torch.empty_like(q)

    def lin(layer: torch.nn.Linear, v: torch.Tensor) -> torch.Tensor:
        return v @ layer.weight.T + layer.bias

    for i in range(b):
        pooled = pe[i, n_out:].mean(0)
        for t in range(n):
            e = lin(m.down, q[i, t])  # e_down, length r
            p = lin(m.prompt_reduce, torch.cat([pe[i, t], pooled]))
            n_layers = len(m.hyper)
            for k in range(n_layers):
                l_out = c if k == n_layers - 1 and m.paper_shapes else r
                h = torch.relu(lin(m.hyper[k][0], p))
                w = lin(m.hyper[k][2], h).reshape(e.shape[0], l_out)  # eq. (1)
                y = e @ w
                y = (y - y.mean()) / torch.sqrt(y.var(unbiased=False) + m.norms[k].eps)
                y = y * m.norms[k].weight + m.norms[k].bias  # Norm along the length (eq. 2)
                e = torch.relu(y)
            if m.paper_shapes:
                out[i, t] = m.gate * e  # zero-initialised output gate (see HyPAdapter)
            else:  # square shapes: r x r weights, then the up-projection to C
                out[i, t] = lin(m.up, e)
    return out


def test_hyp_adapter_paper_shapes_match_equations(randomize):
    torch.manual_seed(0)
    c, r, n_out = 12, 3, 2
    m = HyPAdapter(c, r, prompt_dim=6, layers=3, num_output_tokens=n_out, shapes="paper")
    # last generated weight maps to the output length C (eq. 1), no separate up-projection
    assert m.hyper[-1][2].out_features == r * c
    assert all(h[2].out_features == r * r for h in m.hyper[:-1])
    assert m.norms[-1].normalized_shape == (c,)
    q, pe = torch.randn(2, 5, c), torch.randn(2, 5, c)
    randomize(m, std=0.3)
    with torch.no_grad():
        got = m(q, pe)
        ref = _hyp_reference_paper(m, q, pe, n_out)
    assert got.abs().max() > 1e-3
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_hyp_adapter_square_shapes_match_equations(randomize):
    """The default shapes (all weights r x r + up-projection) against the same raw-weight
    reference (the older loop test re-used the module's own layers)."""
    torch.manual_seed(1)
    m = HyPAdapter(12, 3, prompt_dim=6, layers=3, num_output_tokens=2)
    q, pe = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    randomize(m, std=0.3)
    with torch.no_grad():
        got, ref = m(q, pe), _hyp_reference_paper(m, q, pe, 2)
    assert got.abs().max() > 1e-3
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_hyp_adapter_paper_shapes_start_at_zero():
    """An adapted model must equal the frozen one before training: the paper-shaped HyP-Adpt
    ends in ReLU(Norm(.)), so its output gate starts at zero, and it still learns."""
    torch.manual_seed(0)
    m = HyPAdapter(12, 3, prompt_dim=6, num_output_tokens=2, shapes="paper")
    q, pe = torch.randn(1, 4, 12), torch.randn(1, 4, 12)
    out = m(q, pe)
    assert torch.equal(out, torch.zeros_like(q))
    out.sum().backward()
    assert m.gate.grad.abs().sum() > 0  # the gate gets a gradient (not a dead ReLU)


def test_hyp_adapter_shapes_option_validated():
    with pytest.raises(ValueError, match="shapes"):
        HyPAdapter(12, 3, shapes="round")
    from medsa.errors import ConfigError

    with pytest.raises(ConfigError, match="hyper_shapes"):
        MedSAConfig(hyper_shapes="round")


# ------------------------------------------------------------------ parameter counts (Tables 7, 8)


def _meta_counts(name: str, cfg):
    from medsa.adapters import count_parameters
    from medsa.sam.build import build_sam_from_config, get_config

    with torch.device("meta"):
        model = build_sam_from_config(get_config(name), name=name)
        apply_method(model, cfg)
    return count_parameters(model)


def test_medsa_vit_h_counts_against_table7():
    """Table 7 (ViT-H): rank 64 on blocks 1-32 = 13.10M, 17-32 = 6.55M. medsa counts 163,840
    encoder parameters per rank (32 blocks x 2 adapters x 2 x 1280) while Table 7's slope is
    ~184k per rank; the paper does not say what else it counts. Stated tolerance: 15 % for the
    default (square HyP-Adpt), 6 % with eq. (1)'s shapes, 5 % for half the blocks."""
    full = _meta_counts("vit_h", MedSAConfig(rank=64)).tunable
    paper = _meta_counts("vit_h", MedSAConfig(rank=64, hyper_shapes="paper")).tunable
    top = _meta_counts("vit_h", MedSAConfig(rank=64, blocks="17-32")).tunable
    bottom = _meta_counts("vit_h", MedSAConfig(rank=64, blocks="1-16")).tunable
    assert abs(full - 13.10e6) / 13.10e6 < 0.15, full
    assert abs(paper - 13.10e6) / 13.10e6 < 0.06, paper
    assert top == bottom and abs(top - 6.55e6) / 6.55e6 < 0.05, top


def test_sdtrans_fusion_counts_table8():
    """Table 8 lists 0 extra parameters for add and concat. medsa's add has none beyond the
    depth adapter; concat needs a 2C -> C map, here low-rank: 32 x (2C r + r + r C + C) =
    7.9M on ViT-H at r = 64 (documented in docs/adapters.md)."""
    c, r = 1280, 64
    add = _meta_counts("vit_h", MedSAConfig(rank=r, sd_trans=True, sd_fusion="add")).tunable
    cat = _meta_counts("vit_h", MedSAConfig(rank=r, sd_trans=True, sd_fusion="concat")).tunable
    plain = _meta_counts("vit_h", MedSAConfig(rank=r)).tunable
    assert add - plain == 32 * (2 * c * r + r + c)  # one depth adapter per block, no fusion weights
    assert cat - add == 32 * (2 * c * r + r + r * c + c)
    assert 7.8e6 < cat - add < 8.0e6


def test_masam_widths_follow_the_released_code(tiny):
    """Released MA-SAM: 3D adapters 384 wide; decoder channels halved down to C/32."""
    from medsa.adapters import MASAMConfig

    assert MASAMConfig().adapter_dim == 384
    counts = _meta_counts("vit_b", MASAMConfig(fact_rank=32))
    c, m = 768, 384
    per = 2 * c + (c * m + m) + (3 * m * m + m) + (m * c + c)  # LN, down, conv (3,1,1), up
    assert counts.adapters["adapter3d"][0] == 12 * 2 * per
    model = apply_method(tiny(0), MASAMConfig(fact_rank=4, adapter_dim=8, num_classes=3))
    head = model.masam_decoder
    dim = int(model.mask_decoder.transformer_dim)
    assert head.extra_upscaling[0].out_channels == dim // 16
    assert head.extra_upscaling[3].out_channels == dim // 32
    assert all(h.layers[-1].out_features == dim // 32 for h in head.hypernetworks)
    const = apply_method(
        tiny(0),
        MASAMConfig(fact_rank=4, adapter_dim=8, num_classes=3, decoder_channels="constant"),
    ).masam_decoder
    assert const.extra_upscaling[3].out_channels == dim // 8
    emb = torch.randn(1, dim, 8, 8)
    assert head(emb).shape == const(emb).shape == (1, 3, 128, 128)
