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
