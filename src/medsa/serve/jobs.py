"""Long-running work of the web app (volume propagation) in a background thread, with progress.

A propagation takes seconds to minutes on a CPU: it must neither block the server's event loop nor
tie up a request. ``POST /api/propagate`` submits a :class:`Job` to a single worker thread and
returns at once; the page polls ``GET /api/jobs/{id}`` for ``done / total`` and finally the masks.
One worker: jobs run one after another (they share the model and the CPU), and a finished job's
result is kept until ``max_jobs`` newer jobs have been submitted.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from medsa.errors import MedsaError

from .paths import NotFound

__all__ = ["Cancelled", "Job", "JobManager"]


class Cancelled(Exception):
    """Raised from a job's progress callback after the job was cancelled."""


@dataclass
class Job:
    """One background task. ``state``: queued | running | done | error | cancelled."""

    id: str
    kind: str
    image: str
    state: str = "queued"
    done: int = 0
    total: int = 0
    error: str | None = None
    result: Any = None
    started: float = field(default_factory=time.monotonic)
    seconds: float = 0.0
    cancel_event: threading.Event = field(default_factory=threading.Event)

    def progress(self, done: int, total: int) -> None:
        """Progress callback for the worker; raises :class:`Cancelled` once cancelled."""
        self.done, self.total = int(done), int(total)
        if self.cancel_event.is_set():
            raise Cancelled

    def public(self) -> dict[str, Any]:
        return {
            "job": self.id,
            "kind": self.kind,
            "image": self.image,
            "state": self.state,
            "done": self.done,
            "total": self.total,
            "error": self.error,
            "seconds": round(self.seconds or (time.monotonic() - self.started), 2),
        }


class JobManager:
    """A single worker thread and the last ``max_jobs`` jobs by id."""

    def __init__(self, max_jobs: int = 16) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="medsa-job")
        self.max_jobs = max_jobs

    def submit(
        self,
        kind: str,
        image: str,
        work: Callable[[Job], Any],
        public_message: Callable[[str], str] = str,
    ) -> Job:
        """Run ``work(job)`` in the worker; its return value becomes ``job.result``."""
        job = Job(secrets.token_hex(8), kind, image)
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > self.max_jobs:
                old_id, old = next(iter(self._jobs.items()))
                if old.state in ("queued", "running"):
                    break  # never forget a job that is still running
                del self._jobs[old_id]

        def run() -> None:
            if job.cancel_event.is_set():
                job.state = "cancelled"
                return
            job.state, job.started = "running", time.monotonic()
            try:
                job.result = work(job)
                job.state = "done"
            except Cancelled:
                job.state = "cancelled"
            except MedsaError as e:
                job.state, job.error = "error", public_message(str(e))
            except Exception as e:  # a bug: reported to the page, logged, the server keeps going
                import logging

                logging.getLogger("medsa.serve").exception("job %s failed", job.id)
                job.state, job.error = "error", f"internal error ({type(e).__name__})"
            finally:
                job.seconds = time.monotonic() - job.started

        self._pool.submit(run)
        return job

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id) if isinstance(job_id, str) else None
        if job is None:
            raise NotFound(f"unknown job {job_id[:40]!r}")
        return job

    def cancel(self, job_id: str) -> Job:
        job = self.get(job_id)
        job.cancel_event.set()
        return job

    def close(self) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
        for j in jobs:
            j.cancel_event.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
