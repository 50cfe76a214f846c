"""The session screen's job queue: quick session work (a save, a change that saves itself,
a top-k lookup) runs off the UI thread, one job at a time, in the order it was asked for.

The screen starts each job in its thread worker (``start``) and hands the finished job
back (``finish``, from its ``JobDone`` message). ``settle`` lets an action wait for the
queue without blocking the UI loop: it awaits the worker thread, not the message, so it
cannot deadlock when called from a message handler. Either path shows a result once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from textual.worker import Worker, WorkerCancelled, WorkerError, WorkerFailed, WorkerState

WORKER_ENDS = (WorkerError, WorkerFailed, WorkerCancelled)  # waiting on a worker that did not finish


@dataclass(eq=False)
class Job:
    """``fn`` runs in the worker thread; then ``done`` gets its result or the error it
    refused with, on the UI thread, exactly once."""

    fn: Callable[[], Any]
    done: Callable[[Any, BaseException | None], None]
    worker: Worker | None = None
    result: Any = None
    error: BaseException | None = None
    handled: bool = False


class JobQueue:
    """Jobs in order; the first runs, the others wait their turn."""

    def __init__(self, start: Callable[[Job], Worker]) -> None:
        self._start = start
        self._jobs: deque[Job] = deque()

    def __bool__(self) -> bool:
        """A job runs or waits, or its result is not shown yet."""
        return bool(self._jobs)

    def add(self, fn: Callable[[], Any], done: Callable[[Any, BaseException | None], None]) -> None:
        """Run ``fn`` after the jobs already queued; ``done`` follows on the UI thread."""
        job = Job(fn, done)
        self._jobs.append(job)
        if len(self._jobs) == 1:
            job.worker = self._start(job)

    def finish(self, job: Job) -> None:
        """Show a finished job's result (once), then start the next job."""
        if job.handled:
            return
        job.handled = True
        self._jobs.remove(job)
        job.done(job.result, job.error)
        if self._jobs and self._jobs[0].worker is None:
            self._jobs[0].worker = self._start(self._jobs[0])

    async def settle(self) -> None:
        """Wait for every queued job (and the jobs their results add) and show the results."""
        while self._jobs:
            job = self._jobs[0]
            while job.worker is None or job.worker.state == WorkerState.PENDING:
                await asyncio.sleep(0)
            try:
                await job.worker.wait()
            except WORKER_ENDS:
                pass
            self.finish(job)
