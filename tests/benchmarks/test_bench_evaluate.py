"""Smoke run of benchmarks/bench_evaluate.py on the tiny model (no timing assertions): the
variants run, the fast ones give identical metric rows, the unfused "before" model nearly so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
torch = pytest.importorskip("torch")


@pytest.mark.parametrize("runtime", ["torch", "onnx"])
def test_bench_evaluate_smoke(runtime: str, tmp_path: Path, monkeypatch, capsys) -> None:
    if runtime == "onnx":
        pytest.importorskip("onnxruntime")
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_evaluate

    out = tmp_path / "e.json"
    threads = torch.get_num_threads()
    rc = bench_evaluate.main(
        ["--n", "3", "--size", "64", "--source", "no-such-dataset", "--backbone", "vit_tiny",
         "--blocks", "2", "--workers", "0", "--batch-size", "2", "--threads", "1",
         "--runtime", runtime, "--json", str(out)]
    )  # fmt: skip
    torch.set_num_threads(threads)  # --threads 1 must not leak into later tests
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["identical"] is True and res["data"] == "synthetic (3 images)"
    assert set(res["seconds"]) == {"before", "sequential", "pipelined"}
    # the same weights: the fused paths / ONNX Runtime differ from the explicit maths by float
    # rounding only (another random model gave 0.07 here)
    assert res["before_max_row_dice_diff"] < 0.01
    assert res["mean_dice"]["before"].keys() == res["mean_dice"]["pipelined"].keys()
    assert f"| pipelined | auto | {runtime} | 0 | 2 |" in capsys.readouterr().out
