"""Previous-mask feedback: the low-resolution logits of a prediction, fed back on the next click.

SAM's interactive loop gives the decoder the previous round's low-resolution mask logits as
``mask_input`` together with all clicks so far. The page does not hold the logits (they are float
``(1, 256, 256)`` arrays); each candidate of a ``/api/predict`` answer carries an opaque token and the
page sends back the token of the mask the user is looking at (per object and slice). Undo goes back
to the token of the previous state, so the feedback always matches the remaining prompts.
"""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from medsa.errors import PromptError

__all__ = ["LogitStore"]


@dataclass(frozen=True)
class _Entry:
    image: str
    slice: int
    logits: np.ndarray  # (1, h, w) float16


class LogitStore:
    """Bounded LRU of low-res logits by token (float16: 128 kB per 256 x 256 mask)."""

    def __init__(self, capacity: int = 512) -> None:
        self.capacity = capacity
        self._data: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def put(self, image: str, z: int, logits: np.ndarray) -> str:
        """Store ``(1, h, w)`` (or ``(h, w)``) logits of slice ``z``; returns the token."""
        token = secrets.token_hex(8)
        # clipped: float16 overflows to inf beyond 65504, which the decoder would refuse
        arr = np.clip(np.asarray(logits, dtype=np.float32), -1e4, 1e4).astype(np.float16)
        arr = arr.reshape(1, *arr.shape[-2:])
        with self._lock:
            self._data[token] = _Entry(image, z, arr)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)
        return token

    def get(self, token: str, image: str, z: int) -> np.ndarray | None:
        """float32 ``(1, h, w)`` logits of ``token``, or ``None`` when it was evicted.

        Raises:
            PromptError: the token belongs to another image or slice.
        """
        with self._lock:
            e = self._data.get(token)
            if e is not None:
                self._data.move_to_end(token)
        if e is None:
            return None
        if e.image != image or e.slice != z:
            raise PromptError("mask_input belongs to another image or slice")
        return e.logits.astype(np.float32)
