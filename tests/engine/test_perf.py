"""medsa.engine.perf: device/dtype resolution, autocast selection, peak memory, timing."""

from __future__ import annotations

import contextlib

import pytest
import torch

from medsa.engine import perf
from medsa.errors import ConfigError


def test_resolve_dtype_and_errors() -> None:
    assert perf.resolve_dtype("bf16") is torch.bfloat16
    assert perf.resolve_dtype("FP32") is torch.float32
    assert perf.resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ConfigError, match="unknown dtype"):
        perf.resolve_dtype("int3")


def test_resolve_device() -> None:
    assert perf.resolve_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="unknown device"):
        perf.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA"):
            perf.resolve_device("cuda")


def test_autocast_context_selection() -> None:
    assert isinstance(perf.autocast_context("cpu", "fp32"), contextlib.nullcontext)
    with pytest.raises(ConfigError, match="fp16"):
        perf.autocast_context("cpu", "fp16")
    lin = torch.nn.Linear(8, 8)
    with perf.autocast_context("cpu", "bf16"):
        y = lin(torch.randn(2, 8))
    assert y.dtype is torch.bfloat16 and lin.weight.dtype is torch.float32


def test_peak_memory_cpu_sees_an_allocation() -> None:
    with perf.PeakMemory("cpu") as pm:
        x = torch.ones(16 * 1024 * 1024)  # 64 MiB, touched
        x += 1
    assert pm.peak_bytes is not None
    assert pm.peak_bytes >= 48 * 1024 * 1024


def test_time_fn_counts_iterations() -> None:
    calls = []
    t = perf.time_fn(lambda: calls.append(1), iters=3, warmup=2)
    assert len(calls) == 5 and len(t.seconds) == 3 and t.median >= 0


def test_trainable_and_frozen_helpers() -> None:
    m = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    m[0].requires_grad_(False)
    assert perf.trainable_parameters(m) == list(m[1].parameters())
    m(torch.randn(3, 4)).sum().backward()
    assert perf.frozen_with_grad(m) == []
    m[0].weight.grad = torch.zeros(4, 4)
    assert perf.frozen_with_grad(m) == ["0.weight"]


def test_maybe_compile_disabled_returns_module() -> None:
    m = torch.nn.Linear(2, 2)
    assert perf.maybe_compile(m, enabled=False) is m


def test_set_grad_checkpointing_reaches_vit_and_tinyvit_encoders() -> None:
    from medsa.engine.perf import set_grad_checkpointing
    from medsa.sam import build_sam
    from medsa.sam.build import build_sam_from_config, get_config

    vit = build_sam("vit_tiny")
    lite = build_sam_from_config(get_config("lite_medsam"), name="lite_medsam")  # no weights
    for model in (vit, lite):
        assert model.image_encoder.grad_checkpointing is False
        assert set_grad_checkpointing(model, True) == 1
        assert model.image_encoder.grad_checkpointing is True
        assert set_grad_checkpointing(model, False) == 1
        assert model.image_encoder.grad_checkpointing is False
