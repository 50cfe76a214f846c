"""``SessionFactory``: opens and creates headless Sessions for the app on one store and one
engine (loaded once, lazily). No textual here: the app and the tests share it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from steer_tui.core.models import ModelNotFound
from steer_tui.core.session_errors import SessionErrors
from steer_tui.core.store import Store

# what opening or creating a task may fail with: shown to the user, the app stays usable
OPEN_ERRORS = (*SessionErrors, ModelNotFound, OSError)


class SessionFactory:
    """Opens and creates Sessions on one store and one engine (loaded once, lazily, on the
    first task, from a worker thread, so the UI never waits for the model)."""

    def __init__(
        self,
        *,
        store: Store | str | Path | None,
        engine: Any = None,
        engine_loader: Callable[[], Any] | None = None,
        sampling: dict[str, Any] | None = None,
        annotator: str | None = None,
        read_only: bool = False,
    ) -> None:
        if engine is None and engine_loader is None:
            raise ValueError("SessionFactory needs an engine or an engine_loader")
        self.store = store if isinstance(store, Store) else Store(store)
        self._engine = engine
        self._engine_loader = engine_loader
        self._owns_engine = engine is None
        self._lock = threading.Lock()
        self.sampling = dict(sampling or {})
        self.annotator = annotator
        self.read_only = read_only

    def engine(self) -> Any:
        with self._lock:
            if self._engine is None:
                assert self._engine_loader is not None
                self._engine = self._engine_loader()
            return self._engine

    def create(
        self,
        *,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        system: str | None = None,
        raw: bool = False,
        title: str | None = None,
        task_id: str | None = None,
    ) -> Any:
        from steer_tui.core.session import Session

        return Session.create(
            store=self.store,
            prompt=prompt,
            messages=messages,
            system=system,
            raw=raw,
            model=self.engine(),
            sampling=self.sampling,
            title=title,
            task_id=task_id,
            annotator=self.annotator,
        )

    def open(self, task_id: str) -> Any:
        """Open a saved task. If another live session holds it, open it read-only (to look
        at, not to change) and say so in ``session.warnings``."""
        from steer_tui.core.session import Session
        from steer_tui.core.store import TaskLocked

        try:
            return Session.open(
                store=self.store, task_id=task_id, model=self.engine(), read_only=self.read_only, annotator=self.annotator
            )
        except TaskLocked as exc:
            session = Session.open(
                store=self.store, task_id=task_id, model=self.engine(), read_only=True, annotator=self.annotator
            )
            session.warnings.append(f"{exc} — opened read-only here.")
            return session

    def exists(self, task_id: str) -> bool:
        return self.store.exists(task_id)

    def list_tasks(self) -> list[Any]:
        return self.store.list_tasks()

    def close(self) -> None:
        with self._lock:
            engine, self._engine = self._engine, None
        if engine is not None and self._owns_engine:
            engine.close()
