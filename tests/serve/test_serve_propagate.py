"""Propagation in `medsa serve` (issue #11): background jobs, progress, masks on every slice,
shared embeddings, and an event loop that stays free while a volume propagates."""

from __future__ import annotations

import time

import numpy as np
import pytest
from serve_helpers import IMAGE_SHAPE, VOLUME_SHAPE, BrightPredictor

from medsa.serve.rle import rle_decode, rle_encode

pytest.importorskip("medsa.engine.propagate")

D, H, W = VOLUME_SHAPE
BLOCK = (slice(10, 30), slice(12, 36))  # the bright block of the fixture volume, on every slice


def _open(client, path: str) -> dict:
    r = client.post("/api/open", json={"root": 0, "path": path})
    assert r.status_code == 200, r.text
    return r.json()


def _key() -> list[int]:
    m = np.zeros((H, W), bool)
    m[BLOCK] = True
    return rle_encode(m)


def _wait(client, job: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = client.get(f"/api/jobs/{job}").json()
        if st["state"] not in ("queued", "running"):
            return st
        time.sleep(0.05)
    raise AssertionError(f"job {job} did not finish")


@pytest.fixture
def stub(client):
    """Swap the served model for the stub in the propagator (clicks keep the real model)."""
    pred = BrightPredictor()
    client.app.state.service.propagators.model = pred
    return pred


def test_propagate_fills_every_slice_of_the_object(client, stub):
    vol = _open(client, "sub/vol.nii.gz")
    r = client.post("/api/propagate", json={"image": vol["id"], "keys": {"2": _key()}})
    assert r.status_code == 200, r.text
    assert r.json()["state"] in ("queued", "running", "done")
    st = _wait(client, r.json()["job"])
    assert st["state"] == "done", st
    assert sorted(int(z) for z in st["masks"]) == list(range(D))
    assert st["z_range"] == [0, D - 1] and st["done"] == st["total"] > 0
    expected = np.zeros((H, W), bool)
    expected[BLOCK] = True
    for runs in st["masks"].values():
        np.testing.assert_array_equal(rle_decode(runs, (H, W)), expected)
    # every slice but the key is prompted from the previous slice's result: its mask's box
    # (engine.propagate's default next-slice prompt, chosen on ACDC; docs/propagation.md)
    assert len(stub.boxes) >= D - 1 and all(b is not None for b in stub.boxes)


def test_propagate_one_direction(client, stub):
    vol = _open(client, "sub/vol.nii.gz")
    r = client.post("/api/propagate", json={"image": vol["id"], "keys": {"2": _key()},
                                            "direction": "up"})  # fmt: skip
    st = _wait(client, r.json()["job"])
    assert sorted(int(z) for z in st["masks"]) == [2, 3, 4]


@pytest.mark.parametrize(
    ("path", "keys", "status", "message"),
    [
        ("rgb.png", {"0": [IMAGE_SHAPE[0] * IMAGE_SHAPE[1]]}, 422, "needs a volume"),
        ("sub/vol.nii.gz", {"2": [H * W]}, 422, "empty"),
        ("sub/vol.nii.gz", {"9": [H * W]}, 422, "out of range"),
        ("sub/vol.nii.gz", {"2": [1, 2]}, 422, "sum to"),
    ],
)
def test_bad_propagation_requests(client, stub, path, keys, status, message):
    img = _open(client, path)
    r = client.post("/api/propagate", json={"image": img["id"], "keys": keys})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert client.get("/api/jobs/nope").status_code == 404


def test_event_loop_stays_free_and_cancel(make_app):
    """A slow propagation runs in the worker thread: other requests are answered meanwhile."""
    import httpx

    from medsa.serve.server import ServerThread

    app = make_app()
    app.state.service.propagators.model = BrightPredictor(delay=1.0)
    with (
        ServerThread(app) as server,
        httpx.Client(base_url=server.url, headers={"X-Medsa": "1"}, timeout=30) as c,
    ):
        vol = c.post("/api/open", json={"root": 0, "path": "sub/vol.nii.gz"}).json()
        job = c.post("/api/propagate", json={"image": vol["id"], "keys": {"2": _key()}}).json()
        time.sleep(0.3)
        t0 = time.monotonic()
        assert c.get("/api/info").status_code == 200
        assert c.get(f"/api/images/{vol['id']}/slices/1").status_code == 200
        assert time.monotonic() - t0 < 1.5  # not waiting for the 4 s propagation
        st = c.get(f"/api/jobs/{job['job']}").json()
        assert st["state"] == "running"
        c.post(f"/api/jobs/{job['job']}/cancel", json={})
        deadline = time.monotonic() + 10
        while st["state"] == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
            st = c.get(f"/api/jobs/{job['job']}").json()
        assert st["state"] == "cancelled" and "masks" not in st


def test_embeddings_are_shared_with_clicks(client, encoder_calls):
    """Real (tiny) model: a slice encoded for a click is not encoded again by the propagator, and
    propagated slices are then in the click cache."""
    vol = _open(client, "sub/vol.nii.gz")
    r = client.post("/api/predict", json={"image": vol["id"], "slice": 2, "box": [12, 10, 36, 30]})
    assert r.status_code == 200 and encoder_calls == [1]
    r = client.post("/api/propagate", json={"image": vol["id"], "keys": {"2": _key()}})
    st = _wait(client, r.json()["job"])
    assert st["state"] == "done", st
    svc = client.app.state.service
    prop = svc.propagators.get(svc.images.get(vol["id"]))
    assert 2 in prop.embedded
    assert prop.n_encoded == len(prop.embedded) - 1  # slice 2 came from the click cache
    assert sum(encoder_calls[1:]) == prop.n_encoded  # the propagator's batches
    for z in st["masks"]:
        assert (vol["id"], int(z)) in svc.embeddings
