"""The case loop of ``medsa evaluate``: batched encoder passes, prefetching, scoring off the
model's path, and sharding over ``torchrun`` processes.

Every case goes through the three steps of :mod:`medsa.engine.evaluate`: read + preprocess
(``_prepare_case``), run the model (``_predict_case``), score (``_score_case``). Here

- reading runs ``workers`` cases ahead in worker processes (:func:`medsa.engine.prefetch.prefetch`);
- the images (2D) or prompted slices (3D) of the next ``batch_size`` cases are announced to the
  predictor (``SamPredictor.expect``), so the image encoder runs on ``batch_size`` images per
  forward pass;
- metrics (HD95 / NSD distance transforms) run in the same worker pool while the model goes on;
- with ``distributed=True`` (``torchrun``) each rank evaluates a disjoint subset of the cases
  (``cases[rank::world]``) and the per-case results are gathered, so every rank yields the
  results of all cases in the original order.

The results are those of the sequential loop, case for case: the same prompts (seeded per case,
class, protocol), the same per-sample encoder and the same metric code; only where and when
things run changes (``tests/engine/test_eval_pipeline.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from medsa.engine.prefetch import OrderedPool, make_executor, prefetch
from medsa.errors import ConfigError

__all__ = ["CaseResult", "check_run_args", "distributed_run", "run_cases", "shard"]

#: ``(case rows, NoC Dice curve per class, worst-case candidates, prompt failures)``
CaseResult = tuple[list[dict[str, Any]], dict[str, list[float]], list[dict[str, Any]], list[str]]


def run_cases(
    predictor: Any,
    ds: Any,
    cases: Sequence[Any],
    classes: list[str],
    cfg: Any,
    keep: bool,
    workers: int = 0,
    batch_size: int = 1,
    distributed: bool = False,
    progress: bool = False,
) -> Iterator[tuple[int, Any, CaseResult]]:
    """Yield ``(index, case, result)`` for every case, in the order of ``cases``.

    Args:
        predictor: a ``SamPredictor`` (batching needs its ``expect``; any predictor works).
        cfg: the ``EvalConfig``.
        workers: processes that read cases ahead and compute metrics (0: all inline).
        batch_size: images / slices per image-encoder pass (1: one at a time).
        distributed: shard ``cases`` over the ``torch.distributed`` ranks and gather.
        progress: print one line per case (prefixed with the rank when distributed).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    rank, world = _rank_world() if distributed else (0, 1)
    mine = shard(len(cases), rank, world)
    local = _run_local(predictor, ds, cases, mine, classes, cfg, keep, workers, batch_size)
    tag = f"rank {rank}: " if world > 1 else ""
    if world == 1:
        for i, res in local:
            _print_progress(progress, tag, i, cases, res)
            yield i, cases[i], res
        return
    done: list[tuple[int, CaseResult]] = []
    for i, res in local:
        _print_progress(progress, tag, i, cases, res)
        done.append((i, res))
    for i, res in _gather(done, cfg.worst_k if keep else 0):
        yield i, cases[i], res


def shard(n: int, rank: int, world: int) -> list[int]:
    """Indices of ``n`` items that ``rank`` of ``world`` processes handles (strided, disjoint)."""
    return list(range(rank, n, world))


def check_run_args(workers: int, batch_size: int) -> None:
    """CLI checks of ``--workers`` / ``--batch-size`` (clear errors before the model loads)."""
    if workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {workers}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")


@contextlib.contextmanager
def distributed_run(device: Any) -> Iterator[Any]:
    """Join the ``torchrun`` process group if there is one (``medsa.engine.distributed``);
    yields its ``DistInfo`` (one process: rank 0 of 1, ``device`` unchanged) and leaves it."""
    from medsa.engine.distributed import cleanup_distributed, init_distributed

    info = init_distributed(device)
    try:
        yield info
    finally:
        cleanup_distributed()


