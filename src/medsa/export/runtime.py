"""Inference runtimes: PyTorch (default) or ONNX Runtime behind the one ``SamPredictor`` interface.

:class:`OnnxPredictor` is a :class:`~medsa.sam.SamPredictor` whose two model calls, the image
encoder (``_encode``) and prompt -> mask (``predict_torch``), run the graphs written by
:func:`medsa.export.export_onnx` in ONNX Runtime. Everything else (input checks, resizing,
normalisation, the embedding cache, batched prompts) is the PyTorch predictor's code, so
``medsa predict`` / ``medsa serve`` and :mod:`medsa.engine.inference` work unchanged with it.
:func:`make_predictor` picks the runtime by name (``--runtime torch|onnx``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsa.errors import ConfigError, PromptError
from medsa.sam.predictor import SamPredictor

from .export import DECODER_FILE, ENCODER_FILE, export_onnx, read_meta

__all__ = ["RUNTIMES", "OnnxSessions", "OnnxPredictor", "make_predictor", "onnx_sessions"]

RUNTIMES: tuple[str, ...] = ("torch", "onnx")


def _ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "--runtime onnx needs onnxruntime: pip install 'medsa[onnx]' (or onnxruntime)"
        ) from None
    return onnxruntime


class OnnxSessions:
    """The encoder and decoder ``InferenceSession`` s of one export folder (shareable)."""

    def __init__(self, onnx_dir: str | Path, threads: int | None = None) -> None:
        ort = _ort()
        self.dir = Path(onnx_dir)
        self.meta = read_meta(self.dir)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # torch's thread count by default, so --runtime onnx uses the same cores as torch would
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        self.encoder = self.decoder = None
        for name, attr in ((ENCODER_FILE, "encoder"), (DECODER_FILE, "decoder")):
            path = self.dir / name
            if path.is_file():
                sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
                setattr(self, attr, sess)
        if self.encoder is None or self.decoder is None:
            raise ConfigError(
                f"{self.dir}: an ONNX predictor needs both {ENCODER_FILE} and {DECODER_FILE}"
            )
        if self.meta.single_mask:
            raise ConfigError(
                f"{self.dir}: exported with --single-mask; the predictor needs all 4 masks "
                "(export again without --single-mask)"
            )


def onnx_sessions(model: Any, onnx_dir: str | Path | None = None) -> OnnxSessions:
    """Sessions for ``model``: from ``onnx_dir`` if it holds an export, else a fresh export of
    ``model`` (into ``onnx_dir``, or a temporary folder when ``None``)."""
    if onnx_dir is not None and (Path(onnx_dir) / DECODER_FILE).is_file():
        sessions = OnnxSessions(onnx_dir)
        _check_matches(model, sessions)
        return sessions
    target = (
        Path(onnx_dir) if onnx_dir is not None else Path(tempfile.mkdtemp(prefix="medsa-onnx-"))
    )
    export_onnx(model, target)
    return OnnxSessions(target)


def _check_matches(model: Any, sessions: OnnxSessions) -> None:
    meta = sessions.meta
    mine = (int(model.img_size), list(model.prompt_encoder.mask_input_size))
    if (meta.img_size, meta.mask_input_size) != mine or meta.backbone != model.name:
        raise ConfigError(
            f"{sessions.dir} holds an export of {meta.backbone!r} ({meta.img_size} px), "
            f"not of the loaded {model.name!r} ({model.img_size} px)"
        )


class OnnxPredictor(SamPredictor):
    """:class:`~medsa.sam.SamPredictor` running the exported graphs in ONNX Runtime.

    Args:
        model: the PyTorch model the graphs were exported from; only its pre-processing
            (resize mode, pixel mean / std, sizes) is used here.
        sessions: from :func:`onnx_sessions` (may be shared by several predictors).
        cache_size: embeddings kept, as for :class:`~medsa.sam.SamPredictor`.
    """

    def __init__(self, model: Any, sessions: OnnxSessions, cache_size: int = 8) -> None:
        super().__init__(model, cache_size=cache_size)
        self.sessions = sessions

    @property
    def _dtype(self) -> torch.dtype:
        return torch.float32  # the graphs are exported in fp32

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """The image encoder in ONNX Runtime, one image per run (the graph's batch is 1 or
        dynamic; running them one by one works for both)."""
        x = x.to("cpu", torch.float32).numpy()
        embs = [
            self.sessions.encoder.run(None, {"image": np.ascontiguousarray(xi[None])})[0]
            for xi in x
        ]
        return torch.from_numpy(np.concatenate(embs))
        self.is_image_set = True

    @torch.no_grad()
    def predict_torch(
        self,
        point_coords: torch.Tensor | None,
        point_labels: torch.Tensor | None,
        boxes: torch.Tensor | None = None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = True,
        return_logits: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As :meth:`SamPredictor.predict_torch` (same arguments and outputs), decoded by ONNX
        Runtime: boxes become two corner points (labels 2, 3), point-only prompts get SAM's
        padding point (label -1)."""
        self._require_image()
        sizes = {t.shape[0] for t in (point_coords, boxes, mask_input) if t is not None}
        if len(sizes) > 1:
            raise PromptError(f"prompt batch sizes differ: {sorted(sizes)}")
        bs = sizes.pop() if sizes else 1
        coords = np.zeros((bs, 0, 2), np.float32)
        labels = np.zeros((bs, 0), np.float32)
        if point_coords is not None:
            if point_labels is None or point_labels.shape != point_coords.shape[:2]:
                raise PromptError("point_labels (B, N) are required with point_coords (B, N, 2)")
            coords = point_coords.detach().cpu().float().numpy()
            labels = point_labels.detach().cpu().float().numpy()
        if boxes is not None:
            if boxes.ndim != 2 or boxes.shape[-1] != 4:
                raise PromptError(f"boxes must be (B, 4), got {tuple(boxes.shape)}")
            corners = boxes.detach().cpu().float().numpy().reshape(bs, 2, 2)
            coords = np.concatenate([coords, corners], axis=1)
            labels = np.concatenate([labels, np.tile([[2.0, 3.0]], (bs, 1))], axis=1)
        elif point_coords is not None:
            coords = np.concatenate([coords, np.zeros((bs, 1, 2), np.float32)], axis=1)
            labels = np.concatenate([labels, -np.ones((bs, 1), np.float32)], axis=1)
        mh, mw = self.sessions.meta.mask_input_size
        if mask_input is None:
            mask = np.zeros((bs, 1, mh, mw), np.float32)
        else:
            mask = mask_input.detach().cpu().float().numpy()
        assert self.features is not None and self.original_size is not None
        feeds = {
            "image_embeddings": np.ascontiguousarray(self.features.float().numpy()),
            "point_coords": np.ascontiguousarray(coords, dtype=np.float32),
            "point_labels": np.ascontiguousarray(labels, dtype=np.float32),
            "mask_input": np.ascontiguousarray(mask, dtype=np.float32),
            "has_mask_input": np.array([0.0 if mask_input is None else 1.0], np.float32),
            "orig_im_size": np.array(self.original_size, np.float32),
        }
        masks, iou, low_res = self.sessions.decoder.run(None, feeds)
        sl = slice(1, None) if multimask_output else slice(0, 1)
        masks_t = torch.from_numpy(masks[:, sl])
        if not return_logits:
            masks_t = masks_t > self.model.mask_threshold
        return masks_t, torch.from_numpy(iou[:, sl]), torch.from_numpy(low_res[:, sl])


def make_predictor(
    model: Any,
    runtime: str = "torch",
    *,
    onnx_dir: str | Path | None = None,
    cache_size: int = 8,
    sessions: OnnxSessions | None = None,
) -> SamPredictor:
    """A predictor for ``model`` on ``runtime`` (``"torch"`` or ``"onnx"``).

    ``onnx``: the graphs of ``onnx_dir`` (written by ``medsa export``) or, without one, an export
    of ``model`` made now (tens of seconds); ``sessions`` re-uses already loaded ones. The model
    must be on the CPU (ONNX Runtime's CPU provider).
    """
    if runtime == "torch":
        return SamPredictor(model, cache_size=cache_size)
    if runtime != "onnx":
        raise ConfigError(f"--runtime must be one of {RUNTIMES}, got {runtime!r}")
    if torch.device(model.device).type != "cpu":
        raise ConfigError("--runtime onnx runs on the CPU; use --device cpu (or --runtime torch)")
    return OnnxPredictor(model, sessions or onnx_sessions(model, onnx_dir), cache_size=cache_size)
