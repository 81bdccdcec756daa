"""Attention with SAM's decomposed relative-position bias, in three interchangeable implementations.

SAM's ViT adds a decomposed relative-position bias to every attention logit (MViTv2)::

    logits[n, m] = scale * q_n . k_m + q_n . Rh[h(n), h(m)] + q_n . Rw[w(n), w(m)]

with ``n = (h(n), w(n))`` a query token and ``m`` a key token on a ``(k_h, k_w)`` grid. Implementations:

``"explicit"``
    Meta's segment-anything math: materialise the ``(N, M)`` logits, add the bias, softmax, matmul.
    The reference the others are tested against; memory ``O(N * M)`` per head in the logits dtype
    (under CUDA autocast the softmax even runs in fp32).
``"sdpa_bias"``
    Builds the ``(N, M)`` bias and passes it as an additive ``attn_mask`` to
    :func:`torch.nn.functional.scaled_dot_product_attention`. Avoids the fp32 softmax but still
    materialises a bias of the full attention size, which rules out the flash kernel on CUDA.
``"sdpa_folded"``
    Folds the bias into augmented queries and keys so that a *plain* SDPA call (no mask, ``scale=1``)
    computes exactly the same logits::

        q'_n = [scale * q_n, q_n . Rh[h(n), :], q_n . Rw[w(n), :]]        (C + k_h + k_w)
        k'_m = [k_m,          onehot_kh(h(m)),   onehot_kw(w(m))]

    so ``q'_n . k'_m = scale * q_n . k_m + rel_h[n, h(m)] + rel_w[n, w(m)]``. The head dim is
    zero-padded to a multiple of 8 (fused-kernel alignment). Nothing of size ``N * M`` is ever
    materialised, so flash / memory-efficient kernels apply (CUDA and CPU).

All functions take ``q, k, v`` of shape ``(B, nH, N, C)`` (``N = q_h * q_w``, ``M = k_h * k_w``) and
return ``(B, nH, N, C)``. They are pure functions of their inputs (no caches, no global state).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..errors import ConfigError

AttentionImpl = Literal["explicit", "sdpa_bias", "sdpa_folded"]
ATTENTION_IMPLS: tuple[str, ...] = ("explicit", "sdpa_bias", "sdpa_folded")

# Fused SDPA kernels want head dims that are a multiple of 8 (16-byte aligned rows in bf16/fp16).
_HEAD_DIM_ALIGN = 8


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings for every (query, key) coordinate pair along one axis.

    Same semantics as segment-anything's ``get_rel_pos`` (linear interpolation when the table
    length differs from ``2 * max(q_size, k_size) - 1``, coordinate scaling when sizes differ).

    Args:
        q_size: number of query positions along the axis.
        k_size: number of key positions along the axis.
        rel_pos: embedding table ``(L, C)``.

    Returns:
        ``(q_size, k_size, C)``.
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
            size=max_rel_dist,
            mode="linear",
        )
        rel_pos = resized.reshape(-1, max_rel_dist).permute(1, 0)
    device = rel_pos.device
    q_coords = torch.arange(q_size, device=device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=device)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative_coords.long()]


def rel_pos_terms(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query relative-position logits along each axis.

    Args:
        q: queries ``(B, nH, q_h * q_w, C)`` (unscaled, as in SAM).
        rel_pos_h: ``(Lh, C)``; rel_pos_w: ``(Lw, C)``.

    Returns:
        ``rel_h (B, nH, q_h, q_w, k_h)`` and ``rel_w (B, nH, q_h, q_w, k_w)``.
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    rh = get_rel_pos(q_h, k_h, rel_pos_h).to(q.dtype)
    rw = get_rel_pos(q_w, k_w, rel_pos_w).to(q.dtype)
    b, nh, _, c = q.shape
    r_q = q.reshape(b * nh, q_h, q_w, c)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh).reshape(b, nh, q_h, q_w, k_h)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw).reshape(b, nh, q_h, q_w, k_w)
    return rel_h, rel_w


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_size, k_size) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, nH, N, C); got {tuple(q.shape)}, {tuple(k.shape)}")
    if q.shape[2] != q_size[0] * q_size[1] or k.shape[2] != k_size[0] * k_size[1]:
        raise ValueError(
            f"token counts {q.shape[2]}/{k.shape[2]} do not match grids {q_size}/{k_size}"
        )


def attention_explicit(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rel_pos_h: torch.Tensor | None = None,
    rel_pos_w: torch.Tensor | None = None,
    q_size: tuple[int, int] | None = None,
    k_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Reference attention (segment-anything's math): logits, + rel-pos bias, softmax, @ v."""
    attn = (q * scale) @ k.transpose(-2, -1)  # (B, nH, N, M)
    if rel_pos_h is not None and rel_pos_w is not None:
        assert q_size is not None and k_size is not None
        _check(q, k, v, q_size, k_size)
        rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, q_size, k_size)
        b, nh, n, m = attn.shape
        attn = (
            attn.view(b, nh, q_size[0], q_size[1], k_size[0], k_size[1])
            + rel_h[..., :, None]
            + rel_w[..., None, :]
        ).view(b, nh, n, m)
    return attn.softmax(dim=-1) @ v


