"""LiteMedSAM (real weights) + Med-SA on two Kvasir-SEG images: one real training step through
the CLI dataset path; only the adapters change (TinyViT's frozen BatchNorm statistics included)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medsa.engine.config import config_from_dict
from medsa.engine.train import Trainer, build_datasets, build_model

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "Kvasir-SEG"

pytestmark = [pytest.mark.slow, pytest.mark.realdata]


@pytest.mark.skipif(not DATA.is_dir(), reason="../shared/data/Kvasir-SEG is not available")
def test_lite_medsam_medsa_step_on_kvasir(tmp_path: Path) -> None:
    cfg = config_from_dict(
        {
            "model": {"backbone": "lite_medsam"},
            "method": {"method": "medsa", "rank": 8, "blocks": "10"},
            "data": {"root": str(DATA), "max_train_items": 2, "max_val_items": 1},
            "prompts": {"protocols": {"1pt": 1.0}},
            "optim": {"lr": 1e-3},
            "train": {"max_steps": 1, "batch_size": 2, "device": "cpu", "out_dir": str(tmp_path)},
            "logging": {"progress": False, "tensorboard": False},
        }
    )
    model = build_model(cfg)
    train, val, split = build_datasets(cfg, model)
    item = train[0]
    assert item["image"].shape == (3, 256, 256) and item["target"].shape == (256, 256)
    assert float(item["image"].max()) > 1.0  # model input range [0, 255], normalised by the model
    assert not set(split["test"]) & set(split["train"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tr = Trainer(cfg, train, val, model=model)
    tr.fit()
    tunable = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and changed <= tunable
    assert (tmp_path / "checkpoints" / "best.safetensors").is_file()
