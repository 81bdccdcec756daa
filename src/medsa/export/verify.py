"""Check an ONNX export against the PyTorch model it came from (ONNX Runtime vs PyTorch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from medsa.errors import MedsaError

__all__ = ["compare_export", "verify_export"]

#: largest accepted |ORT - PyTorch| on embeddings and logits (fp32 graph rewrites: ~1e-5)
TOLERANCE = 1e-3


def _test_image(h: int = 180, w: int = 240, seed: int = 0) -> np.ndarray:
    """A smooth RGB image with a bright blob: non-trivial masks for any model."""
    yy, xx = np.mgrid[:h, :w]
    blob = np.exp(-(((xx - 0.6 * w) / (0.16 * w)) ** 2 + ((yy - 0.45 * h) / (0.17 * h)) ** 2))
    rng = np.random.default_rng(seed)
    img = 60 + 150 * blob[..., None] + rng.normal(0, 8, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def compare_export(
    model: Any, onnx_dir: str | Path, image: np.ndarray | None = None
) -> dict[str, float]:
    """Max abs differences ONNX Runtime vs PyTorch on ``image`` (default: a synthetic one).

    Keys: ``embedding``; and for a box, a box + point + mask input, and two points with three
    masks: ``<prompt> low-res`` (logits ``(M, 4h, 4w)``) and ``<prompt> masks`` (original-size
    logits).
    """
    from medsa.sam import SamPredictor

    from .runtime import OnnxSessions, make_predictor

    image = _test_image() if image is None else image
    h, w = image.shape[:2]
    ref = SamPredictor(model, cache_size=0)
    ort = make_predictor(model, "onnx", sessions=OnnxSessions(onnx_dir), cache_size=0)
    with torch.no_grad():
        ref.set_image(image)
        ort.set_image(image)
    out = {"embedding": float((ref.get_image_embedding() - ort.get_image_embedding()).abs().max())}
    box = np.array([0.4 * w, 0.2 * h, 0.8 * w, 0.7 * h])
    mask_in = None
    prompts = {
        "box": {"box": box, "multimask_output": False},
        "box+point+mask": {
            "box": box,
            "point_coords": np.array([[0.6 * w, 0.45 * h]]),
            "point_labels": np.array([1]),
            "multimask_output": False,
        },
        "2 points, 3 masks": {
            "point_coords": np.array([[0.6 * w, 0.45 * h], [0.1 * w, 0.1 * h]]),
            "point_labels": np.array([1, 0]),
            "multimask_output": True,
        },
    }
    for name, kwargs in prompts.items():
        if name == "box+point+mask":
            kwargs["mask_input"] = mask_in
        m1, _, l1 = ref.predict(**kwargs, return_logits=True)
        m2, _, l2 = ort.predict(**kwargs, return_logits=True)
        if name == "box":
            mask_in = l1  # the next prompt refines this one (iterative clicks)
        out[f"{name} low-res"] = float(np.abs(l1 - l2).max())
        out[f"{name} masks"] = float(np.abs(m1 - m2).max())
    return out


def verify_export(model: Any, onnx_dir: str | Path) -> list[str]:
    """Report lines of :func:`compare_export`; raises if a difference exceeds ``TOLERANCE``."""
    diffs = compare_export(model, onnx_dir)
    lines = [f"check    ONNX Runtime vs PyTorch, max |diff| {k}: {v:.2e}" for k, v in diffs.items()]
    bad = {k: v for k, v in diffs.items() if not v <= TOLERANCE}
    if bad:
        raise MedsaError(
            f"the ONNX export in {onnx_dir} differs from PyTorch by more than {TOLERANCE}: {bad}"
        )
    return lines
