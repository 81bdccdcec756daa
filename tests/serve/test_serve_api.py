"""HTTP API of medsa serve against the real (tiny, random-weight) medsa SAM."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
from serve_helpers import IMAGE_SHAPE, VOLUME_AFFINE, VOLUME_SHAPE

from medsa.serve.rle import rle_encode


def _open(client, path: str) -> dict:
    r = client.post("/api/open", json={"root": 0, "path": path})
    assert r.status_code == 200, r.text
    return r.json()


# ------------------------------------------------------------------------------------ browsing


def test_info_and_listing(client, roots):
    info = client.get("/api/info").json()
    assert info["model"] == "vit_tiny" and info["roots"] == [{"index": 0, "name": "root"}]
    listing = client.get("/api/files", params={"root": 0, "path": ""}).json()
    assert listing["dirs"] == ["sub"]
    assert [f["name"] for f in listing["files"]] == ["rgb.png"]
    sub = client.get("/api/files", params={"root": 0, "path": "sub"}).json()
    assert [f["name"] for f in sub["files"]] == ["vol.nii.gz"] and sub["path"] == "sub"


@pytest.mark.parametrize(
    "path",
    ["../secret.png", "sub/../../secret.png", "/etc/passwd", "rgb.png\x00", "..\\secret.png"],
)
def test_open_outside_root_is_403(client, path):
    r = client.post("/api/open", json={"root": 0, "path": path})
    assert r.status_code == 403
    assert "error" in r.json() and r.json()["error"]


def test_listing_outside_root_is_403_and_missing_is_404(client):
    assert client.get("/api/files", params={"path": ".."}).status_code == 403
    assert client.get("/api/files", params={"path": "/tmp"}).status_code == 403
    assert client.get("/api/files", params={"path": "nope"}).status_code == 404
    assert client.get("/api/files", params={"root": 3}).status_code == 404
    assert client.post("/api/open", json={"root": 0, "path": "nope.png"}).status_code == 404
    # a non-image file inside the root is not served either
    r = client.post("/api/open", json={"root": 0, "path": "sub"})
    assert r.status_code == 404


def test_symlink_escape_is_403_and_hidden(client, roots):
    root = roots["root"]
    os.symlink(roots["tmp"] / "secret.png", root / "escape.png")
    os.symlink(roots["tmp"], root / "escape_dir")
    r = client.post("/api/open", json={"root": 0, "path": "escape.png"})
    assert r.status_code == 403
    assert client.get("/api/files", params={"path": "escape_dir"}).status_code == 403
    listing = client.get("/api/files").json()
    assert "escape.png" not in [f["name"] for f in listing["files"]]
    assert "escape_dir" not in listing["dirs"]


def test_unknown_image_id_is_404(client):
    r = client.post("/api/predict", json={"image": "deadbeef", "points": [[1, 1, 1]]})
    assert r.status_code == 404 and "open the image first" in r.json()["error"]
    assert client.get("/api/images/deadbeef/slices/0").status_code == 404


# ------------------------------------------------------------------------------------ guards


def test_csrf_header_and_host_are_checked(make_app):
    from fastapi.testclient import TestClient

    with TestClient(make_app(), base_url="http://127.0.0.1") as c:
        r = c.post("/api/open", json={"root": 0, "path": "rgb.png"})
        assert r.status_code == 403 and "x-medsa" in r.json()["error"]
        assert c.get("/api/info").status_code == 200  # reads need no header
        r = c.get("/api/info", headers={"Host": "attacker.example:8000"})
        assert r.status_code == 403 and "host" in r.json()["error"]
        assert c.get("/api/info", headers={"Host": "localhost:8000"}).status_code == 200
        page = c.get("/")
        assert page.status_code == 200 and "medsa" in page.text
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert c.get("/static/app.js").status_code == 200


# ------------------------------------------------------------------------------------ images


def test_open_2d_and_3d_and_slice_data(client):
    img = _open(client, "rgb.png")
    assert (img["ndim"], img["height"], img["width"], img["slices"], img["channels"]) == (
        2, *IMAGE_SHAPE, 1, 3,
    )  # fmt: skip
    r = client.get(f"/api/images/{img['id']}/slices/0")
    assert r.headers["x-dtype"] == "uint8" and len(r.content) == IMAGE_SHAPE[0] * IMAGE_SHAPE[1] * 3
    vol = _open(client, "sub/vol.nii.gz")
    d, h, w = VOLUME_SHAPE
    assert (vol["ndim"], vol["slices"], vol["height"], vol["width"]) == (3, d, h, w)
    assert vol["save_name"] == "vol_mask.nii.gz"
    lo, hi = vol["window"]
    assert vol["min"] <= lo < hi <= vol["max"]
    r = client.get(f"/api/images/{vol['id']}/slices/2")
    data = np.frombuffer(r.content, dtype="<f4").reshape(h, w)
    assert data[20, 20] > 300 and data[2, 2] < 300  # the bright block of the fixture, not flipped
    assert client.get(f"/api/images/{vol['id']}/slices/{d}").status_code == 422


# ------------------------------------------------------------------------------------ uploads


def _upload(client, name: str, data: bytes):
    return client.post("/api/upload", params={"filename": name}, content=data)


def test_upload_valid_image(client, roots):
    data = (roots["root"] / "rgb.png").read_bytes()
    r = _upload(client, "my scan.png", data)
    assert r.status_code == 200, r.text
    info = r.json()
    assert (info["height"], info["width"]) == IMAGE_SHAPE and info[
        "save_name"
    ] == "my_scan_mask.png"
    assert (
        client.post("/api/predict", json={"image": info["id"], "points": [[10, 10, 1]]}).status_code
        == 200
    )


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("evil.exe", b"MZ" + b"\0" * 100, "unsupported file type"),
        ("noext", b"\x89PNG", "unsupported file type"),
        ("broken.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "not a readable image"),
        ("fake.nii.gz", b"this is not gzip", "not a readable image"),
        ("empty.png", b"", "empty upload"),
    ],
)
def test_bad_uploads_are_400(client, name, data, message):
    r = _upload(client, name, data)
    assert r.status_code == 400
    assert message in r.json()["error"]
    assert "/" not in r.json()["error"].replace(name, "")  # no server-side paths leak


def test_upload_size_limit(make_app, roots):
    from fastapi.testclient import TestClient

    app = make_app(max_upload_mb=0.001)  # 1 kB; the PNG fixture is larger
    data = (roots["root"] / "rgb.png").read_bytes()
    assert len(data) > 1100
    with TestClient(app, base_url="http://127.0.0.1", headers={"X-Medsa": "1"}) as c:
        r = _upload(c, "big.png", data)
        assert r.status_code == 400 and "limit" in r.json()["error"]
        assert list(app.state.service.upload_dir.iterdir()) == []  # nothing left behind
    assert not app.state.service.upload_dir.exists()  # temporary upload folder removed on shutdown


# ------------------------------------------------------------------------------------ prompts


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"points": [[81, 10, 1]]}, "outside the image"),
        ({"points": [[10, -1, 1]]}, "outside the image"),
        ({"points": [[10, 10, 2]]}, "labels must be 1"),
        ({"box": [10, 10, 90, 20]}, "outside the image"),
        ({"box": [30, 10, 20, 20]}, "x0 <= x1"),
        ({"box": [1, 2, 3]}, "4 finite numbers"),
        ({}, "at least one click"),
        ({"points": [[10, 10]]}, "invalid request"),
        ({"points": [[10, 10, 1]], "slice": 1}, "out of range"),
    ],
)
def test_bad_prompts_are_422(client, encoder_calls, body, message):
    img = _open(client, "rgb.png")
    r = client.post("/api/predict", json={"image": img["id"], **body})
    assert r.status_code == 422, r.text
    assert message in r.json()["error"]
    assert encoder_calls == []  # rejected before any model work


def test_predict_shapes_and_multimask(client):
    img = _open(client, "rgb.png")
    h, w = IMAGE_SHAPE
    r = client.post(
        "/api/predict", json={"image": img["id"], "points": [[40, 30, 1]], "multimask": True}
    )
    assert r.status_code == 200, r.text
    res = r.json()
    assert len(res["masks"]) == 3 and 0 <= res["best"] < 3
    for m in res["masks"]:
        assert sum(m["rle"]) == h * w
        assert m["area"] == sum(m["rle"][1::2])
    one = client.post(
        "/api/predict",
        json={"image": img["id"], "points": [[40, 30, 1], [5, 5, 0]], "box": [20, 15, 60, 45]},
    ).json()
    assert len(one["masks"]) == 1


def test_bfloat16_model_predicts_like_fp32(tiny_model, roots):
    """`medsa serve --precision bf16` serves a bfloat16 copy of the model: same API, masks that
    agree with the fp32 model's on nearly every pixel."""
    import copy

    import numpy as np
    import torch
    from fastapi.testclient import TestClient

    from medsa.serve.app import create_app
    from medsa.serve.service import ServeConfig

    areas = []
    for model in (tiny_model, copy.deepcopy(tiny_model).to(torch.bfloat16)):
        app = create_app(model, ServeConfig(roots=(roots["root"],), output_dir=roots["out"]))
        try:
            with TestClient(app, base_url="http://127.0.0.1", headers={"X-Medsa": "1"}) as c:
                img = _open(c, "rgb.png")
                r = c.post(
                    "/api/predict",
                    json={"image": img["id"], "points": [[40, 30, 1]], "box": [20, 15, 60, 45]},
                )
                assert r.status_code == 200, r.text
                rle = r.json()["masks"][0]["rle"]
                areas.append(np.repeat(np.arange(len(rle)) % 2, rle).astype(bool))
        finally:
            app.state.service.close()
    assert 0 < areas[0].sum() < areas[0].size  # a real mask, not an empty or full one
    agree = (areas[0] == areas[1]).mean()
    assert agree > 0.97, agree


