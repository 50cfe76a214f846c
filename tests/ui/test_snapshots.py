"""Snapshots of the main screens on the deterministic FakeEngine (``--snapshot-update`` to
accept a deliberate change; the SVGs live in tests/ui/__snapshots__/)."""

from __future__ import annotations

from steer_tui.core.fake_engine import FakeEngine
from steer_tui.ui.app import make_app
from steer_tui.ui.config import UIConfig
from steer_tui.ui.session_factory import SessionFactory

from .conftest import SCRIPTS, wait_idle


def build(tmp_path):
    factory = SessionFactory(
        store=tmp_path / "store", engine=FakeEngine(SCRIPTS), sampling={"temperature": 0, "seed": 5, "max_tokens": 200}
    )
    return make_app(session_factory=factory, config=UIConfig(annotator="snap"), prompt="Give four examples of fruit.")


def steered(*keys: str):
    """run_before: let it stream, steer once (a correction at "Banana"), then press ``keys``."""

    async def run(pilot) -> None:
        app = pilot.app
        await wait_idle(pilot, app)
        app.session_screen.view.cursor = 12  # (keys are exercised by the Pilot tests)
        await pilot.press("enter", *"Kiwi", "enter")
        await wait_idle(pilot, app)
        app.session_screen.view.cursor = 9
        app.session_screen.status.tokens_per_s = 0.0  # wall-clock speed: not deterministic
        app.clear_notifications()
        if keys:
            await pilot.press(*keys)
        await pilot.pause(0.1)
        app.clear_notifications()
        await pilot.pause()

    return run


def test_snapshot_session(snap_compare, tmp_path):
    assert snap_compare(build(tmp_path), run_before=steered())


def test_snapshot_correction_editor(snap_compare, tmp_path):
    assert snap_compare(build(tmp_path), run_before=steered("enter", *"Pear"))


def test_snapshot_alternatives(snap_compare, tmp_path):
    assert snap_compare(build(tmp_path), run_before=steered("tab"))


def test_snapshot_tree(snap_compare, tmp_path):
    assert snap_compare(build(tmp_path), run_before=steered("t"))


def test_snapshot_stats(snap_compare, tmp_path):
    assert snap_compare(build(tmp_path), run_before=steered("s"))


def test_snapshot_help(snap_compare, tmp_path, monkeypatch):
    monkeypatch.setenv("STEER_CONFIG", "/home/you/.config/steer-tui/config.toml")  # shown on screen
    assert snap_compare(build(tmp_path), run_before=steered("question_mark"))
