"""Pilot tests of the app on the deterministic FakeEngine. Each drives keys as a person
would and asserts on the saved task FILE (and, where it matters, on the screen)."""

from __future__ import annotations

import json

from textual.widgets import DataTable, OptionList, Tree

from steer_tui.core.store import StoreError
from steer_tui.core.tasks import load_task_queue
from steer_tui.ui.app import make_app
from steer_tui.ui.session_factory import SessionFactory
from steer_tui.ui.screens.alternatives import AlternativesScreen
from steer_tui.ui.screens.help import HelpScreen
from steer_tui.ui.screens.picker import PickerScreen
from steer_tui.ui.screens.stats import StatsScreen
from steer_tui.ui.screens.tree import TreeScreen

from .conftest import (
    SCRIPTS,
    SlowFakeEngine,
    nodes_by_id,
    path_of,
    read_task,
    saved_end,
    saved_response_text,
    task_files,
    wait_for,
    wait_idle,
)

FRUITS = SCRIPTS[0]


async def test_streams_to_eos_and_saves(app_for, store):
    app = app_for(prompt="Give four fruits")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        scr = app.session_screen
        assert scr.status.state == "ended (eos)"
        assert scr.view.text().startswith(FRUITS)
        data = read_task(store)
        assert saved_response_text(data) == scr.view.text()
        assert path_of(data, saved_end(data))[-1]["end"] == "eos"
        assert data["prompt"]["messages"] == [{"role": "user", "content": "Give four fruits"}]


async def test_pause_resume_and_cursor(store, config):
    engine = SlowFakeEngine(SCRIPTS, delay=0.05)
    factory = SessionFactory(store=store, engine=engine, sampling={"temperature": 0, "seed": 1, "max_tokens": 200})
    app = make_app(session_factory=factory, config=config, prompt="fruits")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.session_screen and app.session_screen.view.n_tokens >= 10, what="tokens")
        scr = app.session_screen
        await pilot.press("space")
        await wait_idle(pilot, app)
        assert scr.status.state == "paused"
        n = scr.view.n_tokens
        assert 10 <= n < len(FRUITS)
        data = read_task(store)
        last = path_of(data, saved_end(data))[-1]
        assert last["end"] == "paused" and len(last["tokens"]) == n
        # the cursor: end, then left/home/right/ctrl+right
        assert scr.view.cursor == n
        await pilot.press("left")
        assert scr.view.cursor == n - 1
        await pilot.press("home")
        assert scr.view.cursor == 0
        await pilot.press("right", "right")
        assert scr.view.cursor == 2
        await pilot.press("ctrl+right")
        assert scr.view.cursor == 3 and scr.view.token_text(3) == "A"  # the start of "Apple"
        await pilot.press("ctrl+right")
        assert scr.view.token_text(scr.view.cursor) == "\n"  # past the word
        info = str(scr.query_one("#cursor-info").info)
        assert f"#{scr.view.cursor}" in info and "p=" in info and "rank" in info
        # resume: the same model node is extended (pause/continue does not fragment)
        await pilot.press("space")
        await wait_idle(pilot, app, timeout=20)
        data = read_task(store)
        assert len(data["nodes"]) == 1 and data["nodes"][0]["end"] == "eos"
        assert data["nodes"][0]["text"].startswith(FRUITS)


async def test_rollback_and_correct(app_for, store):
    app = app_for(prompt="fruits")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        scr = app.session_screen
        at = FRUITS.index("Banana")
        # move the cursor to the token that starts "Banana" (FakeEngine: one byte per token here)
        await pilot.press("home", *["right"] * at)
        assert scr.view.token_text(scr.view.cursor) == "B"
        await pilot.press("enter")
        assert scr.query_one("#correction").has_focus
        await pilot.press(*"Kiwi")
        # inline preview: the typed text shows at the cut, what follows is struck
        assert any("Kiwi" in line for line in scr.view.visible_lines())
        await pilot.press("enter")
        await wait_idle(pilot, app)
        data = read_task(store)
        by = nodes_by_id(data)
        human = [n for n in data["nodes"] if n["author"] == "human"]
        assert len(human) == 1
        h = human[0]
        assert h["kind"] == "correction" and h["text"] == "Kiwi" and h["annotator"] == "tester"
        rejected = by[h["replaces"]]
        assert rejected["author"] == "model" and rejected["text"].startswith("Banana")
        assert rejected["parent"] == h["parent"]
        assert "".join(n["text"] for n in path_of(data, h["parent"])) == FRUITS[:at]
        # generation resumed after the correction, and the path runs through it
        path = path_of(data, saved_end(data))
        assert h in path and path[-1]["author"] == "model" and path[-1]["parent"] == h["id"]
        assert h["logprobs"] and len(h["logprobs"]) == len(h["tokens"])
        # the rejected text stays visible (struck through) before the correction
        assert "Banana" in "".join(scr.view.visible_lines()[:3])
        assert scr.status.steers == 1


