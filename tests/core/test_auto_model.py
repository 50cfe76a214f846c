"""Rule-driven steering on the bundled SmolLM2 model (test_auto.py has the same behaviours on
the scripted FakeEngine). The rules target a word the model really writes: a plain greedy
run finds it first, so the tests do not depend on the model's exact wording."""

from __future__ import annotations

import re

import pytest

from steer_tui.core.auto import Rule
from steer_tui.core.auto_run import run_auto, steer_sample
from steer_tui.core.engine import open_engine
from steer_tui.core.session import Session
from steer_tui.core.store import Store
from steer_tui.core.tasks import TaskSpec

GREEDY = {"temperature": 0, "seed": 1}
PROMPT = "Give four examples of fruit."
N = 30  # model tokens per sample: enough for a few words, a second or so on 2 cores


@pytest.fixture(scope="module")
def engine(model_path):
    e = open_engine(model_path, n_ctx=512)
    yield e
    e.close()


@pytest.fixture(scope="module")
def plain(engine, tmp_path_factory):
    """(text the model writes greedily, a word in it, where that word starts)."""
    with Session.create(store=tmp_path_factory.mktemp("plain"), prompt=PROMPT, model=engine, sampling=GREEDY) as s:
        list(s.generate(max_tokens=N))
        text = s.response_text
    m = next(m for m in re.finditer(r"\b[A-Za-z]{5,}\b", text) if m.start() >= 5)
    return text, m.group(0), m.start()


def _session(engine, tmp_path):
    return Session.create(store=Store(tmp_path), prompt=PROMPT, model=engine, sampling=GREEDY)


def test_replace_rewrites_exactly_the_matched_word(engine, plain, tmp_path):
    text, word, at = plain
    with _session(engine, tmp_path) as s:
        rep = steer_sample(s, [Rule("w", re.compile(rf"\b{word}\b"), "replace", "Zebra")], max_tokens=N)
        assert rep.steers >= 1 and rep.by_rule == {"w": rep.steers}
        # the text before the match is the model's own, unchanged; the replacement sits where the word was
        assert rep.text[:at] == text[:at] and rep.text[at:].startswith("Zebra")
        first = s.tree.steers()[0]
        assert first.node.annotator == "auto:w" and first.node.text.endswith("Zebra")
        rejected = s.tree.node(first.node.replaces)  # what the model wrote from the cut on
        assert rejected.is_model and rejected.text.lstrip().startswith(word)
        # the correction's ids are what the engine scored after the kept prefix
        assert first.chosen == engine.tokenize(first.node.text)
        assert s.tree.path_tokens(first.node.id)[-len(first.chosen):] == first.chosen
    assert Store(tmp_path).load(s.task_id).to_dict() == s.tree.to_dict()  # saved as it is


def test_pick_takes_another_token_and_never_restarts_the_word(engine, plain, tmp_path):
    text, word, at = plain
    with _session(engine, tmp_path) as s:
        rep = steer_sample(s, [Rule("w", re.compile(rf"\b{word}\b"), "pick")], max_tokens=N)
        assert rep.steers >= 1
        assert rep.text[:at] == text[:at]
        assert word not in rep.text
        for st in s.tree.steers():
            assert st.node.kind == "pick" and len(st.chosen) == 1
            piece = engine.token_bytes(st.chosen[0]).decode("utf-8", "ignore").lstrip()
            assert not (piece and word.startswith(piece))  # the pick does not begin the word again


def test_stop_ends_the_answer_before_the_word(engine, plain, tmp_path):
    text, word, at = plain
    with _session(engine, tmp_path) as s:
        rep = steer_sample(s, [Rule("w", re.compile(rf"\b{word}\b"), "stop")], max_tokens=N)
        assert rep.steers == 1 and rep.end == "eos"
        (st,) = s.tree.steers()
        # SmolLM2 has two end tokens, <|endoftext|> first; the one its chat turn ends with is
        # <|im_end|>, and that is what a stop steer must teach
        end = engine.tokenize("<|im_end|>", add_bos=False, special=True)
        assert len(engine.eos_ids) > 1 and engine.eos_ids[0] != end[0]
        assert st.chosen == end
        eos_text = engine.token_bytes(end[0]).decode()
        assert rep.text.endswith(eos_text)  # the picked end token, shown as its text
        kept = rep.text[: -len(eos_text)]
        assert text.startswith(kept) and word not in kept and len(kept) <= at + 1


def test_run_auto_and_dry_run_agree_on_the_real_model(engine, plain, tmp_path):
    _, word, _ = plain
    rules = [Rule("w", re.compile(rf"\b{word}\b"), "replace", "Zebra")]
    tasks = [TaskSpec(prompt=PROMPT)]
    sampling = {"temperature": 0.7, "seed": 5}
    store = Store(tmp_path / "real")
    rep = run_auto(rules=rules, tasks=tasks, store=store, engine=engine, samples=2, max_tokens=N, sampling=sampling)
    assert len(rep.samples) == 2 and len(store.list_tasks()) == 2
    saved_steers = sum(len(store.load(t.id).steers()) for t in store.list_tasks())
    assert saved_steers == rep.steers
    dry_store = Store(tmp_path / "dry")
    dry = run_auto(rules=rules, tasks=tasks, store=dry_store, engine=engine, samples=2, max_tokens=N, sampling=sampling, dry_run=True)
    assert dry.summary() == rep.summary()  # same seeds, same samples, same steers; nothing written
    assert not dry_store.tasks_dir.exists()
