"""Shared helpers for the adapter tests: tiny random SAM backbones and adapter perturbation."""

from __future__ import annotations

import pytest
import torch


def build_tiny(seed: int = 0, name: str = "vit_tiny"):
    """A random-initialised test backbone; the same seed gives the same weights."""
    from medsa.sam import build_sam

    torch.manual_seed(seed)
    return build_sam(name).eval()


def randomize_adapters(model: torch.nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Give every adapter parameter (zero-initialised ones included) random values, so tests can
    check that the hooks actually change the computation."""
    from medsa.adapters import AdapterModule

    g = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AdapterModule):
                for p in m.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def tiny():
    """``tiny(seed=0, name="vit_tiny")`` builds a random test backbone."""
    return build_tiny


@pytest.fixture
def randomize():
    """``randomize(module, seed=1, std=0.1)`` fills every adapter parameter with noise."""
    return randomize_adapters


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every adapter test runs on one thread (tiny models; see ``one_thread``)."""