async def test_escape_cancels_without_change(app_for, store):
    app = app_for(prompt="fruits")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        before = read_task(store)
        await pilot.press("home", "right", "right", "e", *"junk", "escape")
        await pilot.pause()
        scr = app.session_screen
        assert not scr.query_one("#correction-bar").display
        assert scr.view.text().startswith(FRUITS)
        after = read_task(store)
        assert after["nodes"] == before["nodes"] and after["session"] == before["session"]


async def test_pick_alternative(app_for, store):
    app = app_for(prompt="fruits")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        scr = app.session_screen
        await pilot.press("home", "right", "right", "right")
        cursor = scr.view.cursor
        top = scr.session.tokens_view()[cursor].top
        await pilot.press("tab")
        await pilot.pause()
        assert isinstance(app.screen, AlternativesScreen)
        options = app.screen.query_one(OptionList)
        assert options.option_count == len(top)
        await pilot.press("down", "enter")  # the second most likely token
        await wait_idle(pilot, app)
        data = read_task(store)
        picks = [n for n in data["nodes"] if n["kind"] == "pick"]
        assert len(picks) == 1
        assert picks[0]["tokens"] == [top[1][0]]
        assert len(path_of(data, picks[0]["parent"])) and sum(
            len(n["tokens"]) for n in path_of(data, picks[0]["parent"])
        ) == cursor
        assert nodes_by_id(data)[picks[0]["replaces"]]["author"] == "model"


async def test_resample_branch_switch_undo_redo_accept(app_for, store):
    app = app_for(prompt="fruits")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        scr = app.session_screen
        # resample from token 3: a new model sibling of the cut part, no human node
        await pilot.press("home", "right", "right", "right", "r")
        await wait_idle(pilot, app)
        data = read_task(store)
        assert not [n for n in data["nodes"] if n["author"] == "human"]
        first = data["nodes"][0]
        kids = [n for n in data["nodes"] if n["parent"] == first["id"]]
        assert len(kids) == 2 and all(k["author"] == "model" for k in kids)
        assert saved_end(data) == kids[1]["id"]
        # [ goes to the other sibling at that branch point, ] back
        await pilot.press("home", "right", "right", "right", "right", "left_square_bracket")
        await pilot.pause()
        assert saved_end(read_task(store)) == kids[0]["id"]
        await pilot.press("right_square_bracket")
        await pilot.pause()
        assert saved_end(read_task(store)) == kids[1]["id"]
        # a correction, undone (discarded, not deleted) and redone
        await pilot.press("end", "left", "left", "enter", *"!!", "enter")
        await wait_idle(pilot, app)
        data = read_task(store)
        h = next(n for n in data["nodes"] if n["author"] == "human")
        n_nodes = len(data["nodes"])
        await pilot.press("u")
        # the save lands on the app's own schedule: wait for it, not for a fixed pause (a
        # pause lost this race under a loaded CPU)
        await wait_for(pilot, lambda: read_task(store)["discarded"], what="the undo saved")
        data = read_task(store)
        assert data["discarded"] == [h["id"]] and len(data["nodes"]) == n_nodes
        assert h["id"] not in {n["id"] for n in path_of(data, saved_end(data))}
        assert scr.status.steers == 0
        await pilot.press("U")
        await wait_for(pilot, lambda: not read_task(store)["discarded"], what="the redo saved")
        data = read_task(store)
        assert data["discarded"] == []
        assert h["id"] in {n["id"] for n in path_of(data, saved_end(data))}
        # d: the current path is accepted
        await pilot.press("d")
        await pilot.pause()
        data = read_task(store)
        assert data["accepted"] == [saved_end(data)]


