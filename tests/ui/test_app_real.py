"""The app on the bundled real model (SmolLM2-135M, CPU): the whole steering loop, each
step checked in the saved task file. One engine per module; few tokens per step."""

from __future__ import annotations

import pytest

from steer_tui.ui.app import make_app

from steer_tui.ui.session_factory import SessionFactory
from steer_tui.ui.config import UIConfig
from steer_tui.ui.screens.alternatives import AlternativesScreen

from .conftest import nodes_by_id, path_of, read_task, saved_end, saved_response_text, wait_for, wait_idle


@pytest.fixture(scope="module")
def real_engine(model_path):
    from steer_tui.core.engine import open_engine

    engine = open_engine(model_path, n_ctx=512, seed=0)
    yield engine
    close = getattr(engine, "close", None)
    if close:
        close()


def real_app(store, engine, **kwargs):
    factory = SessionFactory(
        store=store, engine=engine, sampling={"temperature": 0, "seed": 3, "max_tokens": kwargs.pop("max_tokens", 16)}, annotator="t"
    )
    return make_app(session_factory=factory, config=UIConfig(annotator="t"), **kwargs)


async def test_real_model_steering_loop(real_engine, tmp_path):
    store = tmp_path / "store"
    app = real_app(store, real_engine, prompt="Give four examples of fruit.")
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app, timeout=120)
        scr = app.session_screen
        assert scr.status.state in ("paused (max tokens)", "ended (eos)")
        first = read_task(store)
        assert saved_response_text(first) == scr.view.text() and scr.view.n_tokens > 3
        assert first["model"]["name"].startswith("SmolLM2")

        # pick: the second alternative at token 2
        await pilot.press("home", "right", "right", "tab")
        await pilot.pause()
        assert isinstance(app.screen, AlternativesScreen)
        top = scr.session.tokens_view()[2].top
        await pilot.press("down", "enter")
        await wait_idle(pilot, app, timeout=120)
        data = read_task(store)
        pick = next(n for n in data["nodes"] if n["kind"] == "pick")
        assert pick["tokens"] == [top[1][0]] and pick["replaces"]
        assert sum(len(n["tokens"]) for n in path_of(data, pick["parent"])) == 2

        # rollback + correction at the last-but-two token; generation resumes after it
        await pilot.press("end", "left", "left", "enter", *" Kiwi", "enter")
        await wait_idle(pilot, app, timeout=120)
        data = read_task(store)
        corr = next(n for n in data["nodes"] if n["kind"] == "correction")
        assert corr["text"] == " Kiwi" and corr["replaces"] and corr["annotator"] == "t"
        assert len(corr["logprobs"]) == len(corr["tokens"]) and all(lp <= 0 for lp in corr["logprobs"])
        assert path_of(data, saved_end(data))[-1]["parent"] == corr["id"]
        assert " Kiwi" in scr.view.text()

        # resample from token 1: a new model sibling, no new human node
        n_human = sum(n["author"] == "human" for n in data["nodes"])
        await pilot.press("home", "right", "r")
        await wait_idle(pilot, app, timeout=120)
        data = read_task(store)
        assert sum(n["author"] == "human" for n in data["nodes"]) == n_human
        end_path = path_of(data, saved_end(data))
        assert sum(len(n["tokens"]) for n in end_path[:-1]) == 1  # the new branch starts at token 1

        # [ and ]: cycle the sibling branches at token 1
        before = saved_end(data)
        await pilot.press("home", "right", "right", "left_square_bracket")
        await pilot.pause()
        other = saved_end(read_task(store))
        assert other != before
        await pilot.press("right_square_bracket")
        await pilot.pause()
        assert saved_end(read_task(store)) == before

        # go back to the corrected branch, undo and redo its last steer, accept
        await pilot.press("left_square_bracket")
        await pilot.pause()
        data = read_task(store)
        assert corr["id"] in {n["id"] for n in path_of(data, saved_end(data))}
        await pilot.press("u")
        await pilot.pause()
        data = read_task(store)
        assert data["discarded"] == [corr["id"]]
        await pilot.press("U")
        await pilot.pause()
        data = read_task(store)
        assert data["discarded"] == []
        await pilot.press("d")
        await pilot.pause()
        data = read_task(store)
        assert data["accepted"] == [saved_end(data)]
        text = scr.view.text()
        task_id = data["id"]
        await pilot.press("ctrl+q")

    # quit and reopen: exactly where it stopped
    app2 = real_app(store, real_engine, task_id=task_id)
    async with app2.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app2, timeout=120)
        assert app2.session_screen.view.text() == text
        assert app2.session_screen.status.steers == 2
    by = nodes_by_id(read_task(store))
    assert by[corr["id"]]["text"] == " Kiwi"


