"""core.stats: the steer numbers the stats screen and the status bar show, computed in
O(nodes), must agree with the tree's own (slower) ``steers()``."""

from __future__ import annotations

from steer_tui.core.fake_engine import FakeEngine
from steer_tui.core.session import Session
from steer_tui.core.stats import count_steers, rejected_text, steer_rows


def test_steer_rows_and_count_match_the_tree(tmp_path):
    store = tmp_path / "store"
    with Session.create(store=store, prompt="fruits", model=FakeEngine(), sampling={"temperature": 0, "seed": 1}) as s:
        list(s.generate())
        for at, text in ((20, "X"), (12, "Kiwi"), (5, "pp"), (10, "Q")):
            s.rollback(at)
            s.correct(text)
            list(s.generate(max_tokens=8))
        s.undo()
        tree = s.tree
        n_prompt = len(tree.prompt_tokens)
        expected = {st.node.id: (len(st.prefix) - n_prompt, tree.is_discarded(st.node.id)) for st in tree.steers(include_discarded=True)}
        rows = {r.node_id: (r.position, r.discarded) for r in steer_rows(tree)}
        assert rows == expected and len(rows) == 4
        assert count_steers(tree) == len(tree.steers()) == 3
        # the rejected side as the model wrote it, across the splits later rollbacks made
        for st in tree.steers(include_discarded=True):
            assert rejected_text(tree, st.replaced.id) == s.engine.detokenize(st.rejected)


