"""Adapter modules that plug into the hook points of :mod:`medsa.sam` (see docs/architecture.md).

Every module here is an :class:`AdapterModule`: ``configure_trainable`` marks exactly these as
trainable, ``count_parameters`` groups them by :attr:`AdapterModule.kind`, and ``save_adapter``
stores their tensors. Every module starts as an *identity* on the host: the last projection is
zero-initialised, so an adapted model reproduces the frozen model until it is trained.

Shapes: ViT tokens are ``(B, H, W, C)``; 3D inputs run as ``(B*D, H, W, C)`` with ``depth=D``
(the ``D`` slices of one volume contiguous); mask-decoder tokens are ``(B, N, C)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from medsa.errors import DataError

from .config import PROMPT_CONDITIONINGS, SD_FUSIONS

__all__ = [
    "ACTIVATIONS",
    "Adapter",
    "Adapter3D",
    "AdapterModule",
    "FacTQKV",
    "FacTShared",
    "HyPAdapter",
    "LoRAQKV",
    "SDTrans",
    "pack_qkv",
    "split_depth",
]

#: activation name -> constructor (the paper's Adapter uses ReLU)
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


class AdapterModule(nn.Module):
    """Marker base class of everything a PEFT method adds to the backbone.

    ``kind`` names the adapter family in parameter tables (``medsa params``).
    """

    kind: str = "adapter"


def split_depth(n: int, depth: int | None) -> int:
    """Number of volumes ``B`` in a batch of ``n = B*D`` slices (``depth=None`` means 2D: ``D=1``)."""
    d = 1 if depth is None else int(depth)
    if d < 1 or n % d != 0:
        raise DataError(
            f"a 3D batch of {n} slices cannot be split into volumes of depth {depth}; "
            "pass (B*D, 3, H, W) with the D slices of each volume contiguous and depth=D"
        )
    return n // d


def pack_qkv(
    dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, heads: int | None
) -> torch.Tensor:
    """Lay q/k/v deltas ``(..., C)`` out like the host's fused qkv output ``(..., 3C)``.

    ``heads=None``: SAM ViT layout ``[q | k | v]``. Otherwise TinyViT's per-head layout
    ``(nH, [q_h | k_h | v_h])``.
    """
    if heads is None:
        return torch.cat([dq, dk, dv], dim=-1)
    lead = dq.shape[:-1]
    parts = [t.reshape(*lead, heads, -1) for t in (dq, dk, dv)]
    return torch.cat(parts, dim=-1).reshape(*lead, -1)


def _zero_(linear: nn.Linear) -> nn.Linear:
    nn.init.zeros_(linear.weight)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)
    return linear


class Adapter(AdapterModule):
    """Bottleneck adapter ``s * up(act(down(x)))`` (paper Sec. 3.2, Fig. 1b).

    Returns a *delta* ``(..., C)`` for the host to add. ``up`` is zero-initialised, so the delta
    is exactly zero before training.

    Args:
        dim: token width ``C``.
        mid_dim: bottleneck width (the paper's "rank", Table 7a).
        activation: ``"relu"`` (paper) or ``"gelu"``.
        scale: the factor ``s`` (paper: 0.05 for the adapter parallel to the MLP, 1 elsewhere).
    """

    kind = "adapter"

    def __init__(
        self, dim: int, mid_dim: int, activation: str = "relu", scale: float = 1.0
    ) -> None:
        super().__init__()
        self.down = nn.Linear(dim, mid_dim)
        self.act = ACTIVATIONS[activation]()
        self.up = _zero_(nn.Linear(mid_dim, dim))
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.act(self.down(x)))

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


class HyPAdapter(AdapterModule):
    """Hyper-Prompting Adapter (HyP-Adpt, paper Sec. 3.4, eq. 1-2) for the decoder's prompt tokens.

    ``e_down = down(queries)`` is ``(B, N, r)``. The *prompt embedding* ``e_prompt`` is, for
    every token ``n``, the concatenation of that token's positional embedding ``query_pe[:, n]``
    (for SAM this is the token itself: output tokens + sparse point/box embeddings) with the mean
    of the sparse prompt tokens ``query_pe[:, num_output_tokens:]``, reduced by a linear layer to
    ``prompt_dim``: ``e_prompt (B, N, P)``. So every token, the mask/IoU output tokens included, is
    conditioned on the whole prompt. Then, for each of ``layers`` hyper layers with its own MLP
    ``M_i``::

        W_i = reshape(M_i(e_prompt))            # (B, N, r, r)        eq. (1)
        e_down = ReLU(LayerNorm_r(e_down @ W_i))  # per-token matmul   eq. (2)

    and the output is ``up(e_down)`` ``(B, N, C)`` (zero-initialised). ``mode`` selects how the
    prompt enters (paper Table 5): ``"hyper"`` (above), ``"add"`` (``e_down + lin(e_prompt)``),
    ``"concat"`` (``lin([e_down, e_prompt])``) or ``"none"`` (plain adapter).

    ``shapes`` chooses the weight shapes of eq. (1):

    * ``"square"`` (default): all hyper weights are ``r x r`` and a separate zero-initialised
      ``up`` projection maps ``e_down`` to ``C``; the hyper MLPs stay small (``P * r^2`` each).
    * ``"paper"``: as eq. (1) states, ``L_in`` of the first weight is ``r`` and ``L_out`` of the
      last one is the output length ``C``: ``W_1 .. W_{k-1}`` are ``r x r``, ``W_k`` is ``r x C``
      (its MLP emits ``r*C`` numbers per token) and the output is ``ReLU(Norm_C(e @ W_k))``,
      no ``up``. Eq. (2) ends in a ReLU, which cannot start at exactly zero with a live
      gradient, so the output is multiplied by a per-channel ``gate (C,)`` initialised to 0:
      the model starts equal to the frozen one (as every medsa adapter) and ``gate`` gets the
      gradient ``e`` from the first step.
    """

    kind = "hyp_adapter"
    MODES = PROMPT_CONDITIONINGS
    SHAPES = ("square", "paper")

    def __init__(
        self,
        dim: int,
        mid_dim: int,
        prompt_dim: int = 32,
        mode: str = "hyper",
        layers: int = 3,
        num_output_tokens: int = 0,
        activation: str = "relu",
        shapes: str = "square",
    ) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if shapes not in self.SHAPES:
            raise ValueError(f"shapes must be one of {self.SHAPES}, got {shapes!r}")
        if mode == "hyper" and mid_dim < 2:
            raise ValueError("HyP-Adpt needs mid_dim >= 2 (LayerNorm over one value is always 0)")
        self.mode = mode
        self.mid_dim = mid_dim
        self.num_output_tokens = int(num_output_tokens)
        # eq. (1) with the paper's shapes: the last generated weight maps straight to C
        self.paper_shapes = mode == "hyper" and shapes == "paper"
        self.down = nn.Linear(dim, mid_dim)
        self.act = ACTIVATIONS[activation]()
        if self.paper_shapes:
            self.gate = nn.Parameter(torch.zeros(dim))
        else:
            self.up = _zero_(nn.Linear(mid_dim, dim))
        if mode != "none":
            # "the prompt information is concatenated and reduced as prompt embedding"
            self.prompt_reduce = nn.Linear(2 * dim, prompt_dim)
        if mode == "hyper":
            outs = [mid_dim] * layers
            if self.paper_shapes:
                outs[-1] = dim
            self.hyper = nn.ModuleList(
                nn.Sequential(
                    nn.Linear(prompt_dim, prompt_dim),
                    nn.ReLU(),
                    nn.Linear(prompt_dim, mid_dim * o),
                )
                for o in outs
            )
            self.norms = nn.ModuleList(nn.LayerNorm(o) for o in outs)
        elif mode == "add":
            self.prompt_proj = nn.Linear(prompt_dim, mid_dim)
        elif mode == "concat":
            self.fuse = nn.Linear(mid_dim + prompt_dim, mid_dim)

    def prompt_embedding(self, query_pe: torch.Tensor) -> torch.Tensor:
        """``query_pe (B, N, C)`` -> ``e_prompt (B, N, P)``."""
        sparse = query_pe[:, self.num_output_tokens :]
        if sparse.shape[1] > 0:
            pooled = sparse.mean(dim=1, keepdim=True)
        else:  # no point/box prompt (e.g. automatic mode): nothing to condition on
            pooled = torch.zeros_like(query_pe[:, :1])
        both = torch.cat([query_pe, pooled.expand_as(query_pe)], dim=-1)
        return self.prompt_reduce(both)

    def forward(self, queries: torch.Tensor, query_pe: torch.Tensor) -> torch.Tensor:
        """``queries, query_pe: (B, N, C)`` -> delta ``(B, N, C)``."""
        if queries.shape != query_pe.shape:
            raise DataError(
                f"HyP-Adpt needs queries and prompt embeddings of the same shape, got "
                f"{tuple(queries.shape)} and {tuple(query_pe.shape)}"
            )
        if self.mode == "none":
            return self.up(self.act(self.down(queries)))
        p = self.prompt_embedding(query_pe)
        if self.mode == "hyper":
            # The hyper layers supply the non-linearity (ReLU(Norm(.)), eq. 2). A ReLU on e_down
            # first can zero a token's whole reduced embedding; then 0 @ W = 0 and LayerNorm(0)
            # is its bias (0 at init), so the adapter is dead for that token (seen at rank 4).
            e = self.down(queries)
            b, n, r = e.shape
            for mlp, norm in zip(self.hyper, self.norms, strict=True):
                w = mlp(p).view(b, n, r, norm.normalized_shape[0])  # eq. (1): (B, N, L_in, L_out)
                e = F.relu(norm(torch.einsum("bni,bnio->bno", e, w)))  # eq. (2)
            if self.paper_shapes:
                return self.gate * e
        elif self.mode == "add":
            e = self.act(self.down(queries)) + self.prompt_proj(p)
        else:  # concat
            e = self.act(self.fuse(torch.cat([self.act(self.down(queries)), p], dim=-1)))
        return self.up(e)


class SDTrans(AdapterModule):
    """Space-Depth Transpose (paper Sec. 3.3, Fig. 1c): the ``depth_branch`` hook of a ViT block.

    The spatial branch is the block's own windowed attention (output ``a``). The depth branch
    transposes the *un-windowed* normalised tokens ``xn (B*D, H, W, C)`` to ``(B*H*W, 1, D, C)``
    and runs the **same** attention module (same qkv/proj weights, and the same LoRA/FacT deltas
    if any) over them with the 2D relative position bias switched off, so each token attends
    across the ``D`` slices at its own spatial position only. No positional encoding is added
    along depth: the branch is permutation-equivariant over slices, as the paper's plain
    transposition is. (The public reference code runs the depth attention on *windowed* tokens;
    ours does not depend on the window layout.)

    A depth adapter (zero-initialised) follows the depth attention, as in the reference
    ``Depth_Adapter``. Fusion with the spatial branch (paper Table 8):

    * ``"add"`` (paper default): ``a + depth_adapter(o)``, ``o`` the depth-attention output. Only
      the adapter output is added (as in the reference code, and unlike the paper's literal
      "add the depth branch"): adding the raw frozen attention ``o`` would change the pretrained
      model before any training; the zero-initialised adapter makes the branch start at zero.
      ``depth_residual=True`` gives the literal ``a + o + depth_adapter(o)``.
    * ``"concat"``: ``a + up(act(down([a, d])))``, a low-rank linear projection of the channel
      concatenation back to ``C`` (zero-initialised ``up``), ``d = o + depth_adapter(o)``.
    * ``"cross_attn"``: spatial tokens query the depth sequence at their own spatial position:
      ``a + out(softmax(q(a) k(d)^T / sqrt(r)) v(d))``, width ``r``, zero-initialised ``out``.

    With ``depth=None`` (2D input) the hook returns ``a`` unchanged.
    With ``D = 1`` the depth attention has a single key, so the softmax is 1 and
    ``o = proj(v(xn))`` (+ the attention's own deltas): the branch adds the *self-term*
    ``depth_adapter(attn.proj(v))`` with ``v = attn.qkv(xn)[..., 2C:]``.
    """

    kind = "sd_trans"
    FUSIONS = SD_FUSIONS

    def __init__(
        self,
        dim: int,
        mid_dim: int,
        fusion: str = "add",
        activation: str = "relu",
        depth_residual: bool = False,
    ) -> None:
        super().__init__()
        if fusion not in self.FUSIONS:
            raise ValueError(f"fusion must be one of {self.FUSIONS}, got {fusion!r}")
        self.fusion = fusion
        self.depth_residual = bool(depth_residual)
        self.depth_adapter = Adapter(dim, mid_dim, activation)
        if fusion == "concat":
            self.fuse_down = nn.Linear(2 * dim, mid_dim)
            self.fuse_act = ACTIVATIONS[activation]()
            self.fuse_up = _zero_(nn.Linear(mid_dim, dim))
        elif fusion == "cross_attn":
            self.q = nn.Linear(dim, mid_dim)
            self.k = nn.Linear(dim, mid_dim)
            self.v = nn.Linear(dim, mid_dim)
            self.out = _zero_(nn.Linear(mid_dim, dim))

    @staticmethod
    def depth_attention(xn: torch.Tensor, attn: nn.Module, depth: int) -> torch.Tensor:
        """Run ``attn`` across slices: ``xn (B*D, H, W, C)`` -> ``(B*D, H, W, C)``."""
        bd, h, w, c = xn.shape
        b = split_depth(bd, depth)
        t = xn.reshape(b, depth, h, w, c).permute(0, 2, 3, 1, 4).reshape(b * h * w, 1, depth, c)
        o = attn(t, use_rel_pos=False)  # (B*H*W, 1, D, C)
        return o.reshape(b, h, w, depth, c).permute(0, 3, 1, 2, 4).reshape(bd, h, w, c)

    def depth_contribution(self, xn: torch.Tensor, attn: nn.Module, depth: int) -> torch.Tensor:
        """What the depth branch hands to the fusion, ``(B*D, H, W, C)``."""
        o = self.depth_attention(xn, attn, depth)
        if self.fusion == "add" and not self.depth_residual:
            return self.depth_adapter(o)
        return o + self.depth_adapter(o)

    def forward(
        self, a: torch.Tensor, xn: torch.Tensor, block: nn.Module, depth: int | None
    ) -> torch.Tensor:
        """Fuse spatial attention ``a`` with the depth branch of ``xn``; both ``(B*D, H, W, C)``."""
        if depth is None:
            return a
        d = self.depth_contribution(xn, block.attn, depth)
        if self.fusion == "add":
            return a + d
        if self.fusion == "concat":
            return a + self.fuse_up(self.fuse_act(self.fuse_down(torch.cat([a, d], dim=-1))))
        # cross-attention: token (b, z, y, x) attends to d[b, :, y, x] (D keys)
        bd, h, w, c = a.shape
        b = split_depth(bd, depth)

        def seq(t: torch.Tensor) -> torch.Tensor:  # (B*D, H, W, r) -> (B*H*W, D, r)
            return (
                t.reshape(b, depth, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b * h * w, depth, -1)
            )

        q, k, v = seq(self.q(a)), seq(self.k(d)), seq(self.v(d))
        y = F.scaled_dot_product_attention(q, k, v)  # (B*H*W, D, r)
        y = y.reshape(b, h, w, depth, -1).permute(0, 3, 1, 2, 4).reshape(bd, h, w, -1)
        return a + self.out(y)


class LoRAQKV(AdapterModule):
    """LoRA on the fused ``qkv`` projection (SAMed style): ``qkv_delta`` hook.

    Returns ``(..., 3C)`` with ``(alpha / r) * B_q A_q x`` in the q slot, zeros for k and the
    same for v (``targets="qv"``; ``"qkv"`` adapts k too). ``A`` is Kaiming-uniform (SAMed),
    ``B`` zero, so the delta starts at zero. ``heads`` selects TinyViT's per-head qkv layout.
    """

    kind = "lora"

    def __init__(
        self,
        dim: int,
        rank: int,
        alpha: float | None = None,
        targets: str = "qv",
        heads: int | None = None,
    ) -> None:
        super().__init__()
        self.heads = heads
        if not targets or set(targets) - set("qkv"):
            raise ValueError(f"targets must be letters of 'qkv', got {targets!r}")
        self.dim = dim
        self.targets = "".join(t for t in "qkv" if t in targets)
        self.scaling = (rank if alpha is None else float(alpha)) / rank
        self.lora_a = nn.ModuleDict({t: nn.Linear(dim, rank, bias=False) for t in self.targets})
        self.lora_b = nn.ModuleDict({t: nn.Linear(rank, dim, bias=False) for t in self.targets})
        for t in self.targets:
            nn.init.kaiming_uniform_(self.lora_a[t].weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_b[t].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zeros = None
        parts = []
        for t in "qkv":
            if t in self.lora_a:
                parts.append(self.scaling * self.lora_b[t](self.lora_a[t](x)))
            else:
                if zeros is None:
                    zeros = x.new_zeros(*x.shape[:-1], self.dim)
                parts.append(zeros)
        return pack_qkv(*parts, heads=self.heads)


class FacTShared(AdapterModule):
    """FacT factors shared by all blocks (MA-SAM): ``U: C -> r`` and ``V: r -> C`` (V zero)."""

    kind = "fact"

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.u = nn.Linear(dim, rank, bias=False)
        self.v = _zero_(nn.Linear(rank, dim, bias=False))


class FacTQKV(AdapterModule):
    """FacT tensor-train increment on q and v (MA-SAM, after Jie & Deng 2023): ``qkv_delta`` hook.

    ``delta_q = s * V(drop(T_q(drop(U x))))`` and likewise ``delta_v`` with ``T_v``, where ``U, V``
    are :class:`FacTShared` (one instance for the whole encoder) and ``T_q, T_v`` are per-block
    ``r x r`` cores. ``V`` is zero-initialised, so the model starts equal to the frozen one.
    Returns ``(..., 3C)`` (zeros in the k slot).
    """

    kind = "fact"

    def __init__(
        self,
        shared: FacTShared,
        rank: int,
        scale: float = 1.0,
        dropout: float = 0.1,
        heads: int | None = None,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.shared = shared
        self.core_q = nn.Linear(rank, rank, bias=False)
        self.core_v = nn.Linear(rank, rank, bias=False)
        self.drop = nn.Dropout(dropout)
        self.scale = float(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.drop(self.shared.u(x))
        dq = self.scale * self.shared.v(self.drop(self.core_q(u)))
        dv = self.scale * self.shared.v(self.drop(self.core_v(u)))
        return pack_qkv(dq, torch.zeros_like(dq), dv, heads=self.heads)


class Adapter3D(AdapterModule):
    """MA-SAM 3D adapter: ``pre_attn_adapter`` / ``pre_mlp_adapter`` hook.

    ``LayerNorm -> Linear down (C -> m) -> Conv3d (m -> m, kernel (k, 1, 1) over depth, zero
    padding) -> GELU -> Linear up (m -> C, zero-initialised)``, on ``x (B*D, H, W, C)`` reshaped to
    ``(B, m, D, H, W)`` for the convolution. ``depth=None`` treats every image as a volume of one
    slice (only the kernel's centre tap sees data).
    """

    kind = "adapter3d"

    def __init__(self, dim: int, mid_dim: int, kernel_depth: int = 3) -> None:
        super().__init__()
        if kernel_depth < 1 or kernel_depth % 2 == 0:
            raise ValueError(f"kernel_depth must be odd and positive, got {kernel_depth}")
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, mid_dim)
        self.conv = nn.Conv3d(
            mid_dim, mid_dim, kernel_size=(kernel_depth, 1, 1), padding=(kernel_depth // 2, 0, 0)
        )
        self.act = nn.GELU()
        self.up = _zero_(nn.Linear(mid_dim, dim))

    def forward(self, x: torch.Tensor, depth: int | None) -> torch.Tensor:
        bd, h, w, _ = x.shape
        d = 1 if depth is None else int(depth)
        b = split_depth(bd, d)
        z = self.down(self.norm(x))
        m = z.shape[-1]
        z = z.reshape(b, d, h, w, m).permute(0, 4, 1, 2, 3)  # (B, m, D, H, W)
        z = self.conv(z).permute(0, 2, 3, 4, 1).reshape(bd, h, w, m)
        return self.up(self.act(z))
