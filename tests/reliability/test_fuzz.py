"""Property-based fuzzing (hypothesis): the tree loader and Session operation sequences.

Only the project's own errors may escape: TreeError/StoreError from the loader, the
SessionError family (``steer_tui.core.session_errors.SessionErrors``) from a Session. Whatever the
loader accepts, everything downstream (show, list, export rows, steers) handles it.
``STEER_FUZZ_EXAMPLES`` scales the number of examples (default 100).
"""

from __future__ import annotations

import copy
import json
import os
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steer_tui.core.export import dpo_rows, kto_rows, sft_rows
from steer_tui.core.fake_engine import FakeEngine
from steer_tui.core.render import render_tree
from steer_tui.core.safe_text import is_inert
from steer_tui.core.session import Session
from steer_tui.core.session_errors import SessionErrors
from steer_tui.core.store import Store, StoreError, dumps_tree, load_tree
from steer_tui.core.tree import SteerTree, TreeError

from .conftest import build_session

N = int(os.environ.get("STEER_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=N, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["n1", "n2", "n3", "model", "human", "generated", "correction", "pick", "append", "cut", "eos", "steer-tree",
                     "\x1b]52;c;ZXZpbA==\x07", "\x1b[2J", "[bold]x[/bold]", "\u202e", "\x9b31m"]),
)
json_values = st.recursive(scalars, lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)), max_leaves=20)


def _valid() -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with build_session(d) as s:
            return json.loads(s.store.task_path(s.task_id).read_text(encoding="utf-8"))


VALID = _valid()


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


ALL_PATHS = [p for p in _paths(VALID) if p]
# top-level fields, model/prompt/sampling keys and node fields: where type confusion bites
SHORT_PATHS = [p for p in ALL_PATHS if len(p) <= 2 or (p[0] == "nodes" and len(p) == 3)]


@st.composite
def mutated_trees(draw):
    d = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(SHORT_PATHS if draw(st.booleans()) else ALL_PATHS))
        parent = d
        try:
            for k in path[:-1]:
                parent = parent[k]
            key = path[-1]
            op = draw(st.sampled_from(["set", "delete", "swap-type", "dup"]))
            if op == "delete":
                del parent[key]
            elif op == "dup" and isinstance(parent, list):
                parent.append(copy.deepcopy(parent[key]))
            elif op == "swap-type":
                parent[key] = draw(st.sampled_from([None, 0, -1, 1.5, "", "n1", [], {}, True, 10**30, float("inf")]))
            else:
                parent[key] = draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue
    return d


def _downstream(tree: SteerTree) -> None:
    """Everything that consumes a loaded tree must cope with whatever the loader accepted."""
    out = render_tree(tree)
    assert is_inert(out), "show output holds terminal control characters"
    for s in tree.steers(include_discarded=True):
        assert s.chosen == s.node.tokens
    for rows in (sft_rows(tree), dpo_rows(tree, None), kto_rows(tree, None)):
        for row in rows:
            json.dumps(row)
    dumps_tree(tree)
    SteerTree.from_dict(tree.to_dict())  # what loads, saves and loads again


@FUZZ
@given(json_values)
def test_loader_random_json(data):
    try:
        tree = SteerTree.from_dict(data, source="fuzz.json")
    except TreeError:
        return
    _downstream(tree)


@FUZZ
@given(mutated_trees())
def test_loader_mutated_valid_trees(data):
    try:
        tree = SteerTree.from_dict(data, source="fuzz.json")
    except TreeError as exc:
        assert "fuzz.json" in str(exc)
        return
    _downstream(tree)


@settings(max_examples=max(20, N // 4), deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.binary(max_size=300), st.integers(0, 4000))
def test_loader_bytes(tmp_path_factory, junk, cut):
    """Files: random bytes, and a valid file cut short or with bytes spliced in."""
    d = tmp_path_factory.mktemp("fz")
    good = json.dumps(VALID).encode()
    for i, blob in enumerate((junk, good[:cut], good[:cut] + junk + good[cut:])):
        p = d / f"{i}.json"
        p.write_bytes(blob)
        try:
            tree = load_tree(p)
        except (TreeError, StoreError) as exc:
            assert str(p) in str(exc)
            continue
        _downstream(tree)


# ------------------------------------------------------------------ Session operations

texts = st.text(alphabet=st.sampled_from(list(string.ascii_letters + " .,\n\t") + ["é", "🙂", "ש", "\u0301", "\x1b", "[", "]"]), max_size=12)
ops = st.lists(
    st.one_of(
        st.tuples(st.just("generate"), st.integers(0, 12)),
        st.tuples(st.just("rollback"), st.integers(-2, 60)),
        st.tuples(st.just("correct"), texts),
        st.tuples(st.just("pick"), st.integers(-1, 300)),
        st.tuples(st.sampled_from(["undo", "redo", "accept", "resample", "save", "reopen", "stop-early"]), st.none()),
        st.tuples(st.sampled_from(["goto", "switch"]), st.integers(0, 40)),
    ),
    max_size=25,
)


@settings(max_examples=max(20, N // 3), deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(ops)
def test_session_operation_sequences(tmp_path_factory, seq):
    store = Store(tmp_path_factory.mktemp("sess"))
    eng = FakeEngine(n_ctx=96)
    s = Session.create(store=store, prompt="fruits", model=eng, sampling={"temperature": 0.7, "seed": 5, "max_tokens": 20}, task_id="fz")
    try:
        for op, arg in seq:
            try:
                if op == "generate":
                    list(s.generate(max_tokens=arg or None))
                elif op == "stop-early":
                    g = s.generate(max_tokens=10)
                    next(g, None)
                    g.close()
                elif op == "rollback":
                    s.rollback(arg)
                elif op == "correct":
                    s.correct(arg)
                elif op == "pick":
                    s.pick(arg)
                elif op in ("goto", "switch"):
                    ids = [n.id for n in s.tree.nodes]
                    target = ids[arg % len(ids)] if ids else None
                    if op == "goto":
                        s.goto(target)
                    elif target:
                        s.switch_branch(target)
                elif op == "reopen":
                    s.close()
                    s = Session.open(store=store, task_id="fz", model=eng)
                else:
                    getattr(s, op)()
            except SessionErrors:
                pass
            s.tree.validate()
            assert s.response_tokens == s.tree.path_tokens(s.end)
            assert "".join(t.text for t in s.tokens_view()) == s.response_text or "\ufffd" in s.response_text
        s.save()
        on_disk = load_tree(store.task_path("fz"))
        assert [n.to_dict() for n in on_disk.nodes] == [n.to_dict() for n in s.tree.nodes]
        _downstream(on_disk)
    finally:
        s.close()
