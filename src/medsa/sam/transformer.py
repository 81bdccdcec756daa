"""Two-way transformer of the SAM mask decoder (prompt tokens <-> image tokens).

Parameter names match Meta's ``segment_anything.modeling.transformer``. Attention uses
``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import MLPBlock

__all__ = ["Attention", "TwoWayAttentionBlock", "TwoWayTransformer"]


class TwoWayTransformer(nn.Module):
    """Stack of :class:`TwoWayAttentionBlock` plus a final token-to-image attention."""

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim=embedding_dim,
                num_heads=num_heads,
                mlp_dim=mlp_dim,
                activation=activation,
                attention_downsample_rate=attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def forward(
        self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor
    ) -> tuple[Tensor, Tensor]:
        """``image_embedding, image_pe: (B, C, h, w)``, ``point_embedding: (B, N, C)``.

        Returns processed tokens ``(B, N, C)`` and image tokens ``(B, h*w, C)``.
        """
        image_embedding = image_embedding.flatten(2).permute(0, 2, 1)
        image_pe = image_pe.flatten(2).permute(0, 2, 1)
        queries, keys = point_embedding, image_embedding
        for layer in self.layers:
            queries, keys = layer(
                queries=queries, keys=keys, query_pe=point_embedding, key_pe=image_pe
            )
        attn_out = self.final_attn_token_to_image(
            q=queries + point_embedding, k=keys + image_pe, v=keys
        )
        queries = self.norm_final_attn(queries + attn_out)
        return queries, keys


class TwoWayAttentionBlock(nn.Module):
    """Self-attention of tokens, token->image, MLP, image->token cross-attention.

    Hooks (``None`` by default, each returns a delta that is added)::

        queries = queries + token_adapter(queries, query_pe)  # after token->image attn (HyP-Adpt)
        queries = norm2(queries)
        queries = queries + mlp(queries) + mlp_adapter(queries)
        ...
        keys = keys + image_adapter(keys)                      # after image->token attn

    Shapes: ``queries, query_pe: (B, N, C)``; ``keys: (B, h*w, C)``.
    """

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.ReLU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLPBlock(embedding_dim, mlp_dim, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

        self.token_adapter: Callable[[Tensor, Tensor], Tensor] | None = None
        self.mlp_adapter: Callable[[Tensor], Tensor] | None = None
        self.image_adapter: Callable[[Tensor], Tensor] | None = None

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor
    ) -> tuple[Tensor, Tensor]:
        if self.skip_first_layer_pe:
            queries = self.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q=q, k=q, v=queries)
        queries = self.norm1(queries)

        k = keys + key_pe
        queries = queries + self.cross_attn_token_to_image(q=queries + query_pe, k=k, v=keys)
        if self.token_adapter is not None:
            queries = queries + self.token_adapter(queries, query_pe)
        queries = self.norm2(queries)

        mlp_out = self.mlp(queries)
        if self.mlp_adapter is not None:
            mlp_out = mlp_out + self.mlp_adapter(queries)
        queries = self.norm3(queries + mlp_out)

        attn_out = self.cross_attn_image_to_token(q=k, k=queries + query_pe, v=queries)
        keys = keys + attn_out
        if self.image_adapter is not None:
            keys = keys + self.image_adapter(keys)
        keys = self.norm4(keys)
        return queries, keys


class Attention(nn.Module):
    """Multi-head attention whose inner dimension may be down-scaled by ``downsample_rate``.

    ``q: (B, Nq, C)``, ``k, v: (B, Nk, C)`` -> ``(B, Nq, C)``.

    In the decoder's cross-attentions one side holds only the ``T`` prompt tokens (about 7)
    and the other the ``h*w`` image tokens (4096). There the projections of the image side are
    folded into small per-prompt matrices (:meth:`_few_keys`, :meth:`_few_queries`): the image
    tokens meet ``num_heads * T`` columns instead of ``internal_dim``, which needs ~55 % fewer
    FLOPs and much smaller temporaries for SAM's decoder (8 heads x 7 tokens = 56 < 128). Same
    maths as projecting then attending (outputs and gradients equal to 1e-10 in float64;
    tested). ``fold="auto"`` uses it on the CPU only (on a GPU these GEMMs are not the cost,
    kernel launches are); other shapes, or projections replaced by other modules, take the
    standard SDPA path.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads != 0:
            raise ValueError("num_heads must divide embedding_dim // downsample_rate")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)
        #: folded few-token paths: "auto" (where they save work), "always" (whenever the two
        #: sides differ in length), "never" (projection + SDPA everywhere)
        self.fold: str = "auto"

    def _separate_heads(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.num_heads, c // self.num_heads).transpose(1, 2)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        nq, nk = q.shape[1], k.shape[1]
        if self.fold not in ("auto", "always", "never"):
            raise ValueError(
                f"Attention.fold must be 'auto', 'always' or 'never', got {self.fold!r}"
            )
        if self.fold != "never" and nq != nk and self._plain_projections():
            small, large = min(nq, nk), max(nq, nk)
            # Worth it on the CPU when the folded width num_heads * T is well below internal_dim
            # and the other side is long enough to amortise building the small matrices. On a
            # GPU these GEMMs take microseconds and the extra small kernels would cost more.
            pays = (
                q.device.type == "cpu"
                and 4 * self.num_heads * small <= 3 * self.internal_dim
                and large >= 8 * small
            )
            if pays or self.fold == "always":
                return self._few_keys(q, k, v) if nk < nq else self._few_queries(q, k, v)
        return self._project_and_attend(q, k, v)

    def _project_and_attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q = self._separate_heads(self.q_proj(q))
        k = self._separate_heads(self.k_proj(k))
        v = self._separate_heads(self.v_proj(v))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, nH, Nq, C / nH)
        b, _, n, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.internal_dim))

    def _plain_projections(self) -> bool:
        mods = (self.q_proj, self.k_proj, self.v_proj, self.out_proj)
        # exact type: a LoRA/parametrized subclass must run its own forward
        return all(
            type(m) is nn.Linear
            and m.bias is not None
            and not (m._forward_hooks or m._forward_pre_hooks)
            for m in mods
        )

    def _heads_weight(self, lin: nn.Linear) -> Tensor:
        """``(internal_dim, C)`` projection weight as ``(nH, d, C)``."""
        return lin.weight.view(self.num_heads, -1, lin.weight.shape[-1])

    def _few_keys(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Many queries ``(B, N, C)``, few keys/values ``(B, T, C)`` (image -> token).

        ``softmax(s (x Wq_h + bq_h) K_h^T) V_h Wo_h`` summed over heads equals
        ``softmax(x A + c) M`` with ``A = s Wq_h K_h^T`` ``(C, nH*T)``, ``c = s bq_h K_h^T`` and
        ``M = V_h Wo_h`` ``(nH*T, C)``: two GEMMs of width ``nH*T`` over the image tokens.
        """
        b, t, h = k.shape[0], k.shape[1], self.num_heads
        d = self.internal_dim // h
        scale = d**-0.5
        kh = self.k_proj(k).view(b, t, h, d)
        vh = self.v_proj(v).view(b, t, h, d)
        # Logits as (B, nH*T, N): the softmax over T then runs along a strided axis, which the
        # CPU kernel vectorises over N (a softmax over a last axis of length 7 does not).
        a = torch.einsum("hdc,bthd->bhtc", self._heads_weight(self.q_proj), kh * scale)
        c = torch.einsum("hd,bthd->bht", self.q_proj.bias.view(h, d), kh * scale)
        logits = torch.baddbmm(c.reshape(b, h * t, 1), a.reshape(b, h * t, -1), q.transpose(1, 2))
        probs = _softmax(logits.view(b, h, t, -1), dim=2)
        wo = self.out_proj.weight.view(-1, h, d)  # (C, nH, d)
        m = torch.einsum("bthd,chd->bhtc", vh, wo).reshape(b, h * t, -1)
        probs = probs.to(m.dtype).view(b, h * t, -1).transpose(1, 2)  # (B, N, nH*T)
        return torch.baddbmm(self.out_proj.bias.to(m.dtype), probs, m)

    def _few_queries(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Few queries ``(B, T, C)``, many keys/values ``(B, N, C)`` (token -> image).

        ``s Q_h (x Wk_h + bk_h)^T = (s Q_h Wk_h^T) x^T + s Q_h bk_h^T``; the last term is the
        same for every key of a row (it cancels in the softmax but is kept, so that the key bias
        stays in the autograd graph, as DDP expects). As the attention rows sum to one,
        ``P_h (x Wv_h + bv_h) = (P_h x) Wv_h + bv_h``: the image tokens are only multiplied by
        ``(nH*T, C)`` matrices.
        """
        b, t, h = q.shape[0], q.shape[1], self.num_heads
        d = self.internal_dim // h
        qh = self.q_proj(q).view(b, t, h, d) * d**-0.5
        qk = torch.einsum("bthd,hdc->bhtc", qh, self._heads_weight(self.k_proj))
        c = torch.einsum("bthd,hd->bht", qh, self.k_proj.bias.view(h, d))
        logits = torch.baddbmm(
            c.reshape(b, h * t, 1), qk.reshape(b, h * t, -1), k.transpose(1, 2)
        )  # (B, nH*T, N)
        probs = _softmax(logits).to(v.dtype)
        z = torch.bmm(probs, v).view(b, h, t, -1)  # (B, nH, T, C)
        out = torch.einsum("bhtc,hdc->bthd", z, self._heads_weight(self.v_proj))
        out = out + self.v_proj.bias.view(h, d).to(out.dtype)
        return self.out_proj(out.reshape(b, t, self.internal_dim))


def _softmax(x: Tensor, dim: int = -1) -> Tensor:
    """Softmax over ``dim``, accumulated in fp32 for bf16/fp16 inputs (as SDPA does)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        return x.softmax(dim, dtype=torch.float32)
    return x.softmax(dim)
