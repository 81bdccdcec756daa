"""Leakage-free splits by case (or group of cases): K folds, train/val/test, JSON files."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medsa._fs import atomic_write_text
from medsa.errors import ConfigError, DataError

__all__ = ["make_splits", "train_val_test_split", "save_splits", "load_splits"]


def _groups(case_ids: Sequence[str], group_pattern: str | None) -> dict[str, list[str]]:
    rx = re.compile(group_pattern) if group_pattern else None
    groups: dict[str, list[str]] = {}
    for cid in sorted(set(case_ids)):
        key = cid
        if rx is not None:
            m = rx.search(cid)
            key = (m.group(1) if m.groups() else m.group(0)) if m else cid
        groups.setdefault(key, []).append(cid)
    return groups


def make_splits(
    case_ids: Sequence[str], n_folds: int = 5, seed: int = 0, group_pattern: str | None = None
) -> list[dict[str, list[str]]]:
    """Seeded K-fold splits by case (nnU-Net ``splits_final.json`` format: ``[{"train", "val"}]``).

    Args:
        group_pattern: regex whose first group (or match) names a group of cases kept together,
            e.g. ``r"^(patient\\d+)"`` so both ACDC frames of a patient land in the same fold.
    """
    groups = _groups(case_ids, group_pattern)
    if n_folds < 2 or n_folds > len(groups):
        raise ConfigError(
            f"n_folds must be in [2, {len(groups)}] (number of case groups), got {n_folds}"
        )
    keys = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(keys))
    folds = np.array_split(order, n_folds)
    out = []
    for f in folds:
        val_keys = {keys[i] for i in f}
        val = sorted(c for k in val_keys for c in groups[k])
        train = sorted(c for k in keys if k not in val_keys for c in groups[k])
        out.append({"train": train, "val": val})
    return out


def train_val_test_split(
    case_ids: Sequence[str],
    val: float = 0.1,
    test: float = 0.2,
    seed: int = 0,
    group_pattern: str | None = None,
) -> dict[str, list[str]]:
    """Seeded ``{"train", "val", "test"}`` split by case group (each part non-empty when possible)."""
    if val < 0 or test < 0 or val + test >= 1:
        raise ConfigError(f"need 0 <= val, test and val + test < 1, got val={val}, test={test}")
    groups = _groups(case_ids, group_pattern)
    keys = sorted(groups)
    order = [keys[i] for i in np.random.default_rng(seed).permutation(len(keys))]
    n = len(order)
    n_test = max(1, round(test * n)) if test > 0 and n >= 3 else 0
    n_val = max(1, round(val * n)) if val > 0 and n - n_test >= 2 else 0
    parts = {
        "test": order[:n_test],
        "val": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
    }
    return {k: sorted(c for g in v for c in groups[g]) for k, v in parts.items()}


def save_splits(
    splits: list[dict[str, list[str]]] | dict[str, list[str]], path: str | os.PathLike[str]
) -> Path:
    """Write splits as JSON (atomically)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(p, json.dumps(splits, indent=2))


def load_splits(
    path: str | os.PathLike[str], known_ids: Sequence[str] | None = None
) -> list[dict[str, list[str]]]:
    """Read ``splits_final.json`` (list of folds) or a single ``{"train", "val"[, "test"]}`` dict.

    Raises:
        DataError: unreadable/malformed file, a case in two parts of one fold (leakage), or (with
            ``known_ids``) ids that are not in the dataset.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: cannot read splits ({e})") from None
    folds = [data] if isinstance(data, dict) else data
    if not isinstance(folds, list) or not folds:
        raise DataError(f"{p}: expected a list of {{'train': [...], 'val': [...]}} folds")
    known = set(known_ids) if known_ids is not None else None
    for k, fold in enumerate(folds):
        if not isinstance(fold, dict) or "train" not in fold or "val" not in fold:
            raise DataError(f"{p}: fold {k} needs 'train' and 'val' lists")
        parts = {name: set(map(str, ids)) for name, ids in fold.items()}
        names = sorted(parts)
        for a_i, a in enumerate(names):
            for b in names[a_i + 1 :]:
                both = parts[a] & parts[b]
                if both:
                    raise DataError(
                        f"{p}: fold {k}: case(s) {sorted(both)[:5]} in both {a!r} and {b!r}"
                    )
        if known is not None:
            unknown = set().union(*parts.values()) - known
            if unknown:
                raise DataError(f"{p}: fold {k}: unknown case id(s) {sorted(unknown)[:5]}")
    return [{name: list(map(str, ids)) for name, ids in fold.items()} for fold in folds]
