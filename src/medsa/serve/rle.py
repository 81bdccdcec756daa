"""Mask transport between the page and the server: row-major run lengths.

A mask ``(H, W)`` travels as ``[bg, fg, bg, fg, ...]``: alternating run lengths that start with a
(possibly empty) background run. Decoding is strict because the runs come from the network:
every run must be a non-negative integer, there can be at most ``H*W + 1`` of them, and their sum,
computed with Python's unbounded integers (no int64 wrap-around), must equal ``H*W`` before anything
is allocated.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medsa.errors import PromptError

__all__ = ["rle_decode", "rle_encode"]


def rle_encode(mask: np.ndarray) -> list[int]:
    """Row-major run lengths of a binary mask, starting with a (possibly empty) background run."""
    flat = np.asarray(mask, dtype=bool).ravel()
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0, *runs]
    return [int(r) for r in runs]


def rle_decode(runs: Any, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`rle_encode`: bool ``shape`` mask.

    Raises:
        PromptError: ``runs`` is not a list of non-negative integers summing to ``H*W``.
    """
    h, w = (int(s) for s in shape)
    n = h * w
    bad = PromptError(
        f"mask encoding does not match the image ({w} x {h}): run lengths must be integers "
        f">= 0 that sum to {n}"
    )
    if not isinstance(runs, list | tuple) or len(runs) > n + 1:
        raise bad
    total = 0
    for r in runs:
        # bool is an int subclass; JSON true/false are not run lengths
        if type(r) is not int or r < 0 or r > n:
            raise bad
        total += r  # Python int: cannot wrap around
    if total != n:
        raise bad
    values = np.zeros(len(runs), dtype=bool)
    values[1::2] = True
    # every run is in [0, n] and they sum to n: np.repeat allocates exactly n booleans
    return np.repeat(values, np.asarray(runs, dtype=np.int64)).reshape(h, w)
