"""50 concurrent clients against a real uvicorn server on loopback (tiny medsa SAM)."""

from __future__ import annotations

import asyncio
import time

import pytest

N_CLIENTS = 50


async def _client_session(url: str, i: int, n_slices: int) -> list[int]:
    import httpx

    codes = []
    async with httpx.AsyncClient(base_url=url, headers={"X-Medsa": "1"}, timeout=30) as c:
        codes.append((await c.get("/api/files", params={"path": "sub"})).status_code)
        path = "sub/vol.nii.gz" if i % 2 else "rgb.png"
        r = await c.post("/api/open", json={"root": 0, "path": path})
        codes.append(r.status_code)
        info = r.json()
        z = i % n_slices if info["slices"] > 1 else 0
        codes.append((await c.get(f"/api/images/{info['id']}/slices/{z}")).status_code)
        for k in range(2):
            r = await c.post(
                "/api/predict",
                json={"image": info["id"], "slice": z, "points": [[5 + k + i % 20, 10, 1]],
                      "multimask": bool(k)},
            )  # fmt: skip
            codes.append(r.status_code)
            assert sum(r.json()["masks"][0]["rle"]) == info["width"] * info["height"]
    return codes


@pytest.mark.slow
def test_fifty_concurrent_clients(make_app, encoder_calls):
    from serve_helpers import VOLUME_SHAPE

    from medsa.serve.server import ServerThread

    app = make_app()

    async def run_all(url: str) -> list[list[int]]:
        return await asyncio.gather(
            *(_client_session(url, i, VOLUME_SHAPE[0]) for i in range(N_CLIENTS))
        )

    t0 = time.monotonic()
    with ServerThread(app) as server:
        assert server.url.startswith("http://127.0.0.1:")
        results = asyncio.run(asyncio.wait_for(run_all(server.url), timeout=30))
    elapsed = time.monotonic() - t0
    assert all(code == 200 for codes in results for code in codes), results
    assert sum(len(c) for c in results) == N_CLIENTS * 5
    # one encoder pass per distinct (image, slice): the 2D image + the volume's 5 slices
    assert len(encoder_calls) == 1 + VOLUME_SHAPE[0]
    assert elapsed < 30


def test_server_thread_binds_loopback_free_port(make_app):
    import httpx

    from medsa.serve.server import ServerThread

    with ServerThread(make_app()) as a, ServerThread(make_app()) as b:
        assert a.port != b.port and a.port > 0
        assert httpx.get(a.url + "/api/info").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(a.url + "/api/info", timeout=2)
