"""Session on the bundled SmolLM2 model (one engine per module, few tokens)."""

from __future__ import annotations

import pytest

from steer_tui import Session
from steer_tui.core.engine import open_engine
from steer_tui.core.store import load_tree

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
        from steer_tui.core.engine import Sampling

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
    from steer_tui.core.engine import EngineError

    with Session.create(store=store_dir, prompt="Hi", sampling=GREEDY) as s:  # model=None: bundled
        assert s.tree.model["name"] == "SmolLM2-135M-Instruct.Q4_1"
        assert len(list(s.generate(max_tokens=2))) == 2
    with pytest.raises(EngineError, match="does not exist") as info:
        Session.create(store=store_dir, prompt="Hi", model=tmp_path / "nope.gguf")
    assert "nope.gguf" in str(info.value)
    assert not list((store_dir / "tasks").glob("*nope*"))
