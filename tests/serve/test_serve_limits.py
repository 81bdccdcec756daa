"""Issue #14 regressions for `medsa serve`: hostile masks, overwrites, decoded-size and body limits,
upload caps and private folders, no absolute server paths in answers."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import IMAGE_SHAPE

from medsa.serve.rle import rle_decode, rle_encode


def _open(client, path: str) -> dict:
    r = client.post("/api/open", json={"root": 0, "path": path})
    assert r.status_code == 200, r.text
    return r.json()


def _client(app):
    from fastapi.testclient import TestClient

    return TestClient(app, base_url="http://127.0.0.1", headers={"X-Medsa": "1"})


# ------------------------------------------------------------------------------ mask encodings

H, W = IMAGE_SHAPE
N = H * W


@pytest.mark.parametrize(
    "runs",
    [
        [2**62, 2**62, 2**62, 2**62 + N],  # int64 sum wraps around to H*W (segfault in np.repeat)
        [2**63],  # does not fit int64 (OverflowError -> 500)
        [N + 1, -1],  # negative run, correct sum
        [2**64 - 1, N + 1],  # uint64 wrap
        [0] * (N + 2),  # more runs than pixels + 1
        [True] * N,  # JSON booleans are not run lengths
    ],
)
def test_rle_decode_rejects_overflowing_runs(runs):
    from medsa.errors import PromptError

    with pytest.raises(PromptError, match=f"sum to {N}"):
        rle_decode(runs, (H, W))


def test_save_with_wrapping_runs_is_422_and_server_lives(client):
    img = _open(client, "rgb.png")
    for runs in ([2**62, 2**62, 2**62, 2**62 + N], [2**63], [2**63, -(2**63) + N]):
        r = client.post("/api/save", json={"image": img["id"], "masks": {"0": runs}})
        assert r.status_code == 422, r.text
        assert "sum to" in r.json()["error"]
    assert client.get("/api/info").status_code == 200


def test_old_decoder_crash_is_a_real_crash_case():
    """The wrapping runs above are the ones that killed the server: np.repeat with them crashes
    (in a child process here); the strict decoder refuses them before numpy sees them."""
    code = (
        "import numpy as np; r = np.asarray([2**62, 2**62, 2**62, 2**62 + 4800], np.int64); "
        "assert int(r.sum()) == 4800; v = np.zeros(4, bool); v[1::2] = True; np.repeat(v, r)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode != 0  # MemoryError / ValueError / SIGSEGV, never a mask


# ------------------------------------------------------------------------------ overwriting


@pytest.fixture
def out_is_root(make_app, roots):
    """A server whose output folder is the root folder itself (``--output`` = ``--root``)."""
    from medsa.serve.app import create_app
    from medsa.serve.service import ServeConfig

    app = create_app(
        make_app().state.service.model,
        ServeConfig(roots=(roots["root"],), output_dir=roots["root"]),
    )
    with _client(app) as c:
        yield c
    app.state.service.close()


def test_save_never_replaces_a_source_image_under_a_root(out_is_root, roots):
    before = (roots["root"] / "rgb.png").read_bytes()
    (roots["root"] / "other.png").write_bytes(before)
    img = _open(out_is_root, "rgb.png")
    mask = rle_encode(np.ones(IMAGE_SHAPE, bool))
    for name, overwrite in [("rgb.png", False), ("rgb.png", True), ("other.png", True)]:
        r = out_is_root.post(
            "/api/save",
            json={"image": img["id"], "name": name, "masks": {"0": mask}, "overwrite": overwrite},
        )
        assert r.status_code == 403, r.text
    assert (roots["root"] / "rgb.png").read_bytes() == before
    assert (roots["root"] / "other.png").read_bytes() == before
    # the page's default name is a new file: written, and then re-saved without asking
    for _ in range(2):
        r = out_is_root.post("/api/save", json={"image": img["id"], "masks": {"0": mask}})
        assert r.status_code == 200, r.text


def test_open_image_own_name_is_refused(make_app, roots):
    """Saving under the open image's own file name is refused even outside the roots."""
    with _client(make_app()) as c:
        img = _open(c, "rgb.png")
        mask = rle_encode(np.ones(IMAGE_SHAPE, bool))
        r = c.post("/api/save", json={"image": img["id"], "name": "rgb.png", "masks": {"0": mask},
                                      "overwrite": True})  # fmt: skip
        assert r.status_code == 403 and "open image" in r.json()["error"]


