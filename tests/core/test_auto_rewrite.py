"""``action = "rewrite"``: roll back to the sentence/clause start, let the model write up to
``max_tokens`` tokens with the matched words' tokens banned, record that as the correction
(issue 14). Unit checks on the scope and the ban, then the real bundled model."""

from __future__ import annotations

import re

import numpy as np
import pytest

from steer_tui.core.auto import (
    RuleError,
    banned_tokens,
    parse_rules,
    scope_start,
)
from steer_tui.core.auto_run import steer_sample, write_rewrite
from steer_tui.core.sampling import Sampling
from steer_tui.core.fake_engine import EOS, FakeEngine
from steer_tui.core.session import Session


def rewrite_rule(pattern, **kw):
    return parse_rules({"rule": [{"name": "r", "pattern": pattern, "action": "rewrite", **kw}]})[0]


def test_rewrite_rules_parse_and_refuse_bad_fields():
    r = rewrite_rule("vibrant", scope="clause", max_tokens=12)
    assert (r.action, r.scope, r.max_tokens) == ("rewrite", "clause", 12)
    assert (rewrite_rule("x").scope, rewrite_rule("x").max_tokens) == ("sentence", 20)
    for extra, msg in (({"scope": "page"}, "'scope' is 'page'"), ({"max_tokens": 0}, "'max_tokens' must be an integer"),
                       ({"max_tokens": True}, "'max_tokens' must be an integer")):
        with pytest.raises(RuleError, match=msg):
            rewrite_rule("x", **extra)
    with pytest.raises(RuleError, match="only for action 'rewrite'"):
        parse_rules({"rule": [{"name": "r", "pattern": "x", "action": "replace", "replace": "y", "scope": "clause"}]})


@pytest.mark.parametrize("text, word, protected, scope, want", [
    ("One thing. Two vibrant things.", "vibrant", 0, "sentence", "Two vibrant"),
    ("One thing, two vibrant things.", "vibrant", 0, "sentence", "One thing"),
    ("One thing, two vibrant things.", "vibrant", 0, "clause", "two vibrant"),
    ("1. Fine example\n2. Low-quality example 2", "Low", 0, "sentence", "Low-quality"),
    ("Intro: a list - vibrant one", "vibrant", 0, "clause", "vibrant one"),
    ("One thing. Two vibrant things.", "vibrant", 13, "sentence", "o vibrant"),  # never before a steer
])
def test_scope_start(text, word, protected, scope, want):
    start = scope_start(text, text.index(word), protected, scope)
    assert text[start:].startswith(want)


def test_ban_covers_every_tokenisation_and_case_but_not_short_pieces():
    texts = [" vib", "vibrant", " Vibrant", "v", "vi", "brant", " vibrantly", "hello", " VIBR", "rant", "\"Vibrant,"]
    assert banned_tokens(texts, "Vibrant") == {0, 1, 2, 6, 8, 10}
    assert banned_tokens(texts, "a vibrant tapestry") >= {0, 1, 2}  # each matched word
    assert banned_tokens(["I", " I", "it"], "I") == {0, 1}  # a word shorter than 3 characters: the whole word


def test_write_rewrite_never_samples_a_banned_token_and_stops_before_eos():
    eng = FakeEngine(scripts=("1. Apple\n2. Banana",))
    ctx = eng.tokenize("1. Apple\n2.", add_bos=True)
    free = write_rewrite(eng, ctx, Sampling(temperature=0), set(), 20, np.random.default_rng(0))
    assert eng.detokenize(free) == " Banana"  # the script, then EOS (not included)
    ban = {free[1]}  # "B"
    out = write_rewrite(eng, ctx, Sampling(temperature=1.0, seed=3), ban, 6, np.random.default_rng(0))
    assert len(out) <= 6 and not ban & set(out) and EOS not in out