# ------------------------------------------------------------------------------------ caching


def test_embedding_computed_once_per_slice(client, encoder_calls):
    vol = _open(client, "sub/vol.nii.gz")
    body = {"image": vol["id"], "points": [[20, 20, 1]]}
    first = client.post("/api/predict", json={**body, "slice": 1}).json()
    assert encoder_calls == [1] and first["cached"] is False
    again = client.post("/api/predict", json={**body, "slice": 1, "box": [5, 5, 30, 30]}).json()
    assert encoder_calls == [1] and again["cached"] is True
    client.post("/api/predict", json={**body, "slice": 3})
    assert len(encoder_calls) == 2
    client.post("/api/predict", json={**body, "slice": 1})
    assert len(encoder_calls) == 2  # slice 1 still cached
    stats = client.get("/api/stats").json()
    assert stats["encoder_calls"] == 2 and stats["embedding_misses"] == 2


def test_concurrent_requests_for_one_slice_encode_once(client, encoder_calls):
    vol = _open(client, "sub/vol.nii.gz")
    n = 8
    barrier = threading.Barrier(n)
    codes: list[int] = []

    def worker(i: int) -> None:
        barrier.wait()
        r = client.post(
            "/api/predict", json={"image": vol["id"], "slice": 2, "points": [[10 + i, 20, 1]]}
        )
        codes.append(r.status_code)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert codes == [200] * n
    assert encoder_calls == [1]


