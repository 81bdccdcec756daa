"""Cache of the frozen prefix of an image encoder (features entering the first adapted block).

Adapters are often placed in the last blocks only (LiteMedSAM presets: TinyViT blocks 9-10;
Med-SA Table 7b: the deep half of ViT-H). The blocks before them are frozen and hook-free, so
their output depends on the image alone: it can be computed once per image and reused by every
later epoch, every click of an iterative-prompt step, every validation pass and, in
``medsa reproduce``, every method trained on the same images. On the LiteMedSAM encoder the
prefix before block 9 is ~80 % of the encoder's forward time on a CPU.

The cache is an explicit object attached to an encoder (``encoder.prefix_cache = cache``, not a
module, so state dicts are unchanged). It is only used while it is exact:

- no prefix block carries an adapter hook, the input does not require grad and, while autograd
  records (training), every parameter of the prefix is frozen (``requires_grad=False``);
- entries are keyed by the image's bytes **and** a fingerprint of the prefix weights (identity
  and in-place version counter of every prefix tensor), so loading other weights, or another
  model with the same checkpoint, never returns stale features for different weights;
- BatchNorm in the frozen prefix normalises with its running statistics in train mode too
  (``tiny_vit.Conv2d_BN``), so train- and eval-mode prefixes agree.

Otherwise the encoder runs its ordinary forward. Entries are stored as ordinary tensors
(usable by autograd later even when computed under ``torch.inference_mode``) and evicted
least-recently-used beyond ``max_bytes``.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["PrefixCache", "HOOK_NAMES", "prefix_is_frozen"]

#: adapter hook attributes of the encoder blocks and their attention (None = no adapter)
HOOK_NAMES = (
    "qkv_delta",
    "proj_delta",
    "pre_attn_adapter",
    "attn_adapter",
    "depth_branch",
    "pre_mlp_adapter",
    "mlp_adapter",
)


def prefix_is_frozen(modules: Iterable[nn.Module], extra: Iterable[torch.Tensor] = ()) -> bool:
    """True when no module carries an adapter hook and, while autograd records, no parameter
    of ``modules`` (or tensor of ``extra``) requires grad. (Without grad recording trainable
    weights are constant for the call; a later optimizer step changes their version counter and
    with it the cache's weight fingerprint.)"""
    grad = torch.is_grad_enabled()
    if grad and any(t.requires_grad for t in extra):
        return False
    for mod in modules:
        for m in mod.modules():
            if any(getattr(m, h, None) is not None for h in HOOK_NAMES):
                return False
            if grad and any(p.requires_grad for p in m.parameters(recurse=False)):
                return False
    return True


class PrefixCache:
    """LRU cache of encoder-prefix features, shared by any number of encoders / models.

    Args:
        start_block: 0-based index (over the encoder's adapter-hook blocks, as
            ``medsa.adapters.encoder_blocks``) of the first block **not** cached; the cached
            features are the input of that block.
        max_bytes: memory budget; least recently used entries are dropped beyond it.
    """

    def __init__(self, start_block: int, max_bytes: int = 2 << 30) -> None:
        if start_block < 1:
            raise ValueError(f"start_block must be >= 1 (a prefix to cache), got {start_block}")
        self.start_block = int(start_block)
        self.max_bytes = int(max_bytes)
        self._store: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._fingerprints: dict[tuple, str] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._store)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        self._store.clear()
        self._bytes = 0
        self._fingerprints.clear()

    def _fingerprint(self, modules: list[nn.Module], extra: list[torch.Tensor]) -> str:
        """Identity of the prefix weights: content hash, memoised on (tensor id, version)."""
        tensors = [t for mod in modules for t in (*mod.parameters(), *mod.buffers())] + extra
        state = tuple((id(t), t._version, t.data_ptr()) for t in tensors)
        fp = self._fingerprints.get(state)
        if fp is None:
            h = hashlib.sha1()
            for t in tensors:
                h.update(str((tuple(t.shape), t.dtype)).encode())
                h.update(
                    t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                )
            fp = h.hexdigest()
            if len(self._fingerprints) > 64:  # ids of dead models; keep the memo small
                self._fingerprints.clear()
            self._fingerprints[state] = fp
        return fp

    @staticmethod
    def _image_key(x: torch.Tensor) -> str:
        h = hashlib.sha1(str((tuple(x.shape), x.dtype)).encode())
        h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def features(
        self,
        x: torch.Tensor,
        modules: list[nn.Module],
        compute: Callable[[torch.Tensor], torch.Tensor],
        extra: Iterable[torch.Tensor] = (),
    ) -> torch.Tensor:
        """Prefix features of the batch ``x: (B, ...)``; ``compute`` runs the prefix on the
        images that are not cached (one batched call); ``modules`` (and ``extra`` tensors such
        as a position embedding) hold the prefix weights."""
        fp = self._fingerprint(modules, list(extra))
        keys = [(fp, self._image_key(x[i])) for i in range(x.shape[0])]
        missing = [i for i, k in enumerate(keys) if k not in self._store]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            with torch.no_grad():
                out = compute(x[missing])
            with torch.inference_mode(False):
                # clone(): ordinary tensors (not inference tensors), one entry per image
                for j, i in enumerate(missing):
                    fresh[i] = out[j].clone()
        feats = []
        for i, k in enumerate(keys):
            if i in fresh:
                self._put(k, fresh[i])
                feats.append(fresh[i])
            else:
                self._store.move_to_end(k)
                feats.append(self._store[k])
        return torch.stack(feats)

    def _put(self, key: tuple[str, str], t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if key in self._store or size > self.max_bytes:
            return
        self._store[key] = t
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, old = self._store.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()
