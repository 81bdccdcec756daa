"""MA-SAM prompt-free multi-class decoder with progressive x16 upsampling."""

from __future__ import annotations

import copy

import torch
from torch import nn

from medsa.sam.common import LayerNorm2d

from .modules import AdapterModule

__all__ = ["MASAMDecoder"]


class MASAMDecoder(AdapterModule):
    """MA-SAM decoder: image embeddings ``(B, C, h, w)`` -> class logits ``(B, K, 16h, 16w)``.

    Built around SAM's mask decoder as MA-SAM does: it runs SAM's (shared, fully fine-tuned)
    two-way ``transformer`` and ``output_upscaling`` (x4: ``C -> C/4 -> C/8``) without any
    prompt, with one learned token per class instead of SAM's mask tokens, and adds two more
    transposed-convolution stages (x2 each) so the logits come out at the input resolution (x16
    of the embedding grid) rather than SAM's x4 low-resolution masks. Class tokens and
    hypernetwork MLPs start as copies of SAM's pre-trained mask tokens / MLPs (cycled when
    ``K`` > 4). The dense embedding is a trainable copy of the prompt encoder's "no mask"
    embedding and the positional encoding a copy of its random-Fourier ``pe_layer``.

    ``channels`` sets the widths of the two extra stages (the MA-SAM summary is silent):

    * ``"released"`` (default, as the released MA-SAM code): channels keep halving,
      ``C/8 -> C/16 -> C/32`` (LayerNorm2d + GELU after the first, GELU after the second); the
      hypernetwork MLPs' last layer is new (``C -> C/32``, as there), the rest is SAM's.
    * ``"constant"``: both stages keep SAM's ``C/8`` mask channels, so the hypernetwork MLPs
      are SAM's pre-trained ones unchanged (more parameters in the extra stages).

    Use ``K = num_classes`` including background for a softmax/CE loss.
    """

    kind = "masam_decoder"

    CHANNELS = ("released", "constant")

    def __init__(
        self,
        mask_decoder: nn.Module,
        prompt_encoder: nn.Module,
        num_classes: int,
        channels: str = "released",
    ) -> None:
        super().__init__()
        if channels not in self.CHANNELS:
            raise ValueError(f"channels must be one of {self.CHANNELS}, got {channels!r}")
        c = int(mask_decoder.transformer_dim)
        self.num_classes = int(num_classes)
        self.transformer = mask_decoder.transformer  # shared with the promptable decoder
        self.output_upscaling = mask_decoder.output_upscaling  # shared, pre-trained x4
        n_src = mask_decoder.num_mask_tokens
        src_tokens = mask_decoder.mask_tokens.weight.detach()
        self.class_tokens = nn.Parameter(
            torch.stack([src_tokens[i % n_src] for i in range(self.num_classes)]).clone()
        )
        self.hypernetworks = nn.ModuleList(
            copy.deepcopy(mask_decoder.output_hypernetworks_mlps[i % n_src])
            for i in range(self.num_classes)
        )
        mc = c // 8
        m1, m2 = (mc // 2, mc // 4) if channels == "released" else (mc, mc)
        self.extra_upscaling = nn.Sequential(
            nn.ConvTranspose2d(mc, m1, kernel_size=2, stride=2),
            LayerNorm2d(m1),
            nn.GELU(),
            nn.ConvTranspose2d(m1, m2, kernel_size=2, stride=2),
            nn.GELU(),
        )
        if m2 != mc:  # the hypernetworks must emit one weight per final channel
            for mlp in self.hypernetworks:
                last = mlp.layers[-1]
                mlp.layers[-1] = nn.Linear(last.in_features, m2)
        self.dense_embed = nn.Parameter(prompt_encoder.no_mask_embed.weight.detach().clone())
        self.pe_layer = copy.deepcopy(prompt_encoder.pe_layer)

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` -> logits ``(B, num_classes, 16h, 16w)``."""
        b, c, h, w = image_embeddings.shape
        pe = self.pe_layer((h, w)).unsqueeze(0).to(image_embeddings.dtype)  # (1, C, h, w)
        src = image_embeddings + self.dense_embed.reshape(1, c, 1, 1)
        tokens = self.class_tokens.unsqueeze(0).expand(b, -1, -1)  # (B, K, C)
        hs, keys = self.transformer(src, pe.expand(b, -1, -1, -1), tokens)
        feat = keys.transpose(1, 2).reshape(b, c, h, w)
        feat = self.extra_upscaling(self.output_upscaling(feat))  # (B, C/8, 16h, 16w)
        hyper = torch.stack([mlp(hs[:, i]) for i, mlp in enumerate(self.hypernetworks)], dim=1)
        _, mc, H, W = feat.shape
        return (hyper @ feat.reshape(b, mc, H * W)).reshape(b, self.num_classes, H, W)
