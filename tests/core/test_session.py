"""Session on the FakeEngine: position model, steers, undo/redo, saving, locking, reopening,
and a hypothesis state machine that drives random edit sequences and checks the tree and
the file after every step."""

from __future__ import annotations

import os
import threading
import warnings

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from steer_tui import Session
from steer_tui.core.fake_engine import EOS, FakeEngine
from steer_tui.core.session_errors import (
    ModelMismatch,
    ModelMismatchWarning,
    SaveError,
    SessionBusy,
    SessionError,
)
from steer_tui.core.store import Store, TaskLocked, load_tree
from steer_tui.core.tree import SteerTree

GREEDY = {"temperature": 0, "seed": 1}


@pytest.fixture
def engine():
    return FakeEngine()


def new(store_dir, engine, **kw):
    kw.setdefault("prompt", "List four fruits")
    kw.setdefault("sampling", GREEDY)
    return Session.create(store=store_dir, model=engine, **kw)


def saved(s: Session) -> SteerTree:
    return load_tree(s.store.task_path(s.task_id))


def test_create_writes_the_file_with_provenance(store_dir, engine):
    with new(store_dir, engine, title="Fruit", annotator="alice") as s:
        t = saved(s)
        assert t.title == "Fruit" and t.nodes == []
        assert t.model["vocab_sha256"] == engine.vocab_sha256 and t.model["eos_ids"] == [EOS]
        assert t.prompt["mode"] == "chat" and t.prompt["messages"] == [{"role": "user", "content": "List four fruits"}]
        assert t.prompt["tokens"] == engine.tokenize(t.prompt["text"], special=True)
        assert t.sampling["seed"] == 1 and t.sampling["temperature"] == 0


def test_seed_is_drawn_and_recorded_when_missing(store_dir, engine):
    with new(store_dir, engine, sampling={"temperature": 0.7}) as s:
        assert isinstance(saved(s).sampling["seed"], int)


def test_raw_and_system_prompts(store_dir, engine):
    with new(store_dir, engine, prompt="<|im_start|>user\nhi", raw=True) as s:
        assert s.tree.prompt["mode"] == "raw" and s.prompt_tokens[0] == 258  # control token parsed
    with new(store_dir, engine, prompt="hi", system="Be brief.") as s:
        assert s.tree.prompt["messages"][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"prompt": None}, "exactly one"),
        ({"messages": [{"role": "user", "content": "x"}]}, "exactly one"),
        ({"prompt": None, "messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"sampling": {"temp": 1}}, "temp"),
        ({"prompt": "x" * 600}, "context window"),
    ],
)
def test_create_rejects_bad_input_clearly(store_dir, engine, kw, message):
    with pytest.raises(Exception, match=message):
        new(store_dir, engine, **kw)


def test_generate_rollback_correct_makes_a_steer(store_dir, engine):
    with new(store_dir, engine, annotator="bob") as s:
        toks = list(s.generate(max_tokens=12))
        assert s.last_end == "length" and [t.index for t in toks] == list(range(12))
        assert s.response_text == "1. Apple\n2. " == "".join(t.text for t in toks)
        first = s.end
        s.rollback(5)
        assert s.response_text == "1. Ap" and s.end == first and s.cut is not None
        assert s.tree.node(first).end == "cut" and s.tree.node(s.cut).end == "length"
        cut = s.cut  # the split tail "ple\n2. ": the model text the correction replaces
        h = s.correct("ricot")
        assert h.kind == "correction" and h.replaces == cut and h.parent == first
        (steer,) = s.tree.steers()
        assert steer.chosen == engine.tokenize("ricot")
        assert steer.rejected == engine.tokenize("ple\n2. ")
        assert steer.prefix == s.prompt_tokens + engine.tokenize("1. Ap")
        assert h.annotator == "bob" and len(h.logprobs) == len(h.tokens) == len(h.top)
        # the correction's ids are what the engine evaluated, right after the prefix
        assert engine.cached_tokens == s.context_tokens
        assert saved(s).to_dict() == s.tree.to_dict()


