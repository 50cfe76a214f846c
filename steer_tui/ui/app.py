"""The Textual app: ``steer-tui session``.

``make_app`` builds it from a ``SessionFactory`` (tests pass one over a FakeEngine and a
temp store); ``run_app`` is what the CLI calls with its parsed arguments. The app only
routes between screens: the task picker, one ``SessionScreen`` per open task (which owns
the headless Session) and the modal views (help, alternatives, tree, stats).
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from textual.app import App, SystemCommand
from textual.screen import Screen

from steer_tui.core.store import Store, StoreError
from steer_tui.core.tasks import queue_task_id
from steer_tui.ui.config import ConfigError, UIConfig, default_config_path, load_config
from steer_tui.ui.keys import APP_KEYS, SESSION_KEYS, bindings
from steer_tui.ui.screens.help import HelpScreen, key_label
from steer_tui.ui.screens.picker import NewTask, PickerScreen
from steer_tui.ui.screens.session import SessionScreen


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
            close = getattr(engine, "close", None)
            if close is not None:
                close()


class SteerApp(App[int]):
    """Keyboard-first steering of a local model; every correction is saved as a steer."""

    CSS_PATH = "app.tcss"
    TITLE = "steer"
    BINDINGS = bindings(APP_KEYS[:1]) + bindings(APP_KEYS[1:2], priority=True)

    def __init__(
        self,
        *,
        session_factory: SessionFactory,
        tasks: list[Any] | None = None,
        config: UIConfig | None = None,
        task_id: str | None = None,
        prompt: str | None = None,
        messages: list[dict[str, str]] | None = None,
        system: str | None = None,
        raw: bool = False,
        startup_messages: list[str] | None = None,
        autostart: bool = True,
    ) -> None:
        super().__init__()
        self.factory = session_factory
        self.config = config or UIConfig()
        self.queue = list(tasks or [])
        self.queue_index = 0
        self._queue_ids: dict[int, str] = {}
        self._start = (task_id, prompt, messages, system, raw)
        self.startup_messages = list(startup_messages or [])
        self.autostart = autostart

    def notify(
        self,
        message: str,
        *,
        title: str = "",
        severity: str = "information",
        timeout: float | None = None,
        markup: bool = False,
    ) -> None:
        """Notifications carry paths, model text and error messages: plain text unless a
        caller asks for markup (Textual's default is markup)."""
        super().notify(message, title=title, severity=severity, timeout=timeout, markup=markup)  # type: ignore[arg-type]

    @property
    def keymap(self) -> dict[str, str]:
        """Binding id -> keys from the config (what the help screen shows)."""
        return dict(self.config.keymap)

    # ------------------------------------------------------------------ start
    def on_mount(self) -> None:
        if self.config.keymap:
            self.set_keymap(self.config.keymap)
        for msg in self.startup_messages:
            self.notify(msg, title="Task queue", severity="warning", timeout=15)
        task_id, prompt, messages, system, raw = self._start
        if task_id is not None:
            self.push_screen(self._session_screen(lambda: self.factory.open(task_id)))
        elif prompt is not None or messages is not None:
            self.push_screen(
                self._session_screen(
                    lambda: self.factory.create(prompt=prompt, messages=messages, system=system, raw=raw)
                )
            )
        elif self.queue:
            self.push_screen(self._queue_screen(0))
        else:
            self.push_screen(PickerScreen(self._safe_list_tasks(), can_go_back=False), self._picked)

    def _session_screen(self, loader: Callable[[], Any], label: str = "") -> SessionScreen:
        return SessionScreen(loader, task_label=label, autostart=self.autostart)

    def _queue_screen(self, index: int) -> SessionScreen:
        self.queue_index = index
        spec = self.queue[index]

        def load() -> Any:
            tid = self._queue_ids.get(index) or queue_task_id(spec.id, self.factory.annotator)
            if tid and self.factory.exists(tid):
                session = self.factory.open(tid)
            else:
                session = self.factory.create(
                    prompt=spec.prompt, messages=spec.messages, title=spec.title, task_id=tid
                )
            self._queue_ids[index] = session.task_id
            return session

        return self._session_screen(load, f"task {index + 1}/{len(self.queue)}")

    def _safe_list_tasks(self) -> list[Any]:
        try:
            return self.factory.list_tasks()
        except StoreError as exc:
            self.notify(str(exc), title="Store", severity="error")
            return []

    # ------------------------------------------------------------------ navigation
    @property
    def session_screen(self) -> SessionScreen | None:
        for screen in reversed(self.screen_stack):
            if isinstance(screen, SessionScreen):
                return screen
        return None

    async def _replace_session(self, screen: SessionScreen | None) -> None:
        """Close the current task (saved, lock released) and show ``screen`` instead."""
        current = self.session_screen
        if current is not None:
            await current.shutdown()
            while self.screen is not current:
                self.pop_screen()
            if screen is None:
                return
            await self.switch_screen(screen)
        elif screen is not None:
            await self.push_screen(screen)

    async def action_switch_task(self, step: int) -> None:
        if not self.queue:
            self.notify("No task queue (start with --tasks FILE.jsonl); o opens another task.")
            return
        target = self.queue_index + step
        if not 0 <= target < len(self.queue):
            self.notify(f"{'Last' if step > 0 else 'First'} task of the queue ({len(self.queue)} tasks).")
            return
        await self._replace_session(self._queue_screen(target))

    def action_open_tasks(self) -> None:
        self.push_screen(PickerScreen(self._safe_list_tasks(), can_go_back=True), self._picked)

    async def _picked(self, result: NewTask | str | None) -> None:
        if result is None:
            return
        if isinstance(result, NewTask):
            screen = self._session_screen(lambda: self.factory.create(prompt=result.prompt, system=result.system))
        else:
            current = self.session_screen
            if current is not None and current.session is not None and current.session.task_id == result:
                return
            screen = self._session_screen(lambda: self.factory.open(result))
        await self._replace_session(screen)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(str(self.config.path or default_config_path())))

    async def action_quit(self) -> None:
        current = self.session_screen
        if current is not None:
            await current.shutdown()
        self.exit(0)

    # ------------------------------------------------------------------ command palette
    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Help: keys", "Every binding and its id", self.action_help)
        target = screen if isinstance(screen, SessionScreen) else None
        if target is None:
            return
        for key in SESSION_KEYS:
            if not key.palette:
                continue
            yield SystemCommand(
                key.description,
                f"key: {key_label(self, key.id, key.keys)}   id: {key.id}",
                lambda action=key.action: target.run_action(action),
            )


