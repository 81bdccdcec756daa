"""ONNX export of a medsa :class:`~medsa.sam.Sam`: the image encoder and a prompt -> mask decoder.

Two graphs plus a JSON side file are written to one folder (:func:`export_onnx`):

``encoder.onnx``
    ``image (B, 3, S, S)`` float32, already normalised and padded (``Sam.preprocess`` of an image
    resized by ``SamPredictor.transform``) -> ``image_embeddings (B, C, h, w)``. Dynamic ``B``.
``decoder.onnx``
    Prompt -> mask on a cached embedding, the interface of segment-anything's
    ``SamOnnxModel`` (``scripts/export_onnx_model.py``) with a dynamic prompt batch:

    ==================  ================  =====================================================
    input               shape             meaning
    ==================  ================  =====================================================
    image_embeddings    (1, C, h, w)      from ``encoder.onnx``
    point_coords        (B, N, 2) float   ``(x, y)`` in the *input* frame (after the resize);
                                          a box is two points (corners) with labels 2 and 3
    point_labels        (B, N) float      1 positive, 0 negative, 2/3 box corners, -1 padding
    mask_input          (B, 1, 4h, 4w)    previous low-res logits (zeros when unused)
    has_mask_input      (1,) float        1: use ``mask_input``, 0: ignore it
    orig_im_size        (2,) float        ``(H, W)`` of the original image
    ==================  ================  =====================================================

    outputs: ``masks (B, M, H, W)`` logits at the original size, ``iou_predictions (B, M)`` and
    ``low_res_masks (B, M, 4h, 4w)``; ``M = 4`` (token 0 = the single-mask output, 1..3 = the
    three ambiguity masks) or, with ``single_mask=True``, ``M = 1`` chosen as SAM's ONNX model
    does (token 0 for more than 2 points, else the best-scoring one). ``N`` is dynamic; as in SAM,
    prompts without a box need one padding point ``(0, 0)`` with label -1.
``medsa_onnx.json``
    What the runtime needs to pre- and post-process without the graphs: backbone name, input
    size, resize mode, pixel mean / std, embedding and mask-input shapes, adapter, opset.

Adapters are part of the exported graphs (the hook modules are traced with the backbone), so
``load_adapter(build_sam(...), path)`` followed by :func:`export_onnx` gives a self-contained model.
The TinyViT fast paths are traced as well (BN folding becomes constant weights).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from medsa._fs import atomic_write
from medsa.errors import ConfigError, MedsaError

__all__ = [
    "ENCODER_FILE",
    "DECODER_FILE",
    "META_FILE",
    "OnnxMeta",
    "EncoderOnnxModel",
    "DecoderOnnxModel",
    "export_onnx",
    "read_meta",
]

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
META_FILE = "medsa_onnx.json"
DEFAULT_OPSET = 17


@dataclass
class OnnxMeta:
    """Contents of ``medsa_onnx.json`` (see the module docstring)."""

    backbone: str
    img_size: int
    resize_mode: str
    pixel_mean: list[float]
    pixel_std: list[float]
    embedding_shape: list[int]  # (C, h, w)
    mask_input_size: list[int]  # (4h, 4w)
    single_mask: bool
    adapter: str | None
    opset: int
    format_version: int = 1


class EncoderOnnxModel(nn.Module):
    """``image (B, 3, S, S)`` (normalised, padded) -> ``image_embeddings (B, C, h, w)``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.image_encoder = model.image_encoder

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_encoder(image)