def test_append_pick_and_rollback_at_a_node_boundary(store_dir, engine):
    with new(store_dir, engine) as s:
        list(s.generate(max_tokens=4))
        a = s.correct(" more")
        assert a.kind == "append" and a.replaces is None
        s.rollback(4)  # exactly at the boundary: nothing is split, the human node is the cut
        assert s.end == a.parent and s.cut == a.id
        p = s.pick(ord("Z"))
        assert p.kind == "pick" and p.replaces is None  # a human node was cut: not a steer
        list(s.generate(max_tokens=3))
        s.rollback(5)
        alt = s.tree.node(s.cut).top[0][1][0]  # the model's second choice at the cut
        p2 = s.pick(alt)
        assert p2.kind == "pick" and p2.replaces is not None
        assert len(s.tree.steers()) == 1


def test_pick_rejects_ids_outside_the_vocabulary(store_dir, engine):
    with new(store_dir, engine) as s:
        with pytest.raises(SessionError, match="vocabulary"):
            s.pick(engine.n_vocab)
        with pytest.raises(SessionError, match="empty"):
            s.correct("   ")


def test_rollback_evaluates_nothing_and_regeneration_matches(store_dir, engine):
    with new(store_dir, engine) as s:
        ids = [t.id for t in s.generate(max_tokens=20)]
        before = engine.n_evaluated
        s.rollback(8)
        assert engine.n_evaluated == before
        again = [t.id for t in s.generate(max_tokens=5)]
        assert engine.n_evaluated - before == 1 + 4
        assert again == ids[8:13]  # greedy: the same continuation as the first time
        fresh = FakeEngine()
        cold = [x.id for x in fresh.generate(s.prompt_tokens + ids[:8], s.sampling, max_tokens=5)]
        assert again == cold


def test_pause_and_continue_extends_the_node(store_dir, engine):
    with new(store_dir, engine) as s:
        stop = threading.Event()
        got = []
        for t in s.generate(stop=stop):
            got.append(t)
            if len(got) == 3:
                stop.set()
        assert s.last_end == "paused" and len(s.tree.nodes) == 1
        assert saved(s).nodes[0].end == "paused"
        list(s.generate())
        assert s.last_end == "eos" and len(s.tree.nodes) == 1
        assert s.response_text == "1. Apple\n2. Banana\n3. Cherry\n4. Mango<|im_end|>"
        n = len(s.tree.nodes)
        assert list(s.generate()) == [] and s.last_end == "eos" and len(s.tree.nodes) == n
        # breaking out of the loop counts as a pause too
        s.rollback(3)
        for _ in s.generate():
            break
        assert s.last_end == "paused"


def test_resample_makes_a_sibling(store_dir, engine):
    with new(store_dir, engine, sampling={"temperature": 1.5, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 4}) as s:
        list(s.generate(max_tokens=6))
        s.rollback(2)
        cut = s.cut
        list(s.generate(max_tokens=6))
        assert s.tree.node(s.end).parent == s.tree.node(cut).parent
        assert len(s.siblings()) == 2
        s.resample()
        parent = s.end
        list(s.generate(max_tokens=2))
        assert s.tree.node(s.end).parent == parent  # a new node, not an extension


def test_busy_while_generating(store_dir, engine):
    with new(store_dir, engine) as s:
        gen = s.generate(max_tokens=5)
        next(gen)
        with pytest.raises(SessionBusy):
            s.rollback(0)
        gen.close()
        s.rollback(0)
        assert s.response_tokens == []


