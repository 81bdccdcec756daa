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
    from medsa.serve.rle import rle_decode
    from medsa.serve.service import ServeConfig

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


def test_litemedsam_propagation_through_the_api(lite_medsam, tmp_path):
    """One box on the largest LV slice of an ACDC volume, propagated by the server: the volume
    Dice of the saved label map (all slices predicted) against the ground truth."""
    import json
    import time

    from fastapi.testclient import TestClient

    from medsa.data.io import read_image
    from medsa.serve.app import create_app
    from medsa.serve.rle import rle_decode, rle_encode
    from medsa.serve.service import ServeConfig

    acdc_img = DATA / "ACDC" / "imagesTr" / f"{ACDC_ID}.nii.gz"
    if not acdc_img.exists():
        pytest.skip("needs ../shared/data (ACDC)")
    pytest.importorskip("medsa.engine.propagate")
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(acdc_img, root)
    lab = read_image(DATA / "ACDC" / "labelsTr" / f"{ACDC_ID}.nii.gz").array == 3
    z = int(lab.sum(axis=(1, 2)).argmax())
    app = create_app(lite_medsam, ServeConfig(roots=(root,), output_dir=tmp_path / "out"))
    with TestClient(app, base_url="http://127.0.0.1", headers={"X-Medsa": "1"}) as c:
        info = c.post("/api/open", json={"root": 0, "path": acdc_img.name}).json()
        r = c.post("/api/predict", json={"image": info["id"], "slice": z, "box": _box(lab[z])})
        key = rle_decode(r.json()["masks"][0]["rle"], lab.shape[1:])
        t0 = time.perf_counter()
        job = c.post(
            "/api/propagate", json={"image": info["id"], "keys": {str(z): rle_encode(key)}}
        )
        assert job.status_code == 200, job.text
        while (st := c.get(f"/api/jobs/{job.json()['job']}").json())["state"] in (
            "queued",
            "running",
        ):
            time.sleep(0.2)
        seconds = time.perf_counter() - t0
        assert st["state"] == "done", st
        masks = {int(k): v for k, v in st["masks"].items()}
        masks[z] = rle_encode(key)
        r = c.post(
            "/api/save",
            json={
                "image": info["id"],
                "objects": [
                    {"name": "LV", "label": 1, "masks": {str(k): v for k, v in masks.items()}}
                ],
            },
        )
        assert r.status_code == 200, r.text
    saved = read_image(tmp_path / "out" / r.json()["name"])
    src = read_image(acdc_img)
    np.testing.assert_allclose(saved.affine, src.affine, atol=1e-4)  # the input's geometry
    pred = saved.array == 1
    d = _dice(pred, lab)
    far = [k for k in masks if abs(k - z) >= 2]
    print(
        f"ACDC LV propagated from slice {z}: volume dice {d:.3f}, slices {sorted(masks)} "
        f"(GT {sorted(set(np.nonzero(lab)[0].tolist()))}), {seconds:.1f} s"
    )
    assert far, "no mask two or more slices away from the key slice"
    assert d > 0.7, d
    side = json.loads((tmp_path / "out" / r.json()["sidecar"]).read_text())
    assert side["labels"] == {"LV": 1}
