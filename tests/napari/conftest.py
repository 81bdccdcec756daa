"""Headless napari: skip cleanly without napari / Qt; give Qt a display with an OpenGL context.

napari's canvas (vispy) needs OpenGL, which Qt's ``offscreen`` platform does not provide with the
PyQt5 wheels (adding an image layer fails in ``glGetParameter``). Without a ``$DISPLAY`` the
session starts its own Xvfb (Debian package ``xvfb``, installed by .ci/run; Mesa renders in
software) and uses the ``xcb`` platform; without Xvfb the tests are skipped with that reason.
"""

from __future__ import annotations

import os
import select
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("qtpy", reason="napari tests need a Qt binding (pip install -e '.[napari]')")
pytest.importorskip("napari", reason="napari tests need napari (pip install -e '.[napari]')")
pytest.importorskip("pytestqt", reason="napari tests need pytest-qt")

MANIFEST = Path(__file__).resolve().parents[2] / "src" / "medsa" / "napari" / "napari.yaml"


def _die_with_parent() -> None:
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start_xvfb() -> tuple[subprocess.Popen[bytes], str]:
    r, w = os.pipe()
    # -terminate: the server exits when its last client (this process's QApplication) goes;
    # PR_SET_PDEATHSIG: and with this process in any case, however pytest ends
    proc = subprocess.Popen(
        ["Xvfb", "-displayfd", str(w), "-screen", "0", "1400x900x24", "-nolisten", "tcp",
         "-terminate"],
        pass_fds=(w,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )  # fmt: skip
    os.close(w)
    # read up to the newline: Xvfb dies if the pipe closes before it wrote the whole line
    buf = b""
    while not buf.endswith(b"\n") and select.select([r], [], [], 30)[0]:
        chunk = os.read(r, 64)
        if not chunk:
            break
        buf += chunk
    os.close(r)
    number = buf.decode().strip()
    if not number:
        proc.kill()
        raise RuntimeError("Xvfb did not start")
    return proc, f":{number}"


@pytest.fixture(scope="session", autouse=True)
def display() -> Iterator[str]:
    """A display for Qt: the existing ``$DISPLAY`` or a private Xvfb for this session.

    autouse, so it is set up before pytest-qt's session ``qapp`` creates the QApplication."""
    if os.environ.get("DISPLAY") and os.environ.get("QT_QPA_PLATFORM", "xcb") == "xcb":
        yield os.environ["DISPLAY"]
        return
    if shutil.which("Xvfb") is None:
        pytest.skip(
            "napari's canvas needs OpenGL: install xvfb (apt-get install xvfb) or a display"
        )
    try:
        proc, disp = _start_xvfb()
    except (OSError, RuntimeError) as e:
        pytest.skip(f"cannot start Xvfb for the napari tests: {e}")
    os.environ["DISPLAY"], os.environ["QT_QPA_PLATFORM"] = disp, "xcb"
    yield disp
    # Xvfb is NOT stopped here: the session's QApplication outlives this fixture, and Qt aborts the
    # process when its X server vanishes under it (pytest would die before its summary). It ends
    # with its last client (-terminate) or with this process (PR_SET_PDEATHSIG).
    del proc


@pytest.fixture(scope="session")
def medsa_plugin(display: str) -> str:
    """Register medsa's npe2 manifest (from the source tree: works without ``pip install``)."""
    import npe2

    pm = npe2.PluginManager.instance()
    pm.discover()  # an installed medsa (pip install -e) registers itself through its entry point
    if "medsa" not in pm:
        pm.register(npe2.PluginManifest.from_file(MANIFEST))
    return "medsa"


@pytest.fixture
def viewer(display: str, medsa_plugin: str, qtbot) -> Iterator[object]:
    import napari

    v = napari.Viewer(show=False)
    try:
        yield v
    finally:
        v.close()
