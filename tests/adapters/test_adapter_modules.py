"""Adapter modules on plain tensors and single ViT blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medsa.adapters.modules import (
    Adapter,
    Adapter3D,
    FacTQKV,
    FacTShared,
    HyPAdapter,
    LoRAQKV,
    SDTrans,
    pack_qkv,
)
from medsa.errors import DataError
from medsa.sam.image_encoder import Attention, Block

C = 16


def test_adapter_starts_at_zero_and_scales(randomize):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 3, C)
    a = Adapter(C, 4, "relu", scale=0.05)
    assert torch.equal(a(x), torch.zeros_like(x))
    randomize(a)
    manual = 0.05 * (F.relu(x @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias)
    torch.testing.assert_close(a(x), manual)
    g = Adapter(C, 4, "gelu")
    randomize(g)
    manual = F.gelu(x @ g.down.weight.T + g.down.bias) @ g.up.weight.T + g.up.bias
    torch.testing.assert_close(g(x), manual)


def _hyper_reference(m: HyPAdapter, q: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Eq. (1)-(2) written per token with explicit loops (independent of the module's einsum)."""
    b, n, c = q.shape
    out = torch.empty_like(q)
    for i in range(b):
        sparse = pe[i, m.num_output_tokens :]
        pooled = sparse.mean(0) if len(sparse) else torch.zeros(c)
        for t in range(n):
            e = m.down(q[i, t])  # (r,) e_down
            p = m.prompt_reduce(torch.cat([pe[i, t], pooled]))
            for mlp, norm in zip(m.hyper, m.norms, strict=True):
                w = mlp(p).reshape(m.mid_dim, m.mid_dim)  # eq. (1): W = Re(M(e_prompt))
                e = F.relu(norm(e @ w))  # eq. (2)
            out[i, t] = m.up(e)
    return out


def test_hyp_adapter_matches_equations_and_depends_on_prompt(randomize):
    torch.manual_seed(0)
    n_out = 3
    m = HyPAdapter(C, 4, prompt_dim=8, mode="hyper", layers=3, num_output_tokens=n_out)
    q, pe = torch.randn(2, 5, C), torch.randn(2, 5, C)
    assert torch.equal(m(q, pe), torch.zeros_like(q))  # zero-initialised up-projection
    randomize(m, std=0.3)
    y = m(q, pe)
    assert y.shape == (2, 5, C)
    torch.testing.assert_close(y, _hyper_reference(m, q, pe), rtol=1e-4, atol=1e-5)
    # changing only the sparse prompt tokens changes the output of every token,
    # including the output (mask/IoU) tokens, which are identical in both calls
    pe2 = pe.clone()
    pe2[:, n_out:] += torch.randn(2, 2, C)
    y2 = m(q, pe2)
    assert (y2[:, :n_out] - y[:, :n_out]).abs().amax(dim=-1).min() > 1e-6
    # no prompt tokens at all (automatic mode) still works
    assert m(q[:, :n_out], pe[:, :n_out]).shape == (2, n_out, C)


@pytest.mark.parametrize("mode", ["add", "concat", "none"])
def test_hyp_adapter_alternative_modes(mode, randomize):
    torch.manual_seed(0)
    m = HyPAdapter(C, 4, prompt_dim=8, mode=mode, num_output_tokens=2)
    q, pe = torch.randn(1, 4, C), torch.randn(1, 4, C)
    assert torch.equal(m(q, pe), torch.zeros_like(q))
    randomize(m, std=0.3)
    pe2 = pe.clone()
    pe2[:, 2:] += 1.0
    changed = not torch.allclose(m(q, pe), m(q, pe2))
    assert changed == (mode != "none")


def test_hyp_adapter_rejects_mismatched_shapes():
    m = HyPAdapter(C, 4)
    with pytest.raises(DataError, match="same shape"):
        m(torch.randn(1, 4, C), torch.randn(1, 5, C))


def _block(window: int, seed: int = 0) -> Block:
    torch.manual_seed(seed)
    blk = Block(C, num_heads=2, use_rel_pos=True, window_size=window, input_size=(4, 5))
    with torch.no_grad():  # non-zero rel-pos tables so that skipping them matters
        blk.attn.rel_pos_h.normal_()
        blk.attn.rel_pos_w.normal_()
    return blk.eval()


