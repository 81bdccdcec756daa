"""SAM mask decoder: two-way transformer + hypernetwork heads + IoU head.

Parameter names match Meta's ``segment_anything.modeling.mask_decoder``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .common import LayerNorm2d

__all__ = ["MLP", "MaskDecoder"]


class MaskDecoder(nn.Module):
    """Predict masks from image and prompt embeddings.

    Args:
        transformer_dim: channel dimension ``C`` of the transformer (= prompt embedding dim).
        transformer: the :class:`~medsa.sam.transformer.TwoWayTransformer`.
        num_multimask_outputs: masks predicted for ambiguous prompts (a 1-mask token is extra).
    """

    def __init__(
        self,
        *,
        transformer_dim: int,
        transformer: nn.Module,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.num_mask_tokens = num_multimask_outputs + 1
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)
        self.output_upscaling = nn.Sequential(
            nn.ConvTranspose2d(transformer_dim, transformer_dim // 4, kernel_size=2, stride=2),
            LayerNorm2d(transformer_dim // 4),
            activation(),
            nn.ConvTranspose2d(transformer_dim // 4, transformer_dim // 8, kernel_size=2, stride=2),
            activation(),
        )
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, transformer_dim // 8, 3)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim, iou_head_hidden_dim, self.num_mask_tokens, iou_head_depth
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode masks.

        Args:
            image_embeddings: ``(1, C, h, w)`` shared by all prompt sets, or ``(B, C, h, w)``
                with one prompt set per image.
            image_pe: ``(1, C, h, w)`` dense positional encoding.
            sparse_prompt_embeddings: ``(B, N, C)``.
            dense_prompt_embeddings: ``(B, C, h, w)``.
            multimask_output: return the 3 ambiguity masks instead of the single-mask output.
        Returns:
            mask logits ``(B, M, 4h, 4w)`` and IoU predictions ``(B, M)``, ``M`` = 3 or 1.
        """
        masks, iou_pred = self.predict_masks(
            image_embeddings, image_pe, sparse_prompt_embeddings, dense_prompt_embeddings
        )
        mask_slice = slice(1, None) if multimask_output else slice(0, 1)
        return masks[:, mask_slice], iou_pred[:, mask_slice]

    def predict_masks(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        dense_prompt_embeddings: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All ``num_mask_tokens`` masks ``(B, 4, 4h, 4w)`` and IoU predictions ``(B, 4)``."""
        bs = sparse_prompt_embeddings.shape[0]
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.unsqueeze(0).expand(bs, -1, -1)
        tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)

        # One image shared by many prompt sets (SamPredictor), or one prompt set per image
        # (batched training); Meta's version only supports the former.
        if image_embeddings.shape[0] == 1 and bs != 1:
            src = image_embeddings.expand(bs, -1, -1, -1)
        elif image_embeddings.shape[0] == bs:
            src = image_embeddings
        else:
            raise ValueError(
                f"image_embeddings batch {image_embeddings.shape[0]} does not match {bs} prompt sets"
            )
        # channels-last memory makes the transformer's (B, h*w, C) token view contiguous (no-op
        # for the predictor's cached embeddings, which are stored that way)
        src = (src + dense_prompt_embeddings).contiguous(memory_format=torch.channels_last)
        pos_src = image_pe.expand(bs, -1, -1, -1)
        b, c, h, w = src.shape

        hs, src = self.transformer(src, pos_src, tokens)
        iou_token_out = hs[:, 0, :]
        mask_tokens_out = hs[:, 1 : (1 + self.num_mask_tokens), :]

        hyper_in = torch.stack(
            [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(self.output_hypernetworks_mlps)],
            dim=1,
        )
        if self._upscaling_is_standard():
            masks = self._upscale_and_project(src, hyper_in, h, w)
        else:  # a customised upscaling stack: run it as modules
            upscaled = self.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
            b, c, h, w = upscaled.shape
            masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
        iou_pred = self.iou_prediction_head(iou_token_out)
        return masks, iou_pred

    def _upscaling_is_standard(self) -> bool:
        up = self.output_upscaling
        return (
            len(up) == 5
            and all(
                isinstance(up[i], nn.ConvTranspose2d)
                and up[i].kernel_size == (2, 2)
                and up[i].stride == (2, 2)
                and up[i].padding == (0, 0)
                and up[i].output_padding == (0, 0)
                and up[i].groups == 1
                for i in (0, 3)
            )
            and isinstance(up[1], LayerNorm2d)
            and not any(m._forward_hooks or m._forward_pre_hooks for m in up)
        )

    def _upscale_and_project(
        self, src: torch.Tensor, hyper_in: torch.Tensor, h: int, w: int
    ) -> torch.Tensor:
        """``output_upscaling`` + hypernetwork projection, computed channels-last as GEMMs.

        A stride-2, kernel-2 transposed convolution writes each input pixel's ``Cin`` vector
        times a ``(Cin, 2 * 2 * Cout)`` matrix into a 2x2 output block, so it is one matrix
        product over pixels. Keeping the tokens ``(B, h*w, C)`` channels-last and the 2x2
        sub-pixel offsets as extra axes (pixel order ``h, w, di, dj, ei, ej``) avoids the
        NCHW transposes and the slow CPU deconvolution kernels; only the final ``(B, M, 4h, 4w)``
        logits are permuted into raster order. Same maths as the module stack (same weights).

        Args:
            src: image tokens after the transformer ``(B, h*w, C)``.
            hyper_in: per-mask weights ``(B, M, C // 8)``.
        Returns:
            mask logits ``(B, M, 4h, 4w)``.
        """
        up1, norm, act1, up2, act2 = self.output_upscaling
        b, m = src.shape[0], hyper_in.shape[1]

        def deconv(x: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
            # weight (Cin, Cout, 2, 2) -> (Cin, 2*2*Cout) ordered (di, dj, co)
            wt = conv.weight.permute(0, 2, 3, 1).reshape(conv.weight.shape[0], -1).to(x.dtype)
            x2 = x.reshape(-1, x.shape[-1])
            if conv.bias is None:
                y = x2 @ wt
            else:  # bias fused into the GEMM (no second pass over the output)
                y = torch.addmm(conv.bias.to(x.dtype).repeat(4), x2, wt)
            return y.reshape(*x.shape[:-1], 4, -1)  # (..., 4 sub-pixels, Cout)

        x = deconv(src, up1)  # (B, h*w, 4, C/4)
        # normalised shape from the weight (a plain int, so ONNX tracing keeps it static)
        x = _activation(
            act1, F.layer_norm(x, (norm.weight.numel(),), norm.weight, norm.bias, norm.eps)
        )
        x = _activation(act2, deconv(x, up2))  # (B, h*w, 4, 4, C/8)
        masks = x.reshape(b, -1, x.shape[-1]) @ hyper_in.transpose(1, 2)  # (B, h*w*16, M)
        masks = masks.reshape(b, h, w, 2, 2, 2, 2, m)  # h, w, di, dj, ei, ej
        # row = 4i + 2di + ei, col = 4j + 2dj + ej
        return masks.permute(0, 7, 1, 3, 5, 2, 4, 6).reshape(b, m, 4 * h, 4 * w)


def _activation(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(x)``; a plain GELU/ReLU runs in place when no gradient is recorded (inference),
    which saves a large temporary (a page-faulting allocation on the CPU)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return act(x)
    if type(act) is nn.GELU:
        return torch.ops.aten.gelu_(x, approximate=act.approximate)
    if type(act) is nn.ReLU:
        return x.relu_()
    return act(x)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU in between, ``(..., in) -> (..., out)``."""

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_layers: int,
        sigmoid_output: bool = False,
    ) -> None:
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(n, k) for n, k in zip([input_dim, *h], [*h, output_dim], strict=True)
        )
        self.sigmoid_output = sigmoid_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return torch.sigmoid(x) if self.sigmoid_output else x
