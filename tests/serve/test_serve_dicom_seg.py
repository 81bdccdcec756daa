"""`medsa serve` saves a DICOM-SEG next to the label map for DICOM images (issue #15)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsa.serve.rle import rle_encode

pytest.importorskip("highdicom")


def _open(client, path: str) -> dict:
    r = client.post("/api/open", json={"root": 0, "path": path})
    assert r.status_code == 200, r.text
    return r.json()


def test_save_dicom_seg_of_two_named_objects(client, roots, write_dicom_series):
    from medsa.data.dicom_seg import read_dicom_seg
    from medsa.data.io import read_image

    arr = (np.arange(4 * 12 * 14).reshape(4, 12, 14) * 3 - 200).astype(np.int16)
    series = write_dicom_series(roots["root"] / "series", arr)
    info = _open(client, "series")
    liver = np.zeros((12, 14), bool)
    liver[2:8, 3:10] = True
    tumour = np.zeros((12, 14), bool)
    tumour[5:10, 8:13] = True  # overlaps the liver: the later object wins there
    objects = [
        {"name": "liver", "label": 1, "masks": {"1": rle_encode(liver), "2": rle_encode(liver)}},
        {"name": "tumour", "label": 3, "masks": {"2": rle_encode(tumour)}},
    ]
    body = {"image": info["id"], "objects": objects, "dicom_seg": True}
    r = client.post("/api/save", json=body)
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["name"] == "series_mask.nii.gz" and res["dicom_seg"] == "series_mask_seg.dcm"
    saved = read_image(roots["out"] / "series_mask.nii.gz").array
    assert sorted(np.unique(saved).tolist()) == [0, 1, 3]
    labels, names = read_dicom_seg(roots["out"] / "series_mask_seg.dcm", series)
    np.testing.assert_array_equal(labels, saved)
    assert names == {1: "liver", 3: "tumour"}
    side = json.loads((roots["out"] / "series_mask.labels.json").read_text())
    assert side["labels"] == {"liver": 1, "tumour": 3}
    # saving again replaces this session's files; a .dcm this session did not write needs consent
    assert client.post("/api/save", json=body).status_code == 200
    (roots["out"] / "other_seg.dcm").write_bytes(b"keep me")
    r = client.post("/api/save", json={**body, "name": "other.nii.gz"})
    assert r.status_code == 409 and "other_seg.dcm" in r.json()["error"]
    assert (roots["out"] / "other_seg.dcm").read_bytes() == b"keep me"
    assert not (roots["out"] / "other.nii.gz").exists()  # refused before anything was written
    r = client.post("/api/save", json={**body, "name": "other.nii.gz", "overwrite": True})
    assert r.status_code == 200, r.text
    assert read_dicom_seg(roots["out"] / "other_seg.dcm", series)[1] == {1: "liver", 3: "tumour"}


def test_dicom_seg_of_a_non_dicom_image_is_refused(client, roots):
    info = _open(client, "sub/vol.nii.gz")
    masks = {"0": rle_encode(np.ones((info["height"], info["width"]), bool))}
    r = client.post("/api/save", json={"image": info["id"], "masks": masks, "dicom_seg": True})
    assert r.status_code == 400, r.text
    assert "DICOM-SEG can only be saved for a DICOM image" in r.json()["error"]
    assert not roots["out"].exists() or list(roots["out"].iterdir()) == []
