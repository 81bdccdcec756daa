"""Smoke run of benchmarks/bench_evaluate.py on the tiny model (no timing assertions): both
variants run and give identical metric rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
torch = pytest.importorskip("torch")


def test_bench_evaluate_smoke(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_evaluate

    out = tmp_path / "e.json"
    threads = torch.get_num_threads()
    rc = bench_evaluate.main(
        ["--n", "3", "--size", "64", "--source", "no-such-dataset", "--backbone", "vit_tiny",
         "--blocks", "2", "--workers", "0", "--batch-size", "2", "--threads", "1",
         "--json", str(out)]
    )  # fmt: skip
    torch.set_num_threads(threads)  # --threads 1 must not leak into later tests
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["identical"] is True and res["data"] == "synthetic (3 images)"
    assert set(res["seconds"]) == {"sequential", "pipelined"}
    assert "| pipelined | 0 | 2 |" in capsys.readouterr().out
