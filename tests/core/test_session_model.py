"""Session on the bundled SmolLM2 model (one engine per module, few tokens)."""

from __future__ import annotations

import os

import pytest

from steer_tui import Session
from steer_tui.core.engine import open_engine
from steer_tui.core.session_errors import SessionError
from steer_tui.core.store import TaskLocked, load_tree

GREEDY = {"temperature": 0, "seed": 1}
PROMPT = "Give four examples of fruit."


@pytest.fixture(scope="module")
def engine(model_path):
    e = open_engine(model_path, n_ctx=1024)
    yield e
    e.close()


def test_steer_on_the_real_model(store_dir, engine):
    with Session.create(store=store_dir, prompt=PROMPT, model=engine, sampling=GREEDY, annotator="t") as s:
        assert s.tree.prompt["text"].endswith("<|im_start|>assistant\n")
        assert s.tree.model["n_vocab"] == 49152 and s.tree.model["sha256"] == engine.sha256
        first = [t.id for t in s.generate(max_tokens=16)]
        assert s.last_end == "length" and len(first) == 16
        before = engine.n_evaluated
        s.rollback(6)
        assert engine.n_evaluated == before  # a rollback evaluates nothing
        h = s.correct(" Pineapple")
        # the correction's ids are exactly what the engine evaluated after the kept prefix
        assert engine.cached_tokens == s.prompt_tokens + first[:6] + engine.tokenize(" Pineapple")
        assert h.tokens == engine.tokenize(" Pineapple") and h.replaces is not None
        assert all(lp <= 0 for lp in h.logprobs) and all(len(t) == 5 for t in h.top)
        before = engine.n_evaluated
        more = [t.id for t in s.generate(max_tokens=4)]
        assert engine.n_evaluated - before == 3  # nothing re-evaluated: logits were cached by score
        (steer,) = s.tree.steers()
        assert steer.rejected == first[6:]
        assert steer.prefix == s.prompt_tokens + first[:6]
        assert "".join(v.text for v in s.tokens_view()) == s.response_text
        assert s.response_text == engine.detokenize(first[:6] + h.tokens + more)
        assert load_tree(s.store.task_path(s.task_id)).to_dict() == s.tree.to_dict()


def test_regenerating_after_rollback_matches_a_cold_engine(store_dir, engine, model_path):
    with Session.create(store=store_dir, prompt=PROMPT, model=engine, sampling=GREEDY) as s:
        first = [t.id for t in s.generate(max_tokens=14)]
        s.rollback(5)
        s.resample()
        again = [t.id for t in s.generate(max_tokens=6)]
        assert again == first[5:11]
        context = s.prompt_tokens + first[:5]
    cold = open_engine(model_path, n_ctx=1024)
    try:
        from steer_tui.core.sampling import Sampling

        assert [x.id for x in cold.generate(context, Sampling(temperature=0), max_tokens=6)] == again
    finally:
        cold.close()


def test_same_seed_same_session(store_dir, engine):
    samp = {"temperature": 0.9, "seed": 42}
    runs = []
    for _ in range(2):
        with Session.create(store=store_dir, prompt=PROMPT, model=engine, sampling=samp) as s:
            runs.append([t.id for t in s.generate(max_tokens=10)])
    assert runs[0] == runs[1]


def test_reopen_with_the_real_model(store_dir, engine):
    with Session.create(store=store_dir, prompt=PROMPT, model=engine, sampling=GREEDY) as s:
        list(s.generate(max_tokens=8))
        s.rollback(3)
        tid, end, cut = s.task_id, s.end, s.cut
    with Session.open(store=store_dir, task_id=tid, model=engine) as s2:
        assert (s2.end, s2.cut) == (end, cut) and not s2.warnings
        s2.pick(s2.tree.node(cut).top[0][1][0])
        assert len(s2.tree.steers()) == 1


def test_default_model_and_bad_model_path(store_dir, tmp_path):
    from steer_tui.core.errors import EngineError

    with Session.create(store=store_dir, prompt="Hi", sampling=GREEDY) as s:  # model=None: bundled
        assert s.tree.model["name"] == "SmolLM2-135M-Instruct.Q4_1"
        assert len(list(s.generate(max_tokens=2))) == 2
    with pytest.raises(EngineError, match="does not exist") as info:
        Session.create(store=store_dir, prompt="Hi", model=tmp_path / "nope.gguf")
    assert "nope.gguf" in str(info.value)
    assert not list((store_dir / "tasks").glob("*nope*"))


