"""Smoke run of benchmarks/bench_propagate.py (tiny model, a few slices) so that it does not rot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
pytest.importorskip("segment_anything")  # benchmarks/_common imports it


@pytest.fixture(autouse=True)
def _bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_propagate(tmp_path: Path, capsys) -> None:
    import bench_propagate

    out = bench_propagate.main(
        ["--model", "vit_tiny", "--slices", "4", "--size", "32", "--batch", "2", "--batch1"]
        + ["--threads", "1", "--json", str(tmp_path / "p.json")]
    )
    assert set(out["seconds"]) == {
        "encoder only",
        "encoder only, batch 1",
        "propagate (cold)",
        "propagate (cached)",
    }
    assert all(t > 0 for t in out["seconds"].values())
    assert 1 <= out["visited"] <= 4 and out["encoded_cold"] >= 1
    assert "x encoder (CPU)" in capsys.readouterr().out
    assert set(out["cpu_seconds"]) == set(out["seconds"])
    assert json.loads((tmp_path / "p.json").read_text())["seconds"]["encoder only"] > 0