def attention_sdpa_bias(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rel_pos_h: torch.Tensor | None = None,
    rel_pos_w: torch.Tensor | None = None,
    q_size: tuple[int, int] | None = None,
    k_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """SDPA with the rel-pos bias materialised as an additive ``(B, nH, N, M)`` mask."""
    if rel_pos_h is None or rel_pos_w is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    assert q_size is not None and k_size is not None
    _check(q, k, v, q_size, k_size)
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, q_size, k_size)
    b, nh, n, _ = q.shape
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(b, nh, n, k.shape[2])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def folded_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augmented ``q', k'`` of shape ``(B, nH, N|M, D')`` with ``q' . k'`` = biased logits.

    ``D' = C + k_h + k_w`` rounded up to a multiple of 8 (the padding is zeros in both).
    """
    k_h, k_w = k_size
    b, nh, n, c = q.shape
    m = k.shape[2]
    rel_h, rel_w = rel_pos_terms(q, rel_pos_h, rel_pos_w, q_size, k_size)
    d = c + k_h + k_w
    d_pad = -(-d // _HEAD_DIM_ALIGN) * _HEAD_DIM_ALIGN
    pieces_q = [q * scale, rel_h.reshape(b, nh, n, k_h), rel_w.reshape(b, nh, n, k_w)]
    if d_pad > d:
        pieces_q.append(q.new_zeros(b, nh, n, d_pad - d))
    q_aug = torch.cat(pieces_q, dim=-1)
    # One-hot row/column indicators of every key token m = i * k_w + j, padded: (M, D' - C).
    idx = torch.arange(m, device=k.device)[:, None]
    cols = torch.arange(d_pad - c, device=k.device)
    onehot = ((cols == idx // k_w) | (cols == k_h + idx % k_w)).to(k.dtype)
    k_aug = torch.cat([k, onehot.expand(b, nh, m, d_pad - c)], dim=-1)
    return q_aug, k_aug


def attention_sdpa_folded(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rel_pos_h: torch.Tensor | None = None,
    rel_pos_w: torch.Tensor | None = None,
    q_size: tuple[int, int] | None = None,
    k_size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """SDPA without mask: rel-pos bias folded into augmented ``q, k`` (see module docstring).

    ``v`` is zero-padded to the augmented head dim as well, because the flash kernels require
    ``q, k, v`` to share one head dim; the padded output channels are dropped.
    """
    if rel_pos_h is None or rel_pos_w is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    assert q_size is not None and k_size is not None
    _check(q, k, v, q_size, k_size)
    q_aug, k_aug = folded_qk(q, k, scale, rel_pos_h, rel_pos_w, q_size, k_size)
    c = v.shape[-1]
    v_aug = _pad_last(v, q_aug.shape[-1])
    out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=1.0)
    return out[..., :c]


_IMPLS = {
    "explicit": attention_explicit,
    "sdpa_bias": attention_sdpa_bias,
    "sdpa_folded": attention_sdpa_folded,
}


def rel_pos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    rel_pos_h: torch.Tensor | None = None,
    rel_pos_w: torch.Tensor | None = None,
    q_size: tuple[int, int] | None = None,
    k_size: tuple[int, int] | None = None,
    impl: str = "sdpa_folded",
) -> torch.Tensor:
    """Dispatch to one implementation; all are numerically equivalent (see tests).

    Args:
        q, k, v: ``(B, nH, N, C)``, ``(B, nH, M, C)``, ``(B, nH, M, C)``.
        scale: logit scale (``C ** -0.5`` in SAM).
        rel_pos_h, rel_pos_w: ``(Lh, C)``, ``(Lw, C)`` tables, or ``None`` for no bias.
        q_size, k_size: query / key grids ``(h, w)``; required with a bias.
        impl: one of :data:`ATTENTION_IMPLS`.

    Returns:
        ``(B, nH, N, C)``.
    """
    try:
        fn = _IMPLS[impl]
    except KeyError:
        raise ConfigError(
            f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}"
        ) from None
    return fn(q, k, v, scale, rel_pos_h, rel_pos_w, q_size, k_size)


def default_attention_impl(device: torch.device | str | None = None) -> str:
    """The implementation to use by default on ``device``.

    ``"sdpa_folded"`` is exact (fp32 error ~1e-6, tested), was the fastest variant in every CPU
    measurement (inference and training, fp32 and bf16; docs/performance.md) and is the only one
    that can use the flash kernel on CUDA, so it is the default everywhere; the argument exists so
    that a platform where this changes can be special-cased in one place.
    """
    return "sdpa_folded"
