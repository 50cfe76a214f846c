"""Keeping the session screen's task saved: nothing the user captured is ever lost.

Saves run as jobs (off the UI thread). A failed save keeps the work in memory, shows the
error, and is retried every ``save_retry_seconds`` until a save succeeds: one pending
retry at a time, and never under a running generation (which saves when it stops).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from textual.timer import Timer

from steer_tui.core.session_errors import SaveError
from steer_tui.ui.screens.jobs import JobQueue

SAVE_RETRY_SECONDS = 5.0  # a failed save is tried again this long after, until it succeeds


class SaveOwner(Protocol):
    """What the keeper needs of its screen."""

    session: Any
    jobs: JobQueue
    save_retry_seconds: float

    @property
    def app(self) -> Any: ...
    @property
    def status(self) -> Any: ...
    @property
    def generating(self) -> bool: ...
    def set_timer(self, delay: float, callback: Callable[[], None]) -> Timer: ...


class SaveKeeper:
    """Saves the owner's session, shows the save state, reports and retries failures."""

    def __init__(self, owner: SaveOwner) -> None:
        self._owner = owner
        self.failed = False
        self._timer: Timer | None = None

    def save(self, on_saved: Callable[[], None] | None = None) -> None:
        """Save as a job (after the jobs already queued); ``on_saved`` after a success."""
        s = self._owner.session
        if s is not None:
            self._owner.jobs.add(s.save, lambda _path, error: self._saved(error, on_saved))

    def _saved(self, error: BaseException | None, on_saved: Callable[[], None] | None) -> None:
        if error is not None:
            self.report(error, "Save failed")
            return
        self.mark_saved()
        if on_saved is not None:
            on_saved()

    def mark_saved(self) -> None:
        """Everything is on disk."""
        self.failed = False
        self._owner.status.save_state = "saved"

    def save_if_dirty(self) -> None:
        """The session saves each change itself; write again only if that failed."""
        s = self._owner.session
        if getattr(s, "read_only", False):
            return
        if getattr(s, "dirty", True):
            self.save()
        else:  # a later save by the session succeeded
            self.mark_saved()

    def report(self, exc: BaseException, title: str) -> None:
        """Show an error; a failed save is kept in memory and retried."""
        app = self._owner.app
        if isinstance(exc, SaveError):
            self.failed = True
            self._owner.status.save_state = f"save failed: {exc}"
            self._schedule_retry()
            app.notify(f"{exc}\nYour work is kept in memory; saving is retried.", title="Save failed", severity="error", timeout=8)
        else:
            app.notify(str(exc), title=title, severity="error", timeout=10)

    def _schedule_retry(self) -> None:
        """Retry the save later; failures while a retry is pending share it (no pile-up)."""
        if self._timer is None:
            self._timer = self._owner.set_timer(self._owner.save_retry_seconds, self.retry)

    def retry(self) -> None:
        """The retry timer came due: save now, or look again later while the model or a
        job is busy."""
        self._timer = None
        owner = self._owner
        if not self.failed or owner.session is None:
            return
        if owner.generating or owner.jobs:  # the stream saves when it stops
            self._schedule_retry()
            return
        self.save(lambda: owner.app.notify("Saved after retrying.", title="Saved"))
