"""Shared fixtures of the engine tests: a fake "oracle" predictor and small synthetic data."""

from __future__ import annotations

import numpy as np
import pytest


class BoxOraclePredictor:
    """Stands in for ``SamPredictor``: the mask is the prompt box (points: a 5x5 square).

    Makes the plumbing of evaluate / predict checkable with exact expected values.
    """

    def __init__(self) -> None:
        self.size: tuple[int, int] | None = None
        self.n_set = 0

    def set_image(self, image: np.ndarray) -> None:
        # what SAM sees: (H, W, 3) in [0, 255] (uint8 or float, see inference.model_input)
        assert image.ndim == 3 and image.shape[-1] == 3 and 0 <= image.min() <= image.max() <= 255
        self.size = image.shape[:2]
        self.n_set += 1

    def predict(
        self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True
    ):
        assert self.size is not None
        h, w = self.size
        m = np.zeros((h, w), bool)
        if box is not None:
            x0, y0, x1, y1 = np.asarray(box, float)
            m[int(round(y0)) : int(round(y1)) + 1, int(round(x0)) : int(round(x1)) + 1] = True
        elif point_coords is not None:
            for (x, y), lab in zip(point_coords, point_labels, strict=True):
                if lab == 1:
                    m[max(int(y) - 2, 0) : int(y) + 3, max(int(x) - 2, 0) : int(x) + 3] = True
        n = 3 if multimask_output else 1
        return np.stack([m] * n), np.linspace(0.9, 0.5, n), np.zeros((n, 16, 16), np.float32)


@pytest.fixture
def oracle() -> BoxOraclePredictor:
    return BoxOraclePredictor()


@pytest.fixture(scope="session")
def tiny_model():
    """Random-weight ``vit_tiny`` SAM (fast on CPU)."""
    torch = pytest.importorskip("torch")
    from medsa.sam import build_sam

    torch.manual_seed(0)
    return build_sam("vit_tiny")


class ComponentPredictor:
    """Stub ``SamPredictor``: the bright (> 127) connected component that best overlaps the prompt.

    The prompt region is the box, else the positive points; the score is 0.95 for a hit and 0.05
    for an empty mask. It records every prompt and slice it was given.
    """

    def __init__(self) -> None:
        self.image: np.ndarray | None = None
        self.n_set = 0
        self.prompts: list[dict] = []

    def set_image(self, image: np.ndarray) -> None:
        assert image.ndim == 3 and image.shape[-1] == 3
        self.image = image[..., 0]
        self.n_set += 1

    def predict(
        self, point_coords=None, point_labels=None, box=None, mask_input=None, multimask_output=True
    ):
        from scipy.ndimage import label

        assert self.image is not None
        self.prompts.append({"box": box, "points": point_coords, "mask_input": mask_input})
        h, w = self.image.shape
        region = np.zeros((h, w), bool)
        if box is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            region[y0 : y1 + 1, x0 : x1 + 1] = True
        elif point_coords is not None:
            for (x, y), lab in zip(point_coords, point_labels, strict=True):
                if lab == 1:
                    region[int(y), int(x)] = True
        comps, n = label(self.image > 127)
        overlap = np.bincount(comps[region], minlength=n + 1)
        overlap[0] = 0
        m = comps == int(np.argmax(overlap)) if overlap.max() > 0 else np.zeros((h, w), bool)
        k = 3 if multimask_output else 1
        score = 0.95 if m.any() else 0.05
        logits = np.where(m[::2, ::2], 5.0, -5.0).astype(np.float32)  # stands for low-res logits
        return np.stack([m] * k), np.full(k, score), np.stack([logits] * k)


@pytest.fixture
def component() -> type[ComponentPredictor]:
    """The :class:`ComponentPredictor` class (call it for a fresh stub)."""
    return ComponentPredictor
