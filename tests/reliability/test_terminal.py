"""Terminal safety: model output, corrections, titles, ids and file names holding Rich markup,
ANSI/OSC escapes (OSC 52 clipboard, OSC 8 hyperlinks, screen clears) and control characters
are shown inertly by ``steer-tui show``/``list`` and by the app."""

from __future__ import annotations

import json

from steer_tui.core.fake_engine import FakeEngine
from steer_tui.core.session import Session
from steer_tui.core.store import Store

from .conftest import run_cli

OSC52 = "\x1b]52;c;ZXZpbA==\x07"  # write "evil" to the clipboard
OSC8 = "\x1b]8;;https://evil.example\x07click\x1b]8;;\x07"  # a hyperlink
CSI = "\x1b[2J\x1b[31m"  # clear screen, red
C1 = "\x9b31m"  # 8-bit CSI
BIDI = "\u202egnp.exe\u202c"
MARKUP = "[bold red]BOLD[/] [link=https://evil.example]x[/link]"
HOSTILE = f"{MARKUP} {OSC52} {OSC8} {CSI} {C1} {BIDI} \x07\x08\x00 end"
RAW_CONTROL = ("\x1b", "\x07", "\x9b", "\x00", "\x08", "\u202e")


def _hostile_store(tmp_path):
    store = tmp_path / "store"
    eng = FakeEngine(scripts=(HOSTILE,))
    s = Session.create(store=store, prompt=f"Say {MARKUP} {CSI}", model=eng, sampling={"temperature": 0, "seed": 1, "max_tokens": 200},
                       title=f"title {OSC52} {MARKUP}", task_id="hostile", annotator=f"eve{CSI}")
    list(s.generate())
    s.rollback(5)
    s.correct(f" {OSC8} {MARKUP}")
    s.close()
    # ids, dates and file names are data from disk too
    p = Store(store).task_path("hostile")
    d = json.loads(p.read_text(encoding="utf-8"))
    d["updated_at"] = f"2026{CSI}"
    d["model"]["name"] = f"model{OSC52}"
    (p.parent / "other.json").write_text(json.dumps({**d, "id": f"id{OSC52}"}), encoding="utf-8")
    (p.parent / f"broken{CSI}.json").write_text("{", encoding="utf-8")
    p.write_text(json.dumps(d), encoding="utf-8")
    return store


def _assert_inert(out: str) -> None:
    for c in RAW_CONTROL:
        assert c not in out, f"raw {c!r} in output"


def test_show_and_list_are_inert(tmp_path):
    store = _hostile_store(tmp_path)
    show = run_cli("show", "hostile", "--store", str(store))
    assert show.returncode == 0, show.stderr
    _assert_inert(show.stdout)
    assert "[bold red]BOLD[/]" in show.stdout  # markup shown literally
    assert "\\x1b]52;c;ZXZpbA==\\x07" in show.stdout  # escapes shown as visible text
    show2 = run_cli("show", str(store / "tasks" / "other.json"))
    assert show2.returncode == 0, show2.stderr
    _assert_inert(show2.stdout)
    lst = run_cli("list", "--store", str(store))
    assert lst.returncode == 0, lst.stderr
    _assert_inert(lst.stdout + lst.stderr)
    assert "[unreadable]" in lst.stdout and "\\x1b[2J" in lst.stdout


def test_error_messages_are_inert(tmp_path):
    bad = tmp_path / f"evil{OSC52}.json"
    bad.write_text("{", encoding="utf-8")
    proc = run_cli("show", str(bad))
    assert proc.returncode == 2
    _assert_inert(proc.stderr)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(f'{{"prompt": 5, "title": "{OSC52}"}}\n{CSI}\n', encoding="utf-8")
    proc = run_cli("auto", "--dry-run", "--rules", str(tmp_path / "none.toml"), "--tasks", str(tasks))
    assert "Traceback" not in proc.stderr
    _assert_inert(proc.stderr + proc.stdout)


def test_export_keeps_text_exactly(tmp_path):
    """Inert on screen, exact in data: training text keeps the bytes the model wrote."""
    store = _hostile_store(tmp_path)
    out = tmp_path / "sft.jsonl"
    assert run_cli("export", "--format", "sft", "--out", str(out), "--from", str(store / "tasks" / "hostile.json")).returncode == 0
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert rows and any(OSC8 in r["completion"] for r in rows)


async def test_app_renders_hostile_text_literally(tmp_path):
    from textual.widgets import Input

    from steer_tui.ui.app import make_app

    from steer_tui.ui.session_factory import SessionFactory
    from steer_tui.ui.config import UIConfig

    f = SessionFactory(store=tmp_path / "s", engine=FakeEngine(scripts=(HOSTILE,)), sampling={"temperature": 0, "seed": 1, "max_tokens": 200})
    app = make_app(session_factory=f, config=UIConfig(), prompt=f"Say {MARKUP} {CSI}")

    async def idle(pilot):
        for _ in range(500):
            await pilot.pause(0.02)
            s = app.session_screen
            if s and s.session and not s.generating and not s.busy and s.status.state not in ("loading", "streaming"):
                return s
        raise AssertionError("not idle")

    def screen_text() -> str:
        rows = app.screen._compositor.render_strips()
        return "\n".join("".join(seg.text for seg in strip) for strip in rows)

    async with app.run_test(size=(160, 40)) as pilot:
        scr = await idle(pilot)
        text = screen_text()
        _assert_inert(text)
        assert "[bold red]BOLD[/]" in text and "Say [bold red]BOLD[/]" in text
        assert "\\x1b]52;c;ZXZpbA==\\x07" in text
        # a correction holding markup and escapes, typed into the editor
        scr.view.cursor = 3
        await pilot.press("enter")
        app.screen.query_one(Input).value = f" {MARKUP} {OSC8}"
        await pilot.press("enter")
        scr = await idle(pilot)
        text = screen_text()
        _assert_inert(text)
        assert text.count("[bold red]BOLD[/]") >= 2
        assert any(MARKUP in n.text and OSC8 in n.text for n in scr.session.tree.nodes if n.is_human)  # data kept exactly
        await pilot.press("t")  # the tree view
        from steer_tui.ui.screens.tree import TreeScreen

        for _ in range(500):
            await pilot.pause(0.02)
            if isinstance(app.screen, TreeScreen) and "BOLD" in screen_text():
                break
        else:
            raise AssertionError("the tree view did not show the task")
        text = screen_text()
        _assert_inert(text)
        assert "[bold red]BOLD[/]" in text
    f.close()