async def test_quit_and_reopen_continues(app_for, store):
    app = app_for(prompt="fruits")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        await pilot.press("home", *["right"] * 5, "enter", *"Pear", "enter")
        await wait_idle(pilot, app)
        text = app.session_screen.view.text()
        task_id = app.session_screen.session.task_id
        await pilot.press("ctrl+q")
    assert app.return_value == 0
    saved = read_task(store)
    assert saved_response_text(saved) == text
    # the lock was released: the task opens again, at the same position
    app2 = app_for(task_id=task_id)
    async with app2.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app2)
        scr = app2.session_screen
        assert scr.view.text() == text
        assert scr.status.steers == 1
        await pilot.press("u")
        await pilot.pause()
    data = read_task(store)
    assert len(data["discarded"]) == 1


async def test_task_queue_navigation(tmp_path, app_for, store):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(
        json.dumps({"prompt": "first task", "id": "q-one"}) + "\n"
        + "{not json\n"
        + json.dumps({"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "second"}], "title": "Second"}) + "\n",
        encoding="utf-8",
    )
    tasks, errors = load_task_queue(qfile)
    assert len(tasks) == 2 and len(errors) == 1 and ":2:" in errors[0]
    app = app_for(tasks=tasks, startup_messages=[f"skipped {e}" for e in errors])
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        assert app.session_screen.status.task == "task 1/2"
        assert any(":2:" in str(n.message) for n in app._notifications)
        await pilot.press("n")
        await wait_idle(pilot, app)
        assert app.session_screen.status.task == "task 2/2"
        assert len(task_files(store)) == 2
        second = app.session_screen.session.task_id
        await pilot.press("n")  # past the end: a notice, nothing changes
        await pilot.pause()
        assert app.session_screen.session.task_id == second
        await pilot.press("N")
        await wait_idle(pilot, app)
        assert app.session_screen.session.task_id == "q-one-tester"  # queue id + annotator
        assert app.session_screen.status.task == "task 1/2"
    assert len(task_files(store)) == 2  # going back reopened the task, no duplicate
    data = read_task(store, second)
    assert data["title"] == "Second" and data["prompt"]["messages"][0]["role"] == "system"


async def test_picker_new_task_and_open_saved(app_for, store):
    app = app_for()
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, PickerScreen)
        await pilot.press(*"Four fruits", "enter", *"please")
        await pilot.press("ctrl+s")
        await wait_idle(pilot, app)
        data = read_task(store)
        assert data["prompt"]["messages"][-1]["content"] == "Four fruits\nplease"
        first_id = data["id"]
        # o: open the picker again, pick the saved task from the table
        await pilot.press("o")
        await pilot.pause()
        assert isinstance(app.screen, PickerScreen)
        table = app.screen.query_one(DataTable)
        assert table.row_count == 1
        table.focus()
        await pilot.press("enter")
        await wait_idle(pilot, app)
        assert app.session_screen.session.task_id == first_id


async def test_tree_and_stats_views(app_for, store):
    app = app_for(prompt="fruits")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        await pilot.press("home", *["right"] * 12, "enter", *"Kiwi", "enter")
        await wait_idle(pilot, app)
        data = read_task(store)
        h = next(n for n in data["nodes"] if n["author"] == "human")
        await pilot.press("t")
        await pilot.pause()
        assert isinstance(app.screen, TreeScreen)
        tree = app.screen.query_one(Tree)
        # jump to the rejected node: select it in the tree view
        target = app.screen._tree_nodes[h["replaces"]]
        tree.move_cursor(target)
        await pilot.press("enter")
        await pilot.pause()
        assert not isinstance(app.screen, TreeScreen)
        assert saved_end(read_task(store)) == h["replaces"]
        await pilot.press("s")
        await pilot.pause()
        assert isinstance(app.screen, StatsScreen)
        rows = app.screen.rows
        assert len(rows) == 1 and rows[0].chosen == "Kiwi" and rows[0].position == 12
        assert rows[0].rejected.startswith(FRUITS[12:20])
        assert rows[0].p_chosen is not None and 0 < rows[0].p_chosen <= 1
        await pilot.press("escape")


async def test_help_palette_and_keymap(factory, store):
    from steer_tui.ui.config import UIConfig
    from steer_tui.ui.keys import ALL_KEYS, SESSION_KEYS

    config = UIConfig(keymap={"session.pause": "z", "session.undo": "x"})
    engine = SlowFakeEngine(SCRIPTS, delay=0.02)
    slow = SessionFactory(store=store, engine=engine, sampling={"temperature": 0, "seed": 1})
    app = make_app(session_factory=slow, config=config, prompt="fruits")
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_for(pilot, lambda: app.session_screen and app.session_screen.view.n_tokens >= 3, what="tokens")
        await pilot.press("z")  # remapped pause
        await wait_idle(pilot, app)
        assert app.session_screen.status.state == "paused"
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        table = app.screen.query_one(DataTable)
        assert table.row_count == len(ALL_KEYS)
        ids = {str(table.get_row_at(i)[2]) for i in range(table.row_count)}
        assert ids == {k.id for k in ALL_KEYS}
        keys_of_pause = next(str(table.get_row_at(i)[0]) for i in range(table.row_count) if str(table.get_row_at(i)[2]) == "session.pause")
        assert keys_of_pause == "z"
        await pilot.press("escape")
        titles = {c.title for c in app.get_system_commands(app.session_screen)}
        for k in SESSION_KEYS:
            assert k.description in titles


class RetrySpy:
    """Counts the screen's save-retry timers as they are armed and as they fire, and records
    any moment when a second one is armed while one is still pending."""

    def __init__(self, scr) -> None:
        from steer_tui.ui.screens.saving import SaveKeeper

        self.armed = self.fired = 0
        self.piled_up: list[int] = []
        real_set_timer = scr.set_timer

        def set_timer(delay, callback=None, *args, **kwargs):
            if getattr(callback, "__func__", None) is SaveKeeper.retry:
                if self.armed > self.fired:
                    self.piled_up.append(self.armed - self.fired + 1)
                self.armed += 1
                inner = callback

                def fire():
                    self.fired += 1
                    return inner()

                callback = fire
            return real_set_timer(delay, callback, *args, **kwargs)

        scr.set_timer = set_timer


def failing_store_save(monkeypatch, store_type):
    """Make ``store_type.save`` fail while ``state["fail"]``; counts every attempt."""
    real_save = store_type.save
    state = {"fail": True, "attempts": 0}

    def flaky_save(self, tree):
        state["attempts"] += 1
        if state["fail"]:
            raise StoreError(f"cannot write {self.task_path(tree.id)}: No space left on device")
        return real_save(self, tree)

    monkeypatch.setattr(store_type, "save", flaky_save)
    return state


def notices(app) -> list[str]:
    return [n.message for n in app._notifications]


async def test_save_failure_keeps_data_and_the_timer_retries(app_for, store, monkeypatch):
    app = app_for(prompt="fruits")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        scr = app.session_screen
        scr.save_retry_seconds = 0.1
        spy = RetrySpy(scr)
        state = failing_store_save(monkeypatch, type(scr.session.store))
        await pilot.press("d")
        await wait_for(pilot, lambda: scr.status.save_state.startswith("save failed"), what="the failed save")
        assert scr.session.tree.accepted  # kept in memory
        assert read_task(store)["accepted"] == []
        assert any("Your work is kept in memory" in m for m in notices(app))
        # the timer really fires, and fires again while the disk stays full
        await wait_for(pilot, lambda: spy.fired >= 2 and state["attempts"] >= 3, what="two retries by the timer")
        assert read_task(store)["accepted"] == []
        state["fail"] = False
        await wait_for(pilot, lambda: scr.status.save_state == "saved", what="the retry that succeeds")
        assert read_task(store)["accepted"] == scr.session.tree.accepted
        await wait_for(pilot, lambda: "Saved after retrying." in notices(app), what="the notice (posted to the app)")
        fired = spy.fired
        await pilot.pause(5 * scr.save_retry_seconds)
        assert spy.fired == fired and spy.armed == spy.fired  # saved: nothing is retried any more
        assert spy.piled_up == []


async def test_save_retry_waits_for_a_generation_and_never_piles_up(store, config, monkeypatch):
    """Several failed saves share one pending retry; a retry that comes due while the model
    streams re-arms instead of saving under the stream; after the stream, the timer's retry
    saves everything and says so."""
    engine = SlowFakeEngine([FRUITS * 6], delay=0.03)
    factory = SessionFactory(store=store, engine=engine, sampling={"temperature": 0, "seed": 1, "max_tokens": 400}, annotator="tester")
    app = make_app(session_factory=factory, config=config, prompt="fruits")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.session_screen and app.session_screen.view.n_tokens >= 3, what="tokens")
        scr = app.session_screen
        await pilot.press("space")
        await wait_idle(pilot, app)
        scr.save_retry_seconds = 0.15
        spy = RetrySpy(scr)
        state = failing_store_save(monkeypatch, type(scr.session.store))
        # accept twice: two failed saves in a row ("u" here used to be the second, but with no
        # steer on the path undo changes nothing and saves nothing, so the count rested on
        # the first retry firing in time: it failed 1 in 6 on a busy machine)
        await pilot.press("d", "d")
        await wait_idle(pilot, app)
        assert state["attempts"] >= 2 and scr.status.save_state.startswith("save failed")
        assert spy.armed - spy.fired <= 1
        # continue generating; the retry comes due during the stream and waits
        await pilot.press("space")
        await wait_for(pilot, lambda: scr.streaming, what="the stream")
        attempts, fired = state["attempts"], spy.fired
        await wait_for(pilot, lambda: spy.fired >= fired + 2 or not scr.streaming, timeout=20, what="retries during the stream")
        assert scr.streaming, f"{spy.fired - fired} retries came due during the stream: they must re-arm while it runs"
        assert state["attempts"] == attempts  # due twice, saved nothing under the stream
        assert spy.armed - spy.fired == 1  # and re-armed
        # the stream ends (its own save fails too), then the timer's retry saves it all
        await pilot.press("space")
        await wait_idle(pilot, app)
        state["fail"] = False
        await wait_for(pilot, lambda: scr.status.save_state == "saved", what="the retry after the stream")
        await wait_for(pilot, lambda: "Saved after retrying." in notices(app), what="the notice (posted to the app)")
        data = read_task(store)
        assert data["accepted"] == scr.session.tree.accepted
        assert nodes_by_id(data).keys() == {n.id for n in scr.session.tree.nodes}
        assert saved_response_text(data) == scr.view.text()
        assert spy.piled_up == [], f"retries piled up: {spy.piled_up} pending at once"
    factory.close()