# ------------------------------------------------------------------ the fake's behaviours, on the model


def test_session_state_machine_on_the_real_model(engine):
    """The random edit sequences of test_session.py's state machine, on llama.cpp: the tree
    stays valid and saved, text stays derived from the ids, after every step."""
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import run_state_machine_as_test

    from tests.core.test_session import SessionMachine

    class RealSessionMachine(SessionMachine):
        def __init__(self) -> None:
            super().__init__()
            self.engine = engine

    run_state_machine_as_test(
        RealSessionMachine,
        settings=settings(max_examples=3, stateful_step_count=8, deadline=None, derandomize=True,
                          suppress_health_check=list(HealthCheck)),
    )


def test_rollback_between_the_bytes_of_one_character_on_the_real_model(store_dir, engine):
    """SmolLM2 writes an emoji as byte tokens (" \\xf0\\x9f", "\\x8d", "\\x90" for a pear): a rollback
    that lands between them keeps whole characters only."""
    with Session.create(store=store_dir, prompt=PROMPT, model=engine, sampling=GREEDY) as s:
        h = s.correct("Try a pear 🍐 and")
        pieces = [engine.token_bytes(t) for t in h.tokens]
        inside = pieces.index(b"\x90")  # the last byte token of the emoji
        n = len(s.response_tokens)
        assert n == len(h.tokens) and pieces[inside - 2].endswith(b"\xf0\x9f")
        s.rollback(inside)  # keep " \xf0\x9f" + "\x8d": half an emoji
        assert s.response_text == "Try a pear" and "\ufffd" not in s.response_text
        assert len(s.response_tokens) == inside - 2
        h2 = s.correct(" 🍎")
        assert s.response_text == "Try a pear 🍎" and h2.tokens == engine.tokenize(" 🍎")
        again = load_tree(s.store.task_path(s.task_id))
        assert "".join(n.text for n in again.path(s.end)) == "Try a pear 🍎"


def test_full_context_on_the_real_model(store_dir, model_path):
    small = open_engine(model_path, n_ctx=64)
    n_ctx = small.n_ctx
    assert n_ctx == 64  # the window asked for (llama.cpp allocates 256; Llama's own buffer holds 64)
    try:
        # a long prompt (evaluated in one batch) leaves room for about 12 generated tokens
        prompt = "Once upon a time" + " and then" * ((n_ctx - 16) // len(small.tokenize(" and then")))
        with Session.create(store=store_dir, prompt=prompt, raw=True, model=small, sampling=GREEDY) as s:
            assert n_ctx - 20 < len(s.prompt_tokens) < n_ctx - 4
            list(s.generate(max_tokens=200))
            assert s.last_end == "context" and len(s.context_tokens) == n_ctx
            assert list(s.generate(max_tokens=5)) == [] and s.last_end == "context"
            with pytest.raises(SessionError, match="context window"):
                s.correct(" and then")
            s.rollback(2)  # room again: the next generation fills it exactly
            s.correct(" and")
            list(s.generate(max_tokens=200))
            assert s.last_end == "context" and len(s.context_tokens) == n_ctx
            assert small.cached_tokens == s.context_tokens[:-1]  # the last token was never evaluated
            assert load_tree(s.store.task_path(s.task_id)).to_dict() == s.tree.to_dict()
    finally:
        small.close()


def test_locked_task_on_the_real_model(store_dir, engine):
    with Session.create(store=store_dir, prompt=PROMPT, model=engine, sampling=GREEDY) as s:
        list(s.generate(max_tokens=4))
        with pytest.raises(TaskLocked) as ei:
            Session.open(store=store_dir, task_id=s.task_id, model=engine)
        assert ei.value.holder["pid"] == os.getpid()
        with Session.open(store=store_dir, task_id=s.task_id, model=engine, read_only=True) as ro:
            assert ro.response_tokens == s.response_tokens and ro.response_text == s.response_text
            for op in (lambda: list(ro.generate(max_tokens=2)), lambda: ro.correct(" x"), lambda: ro.rollback(1)):
                with pytest.raises(SessionError, match="read-only"):
                    op()
        s.correct(" still mine")  # the writer is unaffected
        tid = s.task_id
    with Session.open(store=store_dir, task_id=tid, model=engine) as again:  # released on close
        assert again.response_text.endswith(" still mine")