def test_undo_redo_never_delete(store_dir, engine):
    with new(store_dir, engine) as s:
        list(s.generate(max_tokens=10))
        s.rollback(4)
        h = s.correct("X")
        list(s.generate(max_tokens=3))
        with_correction = s.response_text
        n = len(s.tree.nodes)
        assert s.undo() is h
        assert h.id in s.tree.discarded and len(s.tree.nodes) == n
        assert s.response_text == "1. Apple\n2" and s.tree.steers() == []
        assert saved(s).discarded == [h.id]
        assert s.redo() is h
        assert s.response_text == with_correction and s.tree.discarded == []
        assert s.redo() is None
        s.undo()
        assert s.undo() is None  # nothing human left on this path


def test_accept_and_navigation(store_dir, engine):
    with new(store_dir, engine) as s:
        with pytest.raises(SessionError, match="nothing to accept"):
            s.accept()
        list(s.generate())
        s.accept()
        leaf = s.end
        assert saved(s).accepted == [leaf]
        s.rollback(3)
        tail = s.cut  # the accepted node was split: its tail now ends that path
        list(s.generate(max_tokens=2))
        other = s.end
        assert [n.id for n in s.siblings()] == [tail, other]
        s.switch_branch(tail)
        assert s.end == tail and s.tree.path(tail)[0].id == leaf
        s.goto(None)
        assert s.response_tokens == []
        s.goto(other)
        assert s.end == other


def test_tokens_view_pieces_concatenate(store_dir):
    e = FakeEngine(scripts=["Prix: 5€ 🙂 net"])
    with new(store_dir, e) as s:
        list(s.generate())
        view = s.tokens_view()
        assert "".join(v.text for v in view) == s.response_text == "Prix: 5€ 🙂 net<|im_end|>"
        euro = [v for v in view if v.text == "€"][0]
        assert [v.text for v in view[euro.index - 2 : euro.index]] == ["", ""]
        assert all(v.logprob is not None and len(v.top) == 5 for v in view)
        # a rollback in the middle of "€" splits the character across nodes
        s.rollback(euro.index - 1)
        s.correct("$")
        assert s.response_text.startswith("Prix: 5")
        assert "".join(n.text for n in s.path) == s.response_text


def test_reopen_continues_where_it_stopped(store_dir, engine):
    s = new(store_dir, engine)
    list(s.generate(max_tokens=10))
    s.rollback(6)
    tid, end, cut = s.task_id, s.end, s.cut
    with pytest.raises(TaskLocked):
        Session.open(store=store_dir, task_id=tid, model=engine)
    ro = Session.open(store=store_dir, task_id=tid, model=engine, read_only=True)
    assert ro.end == end and ro.cut == cut
    with pytest.raises(SessionError, match="read-only"):
        ro.correct("x")
    s.close()
    with Session.open(store=store_dir, task_id=tid, model=engine) as s2:
        assert (s2.end, s2.cut) == (end, cut)
        h = s2.correct("y")
        assert h.replaces == cut


def test_reopen_without_saved_position_picks_the_live_leaf(store_dir, engine):
    with new(store_dir, engine) as s:
        list(s.generate(max_tokens=10))
        s.rollback(6)
        s.correct(" fix")
        list(s.generate(max_tokens=2))
        end = s.end
        s.tree.extra.pop("session")
        Store(store_dir).save(s.tree)
        s.tree.extra["session"] = {}
    with Session.open(store=store_dir, task_id=s.task_id, model=engine) as s2:
        assert s2.end == end


