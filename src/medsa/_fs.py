"""Atomic file writes shared by the packages that save user work (adapters, ONNX exports)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(target: Path, write: Callable[[str], Any]) -> None:
    """``write(tmp_path)`` into a temporary file beside ``target``, then rename it over
    ``target``: a failed or interrupted write never leaves a half-written file there."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
