"""Volume evaluation protocols with propagation (``medsa evaluate --protocols keyslice-box,...``).

The paper's 3D protocol (``slice``: the per-slice protocols ``box``, ``3pt``, ... of
:mod:`medsa.engine.inference`) prompts every slice that contains the target and leaves every other
slice empty, so a false-positive slice cannot happen. The key-slice protocols measure what a user
of a propagating tool gets instead:

- ``keyslice-box``: one tight box on the key slice (the slice where the object is largest), then
  :class:`medsa.engine.propagate.VolumePropagator` propagates it through the volume;
- ``keyslice-3pt``: three positive points (the ``3pt`` protocol) on the key slice, propagated.

Every slice the propagation reaches is predicted, so false positives on object-free slices count.
A class that is absent from the volume gets no prompt (an empty prediction), as in ``slice``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from medsa.data.prompts import Prompt
from medsa.errors import DataError

__all__ = ["KEYSLICE_PROTOCOLS", "is_keyslice", "key_slice", "keyslice_prompt", "predict_keyslice"]

#: propagated volume protocols (3D data only)
KEYSLICE_PROTOCOLS: tuple[str, ...] = ("keyslice-box", "keyslice-3pt")


def is_keyslice(protocol: str) -> bool:
    return protocol in KEYSLICE_PROTOCOLS


def key_slice(target: np.ndarray) -> int:
    """The slice of ``target (D, H, W)`` with the largest foreground area (the first on ties)."""
    t = np.asarray(target, dtype=bool)
    if t.ndim != 3 or not t.any():
        raise DataError("a key slice needs a non-empty (D, H, W) target")
    return int(np.argmax(t.reshape(len(t), -1).sum(1)))


def keyslice_prompt(protocol: str, target2d: np.ndarray, rng: np.random.Generator) -> Prompt:
    """The prompt of ``protocol`` on the key slice's target ``(H, W)``."""
    from medsa.data.prompts import get_protocol

    if not is_keyslice(protocol):
        raise DataError(f"{protocol!r} is not a key-slice protocol")
    return get_protocol(protocol.split("-", 1)[1])(np.asarray(target2d, bool), rng)


def predict_keyslice(
    prop: Any,
    protocol: str,
    target: np.ndarray,
    rng: np.random.Generator,
    **propagate_kwargs: Any,
) -> np.ndarray:
    """Prompt the key slice of ``target (D, H, W)`` with ``protocol`` and propagate with ``prop``
    (a :class:`~medsa.engine.propagate.VolumePropagator` of the case's volume).

    Returns the prediction ``(D, H, W)`` bool (all empty if the target is).
    """
    t = np.asarray(target, dtype=bool)
    if not t.any():
        return np.zeros_like(t)
    z = key_slice(t)
    prompt = keyslice_prompt(protocol, t[z], rng)
    return prop.propagate({z: prompt}, **propagate_kwargs).masks


def keyslice_predictions(
    prop: Any,
    combos: list[tuple[str, int, str]],
    gts: Mapping[str, np.ndarray],
    rngs: Mapping[tuple[str, int, str], np.random.Generator],
) -> dict[tuple[str, int, str], np.ndarray]:
    """Predictions of the key-slice ``(protocol, seed, class)`` combos of one case (evaluate's hook)."""
    return {
        c: predict_keyslice(prop, c[0], gts[c[2]], rngs[c]) for c in combos if is_keyslice(c[0])
    }