def test_open_checks_the_model(store_dir, engine):
    with new(store_dir, engine) as s:
        tid = s.task_id
    other_weights = FakeEngine(boost=5.0)  # same vocabulary, different "file"
    with pytest.warns(ModelMismatchWarning):
        with Session.open(store=store_dir, task_id=tid, model=other_weights) as s2:
            assert s2.warnings
    t = Store(store_dir).load(tid)
    t.model["vocab_sha256"] = "0" * 64
    Store(store_dir).save(t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ModelMismatch, match="vocabulary"):
            Session.open(store=store_dir, task_id=tid, model=engine)
    # the failed open released the lock
    with Session.open(store=store_dir, task_id=tid, model=engine, read_only=False) if False else Store(store_dir).lock(tid):
        pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_save_failure_keeps_state_and_retries(store_dir, engine):
    with new(store_dir, engine) as s:
        tasks = s.store.tasks_dir
        tasks.chmod(0o500)
        try:
            with pytest.raises(SaveError):
                list(s.generate(max_tokens=4))
            assert s.dirty and len(s.response_tokens) == 4
        finally:
            tasks.chmod(0o700)
        s.save()
        assert not s.dirty and saved(s).to_dict() == s.tree.to_dict()


def test_save_failure_via_store_error(store_dir, engine, monkeypatch):
    with new(store_dir, engine) as s:
        from steer_tui.core import store as store_mod

        def boom(tree, path):
            raise store_mod.StoreError(f"could not save {path}: no space left on device")

        monkeypatch.setattr(store_mod, "save_tree", boom)
        with pytest.raises(SaveError, match="no space"):
            list(s.generate(max_tokens=4))
        assert s.dirty and len(s.response_tokens) == 4 and s.last_end == "length"
        with pytest.raises(SaveError):
            s.rollback(2)
        assert s.response_tokens and len(s.response_tokens) == 2  # the change itself happened
        monkeypatch.undo()
        s.save()
        assert not s.dirty and saved(s).to_dict() == s.tree.to_dict()


def test_context_full_through_the_session(store_dir):
    e = FakeEngine(n_ctx=40)
    with new(store_dir, e, prompt="x") as s:
        list(s.generate(max_tokens=100))
        assert s.last_end == "context" and len(s.context_tokens) == 40
        with pytest.raises(SessionError, match="context window"):
            s.correct("more")


# ---------------------------------------------------------------- property test