def test_embedding_cache_is_bounded(make_app, encoder_calls):
    from fastapi.testclient import TestClient

    with TestClient(make_app(embedding_cache=2), base_url="http://127.0.0.1",
                    headers={"X-Medsa": "1"}) as c:  # fmt: skip
        vol = _open(c, "sub/vol.nii.gz")
        for z in (0, 1, 2, 0):  # 0 was evicted by 1 and 2
            c.post("/api/predict", json={"image": vol["id"], "slice": z, "points": [[5, 5, 1]]})
        assert len(encoder_calls) == 4
        assert c.get("/api/stats").json()["embedding_cache"] == 2


# ------------------------------------------------------------------------------------ saving


def test_save_2d_png(client, roots):
    from PIL import Image

    img = _open(client, "rgb.png")
    h, w = IMAGE_SHAPE
    mask = np.zeros((h, w), bool)
    mask[10:20, 30:50] = True
    r = client.post("/api/save", json={"image": img["id"], "masks": {"0": rle_encode(mask)}})
    assert r.status_code == 200, r.text
    assert r.json()["path"] == "out/rgb_mask.png"  # no absolute server path
    out = roots["out"] / "rgb_mask.png"
    assert r.json()["foreground"] == {"object 1": 200}
    saved = np.asarray(Image.open(out))
    assert saved.shape == (h, w)
    np.testing.assert_array_equal(saved, mask.astype(np.uint8))  # label map: label 1
    dl = client.get(r.json()["download"])
    assert dl.status_code == 200 and dl.content == out.read_bytes()
    # no temporary files are left in the output folder (atomic write)
    assert sorted(p.name for p in roots["out"].iterdir()) == [
        "rgb_mask.labels.json",
        "rgb_mask.png",
    ]