def test_rewrite_steer_on_the_real_model(tmp_path, model_path):
    """The bundled model describing winter without the word 'winter': whatever it writes
    on this CPU, each steer is a model-written correction of at most max_tokens tokens that
    the rule no longer matches, replacing a cut continuation that it did match, started at
    the sentence start."""
    from steer_tui.core.engine import open_engine

    rule = rewrite_rule(r"\b[Ww]inter\b", max_tokens=16)
    eng = open_engine(model_path, n_ctx=1024)
    try:
        s = Session.create(store=tmp_path, prompt="Describe a quiet forest in winter.", model=eng,
                           sampling={"temperature": 0, "seed": 1})
        rep = steer_sample(s, [rule], max_tokens=120)
        tree = s.tree
        steers = [n for n in tree.nodes if n.author == "human"]
        assert rep.steers == len(steers) >= 1, rep.messages
        for h in steers:
            assert h.kind == "correction" and h.annotator == "auto:r"
            assert 1 <= len(h.tokens) <= 16
            assert not rule.pattern.search(h.text)
            cut = tree.node(h.replaces)
            assert cut.author == "model" and rule.pattern.search(cut.text)
            before = "".join(n.text for n in tree.path(h.parent))
            assert before == "" or re.search(r"[.!?]\s*$|\n$", before), repr(before[-30:])
        assert not rule.pattern.search(rep.text), "the final answer still says 'winter'"
        s.close()
    finally:
        eng.close()


def test_later_steers_never_cut_into_an_earlier_rewrite(tmp_path, model_path):
    """A rewrite is ~16 tokens in one node; the steers after it must roll back by token
    positions that count each of those tokens (an earlier version counted the whole
    correction as one token, so every later rollback landed that many tokens too early,
    inside the earlier correction, and split it into a one-token 'correction' plus tails)."""
    from steer_tui.core.engine import open_engine

    rule = rewrite_rule(r"\b(?:[Ss]now\w*|[Tt]rees?)\b", max_tokens=16)
    eng = open_engine(model_path, n_ctx=1024)
    try:
        with Session.create(store=tmp_path, prompt="Describe a quiet forest in winter.", model=eng,
                            sampling={"temperature": 0, "seed": 1}) as s:
            rep = steer_sample(s, [rule], max_tokens=160)
            tree = s.tree
            humans = [n for n in tree.nodes if n.author == "human"]
            assert rep.steers >= 2, (rep.steers, rep.messages)  # the case: a steer after a rewrite
            assert [n.kind for n in humans] == ["correction"] * len(humans), "an earlier correction was split"
            assert all(len(n.tokens) >= 2 for n in humans)
            view = s.tokens_view()
            assert rep.response_tokens == len(view)
            assert rep.text == "".join(t.text for t in view)
    finally:
        eng.close()


def test_a_rewrite_never_holds_a_word_any_rule_forbids(tmp_path, model_path):
    """A rewrite is protected from later steers, so if the rewrite of 'bustling' said
    'vibrant' (another rule's word) that word would be trained as the chosen side: every rule
    is checked on it. Greedy on this prompt, the bundled model's rewrites of one word reach for
    the other (checking only the rule that fired let 7 such corrections through)."""
    from steer_tui.core.engine import open_engine

    rules = parse_rules({"rule": [
        {"name": w, "pattern": rf"\b[{w[0].upper()}{w[0]}]{w[1:]}\b", "action": "rewrite", "max_tokens": 20}
        for w in ("vibrant", "bustling")]})
    eng = open_engine(model_path, n_ctx=1024)
    try:
        with Session.create(store=tmp_path, prompt="Describe a busy city market.", model=eng,
                            sampling={"temperature": 0, "seed": 1}) as s:
            rep = steer_sample(s, rules, max_tokens=60)
            rewrites = [n for n in s.tree.nodes if n.author == "human"]
            assert rewrites, rep.messages
            for n in rewrites:
                assert not any(r.pattern.search(n.text) for r in rules), n.text
    finally:
        eng.close()