def _depth_attention_reference(attn: Attention, xn: torch.Tensor, depth: int) -> torch.Tensor:
    """Plain multi-head attention over the slices of each token, one token at a time."""
    bd, h, w, c = xn.shape
    nh = attn.num_heads
    out = torch.empty_like(xn)
    for b in range(bd // depth):
        for y in range(h):
            for x in range(w):
                seq = xn[b * depth : (b + 1) * depth, y, x]  # (D, C)
                q, k, v = attn.qkv(seq).split(c, dim=-1)
                heads = []
                for i in range(nh):
                    sl = slice(i * c // nh, (i + 1) * c // nh)
                    logits = q[:, sl] @ k[:, sl].T / (c // nh) ** 0.5
                    heads.append(logits.softmax(-1) @ v[:, sl])
                out[b * depth : (b + 1) * depth, y, x] = attn.proj(torch.cat(heads, dim=-1))
    return out


def test_sdtrans_depth_branch_equals_per_token_attention():
    torch.manual_seed(0)
    blk = _block(window=3)
    xn = torch.randn(2 * 3, 4, 5, C)
    got = SDTrans.depth_attention(xn, blk.attn, depth=3)
    torch.testing.assert_close(
        got, _depth_attention_reference(blk.attn, xn, 3), rtol=1e-4, atol=1e-5
    )


def _capture(module: SDTrans) -> list[torch.Tensor]:
    """Record the depth contribution (fused output minus spatial input) of an SD-Trans hook."""
    seen: list[torch.Tensor] = []
    module.register_forward_hook(lambda m, args, out: seen.append(out - args[0]))
    return seen


def test_sdtrans_contribution_independent_of_window_layout(randomize):
    torch.manual_seed(0)
    x = torch.randn(2 * 3, 4, 5, C)
    contributions, outputs = [], []
    for window in (0, 3, 2):
        blk = _block(window, seed=0)  # identical weights, different window layouts
        blk.depth_branch = SDTrans(C, 4)
        randomize(blk, seed=5)
        seen = _capture(blk.depth_branch)
        outputs.append(blk(x, depth=3))
        contributions.append(seen[0])
    assert contributions[0].abs().max() > 0
    for c in contributions[1:]:
        torch.testing.assert_close(c, contributions[0])
    assert not torch.allclose(outputs[0], outputs[1])  # the spatial branch does differ


@pytest.mark.parametrize("fusion", ["add", "concat", "cross_attn"])
def test_sdtrans_block_is_permutation_equivariant_over_depth(fusion, randomize):
    torch.manual_seed(0)
    depth = 4
    blk = _block(3)
    blk.depth_branch = SDTrans(C, 4, fusion=fusion)
    randomize(blk, seed=3)
    x = torch.randn(2 * depth, 4, 5, C)
    perm = torch.tensor([2, 0, 3, 1])
    idx = torch.cat([perm, perm + depth])  # permute the slices inside each volume
    y = blk(x, depth=depth)
    torch.testing.assert_close(blk(x[idx], depth=depth), y[idx], rtol=1e-4, atol=1e-5)
    # and the depth branch really mixes slices: changing one slice changes the others
    x2 = x.clone()
    x2[0] += torch.randn_like(x2[0])
    assert (blk(x2, depth=depth)[1] - y[1]).abs().max() > 1e-4
    assert torch.equal(blk(x2, depth=depth)[depth:], y[depth:])  # the other volume: untouched


def test_sdtrans_depth_one_adds_the_self_term(randomize):
    """D = 1: softmax over a single key is 1, so the depth attention returns proj(v(xn)) and the
    hook adds depth_adapter(proj(v)) to the spatial branch."""
    torch.manual_seed(0)
    blk = _block(3)
    sd = SDTrans(C, 4)
    randomize(sd)
    a, xn = torch.randn(3, 4, 5, C), torch.randn(3, 4, 5, C)
    v = blk.attn.qkv(xn)[..., 2 * C :]
    self_term = sd.depth_adapter(blk.attn.proj(v))
    torch.testing.assert_close(sd(a, xn, blk, 1), a + self_term, rtol=1e-4, atol=1e-5)
    assert self_term.abs().max() > 0


def test_sdtrans_2d_path_untouched_and_bad_depth(randomize):
    torch.manual_seed(0)
    base = _block(3)
    blk = _block(3)
    blk.depth_branch = SDTrans(C, 4)
    randomize(blk)
    x = torch.randn(4, 4, 5, C)
    assert torch.equal(blk(x), base(x))  # depth=None: the hook returns the spatial branch
    with pytest.raises(DataError, match="depth 3"):
        blk(x, depth=3)


def test_sdtrans_zero_init_for_every_fusion():
    for fusion in SDTrans.FUSIONS:
        torch.manual_seed(0)
        blk = _block(3)
        a, xn = torch.randn(4, 4, 5, C), torch.randn(4, 4, 5, C)
        assert torch.equal(SDTrans(C, 4, fusion=fusion)(a, xn, blk, 2), a)
    # the paper's literal "add the depth branch": not identity at start
    assert not torch.equal(SDTrans(C, 4, depth_residual=True)(a, xn, blk, 2), a)


def test_lora_qkv_layout_rank_and_scaling(randomize):
    torch.manual_seed(0)
    x = torch.randn(2, 3, C)
    lora = LoRAQKV(C, rank=2, alpha=4.0, targets="qv")
    assert lora.lora_a["q"].weight.shape == (2, C)
    assert torch.equal(lora(x), torch.zeros(2, 3, 3 * C))
    randomize(lora)
    d = lora(x)
    dq = 2.0 * x @ lora.lora_a["q"].weight.T @ lora.lora_b["q"].weight.T
    torch.testing.assert_close(d[..., :C], dq)
    assert torch.equal(d[..., C : 2 * C], torch.zeros(2, 3, C))  # k untouched
    assert d[..., 2 * C :].abs().max() > 0


def test_pack_qkv_tinyvit_layout():
    dq, dk, dv = torch.full((1, 4), 1.0), torch.full((1, 4), 2.0), torch.full((1, 4), 3.0)
    packed = pack_qkv(dq, dk, dv, heads=2).view(1, 2, 3, 2)  # (nH, [q | k | v] of 2 dims)
    assert (
        packed[0, :, 0].eq(1).all() and packed[0, :, 1].eq(2).all() and packed[0, :, 2].eq(3).all()
    )
    assert torch.equal(pack_qkv(dq, dk, dv, heads=None), torch.cat([dq, dk, dv], -1))


def test_fact_shares_factors_and_starts_at_zero(randomize):
    torch.manual_seed(0)
    shared = FacTShared(C, 3)
    f1, f2 = FacTQKV(shared, 3, dropout=0.0), FacTQKV(shared, 3, dropout=0.0)
    x = torch.randn(2, C)
    assert torch.equal(f1(x), torch.zeros(2, 3 * C))
    assert f1.shared.u.weight is f2.shared.u.weight
    randomize(f1)
    d = f1(x)
    u, v = shared.u.weight, shared.v.weight
    torch.testing.assert_close(d[:, :C], x @ u.T @ f1.core_q.weight.T @ v.T)
    torch.testing.assert_close(d[:, 2 * C :], x @ u.T @ f1.core_v.weight.T @ v.T)
    assert torch.equal(d[:, C : 2 * C], torch.zeros(2, C))


def test_adapter3d_mixes_only_neighbouring_slices_of_one_volume(randomize):
    torch.manual_seed(0)
    m = Adapter3D(C, 4, kernel_depth=3).eval()
    x = torch.randn(2 * 5, 2, 2, C)
    assert torch.equal(m(x, 5), torch.zeros_like(x))
    randomize(m)
    y = m(x, 5)
    x2 = x.clone()
    x2[2] += torch.randn_like(x2[2])  # slice 2 of volume 0 (not a constant: LayerNorm)
    changed = (m(x2, 5) - y).abs().amax(dim=(1, 2, 3)) > 1e-6
    assert changed.tolist() == [False, True, True, True, False] + [False] * 5
    assert m(x, None).shape == x.shape  # 2D input: each image is a one-slice volume
    with pytest.raises(DataError):
        m(x, 3)
