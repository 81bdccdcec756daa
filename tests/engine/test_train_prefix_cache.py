"""Training with the frozen-prefix cache (``train.prefix_cache_mb``) gives the same model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medsa.engine.config import config_from_dict
from medsa.engine.train import Trainer, build_model
from medsa.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64


class Squares(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.items = []
        for i in range(n):
            img = 30 + 8 * torch.randn(3, SIZE, SIZE, generator=g)
            tgt = torch.zeros(SIZE, SIZE)
            y, x = 6 + 5 * i, 10 + 4 * i
            img[:, y : y + 20, x : x + 24] += 180
            tgt[y : y + 20, x : x + 24] = 1
            self.items.append({"image": img, "target": tgt})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _cfg(tmp: Path, mb: float | None, blocks: str = "2") -> object:
    return config_from_dict(
        {
            "model": {"backbone": "vit_tiny", "options": {"img_size": SIZE}},
            "method": {"method": "medsa", "rank": 4, "blocks": blocks},
            "prompts": {"protocols": {"1pt": 0.5, "bbox0.75": 0.5}, "clicks": 1},
            "optim": {"lr": 3e-3, "warmup_steps": 1},
            "train": {
                "epochs": 3,  # each image is seen three times: hits from the second epoch on
                "batch_size": 2,
                "device": "cpu",
                "out_dir": str(tmp),
                "prefix_cache_mb": mb,
            },
            "logging": {"progress": False, "tensorboard": False},
        }
    )


def _train(cfg) -> Trainer:
    torch.manual_seed(0)
    tr = Trainer(cfg, Squares(4), model=build_model(cfg))
    tr.fit()
    return tr


def test_cached_training_equals_uncached_training(tmp_path: Path) -> None:
    cached = _train(_cfg(tmp_path / "a", None))  # auto: on, on the CPU
    plain = _train(_cfg(tmp_path / "b", 0))
    assert plain.prefix_cache is None and plain.model.image_encoder.prefix_cache is None
    cache = cached.prefix_cache
    assert cache is not None and cache.start_block == 1  # blocks "2" (1-based) adapt
    assert cache.misses == 4 and cache.hits == 8  # 4 images x 3 epochs
    a = [h["loss"] for h in cached.history if "loss" in h]
    b = [h["loss"] for h in plain.history if "loss" in h]
    assert len(a) == len(b) == 6 and a == pytest.approx(b, rel=1e-4, abs=1e-6)
    pa = dict(cached.model.named_parameters())
    for k, p in plain.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(pa[k], p, rtol=1e-4, atol=1e-6)


def test_no_cache_when_the_first_block_adapts(tmp_path: Path) -> None:
    tr = _train(_cfg(tmp_path, None, blocks="all"))
    assert tr.prefix_cache is None


def test_prefix_cache_mb_must_not_be_negative(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="prefix_cache_mb"):
        _cfg(tmp_path, -1)
