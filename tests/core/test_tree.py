"""Tree operations and every loader invariant (each broken rule gives its own message)."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steer_tui.core.store import dumps_tree
from steer_tui.core.tree import Node, SteerTree, TreeError, new_tree


def make_tree() -> SteerTree:
    t = new_tree(
        task_id="t1",
        title="fruit",
        model={"name": "m", "n_vocab": 100, "eos_ids": [2]},
        prompt={"mode": "raw", "text": "hi", "tokens": [1, 5]},
        sampling={"temperature": 0},
    )
    return t


def model_node(t: SteerTree, parent, tokens, end="paused") -> Node:
    return t.add(
        Node(
            id=t.new_id(),
            parent=parent,
            author="model",
            kind="generated",
            tokens=list(tokens),
            text="".join(chr(97 + x % 26) for x in tokens),
            logprobs=[-0.5] * len(tokens),
            top=[[[x, -0.5], [(x + 1) % 100, -1.0]] for x in tokens],
            end=end,
        )
    )


def human_node(t: SteerTree, parent, tokens, replaces=None, kind="correction") -> Node:
    return t.add(
        Node(
            id=t.new_id(),
            parent=parent,
            author="human",
            kind=kind,
            tokens=list(tokens),
            text="".join(chr(65 + x % 26) for x in tokens),
            replaces=replaces,
            annotator="alice",
        )
    )


def test_split_keeps_head_id_and_moves_children():
    t = make_tree()
    a = model_node(t, None, [10, 11, 12, 13], end="eos")
    child = model_node(t, a.id, [20, 21])
    tail = t.split(a.id, 1, "k", "lmn")
    assert a.tokens == [10] and a.end == "cut" and a.logprobs == [-0.5]
    assert tail.parent == a.id and tail.tokens == [11, 12, 13] and tail.end == "eos"
    assert len(tail.top) == 3
    assert child.parent == tail.id
    assert t.children(a.id) == [tail]
    assert t.path_tokens(child.id) == [10, 11, 12, 13, 20, 21]
    # the file round-trips
    again = SteerTree.from_dict(json.loads(dumps_tree(t)))
    assert again.to_dict() == t.to_dict()


def test_split_chain_is_the_node_as_first_written():
    t = make_tree()
    a = model_node(t, None, [10, 11, 12, 13, 14], end="eos")
    mid = t.split(a.id, 1, "k", "lmno")
    last = t.split(mid.id, 2, "lm", "no")
    model_node(t, a.id, [40])  # a sibling branch at the head is not part of the chain
    assert [n.id for n in t.split_chain(a.id)] == [a.id, mid.id, last.id]
    assert [n.id for n in t.split_chain(mid.id)] == [mid.id, last.id]
    assert t.original_tokens(a.id) == [10, 11, 12, 13, 14]
    assert t.split_chain(a.id)[-1].end == "eos"


def test_split_rejects_boundaries():
    t = make_tree()
    a = model_node(t, None, [10, 11])
    for at in (0, 2, 5):
        with pytest.raises(TreeError, match="cannot split"):
            t.split(a.id, at, "", "")


def test_steer_prefix_chosen_rejected_follow_splits():
    t = make_tree()
    a = model_node(t, None, [10, 11, 12, 13, 14])
    tail = t.split(a.id, 2, "kl", "mno")
    h = human_node(t, a.id, [30, 31], replaces=tail.id)
    # a later rollback inside the rejected node must not shrink the rejected side
    t.split(tail.id, 1, "m", "no")
    (s,) = t.steers()
    assert s.node is h
    assert s.prefix == [1, 5, 10, 11]
    assert s.chosen == [30, 31]
    assert s.rejected == [12, 13, 14]


def test_discarded_subtree_has_no_steers():
    t = make_tree()
    a = model_node(t, None, [10, 11, 12])
    tail = t.split(a.id, 1, "k", "lm")
    h = human_node(t, a.id, [30], replaces=tail.id)
    b = model_node(t, h.id, [40, 41])
    tail2 = t.split(b.id, 1, "o", "p")
    h2 = human_node(t, b.id, [50], replaces=tail2.id)
    assert [s.node.id for s in t.steers()] == [h.id, h2.id]
    t.discarded.append(h.id)
    assert t.is_discarded(h2.id)
    assert t.steers() == []
    assert len(t.steers(include_discarded=True)) == 2


def test_pick_and_append_nodes():
    t = make_tree()
    a = model_node(t, None, [10, 11])
    tail = t.split(a.id, 1, "k", "l")
    p = human_node(t, a.id, [12], replaces=tail.id, kind="pick")
    ap = human_node(t, p.id, [13], kind="append")
    assert [s.node.id for s in t.steers()] == [p.id]
    assert not ap.is_steer
    assert {n.id for n in t.leaves()} == {tail.id, ap.id}


def test_add_checks_parent_and_replaces():
    t = make_tree()
    a = model_node(t, None, [10])
    with pytest.raises(TreeError, match="parent exists"):
        t.add(Node(id="zz", parent="nope", author="model", kind="generated", tokens=[1], text="x"))
    with pytest.raises(TreeError, match="replaces names a model sibling"):
        human_node(t, a.id, [3], replaces=a.id)  # a is the parent, not a sibling


# -- loader invariants: each gives file, node and rule ---------------------------------


def valid_dict() -> dict:
    t = make_tree()
    a = model_node(t, None, [10, 11, 12])
    tail = t.split(a.id, 1, "k", "lm")
    human_node(t, a.id, [30], replaces=tail.id)
    return json.loads(dumps_tree(t))


def _break(mutate):
    d = valid_dict()
    mutate(d)
    with pytest.raises(TreeError) as ei:
        SteerTree.from_dict(d, source="tasks/t1.json")
    return ei.value


@pytest.mark.parametrize(
    "mutate, rule, node",
    [
        (lambda d: d.update(format="other"), "format", None),
        (lambda d: d.update(version=2), "version", None),
        (lambda d: d.update(version="1"), "version", None),
        (lambda d: d["nodes"][1].update(id="n1"), "unique ids", "n1"),
        (lambda d: d["nodes"][1].update(parent="n99"), "parent exists", "n2"),
        (lambda d: d["nodes"][0].update(parent="n2"), "no cycles", None),
        (lambda d: d["nodes"][2].update(replaces="n1"), "replaces names a model sibling", "n3"),
        (lambda d: d["nodes"][2].update(replaces="n77"), "replaces names a model sibling", "n3"),
        (lambda d: d["nodes"][0].update(logprobs=[-1.0, -2.0]), "len(logprobs) == len(tokens)", "n1"),
        (lambda d: d["nodes"][1]["tokens"].__setitem__(0, 100), "token id < n_vocab", "n2"),
        (lambda d: d["nodes"][1]["tokens"].__setitem__(0, -3), "token id < n_vocab", "n2"),
        (lambda d: d["prompt"].update(tokens=[1, 100000]), "token id < n_vocab", None),
        (lambda d: d["nodes"][0].update(author="robot"), "author", "n1"),
        (lambda d: d["nodes"][0].update(kind="correction"), "kind", "n1"),
        (lambda d: d["nodes"][0].update(end="exploded"), "end", "n1"),
        (lambda d: d["nodes"][0].update(tokens="abc"), "token ids", "n1"),
        (lambda d: d.update(accepted=["n42"]), "accepted ids exist", None),
        (lambda d: d.update(discarded=[3]), "discarded ids exist", None),
        (lambda d: d.pop("prompt"), "required field", None),
    ],
)
def test_each_invariant_has_its_own_message(mutate, rule, node):
    err = _break(mutate)
    assert err.rule == rule
    assert err.file == "tasks/t1.json"
    assert "tasks/t1.json" in str(err) and rule in str(err)
    if node is not None:
        assert err.node == node and repr(node) in str(err)


def test_cycle_names_a_node_on_the_cycle():
    err = _break(lambda d: d["nodes"][0].update(parent="n2"))
    assert err.node in {"n1", "n2"}


def test_unknown_fields_are_preserved():
    d = valid_dict()
    d["x_team"] = {"a": 1}
    d["nodes"][0]["x_note"] = "keep me"
    t = SteerTree.from_dict(copy.deepcopy(d))
    out = t.to_dict()
    assert out["x_team"] == {"a": 1}
    assert out["nodes"][0]["x_note"] == "keep me"


# -- property: random operation sequences keep the tree valid and round-trip ------------

ops = st.lists(
    st.tuples(
        st.sampled_from(["gen", "split", "correct", "pick", "discard"]),
        st.integers(0, 10_000),
        st.lists(st.integers(3, 99), min_size=1, max_size=6),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_random_operations_keep_tree_valid(seq):
    t = make_tree()
    for op, r, toks in seq:
        nodes = t.nodes
        if op == "gen" or not nodes:
            parent = nodes[r % len(nodes)].id if nodes and r % 3 else None
            model_node(t, parent, toks)
        elif op == "split":
            splittable = [n for n in nodes if len(n.tokens) > 1]
            if splittable:
                n = splittable[r % len(splittable)]
                at = 1 + r % (len(n.tokens) - 1)
                t.split(n.id, at, n.text[:at], n.text[at:])
        elif op in ("correct", "pick"):
            n = nodes[r % len(nodes)]
            sibs = [c for c in t.children(n.parent) if c.is_model and c.id != n.id]
            rep = n.id if n.is_model else (sibs[0].id if sibs else None)
            human_node(t, n.parent, toks[:1] if op == "pick" else toks, replaces=rep, kind="pick" if op == "pick" else "correction")
        elif op == "discard":
            t.discarded.append(nodes[r % len(nodes)].id)
    text = dumps_tree(t)
    again = SteerTree.from_dict(json.loads(text))
    assert again.to_dict() == t.to_dict()
    assert dumps_tree(again) == text
    for include in (False, True):
        naive = [n.id for n in t.nodes if n.is_steer and (include or not t.is_discarded(n.id))]
        steers = t.steers(include_discarded=include)
        assert [s.node.id for s in steers] == naive
        for s in steers:
            assert s.prefix == t.prompt_tokens + t.path_tokens(s.node.parent)
            assert s.rejected[: len(s.replaced.tokens)] == s.replaced.tokens


def test_a_second_earlier_split_keeps_the_tail_chain():
    """Roll back inside a node, steer, then roll back inside the same node at an earlier token:
    the first tail now hangs under the second tail, so its ``split_from`` must name that tail.
    It used to keep naming the head, which cut ``original_tokens`` (the rejected side of the
    second steer, and where undo returns) at the second tail."""
    t = make_tree()
    a = model_node(t, None, [10, 11, 12, 13, 14], end="eos")
    t1 = t.split(a.id, 3, "klm", "no")
    h1 = human_node(t, a.id, [30], replaces=t1.id)
    t2 = t.split(a.id, 1, "k", "lm")
    h2 = human_node(t, a.id, [31, 32], replaces=t2.id)
    assert t1.parent == t2.id and t1.extra["split_from"] == t2.id
    assert t.original_tokens(a.id) == [10, 11, 12, 13, 14]
    assert t.original_tokens(t2.id) == [11, 12, 13, 14]
    steers = {s.node.id: s for s in t.steers()}
    assert steers[h2.id].rejected == [11, 12, 13, 14]  # the whole cut continuation (was [11, 12])
    assert steers[h1.id].prefix[-3:] == [10, 11, 12] and steers[h1.id].rejected == [13, 14]
    again = SteerTree.from_dict(json.loads(dumps_tree(t)))
    assert again.original_tokens(a.id) == [10, 11, 12, 13, 14]


def test_a_file_with_the_old_stale_split_from_still_reads_whole():
    """Files written before that fix hold a tail whose ``split_from`` names its grandparent;
    loading repairs it (a split tail is always its head's child)."""
    t = make_tree()
    a = model_node(t, None, [10, 11, 12, 13, 14], end="eos")
    t1 = t.split(a.id, 3, "klm", "no")
    t2 = t.split(a.id, 1, "k", "lm")
    d = json.loads(dumps_tree(t))
    for n in d["nodes"]:
        if n["id"] == t1.id:
            n["split_from"] = a.id  # as the old code left it
    old = SteerTree.from_dict(d)
    assert old.original_tokens(a.id) == [10, 11, 12, 13, 14]
    assert old.node(t1.id).extra["split_from"] == t2.id