async def test_tiny_terminal_does_not_crash(app_for, store):
    app = app_for(prompt="fruits")
    async with app.run_test(size=(12, 4)) as pilot:
        await wait_idle(pilot, app)
        await pilot.press("home", "right", "down", "end", "e", *"ok", "enter")
        await wait_idle(pilot, app)
        await pilot.press("t")
        await pilot.pause()
        await pilot.press("escape", "s")
        await pilot.pause()
        await pilot.press("escape", "question_mark")
        await pilot.pause()
        await pilot.press("escape")
        view = app.session_screen.view
        narrow = view.line_count()
        await pilot.resize_terminal(80, 24)  # grow: the text is wrapped again, to the new width
        await wait_for(pilot, lambda: view.line_count() < narrow, what="the text re-wrapped to 80 columns")
        assert max(len(line) for line in view.visible_lines()) <= view.scrollable_content_region.width
    data = read_task(store)
    # at the end after an EOS, a correction replaces the EOS token
    h = next(n for n in data["nodes"] if n["author"] == "human")
    assert h["kind"] == "correction" and h["text"] == "ok"
    assert nodes_by_id(data)[h["replaces"]]["end"] == "eos"


async def test_context_full_is_a_notice_not_a_crash(store, config):
    from steer_tui.core.fake_engine import FakeEngine

    engine = FakeEngine([SCRIPTS[0] * 20], n_ctx=48)
    factory = SessionFactory(store=store, engine=engine, sampling={"temperature": 0, "seed": 1, "max_tokens": 500})
    app = make_app(session_factory=factory, config=config, prompt="go")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        scr = app.session_screen
        assert scr.status.state == "context full"
        assert any("context" in str(n.message).lower() for n in app._notifications)
        assert scr.status.ctx_used == scr.status.ctx_limit == 48
        await pilot.press("space")  # cannot continue: a notice, nothing breaks
        await pilot.pause()
        assert not scr.generating
    data = read_task(store)
    assert path_of(data, saved_end(data))[-1]["end"] == "context"


