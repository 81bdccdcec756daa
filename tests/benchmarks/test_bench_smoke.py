"""Smoke runs of the benchmark scripts (tiny model, one round) so that they do not rot.

No timing assertions: only that every script runs end to end, compares medsa with
segment-anything on the same weights, and writes its table / JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
pytest.importorskip("segment_anything")

# Tiny everywhere: vit_tiny at 64 px (4x4 tokens), one timed round, one thread.
TINY = ["--device", "cpu", "--backbone", "vit_tiny", "--img-size", "64", "--iters", "1"]
TINY += ["--warmup", "0", "--threads", "1"]


@pytest.fixture(autouse=True)
def _bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_bench_encoder(tmp_path: Path) -> None:
    import bench_encoder

    out = bench_encoder.main(
        [*TINY, "--medsa", "sdpa_folded:fp32", "sdpa_bias:bf16", "--json", str(tmp_path / "e.json")]
    )
    names = [r["name"] for r in out["rows"]]
    assert names[0] == "segment-anything | explicit | fp32"
    assert "medsa | sdpa_folded | fp32" in names and "medsa | sdpa_bias | bf16" in names
    rows = {r["name"]: r for r in out["rows"]}
    # Same weights, same input: fp32 medsa reproduces segment-anything, bf16 within bf16 error.
    assert rows["medsa | sdpa_folded | fp32"]["rel_err_vs_sa_fp32"] < 1e-5
    assert rows["medsa | sdpa_bias | bf16"]["rel_err_vs_sa_fp32"] < 3e-2
    assert json.loads((tmp_path / "e.json").read_text())["env"]["threads"] == 1


def test_bench_train_step(tmp_path: Path, capsys) -> None:
    import bench_train_step

    out = bench_train_step.main([*TINY, "--batch", "2", "--medsa", "sdpa_folded:bf16:ckpt"])
    assert [r["name"].split(" | ")[0] for r in out["rows"]] == [
        "reference-style (segment-anything)",
        "medsa",
    ]
    assert all(len(r["seconds"]) == 1 and r["seconds"][0] > 0 for r in out["rows"])
    assert out["trainable_params"]["medsa"] > 0 and out["trainable_params"]["reference"] > 0
    assert "| medsa " in capsys.readouterr().out


def test_bench_prompt_and_run_all_report(tmp_path: Path) -> None:
    import run_all

    report = run_all.main(
        ["--quick", "--threads", "1", "--only", "prompt", "--out", str(tmp_path / "r.md")]
    )
    text = report.read_text()
    assert "Prompt-to-mask latency" in text
    for case in ("1 box, 1 mask", "1 point, 3 masks", "2 boxes batched", "set_image, seen image"):
        assert case in text


def test_bench_prompt_bf16() -> None:
    import bench_prompt

    out = bench_prompt.main([*TINY, "--image-size", "48", "--prompts", "3", "--dtype", "bf16"])
    names = {r["name"] for r in out["rows"]}
    assert "medsa | 3 boxes batched" in names and "segment-anything | 3 boxes batched" in names
    assert out["cache"] == {"hits": 1, "misses": 1}  # the seen-image row hit medsa's cache


def test_run_all_help_imports_every_script() -> None:
    import subprocess

    # run_all imports the three benchmark modules; argparse exits before any model is built.
    res = subprocess.run(
        [sys.executable, str(BENCH / "run_all.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "--quick" in res.stdout


def test_step_cost_counts_flops_and_memory() -> None:
    """The device-independent step cost: every row has work and memory, bf16 saves smaller
    activations than fp32, checkpointing saves fewer per image but recomputes (more FLOPs)."""
    import step_cost

    out = step_cost.main([*TINY, "--medsa", "sdpa_folded:fp32", "sdpa_folded:bf16:ckpt"])
    rows = {r["name"].split(" | ", 1)[1] if "medsa" in r["name"] else "ref": r for r in out["rows"]}
    assert set(rows) == {"ref", "sdpa_folded | fp32 | no", "sdpa_folded | bf16 | yes"}
    for r in rows.values():
        assert r["flops_per_image"] > 0 and r["saved_bytes_per_image"] > 0
        assert r["projected_bytes"] > r["param_grad_optimizer_bytes"]
    fp32, ckpt = rows["sdpa_folded | fp32 | no"], rows["sdpa_folded | bf16 | yes"]
    assert ckpt["saved_bytes_per_image"] < fp32["saved_bytes_per_image"]
    assert ckpt["flops_per_image"] > fp32["flops_per_image"]


def test_gpu_plan_arguments_parse() -> None:
    """The --gpu plan cannot run here, but every run in it must at least parse (no rot)."""
    import argparse

    import run_all

    args = argparse.Namespace(
        device="cuda", threads=None, quick=False, gpu=True, iters=3, train_img_size=512
    )
    runs = run_all.plan(args)
    labels = [label for label, _, _ in runs]
    assert "encoder vit_b attention" in labels and "cost vit_h" in labels
    for _, module, argv in runs:
        module.build_parser().parse_args(argv)


def test_bench_lite_medsam_tiny(tmp_path: Path) -> None:
    """The LiteMedSAM benchmark on a tiny random TinyViT: every path agrees with the unfused
    model, ONNX Runtime rows included (encoder and prompt -> mask)."""
    pytest.importorskip("onnxruntime")
    import bench_lite_medsam

    args = ["--tiny", "--iters", "1", "--warmup", "0", "--threads", "1", "--prompt-iters", "1"]
    out = bench_lite_medsam.main([*args, "--image-size", "48", "--json", str(tmp_path / "l.json")])
    rows = {r["name"]: r for r in out["rows"]}
    assert {"medsa | explicit | fp32", "medsa | auto | fp32", "ONNX Runtime | - | fp32"} <= set(
        rows
    )
    assert rows["medsa | explicit | fp32"]["max_abs_diff"] == 0.0  # the baseline of --tiny
    assert rows["medsa | auto | fp32"]["max_abs_diff"] < 1e-4
    assert rows["ONNX Runtime | - | fp32"]["max_abs_diff"] < 1e-4
    prompts = {r["name"]: r for r in out["prompt_rows"]}
    assert prompts["ONNX Runtime | 1 box, 1 mask"]["max_abs_diff_vs_torch"] < 1e-4
    assert prompts["PyTorch | 1 point, 3 masks"]["seconds"][0] > 0
    assert "prompt -> mask" in json.dumps(json.loads((tmp_path / "l.json").read_text()))
