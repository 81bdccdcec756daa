"""Performance switches shared by training, inference and the benchmarks.

Everything here is an explicit function of its arguments (no global state): pick a device and a
compute dtype, open the matching autocast context, choose the attention implementation, toggle
gradient checkpointing, optionally ``torch.compile``, and measure time / peak memory.

Mixed precision keeps fp32 *master* weights: :func:`autocast_context` only changes the dtype the
matmuls / convolutions / attention run in (bf16 on CUDA and on CPUs with AVX512-BF16 / AMX), so
optimizer updates and the saved adapter weights stay fp32.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from medsa.errors import ConfigError

if TYPE_CHECKING:
    from medsa.sam.prefix_cache import PrefixCache

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


def resolve_device(name: str | torch.device | None = None) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``None`` (CUDA if available, else CPU) -> device.

    Raises:
        ConfigError: CUDA was requested but is not available.
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {name!r}; use 'cpu', 'cuda' or 'cuda:N'") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported; use 'cpu' or 'cuda'")
    return device


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"fp32" | "bf16" | "fp16"`` (or a torch dtype) -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; use one of fp32, bf16, fp16") from None


def supports_bf16(device: torch.device | str) -> bool:
    """Whether bf16 matmuls are natively fast on ``device`` (CUDA >= Ampere, CPU with AVX512-BF16)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def best_dtype(device: torch.device | str) -> torch.dtype:
    """The fastest compute dtype that is accurate enough for SAM: bf16 where native, else fp32."""
    return torch.bfloat16 if supports_bf16(device) else torch.float32


def autocast_context(
    device: torch.device | str, dtype: torch.dtype | str
) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (a no-op context for fp32).

    fp16 is only offered on CUDA (CPU fp16 autocast is slow and needs loss scaling anyway).
    """
    device = torch.device(device)
    dtype = resolve_dtype(dtype)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if dtype == torch.float16 and device.type != "cuda":
        raise ConfigError("fp16 autocast is only supported on CUDA; use bf16 on CPU")
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_attention_impl(model: nn.Module, impl: str) -> int:
    """Switch every SAM ViT / TinyViT attention in ``model`` to ``impl``; returns how many changed.

    ``impl`` is one of :data:`medsa.sam.fast_attention.ATTENTION_IMPLS`. The weights are untouched.
    For TinyViT (LiteMedSAM) ``"explicit"`` also turns off its other inference fast paths (BN
    folding, channels-last): :meth:`medsa.sam.tiny_vit.TinyViT.set_attention_impl`.
    """
    from medsa.sam.fast_attention import ATTENTION_IMPLS
    from medsa.sam.image_encoder import Attention
    from medsa.sam.tiny_vit import Attention as TinyAttention
    from medsa.sam.tiny_vit import TinyViT

    if impl not in ATTENTION_IMPLS:
        raise ConfigError(f"attention_impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    n = 0
    for m in model.modules():
        if isinstance(m, TinyViT):
            m.set_attention_impl(impl)
        elif isinstance(m, (Attention, TinyAttention)):
            m.attention_impl = impl
            n += 1
    return n


def set_grad_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Recompute encoder activations in backward (less memory, ~30% more compute).

    Applies to every :class:`medsa.sam.image_encoder.ImageEncoderViT` (per block) and
    :class:`medsa.sam.tiny_vit.TinyViT` (per stage) inside ``model``; returns the number of
    encoders changed. Checkpointing is only active in ``train()`` mode with grad enabled.
    """
    from medsa.sam.image_encoder import ImageEncoderViT
    from medsa.sam.tiny_vit import TinyViT

    n = 0
    for m in model.modules():
        if isinstance(m, (ImageEncoderViT, TinyViT)):
            m.grad_checkpointing = enabled
            n += 1
    return n


def maybe_compile(module: nn.Module, enabled: bool, mode: str | None = None) -> nn.Module:
    """``torch.compile(module)`` when ``enabled`` (the first call then compiles, minutes on CPU).

    Returns the original module when disabled, so callers can always use the return value.
    """
    if not enabled:
        return module
    if not hasattr(torch, "compile"):
        raise ConfigError("torch.compile needs torch >= 2.0")
    return torch.compile(module, mode=mode)  # type: ignore[return-value]


def first_adapted_block(model: nn.Module) -> int:
    """0-based index (over ``medsa.adapters.encoder_blocks``) of the first encoder block that
    trains or carries an adapter hook (the number of blocks when none does). The encoder itself
    checks at each call that everything before that block is frozen (stem, merges)."""
    from medsa.adapters import encoder_blocks
    from medsa.sam.prefix_cache import prefix_is_frozen

    blocks = encoder_blocks(model)
    with torch.enable_grad():
        for i, b in enumerate(blocks):
            if not prefix_is_frozen([b]):
                return i
    return len(blocks)


def attach_prefix_cache(
    model: nn.Module, max_mb: float, cache: PrefixCache | None = None
) -> PrefixCache | None:
    """Give ``model``'s image encoder a :class:`~medsa.sam.prefix_cache.PrefixCache` (``cache``
    if given and it starts no later than the first adapted block, else a new one of ``max_mb``
    MB); ``None`` (and no cache) when there is no frozen prefix, or no usable ``cache`` and
    ``max_mb`` is 0."""
    from medsa.sam.prefix_cache import PrefixCache

    start = first_adapted_block(model)
    if start < 1:
        cache = None  # nothing frozen before the first adapted block
    elif cache is None or cache.start_block > start:  # a given cache may reach adapted blocks
        cache = PrefixCache(start, int(max_mb * 2**20)) if max_mb > 0 else None
    model.image_encoder.prefix_cache = cache
    return cache


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with ``requires_grad``: give only these to the optimizer (frozen ones get no grad)."""
    return [p for p in model.parameters() if p.requires_grad]


def frozen_with_grad(model: nn.Module) -> list[str]:
    """Names of frozen parameters that nevertheless hold a ``.grad`` (should always be empty)."""
    return [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]


def synchronize(device: torch.device | str) -> None:
    """Wait for queued CUDA work (timings are otherwise meaningless); no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------
# Timing and peak memory
# --------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock seconds of repeated calls (after warm-up)."""

    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")

    @property
    def minimum(self) -> float:
        return min(self.seconds) if self.seconds else float("nan")


def time_fn(
    fn: Callable[[], object], iters: int, warmup: int = 1, device: torch.device | str = "cpu"
) -> Timing:
    """Run ``fn`` ``warmup`` times, then time ``iters`` calls individually (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = Timing()
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.seconds.append(time.perf_counter() - t0)
    return out


def _malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc), so RSS deltas reflect the block being measured."""
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory used inside a ``with`` block, in bytes above the level at entry.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensor memory only, the number to compare with a
    GPU budget). CPU: peak resident set size of the process, sampled every 5 ms on Linux (torch's
    CPU allocator is invisible to ``tracemalloc``); a coarse but honest number for comparisons
    made in the same process. ``peak_bytes`` is ``None`` where it cannot be measured.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self._base = 0
        self._max = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._max = max(self._max, _rss_bytes())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif os.path.exists("/proc/self/statm"):
            _malloc_trim()
            self._base = self._max = _rss_bytes()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._base
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, _rss_bytes())
            self.peak_bytes = self._max - self._base


@contextlib.contextmanager
def num_threads(n: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op CPU threads (``None``: unchanged)."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)
