"""Fixtures for tests/sam."""

from __future__ import annotations

import pytest
import torch
from sam_helpers import meta_sam, randomise


@pytest.fixture(scope="session")
def tiny_oracle(tmp_path_factory):
    """(meta_model, checkpoint_path) for a random vit_tiny SAM saved as an official-style .pth."""
    from medsa.sam.build import get_config

    ref = meta_sam(get_config("vit_tiny"))
    randomise(ref, seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "sam_vit_tiny.pth"
    torch.save(ref.state_dict(), path)
    return ref, path
