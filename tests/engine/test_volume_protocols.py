"""Key-slice (propagated) volume protocols in ``medsa evaluate`` (medsa.engine.volume_protocols)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from medsa.data.io import Image
from medsa.engine.evaluate import EvalConfig, evaluate_model
from medsa.engine.volume_protocols import key_slice, keyslice_prompt
from medsa.errors import ConfigError, DataError


@dataclass
class _Case:
    id: str


class DiscVolumes:
    """Duck-typed 3D ``DatasetInfo``: a bright disc (class "lv") on slices 2..5 of 9; with
    ``decoy`` the same bright disc is also on slice 6 but NOT labelled (a false-positive trap)."""

    def __init__(self, decoy: bool) -> None:
        self.dim, self.root, self.decoy = 3, Path("synthetic"), decoy
        self.classes = {"lv": 1}
        self.cases = [_Case("case0")]

    def load_case(self, case: _Case):
        yy, xx = np.mgrid[:40, :48]
        lv = np.zeros((9, 40, 48), bool)
        for z, r in zip(range(2, 6), (6, 9, 8, 7), strict=True):
            lv[z] = (yy - 20) ** 2 + (xx - 24) ** 2 <= r * r
        img = np.where(lv, 1000.0, 0.0).astype(np.float32)
        if self.decoy:
            img[6][(yy - 20) ** 2 + (xx - 24) ** 2 <= 36] = 1000.0
        img += np.random.default_rng(0).normal(0, 5, img.shape).astype(np.float32)
        return Image(img, spacing=(2.0, 1.0, 1.0)), {"lv": lv}


def _dice(res, protocol: str) -> float:
    return float(res.summary[protocol]["classes"]["lv"]["dice"]["mean"])


def test_false_positive_slice_counts_only_in_keyslice_protocols(component):
    cfg = EvalConfig(
        protocols=("box", "keyslice-box", "keyslice-3pt"), seeds=(0, 1), noc_clicks=0, worst_k=0
    )
    clean = evaluate_model(component(), DiscVolumes(decoy=False), config=cfg)
    trap = evaluate_model(component(), DiscVolumes(decoy=True), config=cfg)
    for prot in ("box", "keyslice-box", "keyslice-3pt"):
        assert _dice(clean, prot) == 1.0, prot  # the propagation itself is exact here
    # slice protocol: slice 6 has no target, so it is never prompted -> still perfect
    assert _dice(trap, "box") == 1.0
    # propagated protocols predict every slice they reach: the decoy on slice 6 is a FP
    for prot in ("keyslice-box", "keyslice-3pt"):
        assert 0.8 < _dice(trap, prot) < 0.97, prot
        rows = [r for r in trap.rows if r["protocol"] == prot]
        assert len(rows) == 2 and all(r["hd95"] >= 2.0 for r in rows)  # slice 6 is 2 mm away


def test_key_slice_and_prompts():
    t = np.zeros((4, 10, 10), bool)
    t[1, 2:5, 2:5] = True
    t[2, 1:8, 1:8] = True
    assert key_slice(t) == 2
    p = keyslice_prompt("keyslice-box", t[2], np.random.default_rng(0))
    np.testing.assert_array_equal(p.box, [1, 1, 7, 7])
    p = keyslice_prompt("keyslice-3pt", t[2], np.random.default_rng(0))
    assert len(p.points) == 3 and p.box is None
    with pytest.raises(DataError):
        key_slice(np.zeros((3, 4, 4), bool))
    with pytest.raises(ConfigError, match="keyslice-box"):
        EvalConfig(protocols=("keyslice-circle",))
