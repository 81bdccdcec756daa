"""Overlap reading / preprocessing and metric computation with the model.

:func:`prefetch` maps a function over items in worker processes, a few items ahead of the
consumer, and yields the results in input order (``workers=0``: lazily in the calling process,
exactly the sequential behaviour). :class:`OrderedPool` runs CPU work that the model does not
wait for (HD95 / NSD) in the same kind of pool and hands the results back in submission order.

Only numpy work runs in the workers (reading files, intensity scaling, metrics): they never
import torch, so they start fast and do not compete with the model's threads for a GPU.
An exception raised in a worker is re-raised in the caller when its item is reached, as the
sequential loop would raise it.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any, TypeVar

from medsa.errors import ConfigError

__all__ = ["OrderedPool", "make_executor", "prefetch"]

T = TypeVar("T")
R = TypeVar("R")


def make_executor(workers: int) -> Executor | None:
    """A process pool of ``workers`` processes, or None for ``workers=0`` (run inline).

    ``forkserver`` (``spawn`` where unavailable): forking a process whose torch / OpenMP thread
    pools are running can deadlock the child.
    """
    if workers < 0:
        raise ConfigError(f"workers must be >= 0, got {workers}")
    if workers == 0:
        return None
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def prefetch(
    fn: Callable[[T], R],
    items: Iterable[T],
    executor: Executor | None = None,
    ahead: int = 2,
) -> Iterator[R]:
    """Yield ``fn(item)`` for every item, in order, computing up to ``ahead`` items in advance.

    Args:
        fn: a picklable function (module level, or ``functools.partial`` of one) when
            ``executor`` is a process pool.
        executor: from :func:`make_executor`; None computes each item when it is requested.
        ahead: results in flight (bounds the memory held by prefetched cases).
    """
    if executor is None:
        for it in items:
            yield fn(it)
        return
    if ahead < 1:
        raise ConfigError(f"ahead must be >= 1, got {ahead}")
    pending: deque[Future[R]] = deque()
    source = iter(items)
    try:
        for it in source:
            pending.append(executor.submit(fn, it))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # consumer stopped early or an item failed: do not leave work running
        for f in pending:
            f.cancel()


class OrderedPool:
    """Submit calls, get their results back in submission order (inline without an executor).

    ``submit(fn, *args, tag=...)`` queues ``fn(*args)``; :meth:`ready` yields ``(tag, result)`` of
    the finished calls at the head of the queue (all of them when more than ``limit`` are
    pending, so memory stays bounded), :meth:`drain` waits for the rest.
    """

    def __init__(self, executor: Executor | None, limit: int = 4) -> None:
        self.executor = executor
        self.limit = max(1, int(limit))
        self._pending: deque[tuple[Any, Future[Any] | Any]] = deque()

    def submit(self, fn: Callable[..., Any], *args: Any, tag: Any = None) -> None:
        if self.executor is None:
            self._pending.append((tag, _Done(fn(*args))))
        else:
            self._pending.append((tag, self.executor.submit(fn, *args)))

    def ready(self) -> Iterator[tuple[Any, Any]]:
        while self._pending and (len(self._pending) > self.limit or self._pending[0][1].done()):
            tag, fut = self._pending.popleft()
            yield tag, fut.result()

    def drain(self) -> Iterator[tuple[Any, Any]]:
        while self._pending:
            tag, fut = self._pending.popleft()
            yield tag, fut.result()


class _Done:
    """A finished "future" (inline execution)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def done(self) -> bool:
        return True

    def result(self) -> Any:
        return self.value