async def test_real_model_pause_mid_stream(real_engine, tmp_path):
    store = tmp_path / "store"
    app = real_app(store, real_engine, prompt="Write a long story about a fox.", max_tokens=400)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.session_screen and app.session_screen.view.n_tokens >= 3, timeout=120, what="tokens")
        await pilot.press("space")
        await wait_idle(pilot, app, timeout=60)
        scr = app.session_screen
        assert scr.status.state == "paused"
        n = scr.view.n_tokens
        assert 3 <= n < 400
        data = read_task(store)
        last = path_of(data, saved_end(data))[-1]
        assert last["end"] == "paused" and saved_response_text(data) == scr.view.text()
        # the cursor moves over the paused response and shows the token's probability
        await pilot.press("left", "left")
        assert scr.view.cursor == n - 2
        assert "p=" in str(scr.query_one("#cursor-info").info)


async def test_real_model_quit_mid_stream_saves_and_releases(real_engine, tmp_path):
    """ctrl+q while llama.cpp streams: the generated tokens are saved (end "paused"), the
    lock is released, and the task reopens paused exactly where it stopped."""
    from steer_tui.core.session import Session

    store = tmp_path / "store"
    app = real_app(store, real_engine, prompt="Write a long story about a fox.", max_tokens=400)
    async with app.run_test(size=(80, 24)) as pilot:
        await wait_for(pilot, lambda: app.session_screen and app.session_screen.view.n_tokens >= 3, timeout=120, what="tokens")
        task_id = app.session_screen.session.task_id
        await pilot.press("ctrl+q")
    data = read_task(store)
    (node,) = data["nodes"]
    assert node["end"] == "paused" and 3 <= len(node["tokens"]) < 400
    assert len(node["logprobs"]) == len(node["top"]) == len(node["tokens"])
    assert node["text"] == real_engine.detokenize(node["tokens"])
    with Session.open(store=store, task_id=task_id, model=real_engine) as s:  # the lock was released
        assert s.response_tokens == node["tokens"]
    app2 = real_app(store, real_engine, task_id=task_id)
    async with app2.run_test(size=(80, 24)) as pilot:
        await wait_idle(pilot, app2, timeout=120)
        scr = app2.session_screen
        assert scr.status.state == "paused" and scr.view.text() == node["text"]


async def test_b_toggles_the_adapter_for_the_next_continuation(tmp_path, model_path):
    """b switches the loaded LoRA off and on: the status line says which, and each new model
    node records whether the adapter wrote it. Without an adapter, b says there is none."""
    from steer_tui.core.engine import open_engine
    from steer_tui.core.sampling import Sampling
    from tests.core.test_engine_adapter import write_lora

    lora = write_lora(tmp_path / "tiny-lora.gguf")
    engine = open_engine(model_path, n_ctx=512, adapter=lora)
    try:
        store = tmp_path / "store"
        app = real_app(store, engine, prompt="Name a fruit.", max_tokens=4)
        async with app.run_test(size=(100, 30)) as pilot:
            await wait_idle(pilot, app, timeout=120)
            scr = app.session_screen
            assert scr.status.model.endswith("+ tiny-lora.gguf")
            first = read_task(store)["nodes"][0]
            assert first["adapter"]["path"] == str(lora.resolve())
            await pilot.press("b")
            await wait_for(pilot, lambda: "(tiny-lora.gguf off)" in scr.status.model, what="adapter off")
            assert engine.adapter is None and "Adapter off for the next continuation." in [n.message for n in app._notifications]
            await pilot.press("home", "right", "r")  # resample from token 1 with the base model
            await wait_idle(pilot, app, timeout=120)
            base_node = path_of(read_task(store), saved_end(read_task(store)))[-1]
            assert base_node["id"] != first["id"] and base_node.get("adapter") is None
            # ...and the base model really wrote it: what a plain engine writes greedily there
            context = read_task(store)["prompt"]["tokens"] + first["tokens"][:1]
            plain = open_engine(model_path, n_ctx=512)
            try:
                want = [t.id for t in plain.generate(context, Sampling(temperature=0), max_tokens=len(base_node["tokens"]))]
            finally:
                plain.close()
            assert base_node["tokens"] == want and want[:3] != first["tokens"][1:4]
            await pilot.press("b")
            await wait_for(pilot, lambda: scr.status.model.endswith("+ tiny-lora.gguf"), what="adapter on")
            await pilot.press("home", "right", "r")
            await wait_idle(pilot, app, timeout=120)
            again = path_of(read_task(store), saved_end(read_task(store)))[-1]
            assert again["id"] not in (first["id"], base_node["id"]) and again["adapter"] == first["adapter"]
            assert again["tokens"][:3] == first["tokens"][1:4]  # the adapter's own greedy text again
    finally:
        engine.set_adapter_enabled(True)
        engine.close()
    from steer_tui.core.fake_engine import FakeEngine

    app = real_app(tmp_path / "store2", FakeEngine(), prompt="hi", max_tokens=3)  # no adapter at all
    async with app.run_test(size=(100, 30)) as pilot:
        await wait_idle(pilot, app, timeout=60)
        await pilot.press("b")
        await wait_for(pilot, lambda: any("No adapter loaded" in n.message for n in app._notifications), what="the notice")