def test_save_3d_keeps_geometry(client, roots):
    import nibabel as nib

    from medsa.data.io import read_image

    vol = _open(client, "sub/vol.nii.gz")
    d, h, w = VOLUME_SHAPE
    m1 = np.zeros((h, w), bool)
    m1[5:15, 10:40] = True
    m3 = np.zeros((h, w), bool)
    m3[30:35, 2:4] = True
    r = client.post(
        "/api/save",
        json={"image": vol["id"], "name": "seg.nii.gz",
              "masks": {"1": rle_encode(m1), "3": rle_encode(m3)}},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    out = roots["out"] / "seg.nii.gz"
    nii = nib.load(out)
    np.testing.assert_allclose(nii.affine, VOLUME_AFFINE, atol=1e-5)
    assert nii.shape == (w, h, d)
    back = read_image(out).array
    expected = np.zeros(VOLUME_SHAPE, bool)
    expected[1], expected[3] = m1, m3
    np.testing.assert_array_equal(back > 0, expected)


@pytest.mark.parametrize(
    ("name", "status"),
    [
        ("../escape.png", 403),
        ("sub/x.png", 403),
        ("/tmp/x.png", 403),
        (".hidden.png", 403),
        ("mask.nii.gz", 400),  # a 2D mask is a PNG
        ("mask.txt", 400),
    ],
)
def test_save_name_is_confined(client, roots, name, status):
    img = _open(client, "rgb.png")
    mask = np.ones(IMAGE_SHAPE, bool)
    r = client.post(
        "/api/save", json={"image": img["id"], "name": name, "masks": {"0": rle_encode(mask)}}
    )
    assert r.status_code == status, r.text
    assert not (roots["tmp"] / "escape.png").exists()
    assert not roots["out"].exists() or list(roots["out"].iterdir()) == []


def test_save_rejects_bad_masks(client):
    img = _open(client, "rgb.png")
    r = client.post("/api/save", json={"image": img["id"], "masks": {"0": [1, 2, 3]}})
    assert r.status_code == 422 and "sum to" in r.json()["error"]
    r = client.post("/api/save", json={"image": img["id"], "masks": {"5": [4800]}})
    assert r.status_code == 422 and "out of range" in r.json()["error"]
    assert client.get("/api/download/..%2Fsecret.txt").status_code in (403, 404)
    assert client.get("/api/download/nothing.png").status_code == 404


def test_save_symlink_in_output_is_refused(client, roots):
    roots["out"].mkdir(exist_ok=True)
    target = roots["tmp"] / "victim.png"
    target.write_bytes(b"keep me")
    os.symlink(target, roots["out"] / "rgb_mask.png")
    img = _open(client, "rgb.png")
    r = client.post(
        "/api/save", json={"image": img["id"], "masks": {"0": rle_encode(np.ones(IMAGE_SHAPE))}}
    )
    assert r.status_code == 403
    assert target.read_bytes() == b"keep me"


def test_dicom_series_folder_opens_and_saves_as_nifti(client, roots, write_dicom_series):
    from medsa.data.io import read_image

    arr = (np.arange(3 * 12 * 14).reshape(3, 12, 14) * 3 - 200).astype(np.int16)
    write_dicom_series(roots["root"] / "series", arr)
    listing = client.get("/api/files", params={"path": "series"}).json()
    assert listing["dicom_series"] is True
    assert client.get("/api/files").json()["dicom_series"] is False
    info = _open(client, "series")
    assert (info["ndim"], info["slices"], info["height"], info["width"]) == (3, 3, 12, 14)
    assert info["format"] == "dicom" and info["save_name"] == "series_mask.nii.gz"
    mask = np.zeros((12, 14), bool)
    mask[2:5, 3:9] = True
    r = client.post("/api/save", json={"image": info["id"], "masks": {"2": rle_encode(mask)}})
    assert r.status_code == 200, r.text
    out = read_image(roots["out"] / "series_mask.nii.gz")
    src = read_image(roots["root"] / "series")
    np.testing.assert_allclose(out.origin, src.origin, atol=1e-4)
    np.testing.assert_allclose(out.spacing, src.spacing, rtol=1e-5)
    assert out.array.shape == arr.shape and out.array[2].astype(bool).tolist() == mask.tolist()
    assert int(out.array.sum()) == int(mask.sum())
    # a plain folder (no DICOM) is not an image
    assert client.post("/api/open", json={"root": 0, "path": "sub"}).status_code == 404


def test_embed_endpoint_warms_the_cache(client, encoder_calls):
    vol = _open(client, "sub/vol.nii.gz")
    r = client.post("/api/embed", json={"image": vol["id"], "slice": 4})
    assert r.status_code == 200 and r.json()["cached"] is False and encoder_calls == [1]
    assert client.post("/api/embed", json={"image": vol["id"], "slice": 4}).json()["cached"]
    p = client.post("/api/predict", json={"image": vol["id"], "slice": 4, "points": [[3, 3, 1]]})
    assert p.json()["cached"] is True and encoder_calls == [1]
    assert client.post("/api/embed", json={"image": vol["id"], "slice": 5}).status_code == 422
