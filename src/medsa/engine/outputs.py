"""Output folders of the commands: checked before any work, existing results never replaced
silently, and OS write failures (full disk, no permission) turned into one clear line.

Used by ``medsa train`` (``--out-dir``), ``evaluate`` (``--out``) and ``predict`` (``--out``).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from medsa.errors import MedsaError

__all__ = ["OutputError", "check_writable_dir", "describe_os_error", "refuse_existing"]


class OutputError(MedsaError):
    """An output folder or file cannot be written (permissions, full disk, existing results)."""


def describe_os_error(e: OSError) -> str:
    """Short reason for a failed write, with the fix for the common cases."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device (free some space or choose another folder)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (choose a folder you can write to)"
    return e.strerror or type(e).__name__


def check_writable_dir(path: str | os.PathLike[str], flag: str) -> Path:
    """Create ``path`` (with parents) and check a file can be created in it, before any work.

    Raises:
        OutputError: naming ``flag`` and the folder when it is not a folder or not writable.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{flag} {p} exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".medsa-write-test-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{flag} {p}: cannot write there: {describe_os_error(e)}") from None
    return p


def refuse_existing(paths: Iterable[Path], flag: str, overwrite: bool) -> None:
    """Raise unless none of ``paths`` exists or ``overwrite`` is set (as ``medsa train``)."""
    if overwrite:
        return
    existing = [p for p in paths if p.exists()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OutputError(
            f"{existing[0]}{more} already exists; pass --overwrite to replace existing results, "
            f"or choose another {flag}"
        )
