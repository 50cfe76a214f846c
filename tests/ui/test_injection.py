"""Model output, prompts and corrections that contain Rich markup, ANSI/OSC escapes or
control characters are shown as text and saved verbatim: never interpreted."""

from __future__ import annotations

from steer_tui.core.fake_engine import FakeEngine
from steer_tui.ui.app import make_app
from steer_tui.ui.config import UIConfig
from steer_tui.ui.session_factory import SessionFactory
from steer_tui.ui.screens.tree import TreeScreen

from .conftest import nodes_by_id, read_task, saved_response_text, wait_for, wait_idle

EVIL = "[bold]B[/bold] [link=https://evil.example]click[/link] \x1b[31mred\x1b[0m \x1b]0;title\x07 end"


def screen_text(app) -> str:
    # the exported screen: every glyph that was drawn, in order
    import html
    import re

    svg = app.export_screenshot()
    return html.unescape(re.sub(r"<[^>]+>", "", svg)).replace("\xa0", " ")


async def test_markup_and_escapes_are_literal_everywhere(tmp_path):
    store = tmp_path / "store"
    engine = FakeEngine([EVIL])
    factory = SessionFactory(store=store, engine=engine, sampling={"temperature": 0, "seed": 1})
    app = make_app(session_factory=factory, config=UIConfig(), prompt="[italic]prompt[/italic] \x1b[2J")
    async with app.run_test(size=(100, 24)) as pilot:
        await wait_idle(pilot, app)
        scr = app.session_screen
        shown = screen_text(app)
        assert "[bold]B[/bold]" in shown
        assert "[link=https://evil.example]click[/link]" in shown
        assert "\\x1b[31mred" in shown and "\\x07" in shown
        assert "[italic]prompt[/italic] \\x1b[2J" in shown
        assert "\x1b" not in shown and "\x07" not in shown
        # a correction with markup and an escape is saved verbatim and shown literally
        await pilot.press("home", *["right"] * 4, "enter")
        await pilot.press(*"[red]no[/red]")
        await pilot.press("enter")
        await wait_idle(pilot, app)
        assert "[red]no[/red]" in screen_text(app)
        data = read_task(store)
        h = next(n for n in data["nodes"] if n["author"] == "human")
        assert h["text"] == "[red]no[/red]"
        assert nodes_by_id(data)[h["replaces"]]["text"].startswith(EVIL[4:8])
        assert saved_response_text(data).startswith(EVIL[:4] + "[red]no[/red]")
        assert data["prompt"]["messages"][0]["content"] == "[italic]prompt[/italic] \x1b[2J"
        # the tree and stats views too
        await pilot.press("t")
        await pilot.pause()
        assert isinstance(app.screen, TreeScreen)
        assert "[red]no[/red]" in screen_text(app)
        await pilot.press("escape", "s")
        await pilot.pause()
        assert "[red]no[/red]" in screen_text(app)
        await pilot.press("escape")
        assert scr.session is not None


async def test_notifications_are_plain_text(tmp_path, monkeypatch):
    from steer_tui.core.store import Store, StoreError

    store = tmp_path / "st[b]ore[/b] [link=x]"
    factory = SessionFactory(store=store, engine=FakeEngine(), sampling={"temperature": 0, "seed": 1})
    app = make_app(session_factory=factory, config=UIConfig(), prompt="hi")
    async with app.run_test(size=(100, 30), notifications=True) as pilot:
        await wait_idle(pilot, app)

        def failing(self, tree):
            raise StoreError(f"cannot write {self.task_path(tree.id)}: [red]disk full[/red]")

        monkeypatch.setattr(Store, "save", failing)
        await pilot.press("d")
        await wait_for(pilot, lambda: app.session_screen.status.save_state.startswith("save failed"), what="the failed save")
        # the notification shows it literally (Textual's toasts parse markup unless told not to)
        from textual.widgets._toast import Toast

        toasts = list(app.screen.query(Toast))
        assert toasts
        drawn = " ".join(str(t.render()) for t in toasts)
        assert "[red]disk full[/red]" in drawn and "st[b]ore[/b] [link=x]" in drawn
