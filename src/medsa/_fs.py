"""Atomic file writes: the one place where medsa saves user work (checkpoints, adapters, ONNX
exports, reports, serve masks and sidecars, DICOM-SEG, reproduce cells)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(
    target: Path | str, write: Callable[[str], Any], fsync: bool = False, suffix: str = ""
) -> Path:
    """``write(tmp_path)`` into a temporary file beside ``target``, then rename it over
    ``target``: a failed or interrupted write never leaves a half-written file there, nor a
    temporary file. ``fsync``: flush the file and its folder to disk (checkpoints); ``suffix``
    ends the temporary name (writers that pick the format from it: ``.nii.gz``, ``.png``).

    An ``OSError`` (full disk, no permission) names ``target``, not the temporary file."""
    target = Path(target)
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent
        )
    except OSError as e:
        raise _naming(e, target) from e
    os.close(fd)
    try:
        write(tmp)
        if fsync:
            _fsync(tmp, os.O_RDONLY)
        os.replace(tmp, target)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(e, target) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        _fsync(target.parent, getattr(os, "O_DIRECTORY", os.O_RDONLY))
    return target


def _naming(e: OSError, target: Path) -> OSError:
    """``e`` with ``target`` as its file name (the same OSError subclass, e.g. PermissionError);
    ``e`` itself when it carries no errno (nothing to rebuild it from)."""
    if e.errno is None:
        return e
    return OSError(e.errno, e.strerror, str(target))


def atomic_write_text(target: Path | str, text: str) -> Path:
    """``text`` (UTF-8) to ``target`` through :func:`atomic_write`."""
    return atomic_write(target, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _fsync(path: Path | str, flags: int) -> None:
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. folders cannot be opened on some platforms
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