def test_existing_output_file_needs_confirmation(client, roots):
    roots["out"].mkdir(exist_ok=True)
    old = roots["out"] / "rgb_mask.png"
    old.write_bytes(b"an earlier mask")
    img = _open(client, "rgb.png")
    body = {"image": img["id"], "masks": {"0": rle_encode(np.ones(IMAGE_SHAPE, bool))}}
    r = client.post("/api/save", json=body)
    assert r.status_code == 409 and "confirm" in r.json()["error"]
    assert old.read_bytes() == b"an earlier mask"
    r = client.post("/api/save", json={**body, "overwrite": True})
    assert r.status_code == 200, r.text
    assert old.read_bytes() != b"an earlier mask"
    # written by this session now: saving again needs no confirmation
    assert client.post("/api/save", json=body).status_code == 200


# ------------------------------------------------------------------------------ decoded size


def _png_header_bomb(path: Path, side: int) -> None:
    """A valid grayscale PNG of ``side`` x ``side`` zero pixels, compressed to a few hundred kB
    (written row by row, never held in memory)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    comp = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))  # fmt: skip


@pytest.fixture
def no_decoding(monkeypatch):
    """Fails the test if any image's pixel data is decoded."""
    import medsa.data.io as io

    def refuse(path):
        raise AssertionError(f"{path} was decoded")

    monkeypatch.setattr(io, "read_image", refuse)


def test_png_of_144_megapixels_is_refused_before_decoding(make_app, roots, no_decoding):
    bomb = roots["tmp"] / "bomb.png"
    _png_header_bomb(bomb, 12000)
    assert bomb.stat().st_size < 2 * 2**20  # passes a 2 MB upload limit
    with _client(make_app(max_upload_mb=2)) as c:
        r = c.post("/api/upload", params={"filename": "bomb.png"}, content=bomb.read_bytes())
        assert r.status_code == 400, r.text
        msg = r.json()["error"]
        assert "bomb.png" in msg and "too large" in msg and "--max-image-mpix" in msg
        assert c.app.state.service.uploads.count == 0
        assert list(c.app.state.service.upload_dir.iterdir()) == []


def test_volume_voxel_limit_is_checked_from_the_nifti_header(make_app, no_decoding):
    with _client(make_app(max_volume_mvox=0.005)) as c:  # the 5 x 40 x 48 fixture has 9600
        r = c.post("/api/open", json={"root": 0, "path": "sub/vol.nii.gz"})
        assert r.status_code == 400, r.text
        assert "9600" not in r.json()["error"] or "too large" in r.json()["error"]
        assert "--max-volume-mvox" in r.json()["error"]


def test_image_pixel_limit(make_app):
    with _client(make_app(max_image_mpix=0.001)) as c:
        r = c.post("/api/open", json={"root": 0, "path": "rgb.png"})
        assert r.status_code == 400 and "too large" in r.json()["error"]


# ------------------------------------------------------------------------------ request bodies