class SessionMachine(RuleBasedStateMachine):
    """Random generate/rollback/correct/pick/undo/redo/... sequences on a FakeEngine."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = tempfile.mkdtemp(prefix="steer-prop-")
        self.engine = FakeEngine(n_ctx=160, boost=4.0)
        self.s: Session | None = None
        self.n_nodes = 0

    @initialize(temp=st.sampled_from([0.0, 0.8, 1.5]), seed=st.integers(0, 2**16))
    def start(self, temp, seed):
        self.s = Session.create(
            store=self.dir, prompt="fruit", model=self.engine, sampling={"temperature": temp, "seed": seed, "top_k": 0, "min_p": 0.0}
        )

    @rule(n=st.integers(1, 12), pause_at=st.integers(0, 12))
    def generate(self, n, pause_at):
        stop = threading.Event()
        for i, _ in enumerate(self.s.generate(max_tokens=n, stop=stop)):
            if i + 1 == pause_at:
                stop.set()

    @rule(frac=st.floats(0, 1))
    def rollback(self, frac):
        total = len(self.s.response_tokens)
        self.s.rollback(int(total * frac))

    @rule(text=st.text(alphabet=st.sampled_from(list("ab é€🙂\n.")), min_size=1, max_size=6))
    def correct(self, text):
        if not text.strip():
            with pytest.raises(SessionError):
                self.s.correct(text)
            return
        try:
            self.s.correct(text)
        except SessionError as exc:
            assert "context window" in str(exc)

    @rule(frac=st.floats(0, 1), text=st.sampled_from([" kiwi", "é", "€", "\n3."]))
    def steer(self, frac, text):
        self.rollback(frac)
        self.correct(text)

    @rule(tok=st.integers(0, 268))
    def pick(self, tok):
        try:
            self.s.pick(tok)
        except SessionError as exc:
            assert "context window" in str(exc)

    @rule()
    def undo(self):
        self.s.undo()

    @rule()
    def redo(self):
        self.s.redo()

    @rule()
    def resample(self):
        self.s.resample()

    @rule()
    def accept(self):
        if self.s.end is not None:
            self.s.accept()

    @rule(i=st.integers(0, 50))
    def switch(self, i):
        if self.s.tree.nodes:
            self.s.switch_branch(self.s.tree.nodes[i % len(self.s.tree.nodes)].id)

    @invariant()
    def tree_is_valid_and_saved(self):
        if self.s is None:
            return
        t = self.s.tree
        d = t.to_dict()
        assert SteerTree.from_dict(d).to_dict() == d
        if not self.s.dirty:
            assert load_tree(self.s.store.task_path(t.id)).to_dict() == d
        assert len(t.nodes) >= self.n_nodes  # nothing is ever deleted
        self.n_nodes = len(t.nodes)
        # text is derived from the ids: pieces concatenate to the detokenized path
        resp = self.s.response_tokens
        text = self.s.response_text
        detok = self.engine.detokenize(resp)
        assert detok in (text, text + "\ufffd")
        assert "".join(v.text for v in self.s.tokens_view()) == text
        assert self.s.context_tokens == self.s.prompt_tokens + resp
        for steer in t.steers():
            assert steer.node.replaces and t.node(steer.node.replaces).is_model

    def teardown(self):
        if self.s is not None:
            self.s.close()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


SessionMachine.TestCase.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_session_state_machine = SessionMachine.TestCase


def test_long_generation_is_checkpointed(store_dir, engine):
    with new(store_dir, engine) as s:
        s.autosave_interval = 0.0  # every token
        seen = []
        for t in s.generate(max_tokens=6):
            seen.append(len(saved(s).nodes[0].tokens))
        assert seen == [1, 2, 3, 4, 5, 6]
        assert saved(s).nodes[0].end == "length"


def test_typing_over_your_own_correction_supersedes_it_and_undo_restores_it(store_dir, engine):
    with new(store_dir, engine) as s:
        list(s.generate(max_tokens=12))
        s.rollback(5)
        first = s.correct(" Kiwi and Lime")
        s.rollback(5 + len(engine.tokenize(" Kiwi")))
        second = s.correct(" and Plum")
        superseded = s.tree.node(second.extra["supersedes"])
        assert superseded.is_human and "Lime" in superseded.text
        assert superseded.id in saved(s).discarded and "Lime" not in s.response_text
        assert [st.node.id for st in s.tree.steers()] == [first.id]  # still one steer
        s.undo()  # the new text goes, the superseded text comes back
        assert "Lime" in s.response_text and superseded.id not in saved(s).discarded
        assert second.id in saved(s).discarded
        s.redo()
        assert "Plum" in s.response_text and superseded.id in saved(s).discarded


def test_rollback_between_the_bytes_of_one_character_keeps_whole_characters(store_dir):
    e = FakeEngine(scripts=["Prix: 5€ 🙂 net"])
    with new(store_dir, e, prompt="x") as s:
        s.correct("ab 🙂")  # the emoji is 4 byte tokens
        n = len(s.response_tokens)
        s.rollback(n - 2)  # between the emoji's bytes
        assert s.response_text == "ab "
        assert len(s.response_tokens) == n - 4


def test_undo_after_two_rollbacks_into_one_node_returns_to_the_whole_original(store_dir, engine):
    """Steer inside a model node, then roll back to an earlier token of the same node and steer
    again: undoing the second steer restores everything the model had written (the first tail
    now hangs under the second; a stale ``split_from`` used to stop the walk there)."""
    with new(store_dir, engine) as s:
        list(s.generate(max_tokens=10))
        original = list(s.response_tokens)
        s.rollback(6)
        s.correct(" first")
        s.rollback(2)
        s.correct(" second")
        s.undo()
        assert s.response_tokens == original
        again = saved(s)
        (model_head,) = [n for n in again.nodes if n.parent is None]
        assert again.original_tokens(model_head.id) == original