def make_app(
    *,
    session_factory: SessionFactory,
    tasks: list[Any] | None = None,
    config: UIConfig | None = None,
    task_id: str | None = None,
    prompt: str | None = None,
    messages: list[dict[str, str]] | None = None,
    system: str | None = None,
    raw: bool = False,
    startup_messages: list[str] | None = None,
    autostart: bool = True,
) -> SteerApp:
    """Build the app (shared by the CLI and the tests)."""
    return SteerApp(
        session_factory=session_factory,
        tasks=tasks,
        config=config,
        task_id=task_id,
        prompt=prompt,
        messages=messages,
        system=system,
        raw=raw,
        startup_messages=startup_messages,
        autostart=autostart,
    )


def run_app(ns: argparse.Namespace) -> int:
    """Run the app for ``steer-tui session`` (``ns`` as parsed by steer_tui.cli).

    Bad arguments (missing model, unknown task, unusable task file, bad config) raise the
    project's error types before the terminal is taken over; the CLI prints them."""
    from steer_tui.core.models import check_gguf
    from steer_tui.core.tasks import load_task_queue

    from steer_tui.cli import CliError

    try:
        config = load_config()
    except ConfigError as exc:
        raise CliError(str(exc)) from None  # a user error: the CLI prints it as one line
    if getattr(ns, "model", None):
        check_gguf(ns.model)
    if getattr(ns, "adapter", None):
        check_gguf(ns.adapter)
    store = Store(getattr(ns, "store", None))
    task_id = getattr(ns, "task", None)
    if task_id is not None and not store.exists(task_id):
        raise StoreError(f"--task {task_id!r}: no such task in {store.root} (steer-tui list shows them)")
    tasks, errors = (None, [])
    if getattr(ns, "tasks", None):
        tasks, errors = load_task_queue(ns.tasks)
    sampling = dict(config.sampling)
    for field in ("temperature", "seed", "max_tokens"):
        value = getattr(ns, field, None)
        if value is not None:
            sampling[field] = value
    annotator = getattr(ns, "annotator", None) or config.annotator

    def load_engine() -> Any:
        from steer_tui.core.engine import open_engine

        return open_engine(
            getattr(ns, "model", None),
            n_ctx=getattr(ns, "n_ctx", 4096) or 4096,
            n_gpu_layers=getattr(ns, "n_gpu_layers", -1),
            adapter=getattr(ns, "adapter", None),
            seed=getattr(ns, "seed", None),
            extra_bufts=getattr(ns, "extra_bufts", None),
        )

    factory = SessionFactory(
        store=store,
        engine_loader=load_engine,
        sampling=sampling,
        annotator=annotator,
        read_only=bool(getattr(ns, "read_only", False)),
    )
    app = make_app(
        session_factory=factory,
        tasks=tasks,
        config=config,
        task_id=task_id,
        prompt=getattr(ns, "prompt", None),
        system=getattr(ns, "system", None),
        raw=bool(getattr(ns, "raw", False)),
        startup_messages=[f"skipped {e}" for e in errors],
    )
    try:
        code = app.run()
    finally:
        factory.close()
    return int(code or 0)
