"""medsa.engine.model_loading.load_model: a backbone without weights is refused unless asked for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medsa.adapters import FullFTConfig, MedSAConfig, apply_method, save_adapter
from medsa.engine.model_loading import load_model
from medsa.errors import ConfigError
from medsa.sam import build_sam


def _adapter(tmp_path: Path, method, name: str) -> Path:
    torch.manual_seed(0)
    model = apply_method(build_sam("vit_tiny"), method)
    save_adapter(model, tmp_path / name)
    return tmp_path / f"{name}.safetensors"


def test_random_backbone_refused_unless_random_weights(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'vit_tiny' has no weights.*--random-weights"):
        load_model("vit_tiny", None, None, "cpu")
    assert load_model("vit_tiny", None, None, "cpu", random_weights=True).name == "vit_tiny"
    # an adapter holding only the method's tensors leaves the backbone random: still refused,
    # with the backbone read from the adapter
    partial = _adapter(tmp_path, MedSAConfig(rank=2), "medsa")
    with pytest.raises(ConfigError, match="holds only the method's weights"):
        load_model(None, None, partial, "cpu")
    assert load_model(None, None, partial, "cpu", random_weights=True) is not None


def test_full_fine_tuning_adapter_needs_no_backbone_weights(tmp_path: Path) -> None:
    """Full fine-tuning saves every parameter: nothing random is left, so no flag is needed."""
    full = _adapter(tmp_path, FullFTConfig(), "full")
    model = load_model(None, None, full, "cpu")
    torch.manual_seed(0)
    ref = apply_method(build_sam("vit_tiny"), FullFTConfig())
    other = dict(model.named_parameters())
    assert all(torch.equal(p, other[n]) for n, p in ref.named_parameters())
    # a partly frozen full fine-tune keeps random frozen parts: refused
    part = _adapter(tmp_path, FullFTConfig(train_image_encoder=False), "decoder_only")
    with pytest.raises(ConfigError, match="--random-weights"):
        load_model(None, None, part, "cpu")


def test_unknown_backbone_is_reported_before_weights(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown model 'vit_q'"):
        load_model("vit_q", None, None, "cpu")
