"""The Textual app of ``steer-tui session``: it builds and runs the screens.

``make_app`` builds it from a ``SessionFactory`` (the CLI passes one over the real engine;
tests pass one over a FakeEngine and a temp store). The app routes between screens (the
task picker, one ``SessionScreen`` per open task, which owns the headless Session, and
the help screen), walks the task queue and offers the session keys in the command
palette. Parsing and checking command-line arguments is the CLI's job (``steer_tui.cli``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from textual.app import App, SystemCommand
from textual.screen import Screen

from steer_tui.core.store import StoreError
from steer_tui.core.tasks import queue_task_id
from steer_tui.ui.config import UIConfig, default_config_path
from steer_tui.ui.keys import APP_KEYS, SESSION_KEYS, bindings
from steer_tui.ui.screens.help import HelpScreen, key_label
from steer_tui.ui.screens.picker import NewTask, PickerScreen
from steer_tui.ui.screens.session import SessionScreen
from steer_tui.ui.session_factory import SessionFactory


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


def make_app(*, session_factory: SessionFactory, **options: Any) -> SteerApp:
    """Build the app (shared by the CLI and the tests); ``options`` are ``SteerApp``'s."""
    return SteerApp(session_factory=session_factory, **options)
