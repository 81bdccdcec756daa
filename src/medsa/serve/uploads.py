"""Uploaded files: a private folder, a cap on what is kept, and cleanup of crashed servers' folders.

Uploads are patient scans, so they are kept only as long as needed and only where nobody else can
read them:

- each server process uploads into its own folder ``medsa-uploads-<pid>-<random>`` created with
  mode ``0700`` (in the system temporary folder, or in ``--upload-dir``);
- at start, folders of that pattern left by server processes that no longer run (a crash, kill -9)
  and owned by the same user are removed;
- at most ``max_files`` uploads and ``max_bytes`` bytes are kept: the oldest are deleted (and their
  image forgotten) to make room for a new one;
- the folder is removed when the server stops (lifespan shutdown, and ``atexit`` as a fallback).
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

from medsa.errors import MedsaError

from .paths import IMAGE_SUFFIXES, image_suffix

__all__ = ["UploadError", "UploadStore", "remove_stale_upload_dirs"]

_PREFIX = "medsa-uploads-"
_DIR_RE = re.compile(r"^medsa-uploads-(\d+)-[A-Za-z0-9_]+$")


class UploadError(MedsaError):
    """An uploaded file is too large, of a refused type, or cannot be decoded (HTTP 400)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to another user
        return True
    except OSError:
        return True  # be conservative: never delete what might be in use
    return True


def remove_stale_upload_dirs(parent: Path) -> list[Path]:
    """Delete ``medsa-uploads-<pid>-*`` folders in ``parent`` whose process is gone.

    Only folders (not symlinks) owned by the current user are touched.
    """
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for d in entries:
        m = _DIR_RE.match(d.name)
        if m is None or d.is_symlink() or not d.is_dir():
            continue
        pid = int(m.group(1))
        try:
            owner = d.stat().st_uid
        except OSError:
            continue
        if owner != os.getuid() or pid == os.getpid() or _pid_alive(pid):
            continue
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


class UploadStore:
    """The private upload folder of one server and the uploads it keeps.

    Args:
        parent: where the private folder is created; ``None``: the system temporary folder.
        max_files: uploads kept at most (the oldest is deleted first).
        max_bytes: total size of the uploads kept at most.
    """

    def __init__(self, parent: Path | None, max_files: int, max_bytes: int) -> None:
        if max_files < 1 or max_bytes < 1:
            raise MedsaError("the upload caps must be positive")
        base = Path(parent or tempfile.gettempdir()).expanduser()
        base.mkdir(parents=True, exist_ok=True)
        self.stale_removed = remove_stale_upload_dirs(base)
        # mkdtemp creates the folder with mode 0700
        self.folder = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-", dir=base)).resolve()
        os.chmod(self.folder, 0o700)
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._kept: OrderedDict[Path, int] = OrderedDict()  # oldest first
        self._lock = threading.Lock()
        self._closed = False
        atexit.register(self.close)

    def new_path(self, filename: str) -> Path:
        """A fresh file path in the upload folder for ``filename`` (validated extension)."""
        suf = image_suffix(filename or "")
        if suf is None:
            raise UploadError(
                f"{filename!r}: unsupported file type; accepted: " + " ".join(IMAGE_SUFFIXES)
            )
        if self._closed:
            raise UploadError("the server is shutting down")
        return self.folder / f"{uuid.uuid4().hex}{suf}"

    def keep(self, path: Path) -> list[Path]:
        """Record a complete upload; deletes and returns the oldest ones beyond the caps."""
        size = path.stat().st_size
        evicted = []
        with self._lock:
            self._kept[path] = size
            while len(self._kept) > 1 and (
                len(self._kept) > self.max_files or sum(self._kept.values()) > self.max_bytes
            ):
                old, _ = self._kept.popitem(last=False)
                evicted.append(old)
        for old in evicted:
            old.unlink(missing_ok=True)
        return evicted

    def discard(self, path: Path) -> None:
        with self._lock:
            self._kept.pop(path, None)
        path.unlink(missing_ok=True)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._kept)

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return sum(self._kept.values())

    def close(self) -> None:
        """Remove the folder and everything in it (idempotent)."""
        self._closed = True
        shutil.rmtree(self.folder, ignore_errors=True)
        atexit.unregister(self.close)