async def test_model_load_failure_is_reported(store, config):
    from steer_tui.core.errors import EngineError

    def broken():
        raise EngineError("model file '/x/broken.gguf' is not a GGUF file")

    factory = SessionFactory(store=store, engine_loader=broken)
    app = make_app(session_factory=factory, config=config, prompt="hi")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.session_screen.status.state == "error", what="error state")
        assert any("broken.gguf" in str(n.message) for n in app._notifications)
        await pilot.press("space", "enter", "t", "u", "d")  # no session: keys do nothing, no crash
        await pilot.pause()
        await pilot.press("ctrl+q")
    assert app.return_value == 0


async def test_locked_task_opens_read_only(app_for, store, fake_engine):
    from steer_tui.core.session import Session

    holder = Session.create(store=store, prompt="held", model=fake_engine, sampling={"temperature": 0, "seed": 1})
    try:
        app = app_for(task_id=holder.task_id)
        async with app.run_test(size=(80, 24)) as pilot:
            await wait_idle(pilot, app)
            scr = app.session_screen
            assert scr.session.read_only and scr.status.save_state == "read-only"
            assert any("another session" in str(n.message) and "read-only" in str(n.message) for n in app._notifications)
            before = read_task(store, holder.task_id)
            await pilot.press("enter", *"x", "enter", "d", "u", "r")  # refused with notices, no crash
            await pilot.pause()
            assert read_task(store, holder.task_id) == before
    finally:
        holder.close()


