"""Constants shared by the tests/serve fixtures and tests."""

from __future__ import annotations

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
