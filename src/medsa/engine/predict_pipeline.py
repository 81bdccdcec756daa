"""The input loop of ``medsa predict``: read ahead in worker processes, batch encoder passes,
shard the inputs over ``torchrun`` processes.

:func:`iter_loaded` yields every job of this rank with its image already read and brought to the
model's input (``read_image`` + ``model_input`` in a worker process, ``--workers`` ahead), and
announces the next ``--batch-size`` 2D images to the predictor (``SamPredictor.expect``) so that
they share one image-encoder pass. A file that cannot be read is yielded with its error, which
the caller reports for that file only, as before.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medsa.engine.prefetch import make_executor, prefetch

__all__ = ["Loaded", "iter_loaded", "reduce_counts"]


@dataclass
class Loaded:
    """A read input: the ``medsa.data.io.Image`` and its model input ``x`` (``(H, W, 3)`` /
    ``(D, H, W, 3)``), or the error raised while reading it."""

    img: Any = None
    x: Any = None
    error: BaseException | None = None


def _load(intensity: str, path: Path) -> Loaded:
    from medsa.data.io import read_image
    from medsa.engine.inference import model_input

    try:
        img = read_image(path)
        return Loaded(img, model_input(img.array, bool(img.is_3d), intensity))
    except Exception as e:  # reported for this file by the caller, like a failing run_job
        return Loaded(error=e)


def iter_loaded(
    jobs: Sequence[Any], predictor: Any, intensity: str, workers: int = 0, batch_size: int = 1
) -> Iterator[tuple[Any, Loaded]]:
    """Yield ``(job, Loaded)`` for ``jobs`` in order (see the module docstring)."""
    # nothing to overlap with a single input: no process start-up cost
    executor = make_executor(min(workers, max(len(jobs) - 1, 0)))
    try:
        loaded = prefetch(
            functools.partial(_load, intensity),
            [j.path for j in jobs],
            executor,
            ahead=max(2, 2 * workers, batch_size),
        )
        batch: list[tuple[Any, Loaded]] = []
        for job, ld in zip(jobs, loaded, strict=True):
            batch.append((job, ld))
            if len(batch) == batch_size:
                yield from _announced(batch, predictor, batch_size)
                batch = []
        yield from _announced(batch, predictor, batch_size)
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def _announced(
    batch: list[tuple[Any, Loaded]], predictor: Any, batch_size: int
) -> Iterator[tuple[Any, Loaded]]:
    if batch_size > 1 and hasattr(predictor, "expect"):
        images = [ld.x for _, ld in batch if ld.error is None and not ld.img.is_3d]
        predictor.expect(images, batch_size=batch_size)
    yield from batch


def reduce_counts(values: list[int], distributed: bool) -> list[int]:
    """Sum integer counters over the ``torchrun`` ranks (identity for one process)."""
    if not distributed:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return [int(v) for v in t.tolist()]