async def test_quit_mid_stream_saves_and_releases(store, config):
    engine = SlowFakeEngine(SCRIPTS, delay=0.03)
    factory = SessionFactory(store=store, engine=engine, sampling={"temperature": 0, "seed": 1, "max_tokens": 200})
    app = make_app(session_factory=factory, config=config, prompt="fruits")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.session_screen and app.session_screen.view.n_tokens >= 4, what="tokens")
        task_id = app.session_screen.session.task_id
        await pilot.press("ctrl+q")
    data = read_task(store)
    last = path_of(data, saved_end(data))[-1]
    assert last["end"] == "paused" and 4 <= len(last["tokens"]) < len(FRUITS)
    from steer_tui.core.session import Session

    with Session.open(store=store, task_id=task_id, model=engine) as s:  # the lock was released
        assert s.response_text == data["nodes"][0]["text"]
    # reopened in the app it waits, paused where it stopped; space continues the same node
    engine.delay = 0
    app2 = make_app(session_factory=factory, config=config, task_id=task_id)
    async with app2.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app2)
        scr = app2.session_screen
        assert scr.status.state == "paused" and scr.view.text() == data["nodes"][0]["text"]
        await pilot.press("space")
        await wait_idle(pilot, app2)
        assert scr.status.state == "ended (eos)"
    data = read_task(store)
    assert len(data["nodes"]) == 1 and data["nodes"][0]["text"].startswith(FRUITS)


