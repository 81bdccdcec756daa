"""The served pipeline with the real LiteMedSAM weights on real images: a box around the ground
truth must give a good mask, in 2D (Kvasir polyp) and on a slice of a 3D MRI volume (ACDC LV).

This checks what the unit tests with random weights cannot: that intensities, coordinates and the
mask orientation reach the model and come back correctly through the HTTP API.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
KVASIR_ID = "cju0qkwl35piu0993l0dewei2"
ACDC_ID = "patient001_frame01"

pytestmark = [pytest.mark.realdata, pytest.mark.slow]


@pytest.fixture(scope="module")
def lite_medsam():
    from medsa.errors import CheckpointError
    from medsa.sam import build_sam

    try:
        return build_sam("lite_medsam")
    except CheckpointError as e:
        pytest.skip(f"LiteMedSAM weights unavailable: {e}")


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def _box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def test_litemedsam_box_prompts_through_the_api(lite_medsam, tmp_path):
    from fastapi.testclient import TestClient

    from medsa.data.io import read_image
    from medsa.serve.app import create_app
    from medsa.serve.service import ServeConfig, rle_decode

    kvasir_img = DATA / "Kvasir-SEG" / "images" / f"{KVASIR_ID}.jpg"
    acdc_img = DATA / "ACDC" / "imagesTr" / f"{ACDC_ID}.nii.gz"
    if not (kvasir_img.exists() and acdc_img.exists()):
        pytest.skip("needs ../shared/data (Kvasir-SEG, ACDC)")
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(kvasir_img, root)
    shutil.copy(acdc_img, root)
    app = create_app(lite_medsam, ServeConfig(roots=(root,), output_dir=tmp_path / "out"))
    with TestClient(app, base_url="http://127.0.0.1", headers={"X-Medsa": "1"}) as c:
        # 2D polyp
        gt = read_image(DATA / "Kvasir-SEG" / "masks" / f"{KVASIR_ID}.png").array
        gt = (gt[..., 0] if gt.ndim == 3 else gt) > 127
        info = c.post("/api/open", json={"root": 0, "path": kvasir_img.name}).json()
        r = c.post("/api/predict", json={"image": info["id"], "box": _box(gt)}).json()
        pred = rle_decode(r["masks"][0]["rle"], gt.shape)
        d = _dice(pred, gt)
        print(f"Kvasir dice {d:.3f}")
        assert d > 0.85, d

        # 3D: the left ventricle (label 3) on its largest slice
        lab = read_image(DATA / "ACDC" / "labelsTr" / f"{ACDC_ID}.nii.gz").array == 3
        z = int(lab.sum(axis=(1, 2)).argmax())
        info = c.post("/api/open", json={"root": 0, "path": acdc_img.name}).json()
        assert info["slices"] == lab.shape[0]
        r = c.post("/api/predict", json={"image": info["id"], "slice": z, "box": _box(lab[z])})
        pred = rle_decode(r.json()["masks"][0]["rle"], lab.shape[1:])
        d = _dice(pred, lab[z])
        print(f"ACDC LV dice {d:.3f}")
        assert d > 0.8, d
        # a box on the wrong place must not give the same mask (the prompt really matters)
        h, w = lab.shape[1:]
        r = c.post(
            "/api/predict", json={"image": info["id"], "slice": z, "box": [0, 0, w / 5, h / 5]}
        )
        wrong = rle_decode(r.json()["masks"][0]["rle"], lab.shape[1:])
        d = _dice(wrong, lab[z])
        print(f"wrong box dice {d:.3f}")
        assert d < 0.3, d