def _print_progress(on: bool, tag: str, i: int, cases: Sequence[Any], res: CaseResult) -> None:
    if on:
        d = [r["dice"] for r in res[0]]
        print(f"{tag}[{i + 1}/{len(cases)}] {cases[i].id}: mean Dice {np.mean(d):.3f}", flush=True)


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _run_local(
    predictor: Any,
    ds: Any,
    cases: Sequence[Any],
    indices: list[int],
    classes: list[str],
    cfg: Any,
    keep: bool,
    workers: int,
    batch_size: int,
) -> Iterator[tuple[int, CaseResult]]:
    from medsa.engine import eval_case as ev

    # nothing to overlap with a single case: no process start-up cost
    executor = make_executor(min(workers, max(len(indices) - 1, 0)))
    try:
        prepare = functools.partial(_prepare, ds, classes, cfg)
        items = [(i, cases[i]) for i in indices]
        prepared = prefetch(prepare, items, executor, ahead=max(2, 2 * workers, batch_size))
        scorer = OrderedPool(executor, limit=max(2, 2 * workers))
        for batch in _chunks(prepared, batch_size):
            _announce(predictor, [p for _, p in batch], cfg, batch_size)
            for i, prep in batch:
                preds, noc_masks, fails = ev._predict_case(
                    predictor, prep, classes, cfg, ds.classes
                )
                # the scorer needs the image only to draw the worst cases: send it as uint8
                light = dataclasses.replace(
                    prep, x=np.clip(prep.x, 0, 255).astype(np.uint8) if keep else prep.x[:0]
                )
                scorer.submit(
                    ev._score_case, light, preds, noc_masks, classes, cfg, keep, tag=(i, fails)
                )
                yield from _finish(scorer.ready())
        yield from _finish(scorer.drain())
    finally:
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)


def _chunks(it: Iterator[Any], n: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for x in it:
        batch.append(x)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _prepare(ds: Any, classes: list[str], cfg: Any, item: tuple[int, Any]) -> tuple[int, Any]:
    from medsa.engine.eval_case import _prepare_case

    i, case = item
    return i, _prepare_case(ds, case, classes, cfg)


def _finish(done: Iterator[tuple[Any, Any]]) -> Iterator[tuple[int, CaseResult]]:
    for (i, fails), (rows, noc, store) in done:
        yield i, (rows, noc, store, fails)


def _announce(predictor: Any, preps: list[Any], cfg: Any, batch_size: int) -> None:
    """Tell the predictor which images the next cases will set (batched encoding)."""
    from medsa.engine.eval_case import _encoded_slices
    from medsa.engine.volume_protocols import KEYSLICE_PROTOCOLS

    if batch_size <= 1 or not hasattr(predictor, "expect") or cfg.depth:
        return  # chunked 3D encoders (depth) already encode several slices per pass
    if any(p in KEYSLICE_PROTOCOLS for p in cfg.protocols):
        return  # the case's VolumePropagator encodes (batched) and serves every slice itself
    images = []
    for p in preps:
        for z in _encoded_slices(p, cfg):
            images.append(p.x if z is None else p.x[z])
    predictor.expect(images, batch_size=batch_size)


def _gather(done: list[tuple[int, CaseResult]], worst_k: int) -> list[tuple[int, CaseResult]]:
    """All ranks' per-case results, sorted by case index (``all_gather_object``).

    The worst-case candidates (with images) are first cut to this rank's ``worst_k`` distinct
    lowest-Dice ones: the global ``worst_k`` are always among them, so the caller's selection is
    unchanged while memory and traffic stay bounded.
    """
    import torch.distributed as dist

    from medsa.engine.eval_case import _worst_distinct

    keep_ids: set[tuple[int, int]] = set()
    if worst_k:
        tagged = [
            {"dice": c["dice"], "key": c["key"], "ij": (i, j)}
            for i, res in done
            for j, c in enumerate(res[2])
        ]
        keep_ids = {c["ij"] for c in _worst_distinct(tagged, worst_k)}
    light = [
        (i, (rows, noc, [c for j, c in enumerate(store) if (i, j) in keep_ids], fails))
        for i, (rows, noc, store, fails) in done
    ]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, light)
    merged = [item for part in parts for item in part]
    merged.sort(key=lambda t: t[0])
    return merged