async def test_steer_key_while_streaming_pauses_first(store, config):
    # a steering key pressed mid-stream pauses, then acts; late stream messages are ignored
    engine = SlowFakeEngine(SCRIPTS, delay=0.03)
    factory = SessionFactory(store=store, engine=engine, sampling={"temperature": 0, "seed": 1, "max_tokens": 200})
    app = make_app(session_factory=factory, config=config, prompt="fruits")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.session_screen and app.session_screen.view.n_tokens >= 6, what="tokens")
        scr = app.session_screen
        await pilot.press("r")  # resample at the cursor (the end while streaming)
        await wait_idle(pilot, app, timeout=20)
        assert scr.view.text() == scr.session.response_text
        data = read_task(store)
        assert saved_response_text(data) == scr.view.text()
        roots = [n for n in data["nodes"] if n["parent"] is None]
        assert len(roots) == 1 and roots[0]["end"] == "paused"
        assert [n["parent"] for n in data["nodes"][1:]] == [roots[0]["id"]]  # resampled after it


async def test_mouse_click_moves_cursor(app_for, store):
    app = app_for(prompt="fruits")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        view = app.session_screen.view
        await pilot.click("#tokens", offset=(1 + 3, 1))  # padding 1: the 4th cell of line 2
        assert view.token_text(view.cursor) == "B"


async def test_page_keys_move_the_cursor(store, config):
    from steer_tui.core.fake_engine import FakeEngine

    engine = FakeEngine(["line of text\n" * 60])
    factory = SessionFactory(store=store, engine=engine, sampling={"temperature": 0, "seed": 1, "max_tokens": 800})
    app = make_app(session_factory=factory, config=config, prompt="lines")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        view = app.session_screen.view
        await pilot.press("home", "pagedown")
        line, _ = view.cursor_position()
        assert line >= 10
        assert view.scroll_offset.y <= line < view.scroll_offset.y + view.scrollable_content_region.height
        await pilot.press("pageup")
        assert view.cursor_position()[0] == 0


def palette_highlights(app, text: str) -> bool:
    """The command palette is open and its highlighted hit is the command ``text``."""
    from textual.command import CommandList, CommandPalette

    if not isinstance(app.screen, CommandPalette):
        return False
    hits = app.screen.query_one(CommandList)
    if hits.highlighted is None:
        return False
    return text in str(hits.get_option_at_index(hits.highlighted).prompt)


async def test_command_palette_runs_session_actions(app_for, store):
    app = app_for(prompt="fruits")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        await pilot.press("ctrl+p")
        await pilot.press(*"Mark path done")
        await wait_for(pilot, lambda: palette_highlights(app, "Mark path done"), what="the palette's hit")
        await pilot.press("enter")
        await wait_for(pilot, lambda: read_task(store)["accepted"] != [], what="accept via the palette")
        await pilot.press("ctrl+p")
        await pilot.press(*"Tree view")
        await wait_for(pilot, lambda: palette_highlights(app, "Tree view"), what="the palette's hit")
        await pilot.press("enter")
        await wait_for(pilot, lambda: isinstance(app.screen, TreeScreen), what="tree view via the palette")


async def test_correction_with_newline(app_for, store):
    app = app_for(prompt="fruits")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        app.session_screen.view.cursor = 9  # "2." of the second line
        await pilot.press("enter", *"Fig", "ctrl+j", *"2.", "enter")
        await wait_idle(pilot, app)
    h = next(n for n in read_task(store)["nodes"] if n["author"] == "human")
    assert h["text"] == "Fig\n2."


async def test_a_typed_newline_glyph_is_saved_as_typed(app_for, store):
    """The editor draws a newline (ctrl+j) as ↵, but the glyph is display only: a ↵ the user
    types is text, and the saved correction holds exactly what was typed."""
    from textual import events

    from steer_tui.ui.widgets.correction import CorrectionInput

    app = app_for(prompt="fruits")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app)
        app.session_screen.view.cursor = 9
        await pilot.press("enter", *"Fig")
        # as a terminal sends it (pilot.press cannot: it finds no character for this key name)
        app.post_message(events.Key("downwards_arrow_with_corner_leftwards", "↵"))
        await pilot.press("ctrl+j", *"2.")
        editor = app.session_screen.query_one(CorrectionInput)
        assert editor.value == "Fig↵\n2."
        assert editor._value.plain == "Fig↵↵2."  # both drawn alike, one cell each
        await pilot.press("enter")
        await wait_idle(pilot, app)
    h = next(n for n in read_task(store)["nodes"] if n["author"] == "human")
    assert h["text"] == "Fig↵\n2."
