"""Constants shared by the tests/serve fixtures and tests."""

from __future__ import annotations

import time

import numpy as np

#: affine of the test volume: anisotropic, rotated and shifted, so a lost geometry is detected
VOLUME_AFFINE = np.array(
    [
        [0.0, -1.2, 0.0, 40.5],
        [1.5, 0.0, 0.0, -12.25],
        [0.0, 0.0, 3.0, 7.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
VOLUME_SHAPE = (5, 40, 48)  # numpy (D, H, W)
IMAGE_SHAPE = (60, 80)  # (H, W)


class BrightPredictor:
    """Stub ``SamPredictor``: the bright (> 127) pixels inside the prompt box grown by 3 px.

    Follows the fixture's block from slice to slice exactly, so propagation results are known.
    ``delay`` seconds per decode make a propagation slow on purpose.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.image: np.ndarray | None = None
        self.mask_inputs: list = []
        self.boxes: list = []

    def set_image(self, image: np.ndarray) -> None:
        self.image = np.asarray(image)[..., 0] if np.ndim(image) == 3 else np.asarray(image)

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None,
                multimask_output=True):  # fmt: skip
        time.sleep(self.delay)
        self.mask_inputs.append(mask_input)
        self.boxes.append(box)
        assert self.image is not None
        m = np.zeros(self.image.shape, bool)
        if box is not None:
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            m[max(y0 - 3, 0) : y1 + 4, max(x0 - 3, 0) : x1 + 4] = True
        m &= self.image > 127
        n = 3 if multimask_output else 1
        score = 0.95 if m.any() else 0.05
        return np.stack([m] * n), np.full(n, score), np.zeros((n, 16, 16), np.float32)
