"""Rule-driven steering: parsing, matching across token boundaries, pick, stop, bounds."""

from __future__ import annotations

import json
import re

import pytest

from steer_tui.core.auto import (
    Hit,
    Rule,
    RuleError,
    alternative_ok,
    find_hit,
    load_rules,
    parse_rules,
    token_at,
)
from steer_tui.core.auto_run import run_auto, steer_sample
from steer_tui.core.fake_engine import FakeEngine
from steer_tui.core.session import Session
from steer_tui.core.store import Store
from steer_tui.core.tasks import TaskSpec

GREEDY = {"temperature": 0, "seed": 1}


def rule(name, pattern, action, replace=None, flags=0):
    return Rule(name, re.compile(pattern, flags), action, replace)


# -- parsing ----------------------------------------------------------------------------


def test_rules_file_parses(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text(
        """
[[rule]]
name = "plain-words"
pattern = '\\bvibrant\\b'
action = "replace"
replace = "lively"

[[rule]]
name = "no-mango"
pattern = 'Mango'
action = "pick"
ignore_case = true
"""
    )
    rules = load_rules(p)
    assert [r.name for r in rules] == ["plain-words", "no-mango"]
    assert rules[1].pattern.flags & re.IGNORECASE


@pytest.mark.parametrize(
    "table, message",
    [
        ({"name": "x", "pattern": "(", "action": "stop"}, "bad regex"),
        ({"name": "x", "pattern": "a", "action": "explode"}, "'action' is 'explode'"),
        ({"name": "x", "pattern": "a", "action": "replace"}, "needs a non-empty 'replace'"),
        ({"name": "x", "pattern": "a", "action": "stop", "replace": "b"}, "only for action 'replace'"),
        ({"name": "x", "pattern": "a", "action": "stop", "colour": "red"}, "unknown field colour"),
        ({"name": "x", "pattern": "a*", "action": "stop"}, "matches the empty string"),
        ({"pattern": "a", "action": "stop"}, "needs a non-empty 'name'"),
    ],
)
def test_bad_rules_are_named(table, message):
    with pytest.raises(RuleError) as ei:
        parse_rules({"rule": [table]}, "rules.toml")
    assert message in str(ei.value) and "rules.toml: rule 1" in str(ei.value)


def test_bad_toml_and_missing_file(tmp_path):
    p = tmp_path / "r.toml"
    p.write_text("[[rule]\nname=")
    with pytest.raises(RuleError, match="not valid TOML"):
        load_rules(p)
    with pytest.raises(RuleError, match="no such file"):
        load_rules(tmp_path / "nope.toml")
    with pytest.raises(RuleError, match="only \\[\\[rule\\]\\]"):
        parse_rules({"rules": []}, "x.toml")


# -- matching ---------------------------------------------------------------------------


def test_match_waits_for_a_following_character():
    r = [rule("v", r"\bvibrant\b", "stop")]
    assert find_hit(r, "a vibrant", 0, final=False) is None
    assert find_hit(r, "a vibrantly", 0, final=False) is None
    hit = find_hit(r, "a vibrant day", 0, final=False)
    assert (hit.start, hit.end) == (2, 9)
    assert find_hit(r, "a vibrant", 0, final=True).start == 2
    assert find_hit(r, "a vibrant day", 3, final=False) is None  # protected text


def test_earliest_match_wins_across_rules():
    r = [rule("b", "day", "stop"), rule("a", "vib", "stop")]
    assert find_hit(r, "a vibrant day!", 0, final=False).rule.name == "a"


def test_token_at_handles_empty_pieces():
    # pieces: "ab", "" (held-back byte), "c€", "d"
    starts = [0, 2, 2, 4]
    assert token_at(starts, 0) == 0
    assert token_at(starts, 2) == 1  # the first of the tokens that share the offset
    assert token_at(starts, 3) == 1
    assert token_at(starts, 4) == 3


def test_alternative_that_restarts_the_match_is_refused():
    r = rule("v", r"vibrant", "pick", flags=re.IGNORECASE)
    text = "a vibrant day"
    hit = Hit(r, 2, 9, "vibrant")
    # the token " vib" starts at offset 1 and holds the match start
    assert not alternative_ok(r, text, " vib", hit, 1)
    assert not alternative_ok(r, text, " Vibrant", hit, 1)
    assert not alternative_ok(r, text, " v", hit, 1)
    assert alternative_ok(r, text, " lively", hit, 1)
    assert alternative_ok(r, text, " bright", hit, 1)
    assert not alternative_ok(r, text, "", hit, 1)


# -- steering a session (FakeEngine: writes "1. Apple\n2. Banana\n3. Cherry\n4. Mango") ---


SCRIPTS = (
    "1. Apple\n2. Banana\n3. Cherry\n4. Mango",
    "Kiwi\n3. Cherry\n4. Mango",
    "Bacon\n3. Cherry\n4. Mango",
    "Apple; 2. Banana\n3. Cherry",
)


def _session(tmp_path, **kw):
    eng = FakeEngine(SCRIPTS, noise=0.2)
    return Session.create(store=Store(tmp_path), prompt="Fruit?", raw=True, model=eng, sampling=GREEDY, **kw)


def test_replace_rolls_back_to_the_token_where_the_match_starts(tmp_path):
    with _session(tmp_path) as s:
        rep = steer_sample(s, [rule("fruit", "Banana", "replace", "Kiwi")], max_tokens=60)
        assert rep.steers == 1 and rep.by_rule == {"fruit": 1}
        assert "2. Kiwi" in rep.text and "Banana" not in rep.text
        (steer,) = s.tree.steers()
        assert steer.node.annotator == "auto:fruit"
        assert steer.node.text == "Kiwi"
        rejected_text = s.tree.node(steer.node.replaces).text
        assert rejected_text.startswith("B")
        # prefix + chosen equals what the session holds
        assert s.tree.path_tokens(steer.node.id)[-len(steer.chosen):] == steer.chosen
    assert Store(tmp_path).load(s.task_id).steers()  # saved


def test_replace_keeps_the_text_of_the_token_before_the_match(tmp_path):
    # "nan" starts inside a token ("Ba" + "nan" ...): the correction keeps "Ba"
    with _session(tmp_path) as s:
        rep = steer_sample(s, [rule("mid", "nana", "replace", "con")], max_tokens=60)
        assert rep.steers == 1
        assert rep.text.startswith("1. Apple\n2. Bacon\n3. Cherry")
        (steer,) = s.tree.steers()
        assert steer.node.text.endswith("con")


def test_match_across_token_boundaries(tmp_path):
    with _session(tmp_path) as s:
        rep = steer_sample(s, [rule("cross", r"a\n2", "replace", "a, 2")], max_tokens=60)
        assert rep.steers == 0  # "Apple\n2" has no "a\n2"
    with _session(tmp_path) as s:
        rep = steer_sample(s, [rule("cross", r"e\n2\.", "replace", "e; 2.")], max_tokens=60)
        assert rep.steers == 1 and "Apple; 2." in rep.text


def test_pick_never_restarts_the_match(tmp_path):
    with _session(tmp_path) as s:
        r = rule("no-banana", "Banana", "pick")
        rep = steer_sample(s, [r], max_tokens=40)
        assert rep.steers >= 1
        for st in s.tree.steers():
            assert st.node.kind == "pick"
            piece = s.engine.token_bytes(st.chosen[0]).decode("utf-8", "ignore")
            assert not "Banana".startswith(piece.lstrip()) or not piece.strip()
        assert "Banana" not in rep.text


def test_stop_ends_with_eos_pick(tmp_path):
    with _session(tmp_path) as s:
        rep = steer_sample(s, [rule("no-3", r"3\.", "stop")], max_tokens=60)
        assert rep.steers == 1 and rep.end == "eos"
        (st,) = s.tree.steers()
        assert st.chosen == [s.engine.eos_ids[0]]
        assert "3." not in rep.text and "2. Banana" in rep.text


def test_unsatisfiable_rule_stops_with_a_message(tmp_path):
    # every character is forbidden: no alternative can avoid it, and it must not loop
    with _session(tmp_path) as s:
        rep = steer_sample(s, [rule("any", r"[^\x00]", "pick")], max_tokens=200)
        assert rep.steers <= 64 + 1
        assert rep.messages, "a clear message says why the sample ended"
    with _session(tmp_path) as s:
        rep = steer_sample(s, [rule("any", r"\w", "replace", "x")], max_tokens=200, max_steers=5)
        assert rep.end == "gave-up" and rep.steers == 5
        assert "giving up" in rep.messages[-1]


def test_run_auto_writes_trees_and_dry_run_writes_nothing(tmp_path):
    eng = FakeEngine(SCRIPTS, noise=0.2)
    tasks = [TaskSpec(prompt="Fruit?"), TaskSpec(prompt="More fruit?")]
    rules = [rule("fruit", "Banana", "replace", "Kiwi")]
    store = Store(tmp_path / "real")
    rep = run_auto(rules=rules, tasks=tasks, store=store, engine=eng, samples=2, max_tokens=60, sampling=GREEDY)
    assert len(rep.samples) == 4 and rep.steers >= 4
    assert len(store.list_tasks()) == 4
    dry_store = Store(tmp_path / "dry")
    dry = run_auto(rules=rules, tasks=tasks, store=dry_store, engine=eng, samples=2, max_tokens=60, sampling=GREEDY, dry_run=True)
    assert dry.summary()["steers"] == rep.summary()["steers"]  # same seeds, same steers
    assert not dry_store.tasks_dir.exists()
    s = dry.summary()
    assert s["steers_per_1k_tokens"] == round(1000 * s["steers"] / s["model_tokens"], 3)
    json.dumps(s)


def test_a_prompt_longer_than_the_context_is_skipped_and_the_rest_run(tmp_path):
    eng = FakeEngine(SCRIPTS, noise=0.2, n_ctx=64)
    tasks = [TaskSpec(prompt="x" * 500, id="too-long"), TaskSpec(prompt="Fruit?")]
    rep = run_auto(rules=[rule("fruit", "Banana", "replace", "Kiwi")], tasks=tasks, store=Store(tmp_path), engine=eng, max_tokens=30, sampling=GREEDY)
    assert len(rep.samples) == 1
    assert len(rep.skipped) == 1 and rep.skipped[0].startswith("too-long: ") and "context" in rep.skipped[0]
    assert rep.summary()["skipped_tasks"] == 1