class DecoderOnnxModel(nn.Module):
    """SAM's ``SamOnnxModel`` for a medsa :class:`~medsa.sam.Sam` (module docstring for the I/O).

    Uses the model's own prompt-encoder weights and mask decoder (with any adapter hooks), the
    resize mode of the model (``longest_side`` crops the padding before resizing to the original
    size, ``stretch`` resizes directly) and a dynamic prompt batch ``B``.
    """

    def __init__(self, model: nn.Module, single_mask: bool = False) -> None:
        super().__init__()
        self.model = model
        self.single_mask = single_mask
        self.img_size = int(model.img_size)
        self.stretch = getattr(model, "resize_mode", "longest_side") == "stretch"

    def _embed_points(self, coords: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(B, N, 2)``, ``(B, N)`` -> ``(B, N, C)``; labels -1 / 0 / 1 / 2 / 3 as in SAM."""
        pe = self.model.prompt_encoder
        coords = coords + 0.5  # pixel centre
        size = (self.img_size, self.img_size)
        emb = pe.pe_layer.forward_with_coords(coords, size)
        labels = labels[..., None]
        emb = torch.where(labels == -1, pe.not_a_point_embed.weight, emb)
        for i in range(pe.num_point_embeddings):
            emb = emb + (labels == i).to(emb.dtype) * pe.point_embeddings[i].weight
        return emb

    def _embed_masks(self, mask_input: torch.Tensor, has_mask_input: torch.Tensor) -> torch.Tensor:
        pe = self.model.prompt_encoder
        dense = pe.mask_downscaling(mask_input) * has_mask_input
        return dense + (1 - has_mask_input) * pe.no_mask_embed.weight.reshape(1, -1, 1, 1)

    def _postprocess(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """``(B, M, 4h, 4w)`` -> ``(B, M, H, W)``: as ``Sam.postprocess_masks``."""
        s = self.img_size
        masks = F.interpolate(masks, size=(s, s), mode="bilinear", align_corners=False)
        size = orig_im_size.to(torch.int64)
        if not self.stretch:  # crop the bottom / right padding of the longest-side resize
            scale = s / torch.max(orig_im_size)
            pre = torch.floor(orig_im_size * scale + 0.5).to(torch.int64)
            masks = masks[..., : pre[0], : pre[1]]
        return F.interpolate(masks, size=(size[0], size[1]), mode="bilinear", align_corners=False)

    def forward(
        self,
        image_embeddings: torch.Tensor,
        point_coords: torch.Tensor,
        point_labels: torch.Tensor,
        mask_input: torch.Tensor,
        has_mask_input: torch.Tensor,
        orig_im_size: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        sparse = self._embed_points(point_coords, point_labels)
        dense = self._embed_masks(mask_input, has_mask_input)
        masks, scores = self.model.mask_decoder.predict_masks(
            image_embeddings=image_embeddings,
            image_pe=self.model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        if self.single_mask:
            # SAM's select_masks: token 0 when more than 2 points (reweighting avoids control flow)
            n = point_coords.shape[1]
            weight = torch.zeros_like(scores[:1])
            weight[:, 0] = 1000.0
            best = torch.argmax(scores + (n - 2.5) * weight, dim=1)
            rows = torch.arange(masks.shape[0])
            masks = masks[rows, best][:, None]
            scores = scores[rows, best][:, None]
        return self._postprocess(masks, orig_im_size), scores, masks


def _example_inputs(model: nn.Module, n_points: int = 2) -> tuple[torch.Tensor, ...]:
    c = model.prompt_encoder.embed_dim
    h, w = model.prompt_encoder.image_embedding_size
    mh, mw = model.prompt_encoder.mask_input_size
    s = float(model.img_size)
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(1, c, h, w, generator=g),
        torch.rand(1, n_points, 2, generator=g) * s,
        torch.tensor([[1.0] * (n_points - 1) + [-1.0]]),
        torch.zeros(1, 1, mh, mw),
        torch.tensor([0.0]),
        torch.tensor([s * 1.5, s * 2.0]),
    )


def _export(module: nn.Module, args: tuple, path: Path, **kwargs: Any) -> None:
    with warnings.catch_warnings():
        # the TorchScript exporter warns about tracing constants and its own deprecation
        warnings.simplefilter("ignore")
        atomic_write(
            path,
            lambda tmp: torch.onnx.export(
                module, args, tmp, dynamo=False, do_constant_folding=True, **kwargs
            ),
        )


def export_onnx(
    model: nn.Module,
    out_dir: str | Path,
    *,
    encoder: bool = True,
    decoder: bool = True,
    single_mask: bool = False,
    opset: int = DEFAULT_OPSET,
    adapter: str | None = None,
) -> dict[str, Path]:
    """Export ``model`` (a :class:`~medsa.sam.Sam`, adapters already loaded) to ``out_dir``.

    Args:
        model: the model to export; it is traced in eval mode on the CPU in fp32 (a copy is not
            made: the model is moved to the CPU and fp32 in place).
        out_dir: created if missing; ``encoder.onnx``, ``decoder.onnx`` and
            ``medsa_onnx.json`` are (over)written atomically.
        encoder, decoder: which graphs to write.
        single_mask: decoder returns SAM's selected single mask instead of all 4.
        opset: ONNX opset (>= 17 for LayerNorm).
        adapter: adapter path recorded in the JSON (informational).
    Returns:
        ``{"encoder": path, "decoder": path, "meta": path}`` for what was written.
    Raises:
        ConfigError: nothing to export, or an unsupported model.
        MedsaError: the ONNX exporter failed (message names the graph).
    """
    if not (encoder or decoder):
        raise ConfigError("nothing to export: enable the encoder, the decoder or both")
    if getattr(model, "masam_decoder", None) is not None:
        raise ConfigError(
            "MA-SAM's prompt-free multi-class head is not exported (only the SAM decoder); "
            "export the backbone without it"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.to("cpu", torch.float32).eval()
    written: dict[str, Path] = {}
    with torch.no_grad():
        if encoder:
            s = int(model.img_size)
            path = out / ENCODER_FILE
            try:
                _export(
                    EncoderOnnxModel(model).eval(),
                    (torch.randn(1, 3, s, s),),
                    path,
                    input_names=["image"],
                    output_names=["image_embeddings"],
                    dynamic_axes={"image": {0: "batch"}, "image_embeddings": {0: "batch"}},
                    opset_version=opset,
                )
            except Exception as e:  # exporter errors are many and untyped
                raise MedsaError(f"ONNX export of the image encoder failed: {e}") from e
            written["encoder"] = path
        if decoder:
            path = out / DECODER_FILE
            try:
                _export(
                    DecoderOnnxModel(model, single_mask=single_mask).eval(),
                    _example_inputs(model),
                    path,
                    input_names=[
                        "image_embeddings",
                        "point_coords",
                        "point_labels",
                        "mask_input",
                        "has_mask_input",
                        "orig_im_size",
                    ],
                    output_names=["masks", "iou_predictions", "low_res_masks"],
                    dynamic_axes={
                        "point_coords": {0: "batch", 1: "num_points"},
                        "point_labels": {0: "batch", 1: "num_points"},
                        "mask_input": {0: "batch"},
                        "masks": {0: "batch", 2: "height", 3: "width"},
                        "iou_predictions": {0: "batch"},
                        "low_res_masks": {0: "batch"},
                    },
                    opset_version=opset,
                )
            except Exception as e:
                raise MedsaError(f"ONNX export of the prompt decoder failed: {e}") from e
            written["decoder"] = path
    meta = OnnxMeta(
        backbone=getattr(model, "name", "custom"),
        img_size=int(model.img_size),
        resize_mode=getattr(model, "resize_mode", "longest_side"),
        pixel_mean=[float(v) for v in model.pixel_mean.flatten()],
        pixel_std=[float(v) for v in model.pixel_std.flatten()],
        embedding_shape=[
            int(model.prompt_encoder.embed_dim),
            *map(int, model.prompt_encoder.image_embedding_size),
        ],
        mask_input_size=[int(v) for v in model.prompt_encoder.mask_input_size],
        single_mask=single_mask,
        adapter=adapter,
        opset=opset,
    )
    meta_path = out / META_FILE
    atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(asdict(meta), indent=2)))
    written["meta"] = meta_path
    return written


def read_meta(onnx_dir: str | Path) -> OnnxMeta:
    """Read ``medsa_onnx.json`` of an export folder (clear error if missing or malformed)."""
    path = Path(onnx_dir) / META_FILE
    if not path.is_file():
        raise ConfigError(f"{onnx_dir} is not a medsa ONNX export: {META_FILE} is missing")
    try:
        return OnnxMeta(**json.loads(path.read_text()))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path} is not a valid medsa ONNX description: {e}") from None
