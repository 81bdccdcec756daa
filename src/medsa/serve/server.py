"""Running the app with uvicorn, in the foreground (CLI) or in a background thread (tests, notebooks)."""

from __future__ import annotations

import socket
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["ServerThread", "bind_socket"]


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: a free port chosen by the OS).

    Binding before uvicorn starts means the port is known (and held) without a race.
    """
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class ServerThread:
    """uvicorn serving ``app`` in a daemon thread; use as a context manager.

    ``url`` is ``http://host:port`` once started. ``stop()`` asks uvicorn to finish open requests
    and waits for the thread.
    """

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, **uvicorn_kw: Any):
        import uvicorn

        self.sock = bind_socket(host, port)
        self.host = host
        self.port = int(self.sock.getsockname()[1])
        kw: dict[str, Any] = {"log_level": "warning", "access_log": False, "timeout_keep_alive": 30}
        kw.update(uvicorn_kw)
        self.server = uvicorn.Server(uvicorn.Config(app, **kw))
        self.thread = threading.Thread(target=self._run, name="medsa-serve", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        self.server.run(sockets=[self.sock])

    def start(self, timeout: float = 20.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
