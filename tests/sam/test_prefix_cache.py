"""medsa.sam.prefix_cache: the frozen encoder prefix computed once per image, exactly.

Random tiny ViT / TinyViT encoders; every cached result is compared with the same encoder
without a cache.
"""

from __future__ import annotations

import copy

import pytest
import torch
from sam_helpers import randomise, tiny_tinyvit_config

from medsa.adapters import MedSAConfig, apply_method, encoder_blocks
from medsa.engine.perf import attach_prefix_cache, first_adapted_block
from medsa.sam.build import build_sam_from_config, get_config
from medsa.sam.prefix_cache import PrefixCache


def _tiny_sam(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = get_config("vit_tiny")
    if kind == "tinyvit":
        cfg.encoder = tiny_tinyvit_config()
    else:
        cfg.encoder.img_size = 32
    model = build_sam_from_config(cfg, name=f"tiny_{kind}")
    randomise(model, seed=1)
    for m in model.modules():  # non-trivial BN statistics (TinyViT): exercises the frozen BN
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=["vit", "tinyvit"])
def model(request) -> torch.nn.Module:
    return _tiny_sam(request.param)


def test_cached_encoder_equals_uncached_at_every_split(model) -> None:
    enc = model.image_encoder.eval()
    x = _images(3)
    with torch.inference_mode():
        ref = enc(x)
        n = len(encoder_blocks(model))
        for start in range(1, n + 1):  # n: the whole encoder before the neck is cached
            cache = PrefixCache(start)
            enc.prefix_cache = cache
            first = enc(x)
            again = enc(x[[2, 0]])  # served from the cache, in another order
            torch.testing.assert_close(first, ref, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(again, ref[[2, 0]], rtol=1e-5, atol=1e-5)
            assert (cache.misses, cache.hits, len(cache)) == (3, 2, 3), start


def test_a_new_image_or_new_weights_miss_the_cache(model) -> None:
    enc = model.image_encoder.eval()
    cache = PrefixCache(2)
    enc.prefix_cache = cache
    x = _images(2)
    with torch.inference_mode():
        enc(x)
        y = x.clone()
        y[1, 0, 0, 0] += 1.0  # one pixel
        enc(y)
        assert (cache.hits, cache.misses) == (1, 3)
        # other weights in the prefix (load_state_dict, an optimizer step): recomputed
        other = _tiny_sam("vit" if hasattr(enc, "pos_embed") else "tinyvit")
        randomise(other, seed=7)
        model.load_state_dict(other.state_dict())
        out = enc(x)
        enc.prefix_cache = None
        torch.testing.assert_close(out, enc(x), rtol=1e-5, atol=1e-5)
    assert cache.misses == 5


def test_adapted_model_trains_the_same_with_the_cache(model) -> None:
    """Med-SA adapters in the last block only: the cached prefix gives the same loss and the
    same adapter gradients as the full forward, in train mode, also for entries that were made
    under inference_mode (validation before training)."""
    n = len(encoder_blocks(model))
    apply_method(model, MedSAConfig(rank=4, blocks=str(n)))
    assert first_adapted_block(model) == n - 1
    for p in model.image_encoder.parameters():  # adapter weights non-zero: real gradients
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.1)
    plain = copy.deepcopy(model)
    cache = attach_prefix_cache(model, 64)
    assert cache is not None and cache.start_block == n - 1
    x = _images(2)
    with torch.inference_mode():
        model.eval()
        model.image_encoder(x)  # entries made in inference mode
    model.train()
    plain.train()
    for _ in range(2):  # second pass: hits
        out = model.image_encoder(x)
        ref = plain.image_encoder(x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        out.square().mean().backward()
        ref.square().mean().backward()
    assert cache.hits == 4 and cache.misses == 2
    grads = {k: p.grad for k, p in model.named_parameters() if p.requires_grad}
    ref_grads = {k: p.grad for k, p in plain.named_parameters() if p.requires_grad}
    assert grads.keys() == ref_grads.keys() and grads
    for k in grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6)


def test_no_cache_when_the_prefix_trains_or_carries_adapters(model) -> None:
    apply_method(model, MedSAConfig(rank=4, blocks="all"))  # block 1 has adapters
    assert first_adapted_block(model) == 0
    assert attach_prefix_cache(model, 64) is None and model.image_encoder.prefix_cache is None
    # forcing a cache onto it: hooks in the prefix, so it is never used
    cache = PrefixCache(1)
    model.image_encoder.prefix_cache = cache
    with torch.inference_mode():
        model.image_encoder.eval()(_images(1))
    assert cache.misses == cache.hits == 0


def test_trainable_prefix_is_not_cached_while_autograd_records() -> None:
    model = _tiny_sam("tinyvit").train()  # full fine-tuning: everything requires grad
    cache = PrefixCache(1)
    model.image_encoder.prefix_cache = cache
    model.image_encoder(_images(1)).sum().backward()
    assert cache.misses == cache.hits == 0
    assert model.image_encoder.patch_embed.seq[0].c.weight.grad is not None


def test_lru_eviction_keeps_the_memory_budget(model) -> None:
    enc = model.image_encoder.eval()
    with torch.inference_mode():
        one = PrefixCache(1)
        enc.prefix_cache = one
        enc(_images(1))
        per_image = one.nbytes
        cache = PrefixCache(1, max_bytes=2 * per_image)
        enc.prefix_cache = cache
        x = _images(3)
        enc(x[:1])
        enc(x[1:])  # three entries for two slots: the oldest goes
        assert len(cache) == 2 and cache.nbytes == 2 * per_image
        enc(x[:1])
    assert cache.misses == 4


def test_start_block_must_leave_a_prefix() -> None:
    with pytest.raises(ValueError, match="start_block"):
        PrefixCache(0)


def test_a_shared_cache_that_reaches_into_adapted_blocks_is_not_used(model) -> None:
    n = len(encoder_blocks(model))
    apply_method(model, MedSAConfig(rank=4, blocks=str(n)))  # first adapted: n - 1
    shared = PrefixCache(n - 1)
    assert attach_prefix_cache(model, 0, shared) is shared
    assert attach_prefix_cache(model, 0, PrefixCache(n)) is None  # and no new one of 0 MB
    assert model.image_encoder.prefix_cache is None
    own = attach_prefix_cache(model, 8, PrefixCache(n))
    assert own is not None and own.start_block == n - 1 and own.max_bytes == 8 * 2**20
