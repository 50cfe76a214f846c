"""The working half of the session screen: it owns the headless ``Session`` and runs all
work on it off the UI thread, reporting back with messages (``SessionScreen`` draws them).

Four thread workers, none of which the UI thread ever waits on for long:

- ``_load`` opens or creates the session (the engine may load here) and posts ``Loaded``;
- ``_stream`` calls ``session.generate`` with a ``threading.Event`` for pause and posts
  batched ``Streamed`` messages (at most one every ``BATCH_SECONDS``), then ``StreamEnded``;
- ``_steer_in_thread`` runs a steer (rollback + correction, pick or resample: the engine
  evaluates tokens) and posts ``SteerDone``; generation resumes after it;
- ``_job_in_thread`` runs the job queue's jobs one at a time, in order: saves, the quick
  changes that save themselves, the top-k lookup after the end (``JobDone``).

The session is mutated only while nothing else does: a steering key pressed while
streaming first stops the stream (``_stop_stream``), and waits for queued jobs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from textual import work
from textual.message import Message
from textual.screen import Screen
from textual.worker import Worker, WorkerState

from steer_tui.core.session_errors import SessionErrors
from steer_tui.ui.screens.jobs import WORKER_ENDS, Job, JobQueue
from steer_tui.ui.screens.saving import SAVE_RETRY_SECONDS, SaveKeeper
from steer_tui.ui.session_factory import OPEN_ERRORS

# Coalesce streamed tokens: at most 20 screen updates a second. Smooth to read, and each
# frame costs the UI thread CPU that a small machine would rather give the model: on 2
# cores, app/Session.generate measured ~0.84 with 30 ms batches and ~0.9 with 50 ms.
BATCH_SECONDS = 0.05

RUNNING = (WorkerState.PENDING, WorkerState.RUNNING)


@dataclass
class StreamedToken:
    text: str
    logprob: float | None


class SessionWork(Screen[None]):
    """Owns ``session``; runs loading, generation, steers and jobs in thread workers."""

    save_retry_seconds: float = SAVE_RETRY_SECONDS
    """Delay before a failed save is retried (one pending retry at a time)."""

    @dataclass
    class Loaded(Message):
        """The loader worker opened the session, or failed with ``error``."""

        session: Any | None
        error: BaseException | None

    @dataclass
    class Streamed(Message):
        """A batch of tokens from generation ``gen``'s worker."""

        gen: int
        tokens: list[StreamedToken]

    @dataclass
    class StreamEnded(Message):
        """Generation ``gen``'s worker stopped: ``end`` is eos|length|context|paused, or error."""

        gen: int
        end: str | None
        error: BaseException | None = None

    @dataclass
    class SteerDone(Message):
        """A steer (rollback + correct/pick/resample at ``at``) finished in its worker."""

        error: BaseException | None
        title: str
        at: int

    @dataclass
    class JobDone(Message):
        """A job finished in the job worker."""

        job: Job

    def __init__(self, loader: Callable[[], Any]) -> None:
        super().__init__()
        self._loader = loader
        self.session: Any | None = None
        self.closed = False
        self._stop = threading.Event()
        self._gen = 0  # the current generation; messages from older ones are stale
        self._worker: Worker | None = None
        self._steer_worker: Worker | None = None
        self.jobs = JobQueue(self._job_in_thread)
        self.saves = SaveKeeper(self)

    # ------------------------------------------------------------------ state
    @property
    def streaming(self) -> bool:
        """The generation worker is running."""
        return self._worker is not None and self._worker.state in RUNNING

    @property
    def steering(self) -> bool:
        """A steer is being evaluated in its worker (generation follows it)."""
        return self._steer_worker is not None and self._steer_worker.state in RUNNING

    @property
    def generating(self) -> bool:
        """The model is busy: streaming, or evaluating a steer (generation follows it)."""
        return self.streaming or self.steering

    @property
    def busy(self) -> bool:
        """A job runs or waits in the job worker, or its result is not shown yet."""
        return bool(self.jobs)

    @property
    def read_only(self) -> bool:
        """The task is open to look at, not to change."""
        return self.session is not None and self.session.read_only

    # ------------------------------------------------------------------ workers
    @work(thread=True, exclusive=True, group="load")
    def _load(self) -> None:
        try:
            session = self._loader()
        except OPEN_ERRORS as exc:  # shown as a notification, the app stays usable
            self.post_message(self.Loaded(None, exc))
            return
        self.post_message(self.Loaded(session, None))

    def _start_stream(self) -> None:
        """Start a new generation (its messages carry the new ``_gen``)."""
        self._gen += 1
        self._stop = threading.Event()
        self._worker = self._stream(self._gen, self._stop)

    @work(thread=True, exclusive=True, group="generate")
    def _stream(self, gen: int, stop: threading.Event) -> None:
        session = self.session
        batch: list[StreamedToken] = []
        last = time.perf_counter()
        post = self.post_message
        try:
            for tok in session.generate(stop=stop):
                batch.append(StreamedToken(tok.text, tok.logprob))
                now = time.perf_counter()
                if now - last >= BATCH_SECONDS:
                    post(self.Streamed(gen, batch))
                    batch = []
                    last = now
            if batch:
                post(self.Streamed(gen, batch))
            post(self.StreamEnded(gen, getattr(session, "last_end", None)))
        except SessionErrors as exc:
            if batch:
                post(self.Streamed(gen, batch))
            post(self.StreamEnded(gen, getattr(session, "last_end", None), exc))

    async def _stop_stream(self) -> bool:
        """Stop streaming and wait until the worker has ended. True if this settled the
        current stream: its last messages may still be queued and are now stale (the
        caller redraws from the session, the truth)."""
        worker = self._worker
        if worker is None:
            return False
        self._stop.set()
        try:
            await worker.wait()
        except WORKER_ENDS:
            pass
        if self._worker is not worker:
            return False  # StreamEnded was handled meanwhile
        self._worker = None
        self._gen += 1
        return True

    def _run_steer(self, fn: Callable[[], None], title: str, at: int) -> None:
        self._steer_worker = self._steer_in_thread(fn, title, at)

    @work(thread=True, exclusive=True, group="steer")
    def _steer_in_thread(self, fn: Callable[[], None], title: str, at: int) -> None:
        try:
            fn()
        except SessionErrors as exc:
            self.post_message(self.SteerDone(exc, title, at))
            return
        self.post_message(self.SteerDone(None, title, at))

    @work(thread=True, group="job")
    def _job_in_thread(self, job: Job) -> None:
        try:
            job.result = job.fn()
        except SessionErrors as exc:  # SaveError among them: the change is kept in memory
            job.error = exc
        self.post_message(self.JobDone(job))

    def on_session_work_job_done(self, event: JobDone) -> None:
        self.jobs.finish(event.job)

    # ------------------------------------------------------------------ shutdown
    async def shutdown(self) -> None:
        """Stop generating, save, release the task lock."""
        self.closed = True
        if self._steer_worker is not None:
            try:
                await self._steer_worker.wait()
            except WORKER_ENDS:
                pass
        await self._stop_stream()
        await self.jobs.settle()
        if self.session is not None:
            self.saves.save_if_dirty()
            await self.jobs.settle()
            self._close_session()

    def _close_session(self) -> None:
        s, self.session = self.session, None
        if s is not None:
            try:
                s.close()
            except OSError as exc:  # the lock file could not be released cleanly
                self.app.notify(str(exc), title="Closing the task", severity="warning")