def test_json_body_limit(make_app):
    with _client(make_app(max_request_mb=0.01)) as c:
        big = b'{"image": "x", "masks": {"0": [' + b"1," * 20_000 + b"1]}}"
        r = c.post("/api/save", content=big, headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "--max-request-mb" in r.json()["error"]

        def chunks():  # no Content-Length: counted while streaming
            yield big[:4096]
            yield big[4096:]

        r = c.post("/api/save", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        # small bodies still work
        assert c.post("/api/open", json={"root": 0, "path": "rgb.png"}).status_code == 200


# ------------------------------------------------------------------------------ uploads


def test_uploads_are_capped_oldest_evicted(make_app, roots):
    data = (roots["root"] / "rgb.png").read_bytes()
    with _client(make_app(max_uploads=2)) as c:
        svc = c.app.state.service
        ids = []
        for i in range(3):
            r = c.post("/api/upload", params={"filename": f"u{i}.png"}, content=data)
            assert r.status_code == 200, r.text
            ids.append(r.json()["id"])
        assert svc.uploads.count == 2 and len(list(svc.upload_dir.iterdir())) == 2
        r = c.post("/api/predict", json={"image": ids[0], "points": [[5, 5, 1]]})
        assert r.status_code == 404  # the oldest upload is gone, with its image
        r = c.post("/api/predict", json={"image": ids[2], "points": [[5, 5, 1]]})
        assert r.status_code == 200
    with _client(make_app(max_upload_total_mb=1.5 * len(data) / 2**20)) as c:
        for i in range(3):
            assert c.post("/api/upload", params={"filename": f"u{i}.png"},
                          content=data).status_code == 200  # fmt: skip
        assert c.app.state.service.uploads.count == 1


def test_upload_folder_is_private_and_stale_ones_are_cleaned(make_app, roots):
    parent = roots["tmp"] / "uploads"
    parent.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = parent / f"medsa-uploads-{dead.pid}-abc123"
    stale.mkdir()
    (stale / "scan.nii.gz").write_bytes(b"patient data")
    alive = parent / f"medsa-uploads-{os.getppid()}-live"  # a running process: kept
    alive.mkdir()
    other = parent / "unrelated"
    other.mkdir()
    app = make_app(upload_dir=parent)
    folder = app.state.service.upload_dir
    assert folder.parent == parent.resolve()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert not stale.exists() and alive.exists() and other.exists()
    app.state.service.close()
    assert not folder.exists()


# ------------------------------------------------------------------------------ no server paths


def test_no_absolute_paths_in_info_and_errors(client, roots):
    secret = str(roots["tmp"])
    info = client.get("/api/info")
    assert secret not in info.text and info.json()["output_dir"] == "out"
    (roots["root"] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    r = client.post("/api/open", json={"root": 0, "path": "broken.png"})
    assert r.status_code == 400 and "broken.png" in r.json()["error"]
    assert secret not in r.text
    img = _open(client, "rgb.png")
    r = client.post("/api/save", json={"image": img["id"], "masks": {"0": [N]}})
    assert r.status_code == 200 and secret not in r.text


# ------------------------------------------------------------------------------ command line


def test_limit_flags_reach_the_server_and_bad_values_exit_1(tmp_path, capsys, monkeypatch):
    from medsa.cli import main
    from medsa.serve import cli

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--max-image-mpix", "--max-volume-mvox", "--max-request-mb", "--max-uploads",
                 "--max-upload-total-mb", "--upload-dir"):  # fmt: skip
        assert flag in out
    base = ["serve", "--root", str(tmp_path), "--output", str(tmp_path / "o")]
    code = main([*base, "--max-request-mb", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "max_request_mb must be a positive number" in err
    assert "Traceback" not in err

    seen = {}

    def stop(backbone, *a, **k):  # the config is built before the model: capture and stop there
        raise SystemExit(0)

    import medsa.serve.service as service

    real = service.ServeConfig

    def capture(**kw):
        seen.update(kw)
        return real(**kw)

    monkeypatch.setattr(service, "ServeConfig", capture)
    monkeypatch.setattr(cli, "build_model", stop)
    with pytest.raises(SystemExit):
        main([*base, "--max-image-mpix", "2", "--max-volume-mvox", "3", "--max-request-mb", "4",
              "--max-uploads", "5", "--max-upload-total-mb", "6"])  # fmt: skip
    assert (seen["max_image_mpix"], seen["max_volume_mvox"], seen["max_request_mb"],
            seen["max_uploads"], seen["max_upload_total_mb"]) == (2, 3, 4, 5, 6)  # fmt: skip
