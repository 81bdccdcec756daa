"""Facts about the machine that speed choices depend on (read once per process)."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def cpu_flags() -> frozenset[str]:
    """CPU feature flags from Linux ``/proc/cpuinfo`` (e.g. ``avx512_bf16``, ``amx_bf16``);
    empty where that file does not exist or has no flags line."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()
