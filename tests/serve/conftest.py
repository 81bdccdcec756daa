"""Fixtures for tests/serve: a tiny random SAM, a root folder with a 2D image and a 3D volume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from serve_helpers import IMAGE_SHAPE, VOLUME_AFFINE, VOLUME_SHAPE


@pytest.fixture(scope="session")
def tiny_model():
    """Random-weight ``vit_tiny`` SAM (128 px input): real medsa model, milliseconds per call."""
    import torch

    from medsa.sam import build_sam

    torch.manual_seed(0)
    return build_sam("vit_tiny")


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    """``root/`` with ``rgb.png`` (2D) and ``sub/vol.nii.gz`` (3D, non-trivial affine), an empty
    ``out/`` and a ``secret.txt`` next to (outside) the root."""
    import nibabel as nib
    from PIL import Image

    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    h, w = IMAGE_SHAPE
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[15:45, 20:60] = (200, 80, 60)
    rgb += rng.integers(0, 20, rgb.shape, dtype=np.uint8)
    Image.fromarray(rgb).save(root / "rgb.png")
    d, hh, ww = VOLUME_SHAPE
    vol = rng.normal(100.0, 20.0, VOLUME_SHAPE).astype(np.int16)  # CT-like signed ints
    vol[:, 10:30, 12:36] += 400
    # nibabel stores (x, y, z): the numpy (D, H, W) volume reversed
    nib.save(
        nib.Nifti1Image(np.transpose(vol, (2, 1, 0)), VOLUME_AFFINE), root / "sub" / "vol.nii.gz"
    )
    (tmp_path / "secret.txt").write_text("outside the root")
    (tmp_path / "secret.png").write_bytes((root / "rgb.png").read_bytes())
    return {"root": root, "out": tmp_path / "out", "tmp": tmp_path}


@pytest.fixture
def make_app(tiny_model, roots):
    """Factory: ``make_app(**config_overrides) -> FastAPI`` on the ``roots`` fixture."""
    from medsa.serve.app import create_app
    from medsa.serve.service import ServeConfig

    apps = []

    def _make(**overrides):
        cfg = ServeConfig(roots=(roots["root"],), output_dir=roots["out"], **overrides)
        app = create_app(tiny_model, cfg)
        apps.append(app)
        return app

    yield _make
    for app in apps:
        app.state.service.close()


@pytest.fixture
def client(make_app):
    """``TestClient`` that sends the ``X-Medsa`` header like the page does."""
    from fastapi.testclient import TestClient

    with TestClient(make_app(), base_url="http://127.0.0.1", headers={"X-Medsa": "1"}) as c:
        yield c


@pytest.fixture
def encoder_calls(tiny_model):
    """List that grows by one per real image-encoder forward pass (a forward hook)."""
    calls: list[int] = []
    handle = tiny_model.image_encoder.register_forward_hook(
        lambda mod, inp, out: calls.append(int(inp[0].shape[0]))
    )
    yield calls
    handle.remove()
